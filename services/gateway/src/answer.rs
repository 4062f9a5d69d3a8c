//! The guard's side of a request beyond CheckPrompt: whether the route fails open or closed when the
//! guard is unreachable (`[gateway.guard]`), and what the prompt check said about the answer
//! ([`GuardVerdict`]: whether CheckAnswer must run, whether the request went unchecked).
//!
//! Answers are checked after the provider and before pseudonyms are restored, only when the
//! guard's CheckPrompt response says the app's or route's policy acts on answers
//! (`check_answer`), so the common path adds no RPC. The cache stores the answer *after* the
//! answer check (still with placeholders): it must never hold a value the policy said to redact.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Deserialize;
use switchboard_config::ConfigError;

/// `[gateway.guard]`.
///
/// ```toml
/// [gateway.guard]
/// fail_open_routes = ["internal-summaries"]  # requested models/routes served without the guard
///                                            # when it is unreachable; every other route: 503
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Routes (requested model names) that proceed unchecked when the guard is unreachable;
    /// every other route fails closed with a 503 `guard_unavailable`.
    pub fail_open_routes: Vec<String>,
}

impl GuardConfig {
    /// Checks the values; errors name the dotted field path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = BTreeSet::new();
        for (i, route) in self.fail_open_routes.iter().enumerate() {
            if route.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("gateway.guard.fail_open_routes[{i}]"),
                    "must not be empty",
                ));
            }
            if !seen.insert(route) {
                return Err(ConfigError::invalid(
                    format!("gateway.guard.fail_open_routes[{i}]"),
                    format!("`{route}` is listed twice"),
                ));
            }
        }
        Ok(())
    }
}

/// How the gateway treats an unreachable guard, per route.
#[derive(Clone, Default)]
pub struct GuardFailure {
    fail_open: Arc<BTreeSet<String>>,
    /// Requests let through unchecked (prompt or answer) because their route fails open.
    fail_open_total: Arc<AtomicU64>,
    /// Where an unchecked request's audit event goes (none: only the metric and the usage tag).
    audit: Option<UncheckedAudit>,
}

/// Publishes the gateway's own audit event of a request the guard did not check.
#[derive(Clone)]
struct UncheckedAudit {
    js: async_nats::jetstream::Context,
    nats: switchboard_bus::NatsConfig,
    tasks: tokio_util::task::TaskTracker,
}

/// The request a fail-open decision is about.
pub struct Unchecked<'a> {
    /// Request id.
    pub request_id: &'a str,
    /// App id.
    pub app: &'a str,
    /// Team id.
    pub team: &'a str,
    /// Route (requested model).
    pub route: &'a str,
    /// `prompt` or `answer`.
    pub direction: &'static str,
}

impl GuardFailure {
    /// From `[gateway.guard]`.
    pub fn new(config: &GuardConfig) -> Self {
        GuardFailure {
            fail_open: Arc::new(config.fail_open_routes.iter().cloned().collect()),
            fail_open_total: Arc::default(),
            audit: None,
        }
    }

    /// Also publishes an audit event (decision `unchecked`, source `gateway`) to the audit stream
    /// for every request let through unchecked, in a task tracked by `tasks`.
    pub fn with_audit(
        mut self,
        js: async_nats::jetstream::Context,
        nats: switchboard_bus::NatsConfig,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        self.audit = Some(UncheckedAudit { js, nats, tasks });
        self
    }

    /// Whether the request's route proceeds without the guard (counted, logged and audited when
    /// it does).
    pub fn fails_open(&self, request: &Unchecked<'_>) -> bool {
        if !self.fail_open.contains(request.route) {
            return false;
        }
        let total = self.fail_open_total.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            request.id = %request.request_id,
            route = %request.route,
            direction = request.direction,
            guard_fail_open_total = total,
            "guard unavailable; route fails open: request proceeds unchecked"
        );
        if let Some(audit) = &self.audit {
            let event = unchecked_event(request);
            let parent = switchboard_telemetry::current_context();
            let (js, nats) = (audit.js.clone(), audit.nats.clone());
            audit.tasks.spawn(async move {
                let published = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    switchboard_bus::publish_audit_in(&js, &nats, &event, &parent)
                        .await
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| e.to_string())
                })
                .await;
                if !matches!(published, Ok(Ok(_))) {
                    tracing::error!(audit.event_id = %event.event_id, "audit event of an unchecked request not published");
                }
            });
        }
        true
    }

    /// `switchboard_guard_fail_open_total`.
    pub fn fail_open_total(&self) -> u64 {
        self.fail_open_total.load(Ordering::Relaxed)
    }
}

/// The audit event of a request let through without the guard.
fn unchecked_event(request: &Unchecked<'_>) -> switchboard_bus::AuditEvent {
    let occurred_at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    switchboard_bus::AuditEvent {
        event_id: format!("{}:{}:0", request.request_id, request.direction),
        request_id: request.request_id.to_owned(),
        app: request.app.to_owned(),
        team: request.team.to_owned(),
        route: request.route.to_owned(),
        direction: request.direction.to_owned(),
        decision: "unchecked".to_owned(),
        injection_decision: "none".to_owned(),
        trace_id: switchboard_telemetry::current_trace_id(),
        occurred_at_unix_ms,
        source: "gateway".to_owned(),
        ..Default::default()
    }
}

