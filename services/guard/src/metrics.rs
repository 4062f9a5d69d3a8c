//! The guard's Prometheus metrics, on `GET /metrics` at `guard.metrics_addr` (unset: not served).
//!
//! On the request path, a check adds one relaxed atomic for its decision and one per kind and
//! action of what it found (`grpc.rs`); the audit trail ([`AuditStats`]) and the admission
//! ([`AdmissionStats`]) keep their own counters, read at scrape time. Labels are fixed names only:
//! direction, decision, finding kind and action, shed reason; never an app, a team, a route, an
//! entity value or a topic name.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use crate::{
    admission::{Admission, AdmissionStats},
    audit::AuditStats,
    guard::{Decision, FindingKind, Outcome},
    policy::{Action, Direction},
};

const DIRECTIONS: [&str; 2] = ["prompt", "answer"];
const DECISIONS: [&str; 3] = ["allow", "transform", "block"];
const KINDS: [&str; 3] = ["entity", "injection", "content_filter"];
const ACTIONS: [&str; 7] = [
    "allow",
    "redact",
    "mask",
    "hash",
    "pseudonymize",
    "block",
    "flag",
];

fn direction(direction: Direction) -> usize {
    match direction {
        Direction::Prompt => 0,
        Direction::Answer => 1,
    }
}

fn decision(decision: Decision) -> usize {
    match decision {
        Decision::Allow => 0,
        Decision::Transform => 1,
        Decision::Block => 2,
    }
}

fn kind(kind: FindingKind) -> usize {
    match kind {
        FindingKind::Entity => 0,
        FindingKind::Injection => 1,
        FindingKind::ContentFilter => 2,
    }
}

fn action(action: Action) -> usize {
    match action {
        Action::Allow => 0,
        Action::Redact => 1,
        Action::Mask => 2,
        Action::Hash => 3,
        Action::Pseudonymize => 4,
        Action::Block => 5,
        Action::Flag => 6,
    }
}

/// The check counters of one guard.
#[derive(Debug, Default)]
pub struct Metrics {
    /// [direction][decision]
    checks: [[AtomicU64; DECISIONS.len()]; DIRECTIONS.len()],
    /// [direction]: checks that failed (content the guard cannot inspect).
    failed: [AtomicU64; DIRECTIONS.len()],
    /// [direction][kind][action]: matches found (a finding's count).
    findings: [[[AtomicU64; ACTIONS.len()]; KINDS.len()]; DIRECTIONS.len()],
}

impl Metrics {
    /// A check in `direction` decided `outcome`.
    pub fn checked(&self, dir: Direction, outcome: &Outcome) {
        let d = direction(dir);
        self.checks[d][decision(outcome.decision)].fetch_add(1, Relaxed);
        for finding in &outcome.findings {
            self.findings[d][kind(finding.kind)][action(finding.action)]
                .fetch_add(u64::from(finding.count), Relaxed);
        }
    }

    /// A check in `direction` failed (an invalid request).
    pub fn failed(&self, dir: Direction) {
        self.failed[direction(dir)].fetch_add(1, Relaxed);
    }

    /// Everything in the Prometheus text format: these counters, the audit trail's (when it is
    /// on) and the admission's.
    pub fn render(&self, audit: Option<&AuditStats>, admission: &Admission) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP switchboard_guard_checks_total Checks answered, by direction and decision.\n\
             # TYPE switchboard_guard_checks_total counter\n",
        );
        for (dir, row) in DIRECTIONS.iter().zip(&self.checks) {
            for (decision, count) in DECISIONS.iter().zip(row) {
                let _ = writeln!(
                    out,
                    "switchboard_guard_checks_total{{direction=\"{dir}\",decision=\"{decision}\"}} {}",
                    count.load(Relaxed)
                );
            }
        }
        out.push_str(
            "# HELP switchboard_guard_check_errors_total Checks refused as invalid (content the guard cannot inspect), by direction.\n\
             # TYPE switchboard_guard_check_errors_total counter\n",
        );
        for (dir, count) in DIRECTIONS.iter().zip(&self.failed) {
            let _ = writeln!(
                out,
                "switchboard_guard_check_errors_total{{direction=\"{dir}\"}} {}",
                count.load(Relaxed)
            );
        }
        out.push_str(
            "# HELP switchboard_guard_findings_total Matches found, by direction, detector kind and the action taken.\n\
             # TYPE switchboard_guard_findings_total counter\n",
        );
        for (dir, kinds) in DIRECTIONS.iter().zip(&self.findings) {
            for (kind, actions) in KINDS.iter().zip(kinds) {
                for (action, count) in ACTIONS.iter().zip(actions) {
                    let count = count.load(Relaxed);
                    if count > 0 {
                        let _ = writeln!(
                            out,
                            "switchboard_guard_findings_total{{direction=\"{dir}\",kind=\"{kind}\",action=\"{action}\"}} {count}"
                        );
                    }
                }
            }
        }
        render_admission(&mut out, admission.stats(), admission.in_flight());
        if let Some(audit) = audit {
            render_audit(&mut out, audit);
        }
        out
    }
}

