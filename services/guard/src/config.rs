//! The `[guard]` configuration section.

use std::collections::BTreeMap;

use serde::Deserialize;
use switchboard_config::ConfigError;

use crate::policy::Policies;

/// The `[guard]` section.
///
/// ```toml
/// [guard]
/// grpc_addr = "127.0.0.1:50052"
/// default_action = "redact"          # allow | redact | block
/// entities = ["EMAIL_ADDRESS", "CREDIT_CARD"]
/// [guard.apps.billing]               # per-app overrides; unset fields inherit the defaults
/// action = "block"
/// entities = ["CREDIT_CARD"]
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server binds (`127.0.0.1:0` picks a free port).
    pub grpc_addr: String,
    /// Action for apps without an override: `allow`, `redact` or `block`.
    pub default_action: String,
    /// Entity types checked for apps without an override.
    pub entities: Vec<String>,
    /// Per-app policy overrides, by app id.
    pub apps: BTreeMap<String, AppPolicyConfig>,
}

/// A per-app override (`[guard.apps.<app>]`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppPolicyConfig {
    /// Action for this app; unset: `guard.default_action`.
    pub action: Option<String>,
    /// Entity types for this app; unset: `guard.entities`.
    pub entities: Option<Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_addr: "127.0.0.1:50052".to_owned(),
            default_action: "redact".to_owned(),
            entities: vec!["EMAIL_ADDRESS".to_owned(), "CREDIT_CARD".to_owned()],
            apps: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Checks every value; errors name the field by its dotted path (e.g. `guard.apps.billing.action`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.grpc_addr.trim().is_empty() {
            return Err(ConfigError::invalid("guard.grpc_addr", "must not be empty"));
        }
        Policies::from_config(self).map(|_| ())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use switchboard_config::Source;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = Source::from_toml(text)?.section("guard")?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_are_safe_and_valid() {
        let config = parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.default_action, "redact");
    }

    #[test]
    fn the_documented_example_parses() {
        let config = parse(
            "[guard]\ngrpc_addr = \"127.0.0.1:50052\"\ndefault_action = \"redact\"\n\
             entities = [\"EMAIL_ADDRESS\", \"CREDIT_CARD\"]\n[guard.apps.billing]\naction = \"block\"\n",
        )
        .unwrap();
        assert_eq!(config.apps["billing"].action.as_deref(), Some("block"));
    }

    #[test]
    fn errors_name_the_bad_field() {
        let cases = [
            (
                "[guard]\ndefault_action = \"drop\"\n",
                "guard.default_action",
            ),
            (
                "[guard]\nentities = [\"EMAIL_ADDRESS\", \"SSN\"]\n",
                "guard.entities[1]",
            ),
            (
                "[guard]\nentities = [\"CREDIT_CARD\", \"CREDIT_CARD\"]\n",
                "guard.entities[1]",
            ),
            (
                "[guard.apps.billing]\naction = \"deny\"\n",
                "guard.apps.billing.action",
            ),
            (
                "[guard.apps.billing]\nentities = [\"PHONE\"]\n",
                "guard.apps.billing.entities[0]",
            ),
            (
                "[guard.apps.billing]\nactoin = \"block\"\n",
                "guard.apps.billing",
            ),
            ("[guard]\ngrpc_addr = \"\"\n", "guard.grpc_addr"),
        ];
        for (text, path) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(&format!("`{path}")), "{text}: {error}");
        }
    }
}