/// What the prompt check decided about the rest of the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardVerdict {
    /// The policy acts on answers: CheckAnswer runs on the provider's answer.
    pub check_answer: bool,
    /// The guard was unreachable and the route fails open: nothing was checked (the usage event is
    /// tagged `switchboard.guard = unchecked` and the answer is not cached).
    pub unchecked: bool,
}

/// The usage-event tag of a request the guard did not check.
pub const UNCHECKED_TAG: (&str, &str) = ("switchboard.guard", "unchecked");

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_routes_fail_open_and_they_are_counted() {
        let failure = GuardFailure::new(&GuardConfig {
            fail_open_routes: vec!["open".into()],
        });
        let request = |route| Unchecked {
            request_id: "r1",
            app: "a",
            team: "t",
            route,
            direction: "prompt",
        };
        assert!(!failure.fails_open(&request("gpt-4o")));
        assert!(failure.fails_open(&request("open")));
        assert_eq!(failure.fail_open_total(), 1);
        assert!(!GuardFailure::default().fails_open(&request("open")));
        let event = unchecked_event(&request("open"));
        assert_eq!(
            (event.event_id.as_str(), event.decision.as_str()),
            ("r1:prompt:0", "unchecked")
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let error = GuardConfig {
            fail_open_routes: vec!["a".into(), "a".into()],
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("gateway.guard.fail_open_routes[1]"),
            "{error}"
        );
        assert!(
            GuardConfig {
                fail_open_routes: vec![" ".into()]
            }
            .validate()
            .is_err()
        );
    }
}

/// Characters of a streamed answer held back before they are checked: more than the longest entity
/// that could straddle a chunk boundary (cards, IBANs, emails, keys), so that a value split by the
/// provider's chunking is whole when its window is checked.
pub const STREAM_HOLD_CHARS: usize = 128;

/// Where the stable part of `pending` (to be checked and sent now) ends: the last whitespace that
/// leaves at least [`STREAM_HOLD_CHARS`] characters held back and does not sit between two digits
/// (a card or phone number written in groups), or `None` when nothing is stable yet.
pub fn stable_cut(pending: &str) -> Option<usize> {
    let chars: Vec<(usize, char)> = pending.char_indices().collect();
    if chars.len() <= STREAM_HOLD_CHARS {
        return None;
    }
    let limit = chars.len() - STREAM_HOLD_CHARS;
    (1..=limit).rev().find_map(|i| {
        let (at, c) = chars[i];
        let before = chars[i - 1].1;
        let after = chars.get(i + 1).map(|(_, c)| *c);
        (c.is_whitespace()
            && !(before.is_ascii_digit() && after.is_some_and(|a| a.is_ascii_digit())))
        .then_some(at + c.len_utf8())
    })
}

/// Held-back answer text of a stream, per choice index.
#[derive(Debug, Default)]
pub struct StreamHold {
    pending: std::collections::BTreeMap<u32, String>,
    /// Windows checked so far (the CheckAnswer `sequence` of the next one is this + 1).
    pub windows: u32,
}

impl StreamHold {
    /// Adds `content` of choice `index` and returns the stable text to check and send now
    /// (empty when everything is still held back). `last`: the choice finished, flush it all.
    pub fn push(&mut self, index: u32, content: &str, last: bool) -> String {
        let pending = self.pending.entry(index).or_default();
        pending.push_str(content);
        let cut = if last {
            Some(pending.len())
        } else {
            stable_cut(pending)
        };
        match cut {
            Some(cut) => {
                let rest = pending.split_off(cut);
                std::mem::replace(pending, rest)
            }
            None => String::new(),
        }
    }

    /// Everything still held, by choice index (end of stream).
    pub fn drain(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|(_, text)| !text.is_empty())
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod stream_tests {
    use super::*;

    #[test]
    fn text_is_held_until_enough_follows_and_cuts_avoid_digit_groups() {
        let mut hold = StreamHold::default();
        assert_eq!(hold.push(0, "write to jane.", false), "");
        assert_eq!(hold.push(0, "doe@example.org please", false), "");
        let long = "x ".repeat(STREAM_HOLD_CHARS);
        let stable = hold.push(0, &long, false);
        // The email is in the stable part whole, and at least the hold is kept back.
        assert!(stable.starts_with("write to jane.doe@example.org please"));
        let held: usize = hold.drain().iter().map(|(_, t)| t.chars().count()).sum();
        assert!(held >= STREAM_HOLD_CHARS);

        let card = format!(
            "{}4111 1111 1111 1111{}",
            "a ".repeat(10),
            " b".repeat(STREAM_HOLD_CHARS / 2 - 5)
        );
        let cut = stable_cut(&card).unwrap();
        assert!(!card[..cut].contains("4111 1111") || card[..cut].contains("4111 1111 1111 1111"));
        assert_eq!(hold.push(1, "tail", true), "tail");
    }
}
