//! Policies: which entity types are looked for, how sure the guard must be, what is exempt and
//! what happens to a finding, per app, entity type and direction.

use std::collections::{BTreeMap, HashMap, HashSet};

use regex::RegexSet;
use sha2::{Digest, Sha256};
use switchboard_config::ConfigError;

use crate::{config::Config, recognizer::KNOWN_ENTITIES};

/// What to do with an entity that was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Pass it unchanged (findings are still reported).
    Allow,
    /// Replace it with `[ENTITY_TYPE]`.
    Redact,
    /// Replace it with a partial mask (`****1234`, `j***@example.com`).
    Mask,
    /// Replace it with a keyed hash (`<ENTITY_TYPE:3f2a9c1d>`): equal values, equal hashes.
    Hash,
    /// Replace it with a placeholder (`<ENTITY_TYPE_1>`) and return the mapping so the caller can
    /// restore the answer.
    Pseudonymize,
    /// Refuse the request.
    Block,
    /// Pass, and report the finding (injection and content-filter findings only).
    Flag,
}

impl Action {
    /// Every action of an entity type (`flag` is for injection and content-filter findings).
    pub const ALL: [Action; 6] = [
        Action::Allow,
        Action::Redact,
        Action::Mask,
        Action::Hash,
        Action::Pseudonymize,
        Action::Block,
    ];

    /// The configuration and findings name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Redact => "redact",
            Action::Mask => "mask",
            Action::Hash => "hash",
            Action::Pseudonymize => "pseudonymize",
            Action::Block => "block",
            Action::Flag => "flag",
        }
    }

    /// Whether the text is rewritten.
    pub fn transforms(self) -> bool {
        matches!(
            self,
            Action::Redact | Action::Mask | Action::Hash | Action::Pseudonymize
        )
    }

    fn parse(name: &str) -> Option<Self> {
        Action::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

/// Which way the text goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the caller to a provider.
    Prompt,
    /// From a provider back to the caller.
    Answer,
}

/// Values and patterns never flagged.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    /// Each configured value as written, lower-cased, and as its letters and digits upper-cased.
    values: HashSet<String>,
    patterns: Option<RegexSet>,
}

impl AllowList {
    fn new(values: &[String], patterns: &[String], path: &str) -> Result<Self, ConfigError> {
        let mut set = HashSet::new();
        for value in values {
            set.insert(value.clone());
            set.insert(value.to_lowercase());
            let compact: String = value
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .map(|c| c.to_ascii_uppercase())
                .collect();
            if !compact.is_empty() {
                set.insert(compact);
            }
        }
        for (i, pattern) in patterns.iter().enumerate() {
            regex::Regex::new(pattern).map_err(|e| {
                ConfigError::invalid(
                    format!("{path}.allow_patterns[{i}]"),
                    format!("invalid regular expression: {e}"),
                )
            })?;
        }
        let patterns = if patterns.is_empty() {
            None
        } else {
            Some(RegexSet::new(patterns).map_err(|e| {
                ConfigError::invalid(format!("{path}.allow_patterns"), e.to_string())
            })?)
        };
        Ok(AllowList {
            values: set,
            patterns,
        })
    }

    /// Whether nothing is exempt (the check can be skipped).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.patterns.is_none()
    }

    /// Whether `value` (as matched, of `entity_type`) is exempt.
    pub fn allows(&self, entity_type: &str, value: &str) -> bool {
        if self.is_empty() {
            return false;
        }
        self.patterns.as_ref().is_some_and(|p| p.is_match(value))
            || self
                .values
                .contains(&crate::recognizer::canonical(entity_type, value))
    }
}

/// The effective policy of one app.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The entity types checked, sorted and distinct, with their prompt and answer actions.
    pub entities: Vec<EntityPolicy>,
    /// Exempt values.
    pub allow: AllowList,
    /// A short hash of everything above: equal policies have equal versions.
    pub version: String,
}

