//! The audit trail: one [`AuditEvent`] per decision that found something or acted, published in
//! batch messages (`AuditBatch` on `<prefix>.audit.batch.v1`, ADR 009) on the JetStream stream
//! [`NatsConfig::audit_stream`] off the request path.
//!
//! A check only builds the event and `try_send`s it into a bounded queue; a background task takes
//! what is queued (the first event of a batch waits `linger_ms` for company), publishes it as one
//! message per run of at most 256 KiB (all sent, then the acks awaited), and retries a run that is
//! not acknowledged with the same `Nats-Msg-Id`, so a retry is stored once. A full queue never
//! blocks a check: the event is dropped, counted and logged at error level (`audit queue full`).
//!
//! What is audited: every decision other than a plain allow with no findings (blocks, transforms,
//! flags and allowed findings such as an injection score under the block threshold that was
//! flagged). An allow with nothing found is the common case and carries no information for an
//! auditor. Events carry entity types, counts, actions, versions, the injection score and the
//! matched topic names, never a checked value, a pseudonym, or a hash of either.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream;
use serde::Deserialize;
use switchboard_bus::{AuditEvent, NatsConfig};
use switchboard_config::ConfigError;
use switchboard_proto::guard::v1::Finding as PbFinding;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;

use crate::{
    guard::{Decision, FindingKind, Outcome},
    policy::{Action, Direction},
};

/// `[guard.audit]`.
///
/// ```toml
/// [guard.audit]
/// enabled = true          # needs the [nats] section
/// queue_capacity = 4096   # events waiting for the publisher; a full queue drops (loudly)
/// publish_timeout_ms = 5000
/// linger_ms = 20          # the first event of a batch waits this long for others (one message)
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Publish audit events (the guard binary then connects to `[nats]`).
    pub enabled: bool,
    /// Capacity of the queue between checks and the publisher.
    pub queue_capacity: usize,
    /// How long one publish (send and JetStream ack) may take before it is retried.
    pub publish_timeout_ms: u64,
    /// How long the first event of a batch waits for others to share its message, milliseconds
    /// (0: publish what is queued at once). Not on the request path.
    pub linger_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            queue_capacity: 4096,
            publish_timeout_ms: 5000,
            linger_ms: 20,
        }
    }
}

impl AuditConfig {
    /// Checks the values; errors name the dotted field path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.queue_capacity == 0 {
            return Err(ConfigError::invalid(
                "guard.audit.queue_capacity",
                "must be at least 1",
            ));
        }
        if self.linger_ms > 1000 {
            return Err(ConfigError::invalid(
                "guard.audit.linger_ms",
                "must be at most 1000",
            ));
        }
        if self.publish_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "guard.audit.publish_timeout_ms",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Counters of the audit trail (exposed for tests and logs).
#[derive(Debug, Default)]
pub struct AuditStats {
    /// Events queued.
    pub queued: AtomicU64,
    /// Events JetStream acknowledged.
    pub published: AtomicU64,
    /// Events dropped because the queue was full or closed.
    pub dropped: AtomicU64,
    /// Events given up after every retry failed.
    pub failed: AtomicU64,
}

/// An event waiting for the publisher (it names its trace by id, `AuditEvent.trace_id`).
pub struct Queued {
    event: AuditEvent,
}

/// The producer side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Queued>,
    stats: Arc<AuditStats>,
}

/// Who asked and about what (the request's metadata, never its text).
pub struct Subject<'a> {
    /// Request id.
    pub request_id: &'a str,
    /// App id.
    pub app: &'a str,
    /// Team id.
    pub team: &'a str,
    /// Route.
    pub route: &'a str,
    /// Direction.
    pub direction: Direction,
    /// Check number within the request and direction.
    pub sequence: u32,
}

impl AuditSink {
    /// A sink and the receiver its publisher drains.
    pub fn channel(capacity: usize) -> (AuditSink, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            AuditSink {
                tx,
                stats: Arc::new(AuditStats::default()),
            },
            rx,
        )
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<AuditStats> {
        &self.stats
    }

    /// Queues the event of `outcome` when it is audited (see the module docs); never waits.
    pub fn record(&self, subject: &Subject<'_>, outcome: &Outcome) {
        if !audited(outcome) {
            return;
        }
        let event = event_of(subject, outcome, switchboard_telemetry::current_trace_id());
        let queued = Queued { event };
        match self.tx.try_send(queued) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(queued) | TrySendError::Closed(queued)) => {
                let dropped = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    audit.event_id = %queued.event.event_id,
                    app.id = %queued.event.app,
                    audit_dropped_total = dropped,
                    "audit queue full; audit event dropped"
                );
            }
        }
    }
}

