//! Policies: which entity types are looked for and what happens when one is found.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use switchboard_config::ConfigError;

use crate::{config::Config, recognizer::KNOWN_ENTITIES};

/// What to do with a prompt that contains an entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pass it unchanged (findings are still reported).
    Allow,
    /// Replace every match with `[ENTITY_TYPE]`.
    Redact,
    /// Refuse the request.
    Block,
}

impl Action {
    /// The configuration and findings name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Redact => "redact",
            Action::Block => "block",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Action::Allow, Action::Redact, Action::Block]
            .into_iter()
            .find(|a| a.as_str() == name)
    }
}

/// The effective policy of one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The action.
    pub action: Action,
    /// The entity types checked, sorted and distinct.
    pub entities: Vec<&'static str>,
    /// A short hash of the action and entity types: equal policies have equal versions.
    pub version: String,
}

impl Policy {
    fn new(action: Action, mut entities: Vec<&'static str>) -> Self {
        entities.sort_unstable();
        let mut hasher = Sha256::new();
        hasher.update(b"switchboard.guard.policy.v1\0");
        hasher.update(action.as_str().as_bytes());
        for entity in &entities {
            hasher.update(b"\0");
            hasher.update(entity.as_bytes());
        }
        let version = hex::encode(&hasher.finalize()[..6]);
        Policy {
            action,
            entities,
            version,
        }
    }
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
        let action = parse_action(&config.default_action, "guard.default_action")?;
        let entities = parse_entities(&config.entities, "guard.entities")?;
        let default = Policy::new(action, entities.clone());
        let mut apps = HashMap::new();
        for (app, overrides) in &config.apps {
            let path = format!("guard.apps.{app}");
            if app.is_empty() {
                return Err(ConfigError::invalid(path, "app id must not be empty"));
            }
            let app_action = match &overrides.action {
                Some(name) => parse_action(name, &format!("{path}.action"))?,
                None => action,
            };
            let app_entities = match &overrides.entities {
                Some(names) => parse_entities(names, &format!("{path}.entities"))?,
                None => entities.clone(),
            };
            apps.insert(app.clone(), Policy::new(app_action, app_entities));
        }
        Ok(Policies { default, apps })
    }

    /// The policy of `app` (the default one when it has no override).
    pub fn for_app(&self, app: &str) -> &Policy {
        self.apps.get(app).unwrap_or(&self.default)
    }
}

fn parse_action(name: &str, path: &str) -> Result<Action, ConfigError> {
    Action::parse(name).ok_or_else(|| {
        ConfigError::invalid(
            path,
            format!("unknown action `{name}`, expected allow, redact or block"),
        )
    })
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
                entities: None,
            },
        );
        config.apps.insert(
            "same".into(),
            AppPolicyConfig {
                action: Some("redact".into()),
                entities: None,
            },
        );
        config.apps.insert(
            "reordered".into(),
            AppPolicyConfig {
                action: None,
                entities: Some(vec!["CREDIT_CARD".into(), "EMAIL_ADDRESS".into()]),
            },
        );
        let policies = Policies::from_config(&config).unwrap();
        let default = policies.for_app("unknown-app");
        let billing = policies.for_app("billing");
        assert_eq!(default.action, Action::Redact);
        assert_eq!(billing.action, Action::Block);
        assert_eq!(billing.entities, default.entities);
        assert_ne!(billing.version, default.version);
        assert_eq!(policies.for_app("same").version, default.version);
        assert_eq!(policies.for_app("reordered").version, default.version);
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
}