/// What happens to one entity type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EntityPolicy {
    /// The entity type.
    pub entity_type: &'static str,
    /// Its action in prompts.
    pub prompt: Action,
    /// Its action in answers.
    pub answer: Action,
    /// Its confidence threshold.
    pub min_score: f32,
}

impl Policy {
    /// The action for `entity_type` in `direction` (allow for entity types the policy does not check).
    pub fn action(&self, entity_type: &str, direction: Direction) -> Action {
        self.entities
            .iter()
            .find(|e| e.entity_type == entity_type)
            .map_or(Action::Allow, |e| match direction {
                Direction::Prompt => e.prompt,
                Direction::Answer => e.answer,
            })
    }
}

/// The raw (inherited) settings of one policy, before resolution.
struct Raw<'a> {
    action: &'a str,
    action_path: String,
    entities: &'a [String],
    entities_path: String,
    actions: &'a BTreeMap<String, String>,
    actions_path: String,
    answer_action: Option<&'a str>,
    answer_action_path: String,
    answer_actions: &'a BTreeMap<String, String>,
    answer_actions_path: String,
    min_score: f64,
    min_score_path: String,
    min_scores: &'a BTreeMap<String, f64>,
    min_scores_path: String,
    allow_values: &'a [String],
    allow_patterns: &'a [String],
    allow_path: String,
}

/// The default policy and the per-app overrides.
#[derive(Debug, Clone)]
pub struct Policies {
    default: Policy,
    apps: HashMap<String, Policy>,
}

impl Policies {
    /// Compiles and validates the configured policies.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        for (i, region) in config.phone_regions.iter().enumerate() {
            if region.parse::<phonenumber::country::Id>().is_err() {
                return Err(ConfigError::invalid(
                    format!("guard.phone_regions[{i}]"),
                    format!("unknown region `{region}`, expected an ISO 3166 alpha-2 code"),
                ));
            }
        }
        let base = Raw {
            action: &config.default_action,
            action_path: "guard.default_action".to_owned(),
            entities: &config.entities,
            entities_path: "guard.entities".to_owned(),
            actions: &config.actions,
            actions_path: "guard.actions".to_owned(),
            answer_action: config.answer_action.as_deref(),
            answer_action_path: "guard.answer_action".to_owned(),
            answer_actions: &config.answer_actions,
            answer_actions_path: "guard.answer_actions".to_owned(),
            min_score: config.min_score,
            min_score_path: "guard.min_score".to_owned(),
            min_scores: &config.min_scores,
            min_scores_path: "guard.min_scores".to_owned(),
            allow_values: &config.allow_values,
            allow_patterns: &config.allow_patterns,
            allow_path: "guard".to_owned(),
        };
        let default = compile(&base, config)?;
        let mut uses_hash = uses(&default, Action::Hash);
        let mut apps = HashMap::new();
        for (app, o) in &config.apps {
            let path = format!("guard.apps.{app}");
            if app.is_empty() {
                return Err(ConfigError::invalid(path, "app id must not be empty"));
            }
            let pick = |set: bool, own: String, inherited: &String| {
                if set { own } else { inherited.clone() }
            };
            let raw = Raw {
                action: o.action.as_deref().unwrap_or(base.action),
                action_path: pick(
                    o.action.is_some(),
                    format!("{path}.action"),
                    &base.action_path,
                ),
                entities: o.entities.as_deref().unwrap_or(base.entities),
                entities_path: pick(
                    o.entities.is_some(),
                    format!("{path}.entities"),
                    &base.entities_path,
                ),
                actions: o.actions.as_ref().unwrap_or(base.actions),
                actions_path: pick(
                    o.actions.is_some(),
                    format!("{path}.actions"),
                    &base.actions_path,
                ),
                answer_action: o.answer_action.as_deref().or(base.answer_action),
                answer_action_path: pick(
                    o.answer_action.is_some(),
                    format!("{path}.answer_action"),
                    &base.answer_action_path,
                ),
                answer_actions: o.answer_actions.as_ref().unwrap_or(base.answer_actions),
                answer_actions_path: pick(
                    o.answer_actions.is_some(),
                    format!("{path}.answer_actions"),
                    &base.answer_actions_path,
                ),
                min_score: o.min_score.unwrap_or(base.min_score),
                min_score_path: pick(
                    o.min_score.is_some(),
                    format!("{path}.min_score"),
                    &base.min_score_path,
                ),
                min_scores: o.min_scores.as_ref().unwrap_or(base.min_scores),
                min_scores_path: pick(
                    o.min_scores.is_some(),
                    format!("{path}.min_scores"),
                    &base.min_scores_path,
                ),
                allow_values: o.allow_values.as_deref().unwrap_or(base.allow_values),
                allow_patterns: o.allow_patterns.as_deref().unwrap_or(base.allow_patterns),
                allow_path: pick(o.allow_patterns.is_some(), path.clone(), &base.allow_path),
            };
            let policy = compile(&raw, config)?;
            uses_hash |= uses(&policy, Action::Hash);
            apps.insert(app.clone(), policy);
        }
        if uses_hash && config.hash_secret.is_none() {
            return Err(ConfigError::invalid(
                "guard.hash_secret",
                "must be set: a policy uses the hash action",
            ));
        }
        Ok(Policies { default, apps })
    }

    /// The policy of `app` (the default one when it has no override).
    pub fn for_app(&self, app: &str) -> &Policy {
        self.apps.get(app).unwrap_or(&self.default)
    }
}

