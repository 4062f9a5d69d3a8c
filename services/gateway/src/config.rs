//! The `[gateway]` configuration section.

use serde::Deserialize;
use switchboard_config::ConfigError;

/// The largest `gateway.max_body_bytes` (32 MiB, Anthropic's own request limit): what the internal
/// hops accept by default ([`switchboard_grpc::DEFAULT_MAX_MESSAGE_BYTES`]) covers it with its
/// headroom ([`switchboard_grpc::internal_message_limit`]).
pub const MAX_BODY_BYTES_LIMIT: usize = 32 * 1024 * 1024;

/// Gateway configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// OpenAI-compatible HTTP listener.
    pub http_addr: String,
    /// gRPC listener (`switchboard.gateway.v1.GatewayService`).
    pub grpc_addr: String,
    /// The guard's gRPC URL.
    pub guard_url: String,
    /// The cache's gRPC URL.
    pub cache_url: String,
    /// The router's gRPC URL.
    pub router_url: String,
    /// Largest accepted request body, bytes (HTTP body or gRPC message), at most
    /// [`MAX_BODY_BYTES_LIMIT`]. The guard, cache and router must accept messages twice as large
    /// (their `max_message_bytes`, 64 MiB by default; `switchboard check-config` checks).
    pub max_body_bytes: usize,
    /// Whether the response cache is used at all.
    pub cache_enabled: bool,
    /// Capacity of the in-memory queue of usage events waiting for JetStream.
    pub usage_queue_capacity: usize,
    /// How long the publisher waits, after a usage event arrives, for others to publish with it
    /// (one JetStream message per batch, ADR 009), milliseconds. The request never waits for it;
    /// usage reaches the ledger that much later, and a crash loses at most what is in memory.
    /// 0 publishes each event at once.
    pub usage_linger_ms: u64,
    /// Directory of the durable outbox of usage events that could not reach JetStream (ADR 005).
    /// Events go to a subdirectory named after `nats.subject_prefix`; one gateway per directory.
    pub outbox_dir: String,
    /// Bound of the outbox, bytes. Beyond it events wait in memory and
    /// `switchboard_usage_outbox_full_total` counts the refusals.
    pub outbox_max_bytes: u64,
    /// Requests served at once (streams included); beyond it requests get a fast 503.
    pub max_in_flight: usize,
    /// Virtual API keys.
    pub keys: Vec<KeyConfig>,
    /// The ledger's gRPC URL (`BudgetService`: budgets and shared rate limits, ADR 007).
    pub ledger_url: String,
    /// Budget enforcement.
    pub budgets: crate::budget::BudgetsConfig,
    /// Per-key and per-app rate limits shared by every replica (through the ledger).
    pub rate_limits: Vec<crate::ratelimit::RateLimitConfig>,
    /// What happens when the guard is unreachable, per route (`[gateway.guard]`).
    pub guard: crate::answer::GuardConfig,
    /// How often the configuration file is checked for a change, milliseconds (0: only SIGHUP).
    /// A reload replaces `keys`; other changes take effect after a restart.
    pub config_poll_ms: u64,
    /// What a request whose caller goes away does once it reached the router: `finish` (the
    /// default) or `cancel`.
    pub abandoned_requests: AbandonedRequests,
}

/// `gateway.abandoned_requests`: what a request whose caller went away (a disconnect, a gRPC
/// reset) does once it reached the router. A stream already started always stops with its caller
/// (its row is what it consumed so far).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbandonedRequests {
    /// A unary request (chat, embeddings) runs to its end: the provider's answer, paid for whether
    /// or not anyone reads it, is recorded exactly (its usage, the target that served, priced;
    /// `PARTIAL` / `CLIENT_DISCONNECTED`), and the budget settles at its real cost. A stream not
    /// yet started is opened to its first chunk, whose head names the deployment to price it at,
    /// then cancelled.
    #[default]
    Finish,
    /// The router's call is cancelled with it, which stops a provider that notices (a self-hosted
    /// server frees its GPU); its row is the prompt's estimate with no provider, unpriced, and the
    /// budget keeps the whole reservation.
    Cancel,
}

/// One virtual API key. Only its SHA-256 is configured (`switchboard hash-key <key>` prints it).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Key id, recorded in the ledger (never the key itself).
    pub id: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    /// Application the key belongs to (the tenant).
    pub app: String,
    /// Team the application belongs to.
    #[serde(default)]
    pub team: String,
    /// The models (routes, as clients name them) this key may call: exact names, or a prefix
    /// ending in `*` (`"claude-*"`). Empty (the default): every route. Others get 403
    /// `model_not_allowed`, and `/v1/models` lists only these.
    #[serde(default)]
    pub models: Vec<String>,
    /// When the key stops working (RFC 3339, e.g. `2027-01-01T00:00:00Z`); unset: never. An
    /// expired key gets 401 `key_expired`.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Tags added to every request of this key (its usage rows, routing rules on tags), e.g.
    /// `{ cost_center = "cc-42" }`; they override a caller's tag of the same name, so that a
    /// caller cannot book its spend elsewhere.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
}

