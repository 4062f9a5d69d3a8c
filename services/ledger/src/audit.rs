//! The audit consumer: a second durable JetStream consumer (on the audit stream) that stores the
//! guard's audit events in the append-only table `audit_events`.
//!
//! A message is a guard's batch (`AuditBatch`, ADR 009) or a single event. A fetched batch of
//! messages is inserted in one transaction (`ON CONFLICT (event_id) DO NOTHING`, so a redelivery
//! is a no-op) and each message acknowledged only after the commit. Database failures are retried
//! with backoff (nothing is acknowledged). An undecodable message is terminated; an event that
//! cannot be stored (malformed, or refused by Postgres on its own) is logged as an error and
//! dropped, the rest of its message stored; a message none of whose events can be stored is
//! terminated. Nothing of that kind ever blocks the consumer.

use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use futures::StreamExt as _;
use sqlx::{PgPool, Postgres, QueryBuilder};
use switchboard_bus::{AuditEvent, NatsConfig};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::error::StartupError;

const IDLE_WAIT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Name of the audit consumer for the usage consumer `name`.
pub fn consumer_name(name: &str) -> String {
    format!("{name}-audit")
}

/// Creates the audit stream (if missing) and the durable audit consumer (if missing).
pub async fn set_up(
    js: &jetstream::Context,
    nats: &NatsConfig,
    name: &str,
    ack_wait: Duration,
) -> Result<PullConsumer, StartupError> {
    let stream = nats.ensure_audit_stream(js).await?;
    let name = consumer_name(name);
    stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                description: Some("switchboard ledger: guard audit events to Postgres".to_owned()),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                filter_subject: nats.audit_wildcard(),
                max_ack_pending: 4000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| StartupError::Consumer {
            consumer: name,
            stream: nats.audit_stream(),
            message: e.to_string(),
        })
}

/// The audit consumer loop.
pub struct AuditConsumer {
    pub(crate) js: jetstream::Context,
    pub(crate) nats: NatsConfig,
    pub(crate) name: String,
    pub(crate) ack_wait: Duration,
    pub(crate) batch_size: usize,
    pub(crate) pool: PgPool,
}

/// A decoded message with its events' rows.
struct Pending {
    message: jetstream::Message,
    rows: Vec<AuditRow>,
}

/// A row of `audit_events`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    event_id: String,
    occurred_at: OffsetDateTime,
    request_id: String,
    app: String,
    team: String,
    route: String,
    direction: String,
    sequence: i32,
    decision: String,
    finding_kinds: Vec<String>,
    entity_types: Vec<String>,
    entity_counts: Vec<i32>,
    actions: Vec<String>,
    policy_version: String,
    detector_version: String,
    injection_score: f32,
    injection_decision: String,
    content_topics: Vec<String>,
    trace_id: String,
    source: String,
}

/// Postgres text cannot hold NUL; ids and names never need it.
fn clean(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "")
    } else {
        text
    }
}

/// The row of an event; `Err` names why it can never be stored.
pub fn row_of(event: AuditEvent) -> Result<AuditRow, String> {
    if event.event_id.is_empty() {
        return Err("empty event id".to_owned());
    }
    if event.direction != "prompt" && event.direction != "answer" {
        return Err("direction is neither prompt nor answer".to_owned());
    }
    let occurred_at = OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(event.occurred_at_unix_ms) * 1_000_000,
    )
    .map_err(|e| format!("invalid time: {e}"))?;
    let mut row = AuditRow {
        event_id: clean(event.event_id),
        occurred_at,
        request_id: clean(event.request_id),
        app: clean(event.app),
        team: clean(event.team),
        route: clean(event.route),
        direction: event.direction,
        sequence: i32::try_from(event.sequence).unwrap_or(i32::MAX),
        decision: clean(event.decision),
        finding_kinds: Vec::with_capacity(event.findings.len()),
        entity_types: Vec::with_capacity(event.findings.len()),
        entity_counts: Vec::with_capacity(event.findings.len()),
        actions: Vec::with_capacity(event.findings.len()),
        policy_version: clean(event.policy_version),
        detector_version: clean(event.detector_version),
        injection_score: if event.injection_score.is_finite() {
            event.injection_score
        } else {
            0.0
        },
        injection_decision: clean(event.injection_decision),
        content_topics: event.content_topics.into_iter().map(clean).collect(),
        trace_id: clean(event.trace_id),
        source: clean(event.source),
    };
    for finding in event.findings {
        row.finding_kinds.push(clean(finding.kind));
        row.entity_types.push(clean(finding.entity_type));
        row.entity_counts
            .push(i32::try_from(finding.count).unwrap_or(i32::MAX));
        row.actions.push(clean(finding.action));
    }
    Ok(row)
}

