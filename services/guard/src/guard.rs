//! The check itself: find entities in every text part, then allow, redact or block per policy.

use std::collections::BTreeMap;

use switchboard_proto::chat::v1::{Message, content_part::Part};

use crate::{
    config::Config,
    error::{GuardError, StartupError},
    policy::{Action, Policies},
    recognizer::{self, Recognizer, Registry},
};

/// What the guard decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Pass unchanged.
    Allow,
    /// Pass [`Outcome::messages`] instead.
    Transform,
    /// Refuse.
    Block,
}

/// Matches of one entity type. Never holds the matched values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Entity type.
    pub entity_type: &'static str,
    /// Number of matches.
    pub count: u32,
    /// The action taken.
    pub action: Action,
}

/// The result of a check.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The decision.
    pub decision: Decision,
    /// The redacted conversation (only when `decision` is `Transform`).
    pub messages: Vec<Message>,
    /// Findings by entity type, sorted by entity type.
    pub findings: Vec<Finding>,
    /// Version of the policy that decided.
    pub policy_version: String,
}

/// The recognisers and the policies.
pub struct Guard {
    registry: Registry,
    policies: Policies,
}

impl Guard {
    /// Builds the guard from a configuration (validated again here).
    pub fn new(config: &Config) -> Result<Self, StartupError> {
        config.validate()?;
        Ok(Guard {
            registry: Registry::builtin()?,
            policies: Policies::from_config(config)?,
        })
    }

