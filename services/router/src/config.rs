//! The `[router]` configuration section.

use std::{collections::BTreeMap, net::SocketAddr};

use secrecy::SecretString;
use serde::Deserialize;
use switchboard_config::ConfigError;

/// The `[router]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC listen address.
    pub grpc_addr: String,
    /// Timeout of one attempt (for a stream: until the first content-bearing chunk, and between
    /// chunks).
    pub attempt_timeout_ms: u64,
    /// Extra tries of the same target on retryable errors.
    pub max_retries: u32,
    /// Base of the exponential backoff between tries of the same target (jitter is added).
    pub retry_backoff_ms: u64,
    /// Cap on a provider's `Retry-After` that is honoured before retrying.
    pub max_retry_after_ms: u64,
    /// Connect timeout of provider HTTP connections.
    pub connect_timeout_ms: u64,
    /// Overall deadline of one request, all attempts and backoff included (a shorter caller
    /// `grpc-timeout` wins).
    pub request_timeout_ms: u64,
    /// Providers by name.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Routes (virtual models), each an ordered fallback chain of targets.
    pub routes: Vec<RouteConfig>,
    /// Circuit breaker and key cooldowns.
    pub breaker: BreakerConfig,
    /// Address of the Prometheus `/metrics` HTTP endpoint; unset: not served.
    pub metrics_addr: Option<String>,
    /// How often the configuration file's modification time is checked for a reload (SIGHUP
    /// always reloads); 0: never. Read at start only.
    pub config_poll_ms: u64,
    /// Largest gRPC request message the server decodes (bytes; tonic's default is 4 MiB): at least
    /// what the gateway sends, twice `gateway.max_body_bytes` (`switchboard check-config` checks).
    /// Read at start only.
    pub max_message_bytes: usize,
}

/// The smallest `max_message_bytes` accepted (tonic's own default).
const MIN_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_addr: "127.0.0.1:50054".to_owned(),
            attempt_timeout_ms: 60_000,
            max_retries: 1,
            retry_backoff_ms: 50,
            max_retry_after_ms: 5_000,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 600_000,
            providers: BTreeMap::new(),
            routes: Vec::new(),
            breaker: BreakerConfig::default(),
            metrics_addr: None,
            config_poll_ms: 5_000,
            max_message_bytes: switchboard_grpc::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// The wire protocol of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI and OpenAI-compatible chat completions (vLLM, Ollama, Groq, Mistral, DeepSeek,
    /// OpenRouter, Together, ...): `POST {base_url}/chat/completions`, `Authorization: Bearer`.
    #[default]
    Openai,
    /// Azure OpenAI: `POST {base_url}/openai/deployments/{model}/chat/completions?api-version=…`
    /// (the target's model is the deployment name), `api-key` header; `api_version` is required.
    Azure,
    /// Anthropic Messages: `POST {base_url}/v1/messages`, `x-api-key` and `anthropic-version`
    /// (`api_version`, default `2023-06-01`) headers.
    Anthropic,
    /// Google Gemini: `POST {base_url}/{api_version}/models/{model}:generateContent` (streaming:
    /// `:streamGenerateContent?alt=sse`; `api_version` defaults to `v1beta`), `x-goog-api-key`.
    Gemini,
}

impl ProviderKind {
    /// The OpenTelemetry `gen_ai.system` value.
    pub fn gen_ai_system(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Azure => "az.ai.openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gcp.gemini",
        }
    }
}

/// The request field that carries the output-token limit (`SamplingParams.max_tokens`) to an
/// OpenAI-style provider (kinds `openai` and `azure`), `[router.providers.<name>] max_tokens_field`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    /// `max_tokens`: the only one OpenAI-compatible servers (vLLM, Ollama, Groq, Mistral,
    /// DeepSeek, OpenRouter, Together, ...) know; OpenAI's reasoning models reject it.
    MaxTokens,
    /// `max_completion_tokens`: OpenAI's current field for every chat model, required by its
    /// reasoning models (o1, o3, o4-mini, gpt-5), and Azure OpenAI's since api-version 2024-09-01.
    MaxCompletionTokens,
}

