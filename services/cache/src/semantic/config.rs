//! The `[cache.semantic]` configuration section.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;
use switchboard_config::ConfigError;
use switchboard_embed::{EmbedOptions, default_embed_dir};

/// The default similarity threshold of a route that opts in (see docs/SEMANTIC_CACHE.md for how
/// it was chosen).
pub const DEFAULT_THRESHOLD: f32 = 0.99;

/// `[cache.semantic]`: the semantic cache. Off unless `enabled` and a route opts in.
///
/// ```toml
/// [cache.semantic]
/// enabled = true            # load the embedding model at startup (routes still opt in one by one)
/// model_dir = ""            # empty: $SWITCHBOARD_EMBED_DIR or .cache/embed, + models/all-MiniLM-L6-v2
/// ort_library = ""          # empty: the same dir + lib/libonnxruntime.so
/// max_batch = 32            # most texts per model call (concurrent lookups are micro-batched)
/// max_wait_us = 1000        # how long the first queued text waits for company
/// intra_threads = 0         # ONNX Runtime threads; 0: one per core
/// top_k = 4                 # nearest entries checked by the near-miss guard, best first
/// max_entries_per_scope = 10000
///
/// [cache.semantic.routes.fast]   # the route (requested model) "fast" opts in
/// threshold = 0.99          # lowest cosine similarity served
/// near_miss_guard = true    # numbers, negation, antonyms, names, word order and length must agree
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SemanticConfig {
    /// Load the model and serve semantic hits on the routes that opt in.
    pub enabled: bool,
    /// Model directory (ONNX + tokenizer files); empty: the default model in the embed dir.
    pub model_dir: String,
    /// `libonnxruntime.so`; empty: `lib/libonnxruntime.so` in the embed dir.
    pub ort_library: String,
    /// Most texts per model call.
    pub max_batch: usize,
    /// Longest wait for more texts after the first, microseconds.
    pub max_wait_us: u64,
    /// ONNX Runtime intra-op threads; 0: its default.
    pub intra_threads: usize,
    /// Nearest entries a lookup considers.
    pub top_k: usize,
    /// Most live entries one scope's index keeps (the oldest go first).
    pub max_entries_per_scope: usize,
    /// Routes (requested model names) that opt in, with their own threshold.
    pub routes: BTreeMap<String, RouteConfig>,
}

/// `[cache.semantic.routes.<route>]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// Whether this route serves semantic hits (an entry can switch a route off).
    pub enabled: bool,
    /// Lowest cosine similarity served, in (0, 1].
    pub threshold: f32,
    /// Turn near misses (numbers, negation, antonyms, names, word order, length) into misses.
    pub near_miss_guard: bool,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            enabled: true,
            threshold: DEFAULT_THRESHOLD,
            near_miss_guard: true,
        }
    }
}

impl Default for SemanticConfig {
    fn default() -> Self {
        SemanticConfig {
            enabled: false,
            model_dir: String::new(),
            ort_library: String::new(),
            max_batch: 32,
            max_wait_us: 1000,
            intra_threads: 0,
            top_k: 4,
            max_entries_per_scope: 10_000,
            routes: BTreeMap::new(),
        }
    }
}

