//! The `[guard]` configuration section.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use switchboard_config::ConfigError;

use crate::{
    admission::AdmissionConfig,
    audit::AuditConfig,
    content::{ContentFilters, TopicConfig},
    policy::Policies,
    route::{RoutePolicies, RoutePolicyConfig},
};

/// The `[guard]` section.
///
/// ```toml
/// [guard]
/// grpc_addr = "127.0.0.1:50052"
/// metrics_addr = "127.0.0.1:9466"    # Prometheus /metrics (unset: not served)
/// default_action = "redact"          # allow | redact | mask | hash | pseudonymize | block
/// entities = ["EMAIL_ADDRESS", "CREDIT_CARD"]
/// actions = { CREDIT_CARD = "mask" } # per entity type (prompts and answers)
/// answer_action = "redact"           # answers; unset: the prompt actions (pseudonymize: allow)
/// answer_actions = {}
/// min_score = 0.5                    # confidence threshold, 0.0..=1.0
/// min_scores = { PHONE_NUMBER = 0.7 } # per entity type
/// allow_values = ["support@example.com"]
/// allow_patterns = ["@example\\.com$"]
/// phone_regions = ["US", "GB"]       # national phone numbers are validated for these
/// hash_secret = "…"                  # HMAC key of the hash action (required when it is used)
/// hash_length = 8                    # hex characters of the keyed hash
/// injection_action = "flag"          # prompt injection: off | flag | block
/// injection_threshold = 0.5          # score in [0, 1] at which the action applies
/// denied_topics = ["weapons"]        # names of [guard.topics.*] denied on every route
/// topic_action = "block"             # flag | block
/// [guard.mask]
/// keep_last = 4
/// char = "*"
/// email_domain = true
/// [guard.topics.weapons]             # a content-filter topic: whole-word terms and regexes
/// terms = ["pipe bomb", "nerve agent"]
/// patterns = ["\\b3d[- ]?printed guns?\\b"]
/// [guard.apps.billing]               # per-app overrides; unset fields inherit the defaults
/// action = "block"
/// entities = ["CREDIT_CARD"]
/// [guard.routes."gpt-4o"]            # per-route overrides of the four keys above
/// injection_action = "block"
/// injection_threshold = 0.3
/// [guard.admission]                  # overload: refused at once beyond these (see `admission`)
/// max_in_flight = 2048
/// max_wait_ms = 500
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server binds (`127.0.0.1:0` picks a free port).
    pub grpc_addr: String,
    /// Address of the Prometheus `/metrics` HTTP endpoint (checks by decision, findings, audit
    /// events published and dropped, overload sheds); unset: not served.
    pub metrics_addr: Option<String>,
    /// Action for apps without an override.
    pub default_action: String,
    /// Entity types checked for apps without an override.
    pub entities: Vec<String>,
    /// Action per entity type, over `default_action`.
    pub actions: BTreeMap<String, String>,
    /// Action in answers; unset: the prompt's actions (with pseudonymize meaning allow).
    pub answer_action: Option<String>,
    /// Action per entity type in answers, over `answer_action`.
    pub answer_actions: BTreeMap<String, String>,
    /// Findings with a lower confidence are ignored.
    pub min_score: f64,
    /// Threshold per entity type, over `min_score`.
    pub min_scores: BTreeMap<String, f64>,
    /// Values never flagged (compared in canonical form: case-insensitive emails, digits of numbers).
    pub allow_values: Vec<String>,
    /// Regular expressions; a value matching one is never flagged.
    pub allow_patterns: Vec<String>,
    /// Regions (ISO 3166 alpha-2) whose national phone numbers are recognised, in order.
    pub phone_regions: Vec<String>,
    /// Key of the `hash` action's HMAC-SHA256.
    pub hash_secret: Option<HashSecret>,
    /// Hex characters of the keyed hash kept in the text.
    pub hash_length: usize,
    /// How the `mask` action renders values.
    pub mask: MaskConfig,
    /// Per-app policy overrides, by app id.
    pub apps: BTreeMap<String, AppPolicyConfig>,
    /// Prompt-injection action: `off`, `flag` or `block`.
    pub injection_action: String,
    /// Injection score at or above which `injection_action` applies.
    pub injection_threshold: f64,
    /// Content-filter topics, by name.
    pub topics: BTreeMap<String, TopicConfig>,
    /// Topics denied on routes without an override.
    pub denied_topics: Vec<String>,
    /// What a denied topic does: `flag` or `block`.
    pub topic_action: String,
    /// Per-route overrides of the injection and topic keys, by route (requested model).
    pub routes: BTreeMap<String, RoutePolicyConfig>,
    /// The audit trail (`[guard.audit]`, see [`crate::audit::AuditConfig`]).
    pub audit: AuditConfig,
    /// Admission of large checks (`[guard.admission]`, see [`crate::admission`]).
    pub admission: AdmissionConfig,
    /// Largest gRPC request message the server decodes (bytes; tonic's default is 4 MiB): at least
    /// what the gateway sends, twice `gateway.max_body_bytes` (`switchboard check-config` checks).
    pub max_message_bytes: usize,
}

