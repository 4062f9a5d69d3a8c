//! Route, target, key and resilience-policy configuration (`[[router.routes]]`, `[router.breaker]`).

use std::collections::{BTreeMap, HashSet};

use secrecy::SecretString;
use serde::Deserialize;
use switchboard_config::ConfigError;

use crate::config::Config;

/// Most keys (and endpoints) one target may balance over.
pub const MAX_KEYS_PER_TARGET: usize = 64;

/// How a route orders its targets before the ordered fallback walks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Configuration order.
    #[default]
    Fallback,
    /// The first target drawn at random by `weight`, then the rest by weight.
    Weighted,
    /// Lowest EWMA latency first (unmeasured targets first, so they get measured).
    Latency,
    /// Fewest requests in flight first.
    LeastBusy,
    /// Lowest estimated price first (targets without a price last).
    Cost,
}

/// One route (`[[router.routes]]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// The virtual model callers ask for.
    pub name: String,
    /// Candidate targets, in fallback order.
    pub targets: Vec<TargetConfig>,
    /// How the targets are ordered for each request (the rest of the order is the fallback).
    pub strategy: Strategy,
    /// Conditional rules on request metadata; the first that matches picks the target list.
    pub rules: Vec<RuleConfig>,
}

impl RouteConfig {
    /// An ordered-fallback route (tests, embedders).
    pub fn new(name: impl Into<String>, targets: Vec<TargetConfig>) -> Self {
        RouteConfig {
            name: name.into(),
            targets,
            ..RouteConfig::default()
        }
    }
}

/// One target of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetConfig {
    /// Provider name (a key of `router.providers`).
    pub provider: String,
    /// The provider's model name.
    pub model: String,
    /// Share of traffic under the `weighted` strategy.
    pub weight: u32,
    /// Context window in tokens; a prompt estimated larger skips the target. Unset: unknown.
    pub context_window: Option<u32>,
    /// Whether the model takes tool definitions.
    pub tools: bool,
    /// Whether the model takes image input.
    pub images: bool,
    /// Input price, integer USD nanos per million tokens (the `cost` strategy).
    pub input_usd_nanos_per_mtok: Option<i64>,
    /// Output price, integer USD nanos per million tokens (the `cost` strategy).
    pub output_usd_nanos_per_mtok: Option<i64>,
    /// API keys (and endpoints) to balance over; empty: the provider's own key and base URL.
    pub keys: Vec<KeyConfig>,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            provider: String::new(),
            model: String::new(),
            weight: 1,
            context_window: None,
            tools: true,
            images: true,
            input_usd_nanos_per_mtok: None,
            output_usd_nanos_per_mtok: None,
            keys: Vec::new(),
        }
    }
}

impl TargetConfig {
    /// A target (tests, embedders).
    pub fn new(provider: impl Into<String>, model: impl Into<String>) -> Self {
        TargetConfig {
            provider: provider.into(),
            model: model.into(),
            ..TargetConfig::default()
        }
    }

    /// The target's name in routes, rules and attempts: `provider/model`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.provider, self.model)
    }
}

/// One API key (and optionally its own endpoint) of a target, with its rate limits.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyConfig {
    /// Name shown in attempts, metrics and logs (never the key).
    pub alias: String,
    /// Environment variable holding the key (read once at start).
    pub api_key_env: Option<String>,
    /// Endpoint of this key; unset: the provider's `base_url`.
    pub base_url: Option<String>,
    /// Requests per minute this key may make for this model (0: unlimited).
    pub rpm: u32,
    /// Tokens per minute this key may use for this model (0: unlimited).
    pub tpm: u32,
    /// The key itself; never read from the file, set in code or resolved from `api_key_env`.
    #[serde(skip)]
    pub api_key: Option<SecretString>,
}

impl std::fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyConfig")
            .field("alias", &self.alias)
            .field("api_key_env", &self.api_key_env)
            .field("base_url", &self.base_url)
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl KeyConfig {
    /// A key set in code (tests, embedders).
    pub fn new(alias: impl Into<String>, api_key: &str) -> Self {
        KeyConfig {
            alias: alias.into(),
            api_key: Some(SecretString::from(api_key.to_owned())),
            ..KeyConfig::default()
        }
    }
}

/// A conditional rule: when every condition set holds, the route uses `targets` (by name).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleConfig {
    /// The caller's application.
    pub app: Option<String>,
    /// The caller's team.
    pub team: Option<String>,
    /// The task-type hint: the request's `task` tag.
    pub task: Option<String>,
    /// Tags the request must carry with these values.
    pub tags: BTreeMap<String, String>,
    /// Targets (`provider/model` names of this route's targets) to use, in fallback order.
    pub targets: Vec<String>,
    /// Strategy for these targets; unset: the route's.
    pub strategy: Option<Strategy>,
}