/// Inserts `rows` in one transaction; returns how many were new.
pub async fn insert(pool: &PgPool, rows: &[AuditRow]) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut builder: QueryBuilder<Postgres> = QueryBuilder::new(
        "INSERT INTO audit_events (event_id, occurred_at, request_id, app, team, route, direction, \
         sequence, decision, finding_kinds, entity_types, entity_counts, actions, policy_version, \
         detector_version, injection_score, injection_decision, content_topics, trace_id, source) ",
    );
    builder.push_values(rows, |mut b, row| {
        b.push_bind(&row.event_id)
            .push_bind(row.occurred_at)
            .push_bind(&row.request_id)
            .push_bind(&row.app)
            .push_bind(&row.team)
            .push_bind(&row.route)
            .push_bind(&row.direction)
            .push_bind(row.sequence)
            .push_bind(&row.decision)
            .push_bind(&row.finding_kinds)
            .push_bind(&row.entity_types)
            .push_bind(&row.entity_counts)
            .push_bind(&row.actions)
            .push_bind(&row.policy_version)
            .push_bind(&row.detector_version)
            .push_bind(row.injection_score)
            .push_bind(&row.injection_decision)
            .push_bind(&row.content_topics)
            .push_bind(&row.trace_id)
            .push_bind(&row.source);
    });
    builder.push(" ON CONFLICT (event_id) DO NOTHING");
    let mut tx = pool.begin().await?;
    let done = builder.build().execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

/// Whether an error is about the data (retrying cannot help) rather than the connection.
fn is_data_error(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|c| {
        // Class 22 (data exception) and 23 (integrity constraint violation).
        c.starts_with("22") || c.starts_with("23")
    }))
}

impl AuditConsumer {
    /// Runs until `cancel` fires.
    pub async fn run(self, consumer: PullConsumer, cancel: CancellationToken) {
        let mut consumer = Some(consumer);
        let mut backoff = BACKOFF_MIN;
        tracing::info!(stream = %self.nats.audit_stream(), "audit consumer started");
        while !cancel.is_cancelled() {
            let current = match &consumer {
                Some(current) => current.clone(),
                None => match set_up(&self.js, &self.nats, &self.name, self.ack_wait).await {
                    Ok(current) => {
                        consumer = Some(current.clone());
                        current
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot set up the audit consumer; retrying");
                        if !sleep(&mut backoff, &cancel).await {
                            break;
                        }
                        continue;
                    }
                },
            };
            let fetched = tokio::select! {
                () = cancel.cancelled() => break,
                fetched = fetch(&current, self.batch_size) => fetched,
            };
            match fetched {
                Ok(messages) => {
                    backoff = BACKOFF_MIN;
                    if !messages.is_empty() {
                        self.process(messages, &cancel).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "fetching audit events failed; retrying");
                    consumer = None;
                    if !sleep(&mut backoff, &cancel).await {
                        break;
                    }
                }
            }
        }
        tracing::info!("audit consumer stopped");
    }