/// `[guard.mask]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskConfig {
    /// Trailing letters and digits kept of cards, phones, SSNs and IBANs (`****1234`).
    pub keep_last: usize,
    /// The masking character.
    pub char: char,
    /// Emails keep their first letter and domain (`j***@example.com`); false: fully masked.
    pub email_domain: bool,
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig {
            keep_last: 4,
            char: '*',
            email_domain: true,
        }
    }
}

/// The HMAC key of the hash action (never printed).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct HashSecret(pub SecretString);

impl HashSecret {
    /// The key's bytes.
    pub fn expose(&self) -> &[u8] {
        self.0.expose_secret().as_bytes()
    }
}

impl PartialEq for HashSecret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl std::fmt::Debug for HashSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashSecret([REDACTED])")
    }
}

impl From<&str> for HashSecret {
    fn from(secret: &str) -> Self {
        HashSecret(SecretString::from(secret.to_owned()))
    }
}

/// A per-app override (`[guard.apps.<app>]`). Every unset field inherits the `[guard]` value.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppPolicyConfig {
    /// Action for this app; unset: `guard.default_action`.
    pub action: Option<String>,
    /// Entity types for this app; unset: `guard.entities`.
    pub entities: Option<Vec<String>>,
    /// Per entity type actions; unset: `guard.actions`.
    pub actions: Option<BTreeMap<String, String>>,
    /// Answer action; unset: `guard.answer_action`.
    pub answer_action: Option<String>,
    /// Per entity type answer actions; unset: `guard.answer_actions`.
    pub answer_actions: Option<BTreeMap<String, String>>,
    /// Confidence threshold; unset: `guard.min_score`.
    pub min_score: Option<f64>,
    /// Threshold per entity type; unset: `guard.min_scores`.
    pub min_scores: Option<BTreeMap<String, f64>>,
    /// Values never flagged; unset: `guard.allow_values`.
    pub allow_values: Option<Vec<String>>,
    /// Patterns never flagged; unset: `guard.allow_patterns`.
    pub allow_patterns: Option<Vec<String>>,
}

/// The default injection threshold (see `docs/GUARD.md` for its measured rates).
pub const DEFAULT_INJECTION_THRESHOLD: f64 = 0.5;