/// Circuit breaker and cooldown settings (`[router.breaker]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker of a (provider, endpoint, key, model).
    pub failure_threshold: u32,
    /// How long an open breaker stays open before one probe request is let through.
    pub open_ms: u64,
    /// Cooldown of a key after a 429 without `Retry-After`.
    pub rate_limit_cooldown_ms: u64,
    /// Cooldown of a key after a 401/403.
    pub auth_cooldown_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_ms: 30_000,
            rate_limit_cooldown_ms: 1_000,
            auth_cooldown_ms: 60_000,
        }
    }
}

fn invalid_url(path: String, url: &str) -> Option<ConfigError> {
    match reqwest::Url::parse(url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => None,
        Ok(_) => Some(ConfigError::invalid(
            path,
            "must be an http:// or https:// URL with a host",
        )),
        Err(e) => Some(ConfigError::invalid(path, format!("not a URL: {e}"))),
    }
}

/// Checks `router.breaker` and `router.routes`; errors name the dotted path.
pub(crate) fn validate_routes(config: &Config) -> Result<(), ConfigError> {
    if let Some(addr) = &config.metrics_addr {
        addr.parse::<std::net::SocketAddr>().map_err(|e| {
            ConfigError::invalid("router.metrics_addr", format!("not a socket address: {e}"))
        })?;
    }
    if config.breaker.failure_threshold == 0 {
        return Err(ConfigError::invalid(
            "router.breaker.failure_threshold",
            "must be greater than 0",
        ));
    }
    if config.breaker.open_ms == 0 {
        return Err(ConfigError::invalid(
            "router.breaker.open_ms",
            "must be greater than 0",
        ));
    }
    let mut names = HashSet::new();
    for (i, route) in config.routes.iter().enumerate() {
        let path = format!("router.routes[{i}]");
        if route.name.is_empty() {
            return Err(ConfigError::invalid(
                format!("{path}.name"),
                "must not be empty",
            ));
        }
        if !names.insert(route.name.as_str()) {
            return Err(ConfigError::invalid(
                format!("{path}.name"),
                format!("duplicate route name `{}`", route.name),
            ));
        }
        if route.targets.is_empty() {
            return Err(ConfigError::invalid(
                format!("{path}.targets"),
                "a route needs at least one target",
            ));
        }
        let mut target_names = HashSet::new();
        for (j, target) in route.targets.iter().enumerate() {
            validate_target(config, &format!("{path}.targets[{j}]"), target)?;
            if !target_names.insert(target.name()) {
                return Err(ConfigError::invalid(
                    format!("{path}.targets[{j}]"),
                    format!("duplicate target `{}`", target.name()),
                ));
            }
        }
        if route.strategy == Strategy::Weighted && route.targets.iter().all(|t| t.weight == 0) {
            return Err(ConfigError::invalid(
                format!("{path}.targets"),
                "the weighted strategy needs a target with a weight above 0",
            ));
        }
        for (k, rule) in route.rules.iter().enumerate() {
            let rule_path = format!("{path}.rules[{k}]");
            if rule.targets.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{rule_path}.targets"),
                    "a rule needs at least one target",
                ));
            }
            for (l, name) in rule.targets.iter().enumerate() {
                if !target_names.contains(name) {
                    return Err(ConfigError::invalid(
                        format!("{rule_path}.targets[{l}]"),
                        format!("`{name}` is not a target of this route"),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn validate_target(config: &Config, path: &str, target: &TargetConfig) -> Result<(), ConfigError> {
    if !config.providers.contains_key(&target.provider) {
        return Err(ConfigError::invalid(
            format!("{path}.provider"),
            format!("unknown provider `{}`", target.provider),
        ));
    }
    if target.model.is_empty() {
        return Err(ConfigError::invalid(
            format!("{path}.model"),
            "must not be empty",
        ));
    }
    if target.context_window == Some(0) {
        return Err(ConfigError::invalid(
            format!("{path}.context_window"),
            "must be greater than 0",
        ));
    }
    for (field, price) in [
        ("input_usd_nanos_per_mtok", target.input_usd_nanos_per_mtok),
        (
            "output_usd_nanos_per_mtok",
            target.output_usd_nanos_per_mtok,
        ),
    ] {
        if price.is_some_and(|p| p < 0) {
            return Err(ConfigError::invalid(
                format!("{path}.{field}"),
                "must not be negative",
            ));
        }
    }
    if target.keys.len() > MAX_KEYS_PER_TARGET {
        return Err(ConfigError::invalid(
            format!("{path}.keys"),
            format!("at most {MAX_KEYS_PER_TARGET} keys per target"),
        ));
    }
    let mut aliases = HashSet::new();
    for (k, key) in target.keys.iter().enumerate() {
        let key_path = format!("{path}.keys[{k}]");
        if key.alias.is_empty() || key.alias.contains(['/', '#']) {
            return Err(ConfigError::invalid(
                format!("{key_path}.alias"),
                "must be non-empty and contain no `/` or `#`",
            ));
        }
        if !aliases.insert(key.alias.as_str()) {
            return Err(ConfigError::invalid(
                format!("{key_path}.alias"),
                format!("duplicate alias `{}`", key.alias),
            ));
        }
        if key.api_key_env.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::invalid(
                format!("{key_path}.api_key_env"),
                "must not be empty",
            ));
        }
        if let Some(url) = &key.base_url
            && let Some(error) = invalid_url(format!("{key_path}.base_url"), url)
        {
            return Err(error);
        }
    }
    Ok(())
}

/// Resolves each target key's `api_key_env` through `lookup`, unless a key was set in code.
/// Returns `provider/model#alias` of keys whose variable is unset (they run keyless).
pub(crate) fn resolve_key_secrets(
    routes: &mut [RouteConfig],
    lookup: &impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let mut missing = Vec::new();
    for target in routes.iter_mut().flat_map(|r| r.targets.iter_mut()) {
        let name = target.name();
        for key in &mut target.keys {
            if key.api_key.is_some() {
                continue;
            }
            if let Some(var) = &key.api_key_env {
                match lookup(var).filter(|k| !k.is_empty()) {
                    Some(secret) => key.api_key = Some(SecretString::from(secret)),
                    None => missing.push(format!("{name}#{}", key.alias)),
                }
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use switchboard_config::Source;

    const ROUTES: &str = r#"
[router.providers.fake]
base_url = "http://127.0.0.1:9090/v1"
[router.breaker]
failure_threshold = 3
[[router.routes]]
name = "chat"
strategy = "weighted"
targets = [
  { provider = "fake", model = "small", weight = 3, context_window = 8192, tools = false,
    input_usd_nanos_per_mtok = 150000000, output_usd_nanos_per_mtok = 600000000,
    keys = [ { alias = "k1", api_key_env = "K1", rpm = 60, tpm = 10000 },
             { alias = "k2", base_url = "http://127.0.0.1:9091/v1", rpm = 30 } ] },
  { provider = "fake", model = "big", weight = 1 },
]
[[router.routes.rules]]
task = "code"
targets = ["fake/big"]
strategy = "latency"
"#;

    fn parsed(text: &str) -> Config {
        Source::from_toml(text).unwrap().section("router").unwrap()
    }

    #[test]
    fn routes_parse_and_validate() {
        let mut config = parsed(ROUTES);
        config.validate().unwrap();
        let route = &config.routes[0];
        assert_eq!(route.strategy, Strategy::Weighted);
        assert_eq!(route.targets[0].keys[1].rpm, 30);
        assert!(!route.targets[0].tools && route.targets[1].tools);
        assert_eq!(route.rules[0].strategy, Some(Strategy::Latency));
        assert_eq!(config.breaker.failure_threshold, 3);
        let missing = resolve_key_secrets(&mut config.routes, &|var| {
            (var == "K1").then(|| "sk-k1".to_owned())
        });
        assert!(missing.is_empty());
        assert!(config.routes[0].targets[0].keys[0].api_key.is_some());
        assert!(!format!("{config:?}").contains("sk-k1"));
    }

    #[test]
    fn the_example_configuration_validates() {
        let text = include_str!("../../../deploy/switchboard.example.toml");
        let config: Config = Source::from_toml(text).unwrap().section("router").unwrap();
        config.validate().unwrap();
        assert_eq!(config.routes[0].targets[0].context_window, Some(128_000));
    }

    #[test]
    fn route_errors_name_the_dotted_path() {
        let error_of = |edit: &dyn Fn(&mut Config)| {
            let mut config = parsed(ROUTES);
            edit(&mut config);
            config.validate().unwrap_err().to_string()
        };
        let error = error_of(&|c| c.routes[0].rules[0].targets = vec!["fake/nope".into()]);
        assert!(
            error.contains("router.routes[0].rules[0].targets[0]"),
            "{error}"
        );
        let error = error_of(&|c| c.routes[0].targets[0].keys[1].alias = "k1".into());
        assert!(
            error.contains("router.routes[0].targets[0].keys[1].alias"),
            "{error}"
        );
        let error = error_of(&|c| c.routes[0].targets[0].keys[0].base_url = Some("x".into()));
        assert!(
            error.contains("router.routes[0].targets[0].keys[0].base_url"),
            "{error}"
        );
        let error = error_of(&|c| c.routes[0].targets[1].context_window = Some(0));
        assert!(
            error.contains("router.routes[0].targets[1].context_window"),
            "{error}"
        );
        let error = error_of(&|c| c.routes[0].targets[1].input_usd_nanos_per_mtok = Some(-1));
        assert!(
            error.contains("router.routes[0].targets[1].input_usd_nanos_per_mtok"),
            "{error}"
        );
        let error = error_of(&|c| c.routes[0].targets[1].model = "small".into());
        assert!(error.contains("router.routes[0].targets[1]"), "{error}");
        let error = error_of(&|c| c.breaker.failure_threshold = 0);
        assert!(
            error.contains("router.breaker.failure_threshold"),
            "{error}"
        );
        let error = error_of(&|c| {
            for t in &mut c.routes[0].targets {
                t.weight = 0;
            }
        });
        assert!(error.contains("router.routes[0].targets"), "{error}");
    }
}
