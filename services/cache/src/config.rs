//! The `[cache]` configuration section.

use serde::Deserialize;
use switchboard_config::ConfigError;

use crate::semantic::SemanticConfig;

/// The `[cache]` section.
///
/// ```toml
/// [cache]
/// grpc_addr = "127.0.0.1:50053"
/// metrics_addr = "127.0.0.1:9467" # Prometheus /metrics (unset: not served)
/// default_ttl_secs = 3600   # used when a Store asks for ttl_seconds = 0
/// max_ttl_secs = 86400      # longer requested TTLs are clamped to this
/// max_entries = 100000      # bound of the in-memory store (each replica's local index)
/// shared = true             # entries shared by every replica through NATS JetStream ([nats])
/// stream = ""               # empty: <NATS SUBJECT PREFIX>_CACHE (SWITCHBOARD_CACHE by default)
/// stream_max_bytes = 1073741824  # bound of the shared stream (oldest dropped); 0 = unlimited
/// sync_timeout_secs = 30    # a starting replica loads the stream within this, or fails to start
/// publish_timeout_ms = 5000 # how long a Store / Purge waits for JetStream
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server binds (`127.0.0.1:0` picks a free port).
    pub grpc_addr: String,
    /// Address of the Prometheus `/metrics` HTTP endpoint (lookups by outcome, stores, entries,
    /// evictions, replication); unset: not served.
    pub metrics_addr: Option<String>,
    /// TTL of entries stored with `ttl_seconds = 0`.
    pub default_ttl_secs: u64,
    /// Upper bound of any entry's TTL.
    pub max_ttl_secs: u64,
    /// Most entries kept in memory; the least useful are evicted beyond it.
    pub max_entries: u64,
    /// Share entries between replicas through NATS JetStream (the `[nats]` section).
    pub shared: bool,
    /// Name of the shared stream; empty: derived from `nats.subject_prefix`.
    pub stream: String,
    /// Most bytes the shared stream keeps (the oldest entries are dropped beyond it); 0: no bound.
    pub stream_max_bytes: u64,
    /// How long a starting replica may take to connect and load the shared entries.
    pub sync_timeout_secs: u64,
    /// How long a store or a purge waits for JetStream.
    pub publish_timeout_ms: u64,
    /// The semantic cache (`[cache.semantic]`, see `crate::semantic::config`).
    pub semantic: SemanticConfig,
    /// Largest gRPC request message the server decodes (bytes; tonic's default is 4 MiB): at least
    /// what the gateway sends, twice `gateway.max_body_bytes` (`switchboard check-config` checks).
    pub max_message_bytes: usize,
}

/// The smallest `max_message_bytes` accepted (tonic's own default).
const MIN_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_addr: "127.0.0.1:50053".to_owned(),
            metrics_addr: None,
            default_ttl_secs: 3600,
            max_ttl_secs: 86_400,
            max_entries: 100_000,
            shared: true,
            stream: String::new(),
            stream_max_bytes: 1 << 30,
            sync_timeout_secs: 30,
            publish_timeout_ms: 5000,
            semantic: SemanticConfig::default(),
            max_message_bytes: switchboard_grpc::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl Config {
    /// Checks every value; errors name the field by its dotted path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.grpc_addr.trim().is_empty() {
            return Err(ConfigError::invalid("cache.grpc_addr", "must not be empty"));
        }
        if let Some(addr) = &self.metrics_addr {
            addr.parse::<std::net::SocketAddr>().map_err(|e| {
                ConfigError::invalid("cache.metrics_addr", format!("not a socket address: {e}"))
            })?;
        }
        if self.max_message_bytes < MIN_MESSAGE_BYTES {
            return Err(ConfigError::invalid(
                "cache.max_message_bytes",
                format!("must be at least {MIN_MESSAGE_BYTES} (4 MiB)"),
            ));
        }
        if self.max_ttl_secs == 0 {
            return Err(ConfigError::invalid(
                "cache.max_ttl_secs",
                "must be at least 1",
            ));
        }
        if self.default_ttl_secs == 0 {
            return Err(ConfigError::invalid(
                "cache.default_ttl_secs",
                "must be at least 1",
            ));
        }
        if self.default_ttl_secs > self.max_ttl_secs {
            return Err(ConfigError::invalid(
                "cache.default_ttl_secs",
                format!("must not exceed cache.max_ttl_secs ({})", self.max_ttl_secs),
            ));
        }
        if self.max_entries == 0 {
            return Err(ConfigError::invalid(
                "cache.max_entries",
                "must be at least 1",
            ));
        }
        if self.stream.chars().any(|c| {
            c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_control()
        }) {
            return Err(ConfigError::invalid(
                "cache.stream",
                "must not contain whitespace, `.`, `*`, `>`, `/` or `\\`",
            ));
        }
        if i64::try_from(self.stream_max_bytes).is_err() {
            return Err(ConfigError::invalid(
                "cache.stream_max_bytes",
                "must fit in a signed 64-bit integer",
            ));
        }
        if self.sync_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "cache.sync_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.publish_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "cache.publish_timeout_ms",
                "must be at least 1",
            ));
        }
        self.semantic.validate()?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use switchboard_config::Source;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = Source::from_toml(text)?.section("cache")?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_and_the_documented_example_are_valid() {
        assert_eq!(parse("").unwrap(), Config::default());
        let text = "[cache]\ngrpc_addr = \"127.0.0.1:50053\"\ndefault_ttl_secs = 3600\n\
                    max_ttl_secs = 86400\nmax_entries = 100000\nshared = true\nstream = \"\"\n\
                    stream_max_bytes = 1073741824\nsync_timeout_secs = 30\n\
                    publish_timeout_ms = 5000\n";
        assert_eq!(parse(text).unwrap(), Config::default());
    }

    #[test]
    fn errors_name_the_bad_field() {
        let cases = [
            ("[cache]\ndefault_ttl_secs = 0\n", "cache.default_ttl_secs"),
            (
                "[cache]\ndefault_ttl_secs = 100\nmax_ttl_secs = 10\n",
                "cache.default_ttl_secs",
            ),
            ("[cache]\nmax_ttl_secs = 0\n", "cache.max_ttl_secs"),
            ("[cache]\nmax_entries = 0\n", "cache.max_entries"),
            ("[cache]\ngrpc_addr = \" \"\n", "cache.grpc_addr"),
            ("[cache]\nmetrics_addr = \"nope\"\n", "cache.metrics_addr"),
            ("[cache]\nmax_entries = -1\n", "cache.max_entries"),
            ("[cache]\nttl = 5\n", "cache"),
            ("[cache]\nstream = \"a.b\"\n", "cache.stream"),
            (
                "[cache]\nsync_timeout_secs = 0\n",
                "cache.sync_timeout_secs",
            ),
            (
                "[cache]\npublish_timeout_ms = 0\n",
                "cache.publish_timeout_ms",
            ),
        ];
        for (text, path) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(&format!("`{path}")), "{text}: {error}");
        }
    }
}