/// Whether a decision is audited: anything but an allow with nothing found.
pub fn audited(outcome: &Outcome) -> bool {
    outcome.decision != Decision::Allow || !outcome.findings.is_empty()
}

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Prompt => "prompt",
        Direction::Answer => "answer",
    }
}

/// The event of one decision (entity types, counts, actions and versions only).
pub fn event_of(subject: &Subject<'_>, outcome: &Outcome, trace_id: String) -> AuditEvent {
    let direction = direction_name(subject.direction);
    let occurred_at_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let request_id = if subject.request_id.is_empty() {
        // No request id (a direct caller): a unique id so that events are not merged.
        format!("anonymous-{occurred_at_unix_ms}-{}", next_anonymous())
    } else {
        subject.request_id.to_owned()
    };
    let injection_decision = outcome
        .findings
        .iter()
        .find(|f| f.kind == FindingKind::Injection)
        .map_or("none", |f| match f.action {
            Action::Block => "block",
            _ => "flag",
        });
    let mut content_topics: Vec<String> = outcome
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::ContentFilter)
        .map(|f| f.entity_type.to_string())
        .collect();
    content_topics.sort();
    content_topics.dedup();
    AuditEvent {
        event_id: format!("{request_id}:{direction}:{}", subject.sequence),
        request_id,
        app: subject.app.to_owned(),
        team: subject.team.to_owned(),
        route: subject.route.to_owned(),
        direction: direction.to_owned(),
        sequence: subject.sequence,
        decision: match outcome.decision {
            Decision::Allow => "allow",
            Decision::Transform => "transform",
            Decision::Block => "block",
        }
        .to_owned(),
        findings: outcome
            .findings
            .iter()
            .map(|f| PbFinding {
                entity_type: f.entity_type.to_string(),
                count: f.count,
                action: f.action.as_str().to_owned(),
                kind: f.kind.as_str().to_owned(),
            })
            .collect(),
        policy_version: outcome.policy_version.clone(),
        detector_version: outcome.detector_version.clone(),
        injection_score: outcome.injection_score,
        injection_decision: injection_decision.to_owned(),
        content_topics,
        trace_id,
        occurred_at_unix_ms,
        source: "guard".to_owned(),
    }
}

fn next_anonymous() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

const RETRIES: u32 = 5;

/// Publishes queued events until `cancel` fires, then publishes what is still queued (each run
/// with its retries) and stops.
pub async fn publish_loop(
    mut rx: mpsc::Receiver<Queued>,
    js: jetstream::Context,
    nats: NatsConfig,
    stats: Arc<AuditStats>,
    timing: Timing,
    cancel: CancellationToken,
) {
    tracing::info!(stream = %nats.audit_stream(), "audit publisher started");
    loop {
        let next = tokio::select! {
            biased;
            next = rx.recv() => next,
            () = cancel.cancelled() => None,
        };
        let Some(queued) = next else { break };
        let mut batch = vec![queued];
        if !timing.linger.is_zero() {
            let until = tokio::time::Instant::now() + timing.linger;
            while batch.len() < BATCH {
                tokio::select! {
                    biased;
                    received = tokio::time::timeout_at(until, rx.recv()) => match received {
                        Ok(Some(queued)) => batch.push(queued),
                        Ok(None) | Err(_) => break,
                    },
                    () = cancel.cancelled() => break,
                }
            }
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(queued) => batch.push(queued),
                Err(_) => break,
            }
        }
        publish_batch(&js, &nats, &stats, timing.timeout, batch).await;
    }
    // Drain: checks that ran before the shutdown are still audited.
    rx.close();
    let mut rest = Vec::new();
    while let Ok(queued) = rx.try_recv() {
        rest.push(queued);
    }
    publish_batch(&js, &nats, &stats, timing.timeout, rest).await;
    tracing::info!("audit publisher stopped");
}

/// The publisher's timing (`[guard.audit]`).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long one publish (send and ack) may take.
    pub timeout: Duration,
    /// How long the first event of a batch waits for company.
    pub linger: Duration,
}

/// Most events taken from the queue at once.
const BATCH: usize = 1024;

