//! Route policies: what the prompt-injection detector and the content filters do for a route
//! (the requested model or route name of a request). A `[guard.routes.<route>]` table sets any of
//! the `[guard]` keys `injection_action`, `injection_threshold`, `denied_topics` and
//! `topic_action`; every key it does not set is inherited from `[guard]`.

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use switchboard_config::ConfigError;

use crate::{config::Config, content::ContentFilters, policy::Action};

/// A per-route override (`[guard.routes.<route>]`). Every unset field inherits the `[guard]` value.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutePolicyConfig {
    /// `off`, `flag` or `block`; unset: `guard.injection_action`.
    pub injection_action: Option<String>,
    /// Injection score at or above which the action applies; unset: `guard.injection_threshold`.
    pub injection_threshold: Option<f64>,
    /// Topics (names of `[guard.topics.*]`) denied on this route; unset: `guard.denied_topics`.
    pub denied_topics: Option<Vec<String>>,
    /// `flag` or `block`; unset: `guard.topic_action`.
    pub topic_action: Option<String>,
}

/// What a route does about injections and topics.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePolicy {
    /// Threshold and action (flag or block) of the injection detector; `None`: off.
    pub injection: Option<(f32, Action)>,
    /// `denied[topic]`: whether the topic (index in [`ContentFilters::names`]) is denied.
    pub denied: Vec<bool>,
    /// Flag or block, for denied topics.
    pub topic_action: Action,
    /// Hash of the above (12 hex characters).
    pub version: String,
}

/// The route policies.
#[derive(Debug)]
pub struct RoutePolicies {
    default: RoutePolicy,
    routes: HashMap<String, RoutePolicy>,
}

impl RoutePolicies {
    /// Compiles the default and per-route policies; errors name the field.
    pub fn from_config(config: &Config, filters: &ContentFilters) -> Result<Self, ConfigError> {
        let default = compile(
            &config.injection_action,
            "guard.injection_action",
            config.injection_threshold,
            "guard.injection_threshold",
            &config.denied_topics,
            "guard.denied_topics",
            &config.topic_action,
            "guard.topic_action",
            filters,
        )?;
        let mut routes = HashMap::new();
        for (route, o) in &config.routes {
            let path = format!("guard.routes.{route}");
            if route.is_empty() {
                return Err(ConfigError::invalid(path, "route must not be empty"));
            }
            let own = |set: bool, key: &str, inherited: &str| {
                if set {
                    format!("{path}.{key}")
                } else {
                    inherited.to_owned()
                }
            };
            let policy = compile(
                o.injection_action
                    .as_deref()
                    .unwrap_or(&config.injection_action),
                &own(
                    o.injection_action.is_some(),
                    "injection_action",
                    "guard.injection_action",
                ),
                o.injection_threshold.unwrap_or(config.injection_threshold),
                &own(
                    o.injection_threshold.is_some(),
                    "injection_threshold",
                    "guard.injection_threshold",
                ),
                o.denied_topics.as_deref().unwrap_or(&config.denied_topics),
                &own(
                    o.denied_topics.is_some(),
                    "denied_topics",
                    "guard.denied_topics",
                ),
                o.topic_action.as_deref().unwrap_or(&config.topic_action),
                &own(
                    o.topic_action.is_some(),
                    "topic_action",
                    "guard.topic_action",
                ),
                filters,
            )?;
            routes.insert(route.clone(), policy);
        }
        Ok(RoutePolicies { default, routes })
    }

    /// The policy of `route` (the default one when it has no override).
    pub fn for_route(&self, route: &str) -> &RoutePolicy {
        self.routes.get(route).unwrap_or(&self.default)
    }
}

/// `flag` or `block` (and `off` where `off_allowed`).
fn detector_action(
    name: &str,
    path: &str,
    off_allowed: bool,
) -> Result<Option<Action>, ConfigError> {
    match name {
        "off" if off_allowed => Ok(None),
        "flag" => Ok(Some(Action::Flag)),
        "block" => Ok(Some(Action::Block)),
        _ => Err(ConfigError::invalid(
            path,
            format!(
                "unknown action `{name}`, expected one of {}",
                if off_allowed {
                    "off, flag, block"
                } else {
                    "flag, block"
                }
            ),
        )),
    }
}