/// The smallest `max_message_bytes` accepted (tonic's own default).
const MIN_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_addr: "127.0.0.1:50052".to_owned(),
            metrics_addr: None,
            default_action: "redact".to_owned(),
            entities: vec!["EMAIL_ADDRESS".to_owned(), "CREDIT_CARD".to_owned()],
            actions: BTreeMap::new(),
            answer_action: None,
            answer_actions: BTreeMap::new(),
            min_score: 0.5,
            min_scores: BTreeMap::new(),
            allow_values: Vec::new(),
            allow_patterns: Vec::new(),
            phone_regions: vec!["US".to_owned(), "GB".to_owned()],
            hash_secret: None,
            hash_length: 8,
            mask: MaskConfig::default(),
            apps: BTreeMap::new(),
            injection_action: "flag".to_owned(),
            injection_threshold: DEFAULT_INJECTION_THRESHOLD,
            topics: BTreeMap::new(),
            denied_topics: Vec::new(),
            topic_action: "block".to_owned(),
            routes: BTreeMap::new(),
            audit: AuditConfig::default(),
            admission: AdmissionConfig::default(),
            max_message_bytes: switchboard_grpc::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl Config {
    /// Checks every value; errors name the field by its dotted path (e.g. `guard.apps.billing.action`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.grpc_addr.trim().is_empty() {
            return Err(ConfigError::invalid("guard.grpc_addr", "must not be empty"));
        }
        if let Some(addr) = &self.metrics_addr {
            addr.parse::<std::net::SocketAddr>().map_err(|e| {
                ConfigError::invalid("guard.metrics_addr", format!("not a socket address: {e}"))
            })?;
        }
        self.admission.validate()?;
        if self.max_message_bytes < MIN_MESSAGE_BYTES {
            return Err(ConfigError::invalid(
                "guard.max_message_bytes",
                format!("must be at least {MIN_MESSAGE_BYTES} (4 MiB)"),
            ));
        }
        if !(4..=64).contains(&self.hash_length) {
            return Err(ConfigError::invalid(
                "guard.hash_length",
                "must be between 4 and 64",
            ));
        }
        if self
            .hash_secret
            .as_ref()
            .is_some_and(|secret| secret.expose().len() < 16)
        {
            return Err(ConfigError::invalid(
                "guard.hash_secret",
                "must be at least 16 bytes",
            ));
        }
        if self.mask.keep_last > 8 {
            return Err(ConfigError::invalid(
                "guard.mask.keep_last",
                "must be at most 8",
            ));
        }
        self.audit.validate()?;
        Policies::from_config(self)?;
        let filters = ContentFilters::new(&self.topics)?;
        RoutePolicies::from_config(self, &filters).map(|_| ())
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
    fn a_digits_only_hash_secret_from_the_environment_is_a_string_and_never_echoed() {
        let env = std::collections::HashMap::from([
            (
                "SWITCHBOARD__GUARD__HASH_SECRET".to_owned(),
                "1234567890123456".to_owned(),
            ),
            (
                "SWITCHBOARD__GUARD__DEFAULT_ACTION".to_owned(),
                "hash".to_owned(),
            ),
        ]);
        let source = Source::from_parts("", None, &env).unwrap();
        let config: Config = source.section("guard").unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.hash_secret.unwrap().expose(),
            b"1234567890123456".as_slice()
        );
        // Even what is not a string at all is taken as the text.
        let env = std::collections::HashMap::from([(
            "SWITCHBOARD__GUARD__HASH_SECRET".to_owned(),
            "[1234567890123456]".to_owned(),
        )]);
        let config: Config = Source::from_parts("", None, &env)
            .unwrap()
            .section("guard")
            .unwrap();
        assert_eq!(
            config.hash_secret.unwrap().expose(),
            b"[1234567890123456]".as_slice()
        );
        // A wrong value from the environment names the variable, not the value.
        let env = std::collections::HashMap::from([(
            "SWITCHBOARD__GUARD__HASH_LENGTH".to_owned(),
            "x1234567890123456".to_owned(),
        )]);
        let error = Source::from_parts("", None, &env)
            .unwrap()
            .section::<Config>("guard")
            .unwrap_err()
            .to_string();
        assert!(error.contains("SWITCHBOARD__GUARD__HASH_LENGTH"), "{error}");
        assert!(!error.contains("1234567890123456"), "{error}");
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
             entities = [\"EMAIL_ADDRESS\", \"CREDIT_CARD\", \"US_SSN\"]\n\
             actions = { CREDIT_CARD = \"mask\", US_SSN = \"hash\" }\n\
             answer_action = \"redact\"\nmin_score = 0.6\nmin_scores = { US_SSN = 0.4 }\n\
             allow_values = [\"support@example.com\"]\nallow_patterns = [\"@example\\\\.com$\"]\n\
             phone_regions = [\"US\", \"DE\"]\nhash_secret = \"0123456789abcdef\"\n\
             [guard.mask]\nkeep_last = 2\nchar = \"#\"\n\
             [guard.apps.billing]\naction = \"block\"\n\
             [guard.apps.support]\nactions = { EMAIL_ADDRESS = \"pseudonymize\" }\nmin_score = 0.3\n",
        )
        .unwrap();
        assert_eq!(config.apps["billing"].action.as_deref(), Some("block"));
        assert_eq!(config.mask.char, '#');
        assert!(!format!("{config:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn the_example_file_parses() {
        let config = parse(include_str!("../../../deploy/switchboard.example.toml")).unwrap();
        assert_eq!(config.default_action, "redact");
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
            ("[guard]\nmetrics_addr = \"nope\"\n", "guard.metrics_addr"),
            (
                "[guard]\nactions = { CREDIT_CARD = \"shred\" }\n",
                "guard.actions.CREDIT_CARD",
            ),
            (
                "[guard]\nactions = { NAME = \"redact\" }\n",
                "guard.actions.NAME",
            ),
            (
                "[guard.apps.x]\nanswer_actions = { EMAIL_ADDRESS = \"pseudonymize\" }\n",
                "guard.apps.x.answer_actions.EMAIL_ADDRESS",
            ),
            ("[guard]\nmin_score = 1.5\n", "guard.min_score"),
            (
                "[guard]\nmin_scores = { PHONE_NUMBER = 2.0 }\n",
                "guard.min_scores.PHONE_NUMBER",
            ),
            (
                "[guard.apps.x]\nmin_scores = { PHONE = 0.5 }\n",
                "guard.apps.x.min_scores.PHONE",
            ),
            (
                "[guard.apps.x]\nmin_score = -0.1\n",
                "guard.apps.x.min_score",
            ),
            (
                "[guard]\nallow_patterns = [\"(\"]\n",
                "guard.allow_patterns[0]",
            ),
            (
                "[guard]\nphone_regions = [\"XX\"]\n",
                "guard.phone_regions[0]",
            ),
            ("[guard]\ndefault_action = \"hash\"\n", "guard.hash_secret"),
            (
                "[guard.apps.x]\nactions = { EMAIL_ADDRESS = \"hash\" }\n",
                "guard.hash_secret",
            ),
            ("[guard]\nhash_secret = \"short\"\n", "guard.hash_secret"),
            ("[guard]\nhash_length = 2\n", "guard.hash_length"),
            ("[guard.mask]\nkeep_last = 20\n", "guard.mask.keep_last"),
        ];
        for (text, path) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(&format!("`{path}")), "{text}: {error}");
        }
    }
}