/// Publishes `batch` as batch messages, pipelined: every run is sent, then the acks are awaited.
/// A run that fails or is not acknowledged in time is retried with the same message id (JetStream
/// drops a duplicate).
async fn publish_batch(
    js: &jetstream::Context,
    nats: &NatsConfig,
    stats: &AuditStats,
    timeout: Duration,
    batch: Vec<Queued>,
) {
    let events: Vec<&AuditEvent> = batch.iter().map(|queued| &queued.event).collect();
    let mut sent = Vec::new();
    let mut retry = Vec::new();
    let mut start = 0usize;
    for run in switchboard_bus::audit_batch_runs(&events, switchboard_bus::MAX_USAGE_BATCH_BYTES) {
        let run = &events[start..start + run];
        start += run.len();
        let publish = switchboard_bus::publish_audit_batch(js, nats, run);
        match tokio::time::timeout(timeout, publish).await {
            Ok(Ok(ack)) => sent.push((run, ack)),
            Ok(Err(_)) | Err(_) => retry.push(run),
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    for (run, ack) in sent {
        match tokio::time::timeout_at(deadline, ack).await {
            Ok(Ok(_)) => {
                stats
                    .published
                    .fetch_add(run.len() as u64, Ordering::Relaxed);
            }
            Ok(Err(_)) | Err(_) => retry.push(run),
        }
    }
    for run in retry {
        publish_run(js, nats, stats, timeout, run).await;
    }
}

/// Publishes one run with retries and backoff; counts its events as failed when every try fails.
async fn publish_run(
    js: &jetstream::Context,
    nats: &NatsConfig,
    stats: &AuditStats,
    timeout: Duration,
    run: &[&AuditEvent],
) {
    let mut delay = Duration::from_millis(100);
    let first = run
        .first()
        .map(|event| event.event_id.as_str())
        .unwrap_or_default();
    for attempt in 1..=RETRIES {
        let sent = tokio::time::timeout(timeout, async {
            switchboard_bus::publish_audit_batch(js, nats, run)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        let error = match sent {
            Ok(Ok(_)) => {
                stats
                    .published
                    .fetch_add(run.len() as u64, Ordering::Relaxed);
                return;
            }
            Ok(Err(error)) => error,
            Err(_) => "timed out".to_owned(),
        };
        tracing::warn!(
            audit.event_id = %first,
            events = run.len(),
            attempt,
            %error,
            "audit publish failed"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
    let failed = stats.failed.fetch_add(run.len() as u64, Ordering::Relaxed) + run.len() as u64;
    tracing::error!(
        audit.event_id = %first,
        events = run.len(),
        audit_failed_total = failed,
        "audit events not published after retries"
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{Config, Guard};
    use switchboard_proto::chat::v1::{Message, Role};

    fn subject(direction: Direction) -> Subject<'static> {
        Subject {
            request_id: "req-1",
            app: "web",
            team: "team-1",
            route: "gpt-4o-mini",
            direction,
            sequence: 0,
        }
    }

    #[test]
    fn events_carry_types_and_counts_never_values() {
        let guard = Guard::new(&Config::default()).unwrap();
        let text = "mail jane.doe@example.org or pay 4111 1111 1111 1111";
        let outcome = guard
            .check("web", Direction::Prompt, &[Message::text(Role::User, text)])
            .unwrap();
        assert!(audited(&outcome));
        let event = event_of(&subject(Direction::Prompt), &outcome, "ab".repeat(16));
        assert_eq!(event.event_id, "req-1:prompt:0");
        assert_eq!(event.decision, "transform");
        assert_eq!(event.team, "team-1");
        let types: Vec<&str> = event
            .findings
            .iter()
            .map(|f| f.entity_type.as_str())
            .collect();
        assert_eq!(types, ["CREDIT_CARD", "EMAIL_ADDRESS"]);
        let debug = format!("{event:?}");
        assert!(!debug.contains("jane.doe"), "{debug}");
        assert!(!debug.contains("1111"), "{debug}");
    }

    #[test]
    fn a_clean_allow_is_not_audited() {
        let guard = Guard::new(&Config::default()).unwrap();
        let outcome = guard
            .check(
                "web",
                Direction::Answer,
                &[Message::text(Role::Assistant, "nothing to see")],
            )
            .unwrap();
        assert!(!audited(&outcome));
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_blocking() {
        let guard = Guard::new(&Config::default()).unwrap();
        let outcome = guard
            .check(
                "web",
                Direction::Prompt,
                &[Message::text(Role::User, "a@example.org")],
            )
            .unwrap();
        let (sink, mut rx) = AuditSink::channel(1);
        sink.record(&subject(Direction::Prompt), &outcome);
        sink.record(&subject(Direction::Prompt), &outcome);
        assert_eq!(sink.stats().queued.load(Ordering::Relaxed), 1);
        assert_eq!(sink.stats().dropped.load(Ordering::Relaxed), 1);
        assert!(rx.try_recv().is_ok());
    }
}