impl SemanticConfig {
    /// Checks every value; errors name the field by its dotted path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch == 0 || self.max_batch > 1024 {
            return Err(ConfigError::invalid(
                "cache.semantic.max_batch",
                "must be between 1 and 1024",
            ));
        }
        if self.max_wait_us > 100_000 {
            return Err(ConfigError::invalid(
                "cache.semantic.max_wait_us",
                "must be at most 100000 (0.1 s)",
            ));
        }
        if self.top_k == 0 || self.top_k > 64 {
            return Err(ConfigError::invalid(
                "cache.semantic.top_k",
                "must be between 1 and 64",
            ));
        }
        if self.max_entries_per_scope == 0 {
            return Err(ConfigError::invalid(
                "cache.semantic.max_entries_per_scope",
                "must be at least 1",
            ));
        }
        for (route, config) in &self.routes {
            if route.is_empty() {
                return Err(ConfigError::invalid(
                    "cache.semantic.routes",
                    "a route name must not be empty",
                ));
            }
            if !(config.threshold > 0.0 && config.threshold <= 1.0) {
                return Err(ConfigError::invalid(
                    format!("cache.semantic.routes.{route}.threshold"),
                    "must be in (0, 1]",
                ));
            }
        }
        Ok(())
    }

    /// The embedding options, with empty paths resolved to the defaults.
    pub fn embed_options(&self) -> EmbedOptions {
        let mut options = EmbedOptions::in_dir(&default_embed_dir());
        if !self.model_dir.is_empty() {
            options.model_dir = PathBuf::from(&self.model_dir);
        }
        if !self.ort_library.is_empty() {
            options.ort_library = PathBuf::from(&self.ort_library);
        }
        options.max_batch = self.max_batch;
        options.max_wait = Duration::from_micros(self.max_wait_us);
        options.intra_threads = (self.intra_threads > 0).then_some(self.intra_threads);
        options
    }

    /// The policy of `route`, if it opts in.
    pub fn route(&self, route: &str) -> Option<&RouteConfig> {
        self.routes.get(route).filter(|r| r.enabled)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use switchboard_config::Source;

    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Cache {
        semantic: SemanticConfig,
    }

    fn parse(text: &str) -> Result<SemanticConfig, ConfigError> {
        let cache: Cache = Source::from_toml(text)?.section("cache")?;
        cache.semantic.validate()?;
        Ok(cache.semantic)
    }

    #[test]
    fn the_documented_example_parses() {
        let text = "[cache.semantic]\nenabled = true\nmodel_dir = \"\"\nort_library = \"\"\n\
                    max_batch = 32\nmax_wait_us = 1000\nintra_threads = 0\ntop_k = 4\n\
                    max_entries_per_scope = 10000\n\
                    [cache.semantic.routes.fast]\nthreshold = 0.99\nnear_miss_guard = true\n";
        let config = parse(text).unwrap();
        assert!(config.enabled);
        assert_eq!(config.route("fast"), Some(&RouteConfig::default()));
        assert_eq!(config.route("smart"), None);
        assert_eq!(parse("").unwrap(), SemanticConfig::default());
    }

    #[test]
    fn errors_name_the_bad_field() {
        for (text, path) in [
            (
                "[cache.semantic]\nmax_batch = 0\n",
                "cache.semantic.max_batch",
            ),
            ("[cache.semantic]\ntop_k = 0\n", "cache.semantic.top_k"),
            (
                "[cache.semantic]\nmax_wait_us = 1000000\n",
                "cache.semantic.max_wait_us",
            ),
            (
                "[cache.semantic]\nmax_entries_per_scope = 0\n",
                "cache.semantic.max_entries_per_scope",
            ),
            (
                "[cache.semantic.routes.fast]\nthreshold = 1.5\n",
                "cache.semantic.routes.fast.threshold",
            ),
            (
                "[cache.semantic.routes.fast]\nthreshold = 0\n",
                "cache.semantic.routes.fast.threshold",
            ),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(&format!("`{path}")), "{text}: {error}");
        }
    }

    #[test]
    fn paths_default_to_the_embed_dir_and_can_be_overridden() {
        let options = SemanticConfig::default().embed_options();
        assert!(options.model_dir.ends_with("models/all-MiniLM-L6-v2"));
        assert!(options.ort_library.ends_with("lib/libonnxruntime.so"));
        let options = SemanticConfig {
            model_dir: "/m".into(),
            ort_library: "/l.so".into(),
            intra_threads: 1,
            ..Default::default()
        }
        .embed_options();
        assert_eq!(options.model_dir, PathBuf::from("/m"));
        assert_eq!(options.ort_library, PathBuf::from("/l.so"));
        assert_eq!(options.intra_threads, Some(1));
    }
}