    /// Checks the text parts of every message (all roles) under the policy of `app`.
    /// Other parts and fields are left as they are.
    pub fn check(&self, app: &str, messages: &[Message]) -> Result<Outcome, GuardError> {
        let policy = self.policies.for_app(app);
        let recognizers: Vec<&dyn Recognizer> = policy
            .entities
            .iter()
            .filter_map(|entity| self.registry.get(entity))
            .collect();
        let redact = policy.action == Action::Redact;
        let mut counts: BTreeMap<&'static str, u32> = BTreeMap::new();
        let mut transformed: Vec<Message> = Vec::new();
        if redact {
            transformed = messages.to_vec();
        }
        for (i, message) in messages.iter().enumerate() {
            for (j, part) in message.content.iter().enumerate() {
                let text = match &part.part {
                    Some(Part::Text(text)) => text,
                    Some(Part::ImageUrl(_)) => continue,
                    // A part kind this build does not know: it cannot be inspected, so it cannot pass.
                    None => {
                        return Err(GuardError::UninspectableContent {
                            message: i,
                            part: j,
                        });
                    }
                };
                let matches = recognizer::scan(text, &recognizers);
                if matches.is_empty() {
                    continue;
                }
                for m in &matches {
                    let count = counts.entry(m.entity_type).or_default();
                    *count = count.saturating_add(1);
                }
                if redact
                    && let Some(slot) = transformed.get_mut(i).and_then(|m| m.content.get_mut(j))
                {
                    slot.part = Some(Part::Text(recognizer::redact(text, &matches)));
                }
            }
        }
        let findings: Vec<Finding> = counts
            .into_iter()
            .map(|(entity_type, count)| Finding {
                entity_type,
                count,
                action: policy.action,
            })
            .collect();
        let decision = match (findings.is_empty(), policy.action) {
            (true, _) | (false, Action::Allow) => Decision::Allow,
            (false, Action::Redact) => Decision::Transform,
            (false, Action::Block) => Decision::Block,
        };
        if decision != Decision::Transform {
            transformed.clear();
        }
        Ok(Outcome {
            decision,
            messages: transformed,
            findings,
            policy_version: policy.version.clone(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::AppPolicyConfig;
    use switchboard_proto::chat::v1::{ContentPart, ImageUrl, Role, ToolCall};

    fn guard() -> Guard {
        let mut config = Config::default();
        config.apps.insert(
            "billing".into(),
            AppPolicyConfig {
                action: Some("block".into()),
                entities: None,
            },
        );
        config.apps.insert(
            "audit".into(),
            AppPolicyConfig {
                action: Some("allow".into()),
                entities: None,
            },
        );
        config.apps.insert(
            "cards".into(),
            AppPolicyConfig {
                action: None,
                entities: Some(vec!["CREDIT_CARD".into()]),
            },
        );
        Guard::new(&config).unwrap()
    }

    fn conversation() -> Vec<Message> {
        let mut assistant = Message::text(Role::Assistant, "noted, a@example.com");
        assistant.tool_calls.push(ToolCall {
            id: "call_1".into(),
            name: "lookup".into(),
            arguments_json: "{\"email\":\"x@example.com\"}".into(),
        });
        let mut user = Message::text(
            Role::User,
            "I am jane@example.com, card 4111 1111 1111 1111.",
        );
        user.name = "jane".into();
        user.content.push(ContentPart {
            part: Some(Part::ImageUrl(ImageUrl {
                url: "https://img.example/a.png".into(),
                detail: "low".into(),
            })),
        });
        user.content.push(ContentPart {
            part: Some(Part::Text("also bob@example.org".into())),
        });
        vec![Message::text(Role::System, "be brief"), user, assistant]
    }

    #[test]
    fn redact_replaces_matches_and_preserves_everything_else() {
        let input = conversation();
        let outcome = guard().check("web", &input).unwrap();
        assert_eq!(outcome.decision, Decision::Transform);
        assert_eq!(
            outcome.findings,
            vec![
                Finding {
                    entity_type: "CREDIT_CARD",
                    count: 1,
                    action: Action::Redact
                },
                Finding {
                    entity_type: "EMAIL_ADDRESS",
                    count: 3,
                    action: Action::Redact
                },
            ]
        );
        let out = &outcome.messages;
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], input[0]);
        assert_eq!(
            out[1].joined_text(),
            "I am [EMAIL_ADDRESS], card [CREDIT_CARD].also [EMAIL_ADDRESS]"
        );
        assert_eq!(out[1].content[1], input[1].content[1]);
        assert_eq!(out[1].name, "jane");
        assert_eq!(out[1].role, input[1].role);
        assert_eq!(out[2].joined_text(), "noted, [EMAIL_ADDRESS]");
        assert_eq!(out[2].tool_calls, input[2].tool_calls);
    }

    #[test]
    fn actions_follow_the_app_policy() {
        let guard = guard();
        let input = conversation();
        let blocked = guard.check("billing", &input).unwrap();
        assert_eq!(blocked.decision, Decision::Block);
        assert!(blocked.messages.is_empty());
        assert!(blocked.findings.iter().all(|f| f.action == Action::Block));
        let allowed = guard.check("audit", &input).unwrap();
        assert_eq!(allowed.decision, Decision::Allow);
        assert!(allowed.messages.is_empty());
        assert_eq!(allowed.findings.len(), 2);
        let cards = guard.check("cards", &input).unwrap();
        assert_eq!(
            cards
                .findings
                .iter()
                .map(|f| f.entity_type)
                .collect::<Vec<_>>(),
            ["CREDIT_CARD"]
        );
        assert!(cards.messages[1].joined_text().contains("jane@example.com"));
    }

    #[test]
    fn clean_prompts_are_allowed_without_messages() {
        let outcome = guard()
            .check(
                "billing",
                &[Message::text(Role::User, "hello @team, see a@b")],
            )
            .unwrap();
        assert_eq!(outcome.decision, Decision::Allow);
        assert!(outcome.messages.is_empty() && outcome.findings.is_empty());
        assert!(!outcome.policy_version.is_empty());
    }

    #[test]
    fn unknown_content_parts_fail_closed() {
        let mut message = Message::text(Role::User, "hi");
        message.content.push(ContentPart { part: None });
        let error = guard().check("web", &[message]).unwrap_err();
        assert!(matches!(
            error,
            GuardError::UninspectableContent {
                message: 0,
                part: 1
            }
        ));
    }
}