impl KeyConfig {
    /// `expires_at` parsed; `Err` names what is wrong with it.
    pub fn expiry(&self) -> Result<Option<time::OffsetDateTime>, String> {
        self.expires_at
            .as_deref()
            .map(|at| {
                time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                    .map_err(|error| {
                        format!(
                            "`{at}` is not an RFC 3339 time (e.g. 2027-01-01T00:00:00Z): {error}"
                        )
                    })
            })
            .transpose()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http_addr: "127.0.0.1:8080".to_owned(),
            grpc_addr: "127.0.0.1:50051".to_owned(),
            guard_url: "http://127.0.0.1:50052".to_owned(),
            cache_url: "http://127.0.0.1:50053".to_owned(),
            router_url: "http://127.0.0.1:50054".to_owned(),
            max_body_bytes: 4 * 1024 * 1024,
            cache_enabled: true,
            usage_queue_capacity: 100_000,
            usage_linger_ms: 20,
            outbox_dir: "./data/outbox".to_owned(),
            outbox_max_bytes: 1024 * 1024 * 1024,
            max_in_flight: 2048,
            keys: Vec::new(),
            ledger_url: "http://127.0.0.1:50055".to_owned(),
            budgets: crate::budget::BudgetsConfig::default(),
            rate_limits: Vec::new(),
            guard: crate::answer::GuardConfig::default(),
            config_poll_ms: 5_000,
            abandoned_requests: AbandonedRequests::Finish,
        }
    }
}