impl MaxTokensField {
    /// The JSON field name.
    pub fn name(self) -> &'static str {
        match self {
            MaxTokensField::MaxTokens => "max_tokens",
            MaxTokensField::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// The first Azure OpenAI api-version that takes `max_completion_tokens`.
const AZURE_MAX_COMPLETION_TOKENS_SINCE: &str = "2024-09-01";

/// Whether `base_url` is OpenAI's own API (`api.openai.com`), not an OpenAI-compatible server.
pub(crate) fn is_openai_itself(base_url: &str) -> bool {
    reqwest::Url::parse(base_url)
        .ok()
        .and_then(|url| url.host_str().map(str::to_ascii_lowercase))
        .is_some_and(|host| host == "api.openai.com")
}

/// One provider (`[router.providers.<name>]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// Wire protocol.
    pub kind: ProviderKind,
    /// Base URL: `https://api.openai.com/v1` (openai), `https://RESOURCE.openai.azure.com` (azure),
    /// `https://api.anthropic.com` (anthropic), `https://generativelanguage.googleapis.com` (gemini).
    pub base_url: String,
    /// Azure `api-version` (required), Anthropic `anthropic-version` header, Gemini API version path
    /// segment; not used by `openai`.
    pub api_version: Option<String>,
    /// `max_tokens` sent to Anthropic (which requires it) when the request sets none.
    pub default_max_tokens: u32,
    /// Kinds `openai` and `azure` only: the field that carries a request's output-token limit,
    /// `"max_tokens"` or `"max_completion_tokens"`. Unset: `max_completion_tokens` for OpenAI
    /// itself (kind `openai` with a `base_url` on `api.openai.com`) and for `azure` (unless its
    /// `api_version` is a date before 2024-09-01, which knows only `max_tokens`); `max_tokens`
    /// for any other `openai` base URL (OpenAI-compatible servers). Set it for a proxy in front of
    /// OpenAI (`max_completion_tokens`) or a server that knows only `max_tokens`.
    pub max_tokens_field: Option<MaxTokensField>,
    /// Environment variable holding the API key (read once at start by [`Config::resolve_api_keys`]).
    pub api_key_env: Option<String>,
    /// The API key itself; never read from the file, set in code or resolved from `api_key_env`.
    #[serde(skip)]
    pub api_key: Option<SecretString>,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            kind: ProviderKind::Openai,
            base_url: String::new(),
            api_version: None,
            default_max_tokens: 4096,
            max_tokens_field: None,
            api_key_env: None,
            api_key: None,
        }
    }
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_version", &self.api_version)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("max_tokens_field", &self.max_tokens_field)
            .field("api_key_env", &self.api_key_env)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl ProviderConfig {
    /// An OpenAI-compatible provider at `base_url` with an optional key (tests, embedders).
    pub fn openai(base_url: impl Into<String>, api_key: Option<&str>) -> Self {
        Self::of_kind(ProviderKind::Openai, base_url, api_key)
    }

    /// A provider of `kind` at `base_url` with an optional key and default settings.
    pub fn of_kind(kind: ProviderKind, base_url: impl Into<String>, api_key: Option<&str>) -> Self {
        ProviderConfig {
            kind,
            base_url: base_url.into(),
            api_key: api_key.map(|key| SecretString::from(key.to_owned())),
            ..ProviderConfig::default()
        }
    }

    /// An Azure OpenAI resource at `base_url` with its `api-version`.
    pub fn azure(
        base_url: impl Into<String>,
        api_version: impl Into<String>,
        api_key: Option<&str>,
    ) -> Self {
        ProviderConfig {
            api_version: Some(api_version.into()),
            ..Self::of_kind(ProviderKind::Azure, base_url, api_key)
        }
    }

    /// The field that carries the output-token limit to this provider (kinds `openai` and
    /// `azure`): `max_tokens_field` if set, else the default of its kind, base URL and
    /// api-version (see [`ProviderConfig::max_tokens_field`]).
    pub fn effective_max_tokens_field(&self) -> MaxTokensField {
        if let Some(field) = self.max_tokens_field {
            return field;
        }
        match self.kind {
            ProviderKind::Openai if is_openai_itself(&self.base_url) => {
                MaxTokensField::MaxCompletionTokens
            }
            ProviderKind::Azure => {
                // Dated versions (`2024-06-01`, `2024-08-01-preview`) compare as text; others
                // (`v1`, `preview`, `latest`) are recent.
                let version = self.api_version.as_deref().unwrap_or_default();
                let dated = version.starts_with(|c: char| c.is_ascii_digit());
                if dated && version < AZURE_MAX_COMPLETION_TOKENS_SINCE {
                    MaxTokensField::MaxTokens
                } else {
                    MaxTokensField::MaxCompletionTokens
                }
            }
            _ => MaxTokensField::MaxTokens,
        }
    }

    /// Checks the provider-specific settings; `path` is `router.providers.<name>`.
    fn validate_kind(&self, path: &str) -> Result<(), ConfigError> {
        let version = self.api_version.as_deref();
        match self.kind {
            ProviderKind::Azure if version.is_none_or(str::is_empty) => {
                return Err(ConfigError::invalid(
                    format!("{path}.api_version"),
                    "is required for kind = \"azure\" (e.g. \"2024-10-21\")",
                ));
            }
            ProviderKind::Openai if version.is_some() => {
                return Err(ConfigError::invalid(
                    format!("{path}.api_version"),
                    "is not used by kind = \"openai\"",
                ));
            }
            _ => {}
        }
        if version.is_some_and(|v| v.is_empty() || v.contains(['/', '?', '#', ' '])) {
            return Err(ConfigError::invalid(
                format!("{path}.api_version"),
                "must be non-empty and contain no `/`, `?`, `#` or spaces",
            ));
        }
        if self.max_tokens_field.is_some()
            && !matches!(self.kind, ProviderKind::Openai | ProviderKind::Azure)
        {
            return Err(ConfigError::invalid(
                format!("{path}.max_tokens_field"),
                "is used only by kind = \"openai\" and kind = \"azure\"",
            ));
        }
        if self.default_max_tokens == 0 {
            return Err(ConfigError::invalid(
                format!("{path}.default_max_tokens"),
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

pub use crate::route_config::{
    BreakerConfig, KeyConfig, RouteConfig, RuleConfig, Strategy, TargetConfig,
};

impl Config {
    /// Checks the configuration; errors name the bad field by its dotted path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.grpc_addr.parse::<SocketAddr>().map_err(|e| {
            ConfigError::invalid("router.grpc_addr", format!("not a socket address: {e}"))
        })?;
        if self.attempt_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "router.attempt_timeout_ms",
                "must be greater than 0",
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "router.request_timeout_ms",
                "must be greater than 0",
            ));
        }
        if self.max_message_bytes < MIN_MESSAGE_BYTES {
            return Err(ConfigError::invalid(
                "router.max_message_bytes",
                format!("must be at least {MIN_MESSAGE_BYTES} (4 MiB)"),
            ));
        }
        for (name, provider) in &self.providers {
            let path = format!("router.providers.{name}");
            if name.is_empty() || name.contains('/') {
                return Err(ConfigError::invalid(
                    path,
                    "provider names must be non-empty and contain no `/`",
                ));
            }
            match reqwest::Url::parse(&provider.base_url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                Ok(_) => {
                    return Err(ConfigError::invalid(
                        format!("{path}.base_url"),
                        "must be an http:// or https:// URL with a host",
                    ));
                }
                Err(e) => {
                    return Err(ConfigError::invalid(
                        format!("{path}.base_url"),
                        format!("not a URL: {e}"),
                    ));
                }
            }
            provider.validate_kind(&path)?;
            if provider.api_key_env.as_deref().is_some_and(str::is_empty) {
                return Err(ConfigError::invalid(
                    format!("{path}.api_key_env"),
                    "must not be empty",
                ));
            }
        }
        crate::route_config::validate_routes(self)?;
        Ok(())
    }

    /// Resolves each provider's `api_key_env` through `lookup` (main passes `std::env::var`), unless a
    /// key was set in code. Returns the names of providers whose variable is unset (they run keyless).
    pub fn resolve_api_keys(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Vec<String> {
        let mut missing = Vec::new();
        for (name, provider) in &mut self.providers {
            if provider.api_key.is_some() {
                continue;
            }
            if let Some(var) = &provider.api_key_env {
                match lookup(var).filter(|key| !key.is_empty()) {
                    Some(key) => provider.api_key = Some(SecretString::from(key)),
                    None => missing.push(name.clone()),
                }
            }
        }
        missing.extend(crate::route_config::resolve_key_secrets(
            &mut self.routes,
            &lookup,
        ));
        missing
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use secrecy::ExposeSecret;
    use switchboard_config::Source;

    const EXAMPLE: &str = r#"
[router]
grpc_addr = "127.0.0.1:50054"
attempt_timeout_ms = 60000
max_retries = 1
retry_backoff_ms = 50
[router.providers.fake]
kind = "openai"
base_url = "http://127.0.0.1:9090/v1"
api_key_env = "FAKE_API_KEY"
[router.providers.backup]
base_url = "http://127.0.0.1:9091/v1"
[[router.routes]]
name = "gpt-4o-mini"
targets = [ { provider = "fake", model = "gpt-4o-mini" }, { provider = "backup", model = "gpt-4o-mini" } ]
"#;

    fn example() -> Config {
        Source::from_toml(EXAMPLE)
            .unwrap()
            .section("router")
            .unwrap()
    }

    #[test]
    fn example_parses_and_validates() {
        let config = example();
        config.validate().unwrap();
        assert_eq!(config.routes[0].targets[1].provider, "backup");
        assert_eq!(config.providers["fake"].kind, ProviderKind::Openai);
        assert_eq!(config.max_retry_after_ms, 5_000);
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    fn error_of(config: &Config) -> String {
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_dotted_path() {
        let mut config = example();
        config.routes.push(RouteConfig::new(
            "other",
            vec![TargetConfig::new("nope", "m")],
        ));
        assert!(
            error_of(&config).contains("router.routes[1].targets[0].provider"),
            "{}",
            error_of(&config)
        );

        let mut config = example();
        config.routes.push(config.routes[0].clone());
        assert!(error_of(&config).contains("router.routes[1].name"));

        let mut config = example();
        config.routes[0].targets.clear();
        assert!(error_of(&config).contains("router.routes[0].targets"));

        let mut config = example();
        config.providers.get_mut("backup").unwrap().base_url = "not a url".into();
        assert!(error_of(&config).contains("router.providers.backup.base_url"));

        let mut config = example();
        config.providers.get_mut("backup").unwrap().base_url = "ftp://host/v1".into();
        assert!(error_of(&config).contains("router.providers.backup.base_url"));
    }

    #[test]
    fn unknown_fields_are_rejected_and_api_key_is_not_read_from_the_file() {
        let text = "[router.providers.p]\nbase_url = \"http://x\"\napi_key = \"sk\"\n";
        let error = Source::from_toml(text)
            .unwrap()
            .section::<Config>("router")
            .unwrap_err()
            .to_string();
        assert!(error.contains("router.providers"), "{error}");
    }

    #[test]
    fn provider_kinds_and_their_settings() {
        let text = r#"
[router.providers.az]
kind = "azure"
base_url = "https://res.openai.azure.com"
api_version = "2024-10-21"
[router.providers.claude]
kind = "anthropic"
base_url = "https://api.anthropic.com"
default_max_tokens = 1024
[router.providers.gem]
kind = "gemini"
base_url = "https://generativelanguage.googleapis.com"
"#;
        let config: Config = Source::from_toml(text).unwrap().section("router").unwrap();
        config.validate().unwrap();
        assert_eq!(config.providers["az"].kind, ProviderKind::Azure);
        assert_eq!(config.providers["claude"].default_max_tokens, 1024);
        assert_eq!(config.providers["gem"].kind, ProviderKind::Gemini);
        assert_eq!(config.providers["gem"].default_max_tokens, 4096);

        let mut bad = config.clone();
        bad.providers.get_mut("az").unwrap().api_version = None;
        assert!(error_of(&bad).contains("router.providers.az.api_version"));
        let mut bad = config.clone();
        bad.providers.insert(
            "oa".into(),
            ProviderConfig {
                api_version: Some("v1".into()),
                ..ProviderConfig::openai("http://x/v1", None)
            },
        );
        assert!(error_of(&bad).contains("router.providers.oa.api_version"));
        let mut bad = config.clone();
        bad.providers.get_mut("claude").unwrap().default_max_tokens = 0;
        assert!(error_of(&bad).contains("router.providers.claude.default_max_tokens"));
        let mut bad = config;
        bad.providers.get_mut("gem").unwrap().api_version = Some("v1/../x".into());
        assert!(error_of(&bad).contains("router.providers.gem.api_version"));
    }

    #[test]
    fn the_max_tokens_field_defaults_by_kind_host_and_api_version() {
        use MaxTokensField::{MaxCompletionTokens, MaxTokens};
        let openai = ProviderConfig::openai("https://api.openai.com/v1", None);
        assert_eq!(openai.effective_max_tokens_field(), MaxCompletionTokens);
        let upper = ProviderConfig::openai("https://API.OpenAI.com/v1/", None);
        assert_eq!(upper.effective_max_tokens_field(), MaxCompletionTokens);
        for compatible in [
            "http://localhost:8000/v1",
            "https://api.groq.com/openai/v1",
            "https://openrouter.ai/api/v1",
            "https://api.openai.com.evil.example/v1",
        ] {
            let config = ProviderConfig::openai(compatible, None);
            assert_eq!(
                config.effective_max_tokens_field(),
                MaxTokens,
                "{compatible}"
            );
        }
        for (version, field) in [
            ("2024-10-21", MaxCompletionTokens),
            ("2024-09-01-preview", MaxCompletionTokens),
            ("2025-04-01-preview", MaxCompletionTokens),
            ("preview", MaxCompletionTokens),
            ("2024-08-01-preview", MaxTokens),
            ("2024-06-01", MaxTokens),
        ] {
            let azure = ProviderConfig::azure("https://r.openai.azure.com", version, None);
            assert_eq!(azure.effective_max_tokens_field(), field, "{version}");
        }
        // The override wins both ways.
        let proxy = ProviderConfig {
            max_tokens_field: Some(MaxCompletionTokens),
            ..ProviderConfig::openai("https://proxy.example/v1", None)
        };
        assert_eq!(proxy.effective_max_tokens_field(), MaxCompletionTokens);
        let old = ProviderConfig {
            max_tokens_field: Some(MaxTokens),
            ..ProviderConfig::azure("https://r.openai.azure.com", "2024-10-21", None)
        };
        assert_eq!(old.effective_max_tokens_field(), MaxTokens);
    }

    #[test]
    fn max_tokens_field_parses_and_is_refused_for_other_kinds() {
        let text = r#"
[router.providers.proxy]
base_url = "https://proxy.example/v1"
max_tokens_field = "max_completion_tokens"
[router.providers.vllm]
base_url = "http://localhost:8000/v1"
max_tokens_field = "max_tokens"
"#;
        let config: Config = Source::from_toml(text).unwrap().section("router").unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.providers["proxy"].max_tokens_field,
            Some(MaxTokensField::MaxCompletionTokens)
        );
        assert_eq!(
            config.providers["vllm"].max_tokens_field,
            Some(MaxTokensField::MaxTokens)
        );
        let bad = text.replace("\"max_tokens\"", "\"max_output_tokens\"");
        let error = Source::from_toml(&bad)
            .unwrap()
            .section::<Config>("router")
            .unwrap_err()
            .to_string();
        assert!(error.contains("max_output_tokens"), "{error}");
        let mut config = config;
        config.providers.insert(
            "claude".into(),
            ProviderConfig {
                max_tokens_field: Some(MaxTokensField::MaxTokens),
                ..ProviderConfig::of_kind(
                    ProviderKind::Anthropic,
                    "https://api.anthropic.com",
                    None,
                )
            },
        );
        assert!(error_of(&config).contains("router.providers.claude.max_tokens_field"));
    }

    #[test]
    fn api_keys_resolve_from_the_environment_and_are_redacted() {
        let mut config = example();
        let missing =
            config.resolve_api_keys(|var| (var == "FAKE_API_KEY").then(|| "sk-secret".to_owned()));
        assert!(missing.is_empty());
        assert_eq!(
            config.providers["fake"]
                .api_key
                .as_ref()
                .unwrap()
                .expose_secret(),
            "sk-secret"
        );
        assert!(!format!("{config:?}").contains("sk-secret"));
        let mut config = example();
        assert_eq!(config.resolve_api_keys(|_| None), vec!["fake".to_owned()]);
    }
}