#[allow(clippy::too_many_arguments)]
fn compile(
    injection_action: &str,
    injection_action_path: &str,
    injection_threshold: f64,
    injection_threshold_path: &str,
    denied_topics: &[String],
    denied_topics_path: &str,
    topic_action: &str,
    topic_action_path: &str,
    filters: &ContentFilters,
) -> Result<RoutePolicy, ConfigError> {
    let action = detector_action(injection_action, injection_action_path, true)?;
    if !(0.0..=1.0).contains(&injection_threshold) {
        return Err(ConfigError::invalid(
            injection_threshold_path,
            "must be between 0.0 and 1.0",
        ));
    }
    // Narrowed once here; scores are f32.
    #[allow(clippy::cast_possible_truncation)]
    let threshold = injection_threshold as f32;
    let topic_action =
        detector_action(topic_action, topic_action_path, false)?.unwrap_or(Action::Block);
    let mut denied = vec![false; filters.names().len()];
    for (i, topic) in denied_topics.iter().enumerate() {
        let Some(index) = filters.index(topic) else {
            return Err(ConfigError::invalid(
                format!("{denied_topics_path}[{i}]"),
                format!(
                    "unknown topic `{topic}`, expected one of the [guard.topics] tables: {}",
                    filters.names().join(", ")
                ),
            ));
        };
        denied[index] = true;
    }
    let mut hasher = Sha256::new();
    hasher.update(b"switchboard.guard.route.v1\0");
    match action {
        Some(action) => {
            hasher.update(action.as_str().as_bytes());
            hasher.update(threshold.to_le_bytes());
        }
        None => hasher.update(b"off"),
    }
    hasher.update(b"\0");
    hasher.update(topic_action.as_str().as_bytes());
    for (name, denied) in filters.names().iter().zip(&denied) {
        if *denied {
            hasher.update(b"\0");
            hasher.update(name.as_bytes());
        }
    }
    Ok(RoutePolicy {
        injection: action.map(|a| (threshold, a)),
        denied,
        topic_action,
        version: hex::encode(&hasher.finalize()[..6]),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::content::TopicConfig;

    fn config() -> Config {
        Config {
            topics: BTreeMap::from([
                (
                    "weapons".to_owned(),
                    TopicConfig {
                        terms: vec!["ricin".into()],
                        patterns: Vec::new(),
                    },
                ),
                (
                    "finance".to_owned(),
                    TopicConfig {
                        terms: vec!["stock tip".into()],
                        patterns: Vec::new(),
                    },
                ),
            ]),
            denied_topics: vec!["weapons".into()],
            routes: BTreeMap::from([
                (
                    "strict".to_owned(),
                    RoutePolicyConfig {
                        injection_action: Some("block".into()),
                        injection_threshold: Some(0.3),
                        denied_topics: Some(vec!["weapons".into(), "finance".into()]),
                        ..Default::default()
                    },
                ),
                (
                    "lenient".to_owned(),
                    RoutePolicyConfig {
                        injection_action: Some("off".into()),
                        topic_action: Some("flag".into()),
                        ..Default::default()
                    },
                ),
            ]),
            ..Config::default()
        }
    }

    #[test]
    fn routes_inherit_unset_keys() {
        let config = config();
        let filters = ContentFilters::new(&config.topics).unwrap();
        let policies = RoutePolicies::from_config(&config, &filters).unwrap();
        let default = policies.for_route("");
        assert_eq!(policies.for_route("unknown-model"), default);
        #[allow(clippy::cast_possible_truncation)]
        let default_threshold = config.injection_threshold as f32;
        assert_eq!(default.injection, Some((default_threshold, Action::Flag)));
        // Topics are indexed by name: finance, weapons.
        assert_eq!(default.denied, [false, true]);
        assert_eq!(default.topic_action, Action::Block);
        let strict = policies.for_route("strict");
        assert_eq!(strict.injection, Some((0.3, Action::Block)));
        assert_eq!(strict.denied, [true, true]);
        assert_eq!(strict.topic_action, Action::Block);
        let lenient = policies.for_route("lenient");
        assert_eq!(lenient.injection, None);
        assert_eq!(lenient.denied, [false, true]);
        assert_eq!(lenient.topic_action, Action::Flag);
        assert_ne!(strict.version, default.version);
        assert_ne!(lenient.version, default.version);
        assert_eq!(default.version.len(), 12);
    }

    #[test]
    fn errors_name_the_route_field() {
        type Edit = fn(&mut Config);
        let cases: [(Edit, &str); 5] = [
            (
                |c| {
                    c.routes.get_mut("strict").unwrap().injection_action = Some("warn".into());
                },
                "guard.routes.strict.injection_action",
            ),
            (
                |c| {
                    c.routes.get_mut("strict").unwrap().injection_threshold = Some(1.5);
                },
                "guard.routes.strict.injection_threshold",
            ),
            (
                |c| {
                    c.routes.get_mut("lenient").unwrap().denied_topics =
                        Some(vec!["weapons".into(), "drugs".into()]);
                },
                "guard.routes.lenient.denied_topics[1]",
            ),
            (
                |c| {
                    c.routes.get_mut("lenient").unwrap().topic_action = Some("off".into());
                },
                "guard.routes.lenient.topic_action",
            ),
            (
                |c| c.injection_threshold = -0.1,
                "guard.injection_threshold",
            ),
        ];
        for (edit, path) in cases {
            let mut config = config();
            edit(&mut config);
            let filters = ContentFilters::new(&config.topics).unwrap();
            let error = RoutePolicies::from_config(&config, &filters)
                .unwrap_err()
                .to_string();
            assert!(error.contains(&format!("`{path}`")), "{path}: {error}");
        }
    }
}