fn uses(policy: &Policy, action: Action) -> bool {
    policy
        .entities
        .iter()
        .any(|e| e.prompt == action || e.answer == action)
}

fn compile(raw: &Raw<'_>, config: &Config) -> Result<Policy, ConfigError> {
    let action = parse_action(raw.action, &raw.action_path)?;
    let mut entities = parse_entities(raw.entities, &raw.entities_path)?;
    entities.sort_unstable();
    let actions = parse_action_map(raw.actions, &raw.actions_path, false)?;
    let answer_action = match raw.answer_action {
        Some(name) => {
            let answer = parse_action(name, &raw.answer_action_path)?;
            if answer == Action::Pseudonymize {
                return Err(ConfigError::invalid(
                    &raw.answer_action_path,
                    "pseudonymize applies to prompts only",
                ));
            }
            Some(answer)
        }
        None => None,
    };
    let answer_actions = parse_action_map(raw.answer_actions, &raw.answer_actions_path, true)?;
    if !(0.0..=1.0).contains(&raw.min_score) {
        return Err(ConfigError::invalid(
            &raw.min_score_path,
            "must be between 0.0 and 1.0",
        ));
    }
    let mut min_scores: HashMap<&'static str, f64> = HashMap::new();
    for (entity, score) in raw.min_scores {
        let at = format!("{}.{entity}", raw.min_scores_path);
        let Some(known) = KNOWN_ENTITIES.iter().copied().find(|k| k == entity) else {
            return Err(ConfigError::invalid(
                at,
                format!(
                    "unknown entity type `{entity}`, expected one of {}",
                    KNOWN_ENTITIES.join(", ")
                ),
            ));
        };
        if !(0.0..=1.0).contains(score) {
            return Err(ConfigError::invalid(at, "must be between 0.0 and 1.0"));
        }
        min_scores.insert(known, *score);
    }
    let allow = AllowList::new(raw.allow_values, raw.allow_patterns, &raw.allow_path)?;
    let entities: Vec<EntityPolicy> = entities
        .into_iter()
        .map(|entity_type| {
            let prompt = actions.get(entity_type).copied().unwrap_or(action);
            let inherited = if prompt == Action::Pseudonymize {
                // The caller gets its own values back in the answer.
                Action::Allow
            } else {
                prompt
            };
            let answer = answer_actions
                .get(entity_type)
                .copied()
                .or(answer_action)
                .unwrap_or(inherited);
            // Narrowed to f32 once here; scores are f32.
            #[allow(clippy::cast_possible_truncation)]
            let min_score = min_scores
                .get(entity_type)
                .copied()
                .unwrap_or(raw.min_score) as f32;
            EntityPolicy {
                entity_type,
                prompt,
                answer,
                min_score,
            }
        })
        .collect();
    let mut hasher = Sha256::new();
    hasher.update(b"switchboard.guard.policy.v2\0");
    for e in &entities {
        hasher.update(e.entity_type.as_bytes());
        hasher.update(b"\0");
        hasher.update(e.prompt.as_str().as_bytes());
        hasher.update(b"\0");
        hasher.update(e.answer.as_str().as_bytes());
        hasher.update(b"\0");
        hasher.update(e.min_score.to_le_bytes());
    }
    let mut values: Vec<&String> = raw.allow_values.iter().collect();
    values.sort();
    for v in values {
        hasher.update(b"v\0");
        hasher.update(v.as_bytes());
    }
    for p in raw.allow_patterns {
        hasher.update(b"p\0");
        hasher.update(p.as_bytes());
    }
    hasher.update(config.mask.keep_last.to_le_bytes());
    hasher.update(config.mask.char.to_string().as_bytes());
    hasher.update([u8::from(config.mask.email_domain)]);
    hasher.update(config.hash_length.to_le_bytes());
    let version = hex::encode(&hasher.finalize()[..6]);
    Ok(Policy {
        entities,
        allow,
        version,
    })
}