impl Config {
    /// Checks values that types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, url) in [
            ("guard_url", &self.guard_url),
            ("cache_url", &self.cache_url),
            ("router_url", &self.router_url),
            ("ledger_url", &self.ledger_url),
        ] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    format!("gateway.{field}"),
                    format!("`{url}` is not an http(s) URL"),
                ));
            }
        }
        self.guard.validate()?;
        if self.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "gateway.max_body_bytes",
                "must be greater than 0",
            ));
        }
        if self.max_body_bytes > MAX_BODY_BYTES_LIMIT {
            return Err(ConfigError::invalid(
                "gateway.max_body_bytes",
                format!("must be at most {MAX_BODY_BYTES_LIMIT} (32 MiB)"),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "gateway.max_in_flight",
                "must be greater than 0",
            ));
        }
        if self.usage_queue_capacity == 0 {
            return Err(ConfigError::invalid(
                "gateway.usage_queue_capacity",
                "must be greater than 0",
            ));
        }
        if self.usage_linger_ms > 1000 {
            return Err(ConfigError::invalid(
                "gateway.usage_linger_ms",
                "must be at most 1000",
            ));
        }
        if self.outbox_dir.is_empty() {
            return Err(ConfigError::invalid(
                "gateway.outbox_dir",
                "must not be empty",
            ));
        }
        if self.outbox_max_bytes < 64 * 1024 {
            return Err(ConfigError::invalid(
                "gateway.outbox_max_bytes",
                "must be at least 65536",
            ));
        }
        self.budgets.validate()?;
        crate::ratelimit::validate(&self.rate_limits)?;
        let mut ids = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (index, key) in self.keys.iter().enumerate() {
            let path = format!("gateway.keys[{index}]");
            if key.id.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{path}.id"),
                    "must not be empty",
                ));
            }
            if key.app.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{path}.app"),
                    "must not be empty",
                ));
            }
            if key.sha256.len() != 64 || !key.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ConfigError::invalid(
                    format!("{path}.sha256"),
                    "must be 64 hex characters (run `switchboard hash-key <key>`)",
                ));
            }
            if !ids.insert(key.id.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{path}.id"),
                    format!("duplicate key id `{}`", key.id),
                ));
            }
            for (m, model) in key.models.iter().enumerate() {
                let prefix = model.strip_suffix('*').unwrap_or(model);
                if model.trim().is_empty() || model.trim() != model {
                    return Err(ConfigError::invalid(
                        format!("{path}.models[{m}]"),
                        "must be a model name without surrounding spaces",
                    ));
                }
                if prefix.contains('*') {
                    return Err(ConfigError::invalid(
                        format!("{path}.models[{m}]"),
                        format!("`{model}`: `*` may only end a pattern (a name prefix)"),
                    ));
                }
            }
            for name in key.tags.keys() {
                if name.trim().is_empty() || name.starts_with(crate::auth::RESERVED_TAG_PREFIX) {
                    return Err(ConfigError::invalid(
                        format!("{path}.tags.{name}"),
                        format!(
                            "a tag name must not be empty nor start with `{}` (reserved)",
                            crate::auth::RESERVED_TAG_PREFIX
                        ),
                    ));
                }
            }
            if let Err(message) = key.expiry() {
                return Err(ConfigError::invalid(format!("{path}.expires_at"), message));
            }
            if !hashes.insert(key.sha256.to_ascii_lowercase()) {
                return Err(ConfigError::invalid(
                    format!("{path}.sha256"),
                    "the same key is configured twice",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_config::Source;

    #[test]
    fn the_largest_body_limit_fits_what_the_hops_accept_by_default() {
        assert!(
            switchboard_grpc::internal_message_limit(MAX_BODY_BYTES_LIMIT)
                <= switchboard_grpc::DEFAULT_MAX_MESSAGE_BYTES
        );
        let largest = Config {
            max_body_bytes: MAX_BODY_BYTES_LIMIT,
            ..Config::default()
        };
        assert!(largest.validate().is_ok());
        let over = Config {
            max_body_bytes: MAX_BODY_BYTES_LIMIT + 1,
            ..Config::default()
        };
        let error = over.validate().unwrap_err().to_string();
        assert!(error.contains("gateway.max_body_bytes"), "{error}");
    }

    #[test]
    fn abandoned_requests_finish_by_default_and_cancel_when_asked() {
        let parse = |toml: &str| {
            Source::from_toml(toml)
                .unwrap()
                .section::<Config>("gateway")
        };
        assert_eq!(
            parse("[gateway]\n").unwrap().abandoned_requests,
            AbandonedRequests::Finish
        );
        assert_eq!(
            parse("[gateway]\nabandoned_requests = \"cancel\"\n")
                .unwrap()
                .abandoned_requests,
            AbandonedRequests::Cancel
        );
        let error = parse("[gateway]\nabandoned_requests = \"stop\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("abandoned_requests"), "{error}");
    }

    #[test]
    fn a_model_pattern_with_an_inner_star_is_named() {
        let hash = "a".repeat(64);
        for (models, bad) in [
            (r#"["gpt-4o", "claude-*-sonnet"]"#, "models[1]"),
            (r#"[" gpt-4o"]"#, "models[0]"),
            (r#"[""]"#, "models[0]"),
        ] {
            let source = Source::from_toml(&format!(
                "[gateway]\nkeys = [{{ id = \"k\", sha256 = \"{hash}\", app = \"a\", models = {models} }}]\n"
            ))
            .unwrap();
            let config: Config = source.section("gateway").unwrap();
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(&format!("gateway.keys[0].{bad}")), "{error}");
        }
        let source = Source::from_toml(&format!(
            "[gateway]\nkeys = [{{ id = \"k\", sha256 = \"{hash}\", app = \"a\", models = [\"gpt-4o\", \"claude-*\"] }}]\n"
        ))
        .unwrap();
        let config: Config = source.section("gateway").unwrap();
        config.validate().unwrap();
        assert_eq!(config.keys[0].models, ["gpt-4o", "claude-*"]);
    }

    #[test]
    fn a_reserved_key_tag_is_named() {
        let hash = "a".repeat(64);
        let source = Source::from_toml(&format!(
            "[gateway]\nkeys = [{{ id = \"k\", sha256 = \"{hash}\", app = \"a\", tags = {{ \"switchboard.guard\" = \"checked\" }} }}]\n"
        ))
        .unwrap();
        let config: Config = source.section("gateway").unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("gateway.keys[0].tags.switchboard.guard"),
            "{error}"
        );
    }

    #[test]
    fn a_bad_expiry_is_named() {
        let hash = "a".repeat(64);
        let key = |at: &str| {
            let source = Source::from_toml(&format!(
                "[gateway]\nkeys = [{{ id = \"k\", sha256 = \"{hash}\", app = \"a\", expires_at = \"{at}\" }}]\n"
            ))
            .unwrap();
            source.section::<Config>("gateway").unwrap()
        };
        let error = key("2027-01-01").validate().unwrap_err().to_string();
        assert!(error.contains("gateway.keys[0].expires_at"), "{error}");
        assert!(error.contains("RFC 3339"), "{error}");
        let config = key("2027-01-01T00:00:00+01:00");
        config.validate().unwrap();
        assert_eq!(
            config.keys[0].expiry().unwrap().unwrap().unix_timestamp(),
            1_798_758_000
        );
    }

    #[test]
    fn bad_key_hash_is_named() {
        let source = Source::from_toml(
            "[gateway]\nkeys = [{ id = \"k\", sha256 = \"abc\", app = \"a\" }]\n",
        )
        .unwrap();
        let config: Config = source.section("gateway").unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("gateway.keys[0].sha256"), "{error}");
    }

    #[test]
    fn unknown_field_is_named() {
        let source = Source::from_toml("[gateway]\nrouter_ulr = \"http://x\"\n").unwrap();
        let error = source.section::<Config>("gateway").unwrap_err().to_string();
        assert!(error.contains("router_ulr"), "{error}");
    }
}