    async fn process(&self, messages: Vec<jetstream::Message>, cancel: &CancellationToken) {
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let events =
                match switchboard_bus::decode_audit(&self.nats, &message.subject, &message.payload)
                {
                    Ok(events) => events,
                    Err(error) => {
                        terminate(&message, &error.to_string()).await;
                        continue;
                    }
                };
            let mut rows = Vec::with_capacity(events.len());
            for event in events {
                let event_id: String = event.event_id.chars().take(128).collect();
                match row_of(event) {
                    Ok(row) => rows.push(row),
                    Err(reason) => {
                        tracing::error!(audit.event_id = %event_id, subject = %message.subject, %reason, "audit event cannot be stored; dropping it");
                    }
                }
            }
            if rows.is_empty() {
                terminate(&message, "no event of the message can be stored").await;
            } else {
                pending.push(Pending { message, rows });
            }
        }
        let rows: Vec<AuditRow> = pending.iter().flat_map(|p| p.rows.clone()).collect();
        match self.commit(&rows, cancel).await {
            Some(Ok(inserted)) => {
                tracing::debug!(rows = rows.len(), inserted, "audit batch committed");
                ack_all(&pending).await;
            }
            Some(Err(error)) => {
                tracing::warn!(%error, rows = rows.len(), "audit batch refused; inserting one by one");
                for item in &pending {
                    let mut stored = 0usize;
                    for row in &item.rows {
                        match self.commit(std::slice::from_ref(row), cancel).await {
                            Some(Ok(_)) => stored += 1,
                            Some(Err(error)) => {
                                tracing::error!(audit.event_id = %row.event_id, %error, "database refused the audit row; dropping it");
                            }
                            None => return,
                        }
                    }
                    if stored == 0 {
                        terminate(&item.message, "database refused every row of the message").await;
                    } else {
                        ack_all(std::slice::from_ref(item)).await;
                    }
                }
            }
            None => {}
        }
    }

    /// Commits, retrying connection failures; `None` when cancelled, `Some(Err)` on a data error.
    async fn commit(
        &self,
        rows: &[AuditRow],
        cancel: &CancellationToken,
    ) -> Option<Result<u64, sqlx::Error>> {
        let mut backoff = BACKOFF_MIN;
        loop {
            match insert(&self.pool, rows).await {
                Ok(inserted) => return Some(Ok(inserted)),
                Err(error) if is_data_error(&error) => return Some(Err(error)),
                Err(error) => {
                    tracing::warn!(%error, rows = rows.len(), "cannot commit audit batch; retrying");
                    if !sleep(&mut backoff, cancel).await {
                        return None;
                    }
                }
            }
        }
    }
}

async fn sleep(backoff: &mut Duration, cancel: &CancellationToken) -> bool {
    let delay = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

async fn fetch(
    consumer: &PullConsumer,
    max: usize,
) -> Result<Vec<jetstream::Message>, async_nats::Error> {
    let mut batch = consumer
        .batch()
        .max_messages(max.max(1))
        .max_bytes(crate::consumer::fetch_max_bytes(max))
        .expires(IDLE_WAIT)
        .messages()
        .await?;
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        match message {
            Ok(message) => messages.push(message),
            Err(error) if messages.is_empty() => return Err(error),
            Err(error) => {
                tracing::debug!(%error, "audit batch ended early");
                break;
            }
        }
    }
    Ok(messages)
}

async fn ack_all(items: &[Pending]) {
    let acks = items.iter().map(|item| async move {
        if let Err(error) = item.message.ack().await {
            tracing::warn!(events = item.rows.len(), %error, "audit ack failed; the message will be redelivered");
        }
    });
    futures::future::join_all(acks).await;
}

async fn terminate(message: &jetstream::Message, reason: &str) {
    tracing::error!(subject = %message.subject, reason, "audit event cannot be stored; terminating it");
    if let Err(error) = message.ack_with(AckKind::Term).await {
        tracing::warn!(%error, "terminating the audit message failed");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use switchboard_proto::guard::v1::Finding;

    #[test]
    fn rows_keep_findings_aligned_and_refuse_bad_events() {
        let event = AuditEvent {
            event_id: "r:prompt:0".into(),
            request_id: "r".into(),
            direction: "prompt".into(),
            occurred_at_unix_ms: 1_700_000_000_123,
            findings: vec![Finding {
                entity_type: "EMAIL_ADDRESS".into(),
                count: 2,
                action: "redact".into(),
                kind: "entity".into(),
            }],
            ..Default::default()
        };
        let row = row_of(event.clone()).unwrap();
        assert_eq!(row.entity_types, ["EMAIL_ADDRESS"]);
        assert_eq!(row.entity_counts, [2]);
        assert_eq!(row.actions, ["redact"]);
        assert_eq!(row.occurred_at.unix_timestamp(), 1_700_000_000);
        assert!(
            row_of(AuditEvent {
                direction: "sideways".into(),
                ..event.clone()
            })
            .is_err()
        );
        assert!(
            row_of(AuditEvent {
                event_id: String::new(),
                ..event
            })
            .is_err()
        );
    }
}