fn parse_action(name: &str, path: &str) -> Result<Action, ConfigError> {
    Action::parse(name).ok_or_else(|| {
        ConfigError::invalid(
            path,
            format!(
                "unknown action `{name}`, expected one of {}",
                Action::ALL.map(Action::as_str).join(", ")
            ),
        )
    })
}

fn parse_action_map(
    map: &BTreeMap<String, String>,
    path: &str,
    answer: bool,
) -> Result<HashMap<&'static str, Action>, ConfigError> {
    let mut out = HashMap::new();
    for (entity, name) in map {
        let at = format!("{path}.{entity}");
        let Some(known) = KNOWN_ENTITIES.iter().copied().find(|k| k == entity) else {
            return Err(ConfigError::invalid(
                at,
                format!(
                    "unknown entity type `{entity}`, expected one of {}",
                    KNOWN_ENTITIES.join(", ")
                ),
            ));
        };
        let action = parse_action(name, &at)?;
        if answer && action == Action::Pseudonymize {
            return Err(ConfigError::invalid(
                at,
                "pseudonymize applies to prompts only",
            ));
        }
        out.insert(known, action);
    }
    Ok(out)
}

fn parse_entities(names: &[String], path: &str) -> Result<Vec<&'static str>, ConfigError> {
    let mut out: Vec<&'static str> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let Some(known) = KNOWN_ENTITIES.iter().copied().find(|k| *k == name) else {
            return Err(ConfigError::invalid(
                format!("{path}[{i}]"),
                format!(
                    "unknown entity type `{name}`, expected one of {}",
                    KNOWN_ENTITIES.join(", ")
                ),
            ));
        };
        if out.contains(&known) {
            return Err(ConfigError::invalid(
                format!("{path}[{i}]"),
                format!("duplicate entity type `{name}`"),
            ));
        }
        out.push(known);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::AppPolicyConfig;

    #[test]
    fn apps_inherit_unset_fields_and_versions_follow_the_effective_policy() {
        let mut config = Config::default();
        config.apps.insert(
            "billing".into(),
            AppPolicyConfig {
                action: Some("block".into()),
                ..Default::default()
            },
        );
        config.apps.insert(
            "same".into(),
            AppPolicyConfig {
                action: Some("redact".into()),
                ..Default::default()
            },
        );
        config.apps.insert(
            "reordered".into(),
            AppPolicyConfig {
                entities: Some(vec!["CREDIT_CARD".into(), "EMAIL_ADDRESS".into()]),
                ..Default::default()
            },
        );
        config.apps.insert(
            "stricter".into(),
            AppPolicyConfig {
                min_score: Some(0.8),
                ..Default::default()
            },
        );
        let policies = Policies::from_config(&config).unwrap();
        let default = policies.for_app("unknown-app");
        let billing = policies.for_app("billing");
        assert_eq!(
            default.action("CREDIT_CARD", Direction::Prompt),
            Action::Redact
        );
        assert_eq!(
            billing.action("CREDIT_CARD", Direction::Prompt),
            Action::Block
        );
        assert_eq!(
            billing.action("CREDIT_CARD", Direction::Answer),
            Action::Block
        );
        assert_eq!(billing.action("US_SSN", Direction::Prompt), Action::Allow);
        assert_ne!(billing.version, default.version);
        assert_eq!(policies.for_app("same").version, default.version);
        assert_eq!(policies.for_app("reordered").version, default.version);
        assert_ne!(policies.for_app("stricter").version, default.version);
        assert_eq!(default.version.len(), 12);
        // Stable across builds.
        assert_eq!(
            Policies::from_config(&config)
                .unwrap()
                .for_app("billing")
                .version,
            billing.version
        );
    }

    #[test]
    fn actions_resolve_per_entity_and_direction() {
        let mut config = Config {
            entities: vec![
                "EMAIL_ADDRESS".into(),
                "CREDIT_CARD".into(),
                "US_SSN".into(),
            ],
            actions: BTreeMap::from([
                ("EMAIL_ADDRESS".into(), "pseudonymize".into()),
                ("US_SSN".into(), "block".into()),
            ]),
            ..Config::default()
        };
        config.apps.insert(
            "support".into(),
            AppPolicyConfig {
                action: Some("mask".into()),
                answer_actions: Some(BTreeMap::from([("CREDIT_CARD".into(), "redact".into())])),
                ..Default::default()
            },
        );
        let policies = Policies::from_config(&config).unwrap();
        let default = policies.for_app("web");
        assert_eq!(
            default.action("EMAIL_ADDRESS", Direction::Prompt),
            Action::Pseudonymize
        );
        assert_eq!(
            default.action("EMAIL_ADDRESS", Direction::Answer),
            Action::Allow
        );
        assert_eq!(
            default.action("CREDIT_CARD", Direction::Prompt),
            Action::Redact
        );
        assert_eq!(default.action("US_SSN", Direction::Answer), Action::Block);
        let support = policies.for_app("support");
        // Per-entity actions are inherited separately from the app's own action.
        assert_eq!(
            support.action("EMAIL_ADDRESS", Direction::Prompt),
            Action::Pseudonymize
        );
        assert_eq!(
            support.action("CREDIT_CARD", Direction::Prompt),
            Action::Mask
        );
        assert_eq!(
            support.action("CREDIT_CARD", Direction::Answer),
            Action::Redact
        );
    }

    #[test]
    fn allow_lists_compare_canonical_values() {
        let allow = AllowList::new(
            &["Support@Example.com".into(), "4111 1111 1111 1111".into()],
            &["^ops-[a-z]+@example\\.org$".into()],
            "guard",
        )
        .unwrap();
        assert!(allow.allows("EMAIL_ADDRESS", "support@example.COM"));
        assert!(allow.allows("CREDIT_CARD", "4111-1111-1111-1111"));
        assert!(allow.allows("EMAIL_ADDRESS", "ops-team@example.org"));
        assert!(!allow.allows("EMAIL_ADDRESS", "jane@example.com"));
        assert!(!AllowList::default().allows("EMAIL_ADDRESS", "x@y.z"));
    }
}