fn render_admission(out: &mut String, stats: &AdmissionStats, in_flight: usize) {
    let _ = write!(
        out,
        "# HELP switchboard_guard_in_flight Check calls received and not yet answered.\n\
         # TYPE switchboard_guard_in_flight gauge\n\
         switchboard_guard_in_flight {in_flight}\n\
         # HELP switchboard_guard_admitted_total Check calls admitted.\n\
         # TYPE switchboard_guard_admitted_total counter\n\
         switchboard_guard_admitted_total {}\n\
         # HELP switchboard_guard_shed_total Check calls refused for overload (UNAVAILABLE, GUARD_OVERLOADED), by bound: max_in_flight (at once), max_wait (waited too long, unchecked).\n\
         # TYPE switchboard_guard_shed_total counter\n\
         switchboard_guard_shed_total{{reason=\"max_in_flight\"}} {}\n\
         switchboard_guard_shed_total{{reason=\"max_wait\"}} {}\n",
        stats.admitted.load(Relaxed),
        stats.refused_in_flight.load(Relaxed),
        stats.refused_waited.load(Relaxed),
    );
}

fn render_audit(out: &mut String, stats: &AuditStats) {
    let _ = write!(
        out,
        "# HELP switchboard_guard_audit_events_total Audit events by fate: queued for the publisher, published (JetStream acknowledged), dropped (queue full: never published), failed (every retry failed).\n\
         # TYPE switchboard_guard_audit_events_total counter\n\
         switchboard_guard_audit_events_total{{outcome=\"queued\"}} {}\n\
         switchboard_guard_audit_events_total{{outcome=\"published\"}} {}\n\
         switchboard_guard_audit_events_total{{outcome=\"dropped\"}} {}\n\
         switchboard_guard_audit_events_total{{outcome=\"failed\"}} {}\n",
        stats.queued.load(Relaxed),
        stats.published.load(Relaxed),
        stats.dropped.load(Relaxed),
        stats.failed.load(Relaxed),
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::{Finding, admission::AdmissionConfig};

    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn renders_checks_findings_sheds_and_audit_fates() {
        let metrics = Metrics::default();
        let outcome = Outcome {
            decision: Decision::Transform,
            findings: vec![
                Finding {
                    entity_type: Cow::Borrowed("EMAIL_ADDRESS"),
                    count: 2,
                    action: Action::Redact,
                    kind: FindingKind::Entity,
                },
                Finding {
                    entity_type: Cow::Borrowed("PROMPT_INJECTION"),
                    count: 1,
                    action: Action::Flag,
                    kind: FindingKind::Injection,
                },
            ],
            messages: Vec::new(),
            pseudonyms: crate::pseudonym::Mapping::default(),
            policy_version: String::new(),
            injection_score: 0.7,
            detector_version: String::new(),
            check_answer: false,
            prompt_passthrough: false,
        };
        metrics.checked(Direction::Prompt, &outcome);
        metrics.failed(Direction::Answer);
        let admission = Admission::new(&AdmissionConfig {
            max_in_flight: 1,
            max_wait_ms: 0,
        });
        let slot = admission.enter().unwrap();
        assert!(admission.enter().is_err());
        let audit = AuditStats::default();
        audit.dropped.fetch_add(3, Relaxed);
        audit.published.fetch_add(5, Relaxed);
        let text = metrics.render(Some(&audit), &admission);
        for (series, expected) in [
            (
                "switchboard_guard_checks_total{direction=\"prompt\",decision=\"transform\"}",
                1,
            ),
            (
                "switchboard_guard_checks_total{direction=\"prompt\",decision=\"allow\"}",
                0,
            ),
            (
                "switchboard_guard_check_errors_total{direction=\"answer\"}",
                1,
            ),
            (
                "switchboard_guard_findings_total{direction=\"prompt\",kind=\"entity\",action=\"redact\"}",
                2,
            ),
            (
                "switchboard_guard_findings_total{direction=\"prompt\",kind=\"injection\",action=\"flag\"}",
                1,
            ),
            ("switchboard_guard_in_flight", 1),
            ("switchboard_guard_admitted_total", 1),
            ("switchboard_guard_shed_total{reason=\"max_in_flight\"}", 1),
            ("switchboard_guard_shed_total{reason=\"max_wait\"}", 0),
            (
                "switchboard_guard_audit_events_total{outcome=\"dropped\"}",
                3,
            ),
            (
                "switchboard_guard_audit_events_total{outcome=\"published\"}",
                5,
            ),
        ] {
            assert_eq!(value(&text, series), Some(expected), "{series}:\n{text}");
        }
        // Nothing found of a kind: no series for it.
        assert!(!text.contains("kind=\"content_filter\""), "{text}");
        drop(slot);
        // Without an audit trail, no audit series.
        let text = metrics.render(None, &admission);
        assert!(!text.contains("audit_events"), "{text}");
        assert_eq!(value(&text, "switchboard_guard_in_flight"), Some(0));
    }
}
