//! NATS JetStream for Switchboard: the `[nats]` config section, stream set-up, and the usage-event
//! envelope.
//!
//! Subjects (all under the configured prefix, `switchboard` by default):
//! - `<prefix>.usage.batch.v1`: a [`UsageBatch`], the usage events of several requests in one
//!   message, each with its request's W3C trace context (ADR 009); `Nats-Msg-Id` =
//!   `<first request id>+<count>`. This is what the gateway publishes.
//! - `<prefix>.usage.<app>`: one [`UsageEvent`], protobuf-encoded, `Nats-Msg-Id` = its request id
//!   (JetStream de-duplicates redeliveries within the stream's duplicate window), W3C `traceparent`
//!   in the headers. Still accepted by the ledger (tests, tools, events of older gateways).
//!   Both are captured by the stream `<STREAM>` (`SWITCHBOARD_USAGE` by default); an app's token is
//!   a single subject token, so no app's subject is the batch subject.
//!
//! [`decode_usage`] reads either.
//! - `<prefix>.audit.batch.v1`: an [`AuditBatch`], the guard's audit events of several decisions in
//!   one message (ADR 009), `Nats-Msg-Id` = `<first event id>+<count>`.
//! - `<prefix>.audit.<app>`: one [`AuditEvent`] per guard decision that found something or acted,
//!   `Nats-Msg-Id` = its event id (`<request_id>:<direction>:<sequence>`): the gateway's answer
//!   audits, tools, older guards. Both are captured by the stream named after the prefix
//!   ([`NatsConfig::audit_stream`]: `SWITCHBOARD_AUDIT` for `switchboard`); [`decode_audit`] reads
//!   either.

use std::time::Duration;

use async_nats::{
    HeaderMap,
    jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream},
};
use prost::Message as _;
use serde::Deserialize;
use switchboard_proto::guard::v1::AuditBatch;
pub use switchboard_proto::guard::v1::AuditEvent;
pub use switchboard_proto::ledger::v1::UsageEvent;
use switchboard_proto::ledger::v1::{TracedUsageEvent, UsageBatch};

/// The `[nats]` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL.
    pub url: String,
    /// Subject prefix; tests use a unique one per run.
    pub subject_prefix: String,
    /// Name of the JetStream stream holding usage events.
    pub usage_stream: String,
    /// De-duplication window of the usage stream, seconds.
    pub duplicate_window_secs: u64,
    /// How long usage events are kept in the stream, hours.
    pub max_age_hours: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_owned(),
            subject_prefix: "switchboard".to_owned(),
            usage_stream: "SWITCHBOARD_USAGE".to_owned(),
            duplicate_window_secs: 600,
            max_age_hours: 24 * 7,
        }
    }
}

/// Bus errors.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Could not connect.
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    /// Stream set-up failed.
    #[error("cannot set up JetStream stream {stream}: {message}")]
    Stream { stream: String, message: String },
    /// Publishing failed.
    #[error("cannot publish to {subject}: {message}")]
    Publish { subject: String, message: String },
}

impl NatsConfig {
    /// Subject of usage events for `app`.
    pub fn usage_subject(&self, app: &str) -> String {
        format!("{}.usage.{}", self.subject_prefix, sanitize_token(app))
    }

    /// Subject of usage batches ([`UsageBatch`]): two tokens after `usage`, so no app's subject.
    pub fn usage_batch_subject(&self) -> String {
        format!("{}.usage.batch.v1", self.subject_prefix)
    }

    /// Wildcard over every usage subject.
    pub fn usage_wildcard(&self) -> String {
        format!("{}.usage.>", self.subject_prefix)
    }

    /// Subject of audit events for `app`.
    pub fn audit_subject(&self, app: &str) -> String {
        format!("{}.audit.{}", self.subject_prefix, sanitize_token(app))
    }

    /// Subject of audit batches ([`AuditBatch`]): two tokens after `audit`, so no app's subject.
    pub fn audit_batch_subject(&self) -> String {
        format!("{}.audit.batch.v1", self.subject_prefix)
    }

    /// Wildcard over every audit subject.
    pub fn audit_wildcard(&self) -> String {
        format!("{}.audit.>", self.subject_prefix)
    }

    /// The base of the stream names derived from the subject prefix: the prefix in upper case,
    /// other characters than letters, digits, `-` and `_` as `_` (`SWITCHBOARD` for the default
    /// prefix, `TEST_0A1B…` for `test.0a1b…`).
    pub fn stream_base(&self) -> String {
        self.subject_prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// Name of the audit stream: [`NatsConfig::stream_base`] and `_AUDIT`, so
    /// `SWITCHBOARD_AUDIT` for the default prefix and one stream per test prefix.
    pub fn audit_stream(&self) -> String {
        format!("{}_AUDIT", self.stream_base())
    }

    /// Name of the cache's replication stream when the cache does not name one: the stream base
    /// and `_CACHE` (`SWITCHBOARD_CACHE` for the default prefix).
    pub fn cache_stream(&self) -> String {
        format!("{}_CACHE", self.stream_base())
    }

    /// Creates the audit stream if needed and returns it (same de-duplication window and age
    /// limit as the usage stream).
    pub async fn ensure_audit_stream(
        &self,
        js: &jetstream::Context,
    ) -> Result<stream::Stream, BusError> {
        js.get_or_create_stream(stream::Config {
            name: self.audit_stream(),
            subjects: vec![self.audit_wildcard()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: Duration::from_secs(self.duplicate_window_secs),
            max_age: Duration::from_secs(self.max_age_hours * 3600),
            ..Default::default()
        })
        .await
        .map_err(|e| BusError::Stream {
            stream: self.audit_stream(),
            message: e.to_string(),
        })
    }

    /// Connects (the client reconnects by itself afterwards).
    pub async fn connect(&self) -> Result<async_nats::Client, BusError> {
        async_nats::ConnectOptions::new()
            .name("switchboard")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .connect(&self.url)
            .await
            .map_err(|e| BusError::Connect {
                url: self.url.clone(),
                message: e.to_string(),
            })
    }

    /// Creates the usage stream if needed and returns it.
    pub async fn ensure_usage_stream(
        &self,
        js: &jetstream::Context,
    ) -> Result<stream::Stream, BusError> {
        js.get_or_create_stream(stream::Config {
            name: self.usage_stream.clone(),
            subjects: vec![self.usage_wildcard()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: Duration::from_secs(self.duplicate_window_secs),
            max_age: Duration::from_secs(self.max_age_hours * 3600),
            ..Default::default()
        })
        .await
        .map_err(|e| BusError::Stream {
            stream: self.usage_stream.clone(),
            message: e.to_string(),
        })
    }
}

/// Replaces characters that are not valid in a subject token.
fn sanitize_token(token: &str) -> String {
    let cleaned: String = token
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "_".to_owned()
    } else {
        cleaned
    }
}

/// Publishes a usage event with `Nats-Msg-Id` = its request id and the current trace context.
/// Await the returned future to know JetStream has stored it.
pub async fn publish_usage(
    js: &jetstream::Context,
    config: &NatsConfig,
    event: &UsageEvent,
) -> Result<PublishAckFuture, BusError> {
    let parent = switchboard_telemetry::current_context();
    publish_usage_in(js, config, event, &parent).await
}

/// [`publish_usage`] with the trace context `parent` (the request's span, captured when the event
/// was queued) in the headers instead of the current span's: the consumer's span continues the
/// request's trace without a producer span per event.
pub async fn publish_usage_in(
    js: &jetstream::Context,
    config: &NatsConfig,
    event: &UsageEvent,
    parent: &opentelemetry::Context,
) -> Result<PublishAckFuture, BusError> {
    let subject = config.usage_subject(&event.app);
    publish_traced(
        js,
        subject,
        &event.request_id,
        event.encode_to_vec(),
        parent,
    )
    .await
}

/// Bytes of one encoded usage batch at most, well below NATS's default `max_payload` (1 MiB).
pub const MAX_USAGE_BATCH_BYTES: usize = 256 * 1024;

/// Splits `events` into consecutive runs whose batch messages stay within `max_bytes` (an event
/// larger than that goes alone): the lengths of the runs, in order.
pub fn usage_batch_runs(events: &[&UsageEvent], max_bytes: usize) -> Vec<usize> {
    // The event, its trace context (~120 bytes) and the framing of both.
    batch_runs(
        events.iter().map(|event| event.encoded_len() + 160),
        max_bytes,
    )
}

/// [`usage_batch_runs`] for audit events.
pub fn audit_batch_runs(events: &[&AuditEvent], max_bytes: usize) -> Vec<usize> {
    batch_runs(
        events.iter().map(|event| event.encoded_len() + 8),
        max_bytes,
    )
}

fn batch_runs(sizes: impl Iterator<Item = usize>, max_bytes: usize) -> Vec<usize> {
    let mut runs = Vec::new();
    let (mut count, mut bytes) = (0usize, 0usize);
    for size in sizes {
        if count > 0 && bytes + size > max_bytes {
            runs.push(count);
            (count, bytes) = (0, 0);
        }
        count += 1;
        bytes += size;
    }
    if count > 0 {
        runs.push(count);
    }
    runs
}

/// Publishes `events` (keep them within [`MAX_USAGE_BATCH_BYTES`], see [`usage_batch_runs`]) as one
/// [`UsageBatch`] message, each event with the trace context of its request (captured when it was
/// queued), `Nats-Msg-Id` = `<first request id>+<count>`. Await the returned future to know
/// JetStream has stored it: then every event of it is stored.
pub async fn publish_usage_batch(
    js: &jetstream::Context,
    config: &NatsConfig,
    events: &[(&UsageEvent, &opentelemetry::Context)],
) -> Result<PublishAckFuture, BusError> {
    let subject = config.usage_batch_subject();
    let Some((first, _)) = events.first() else {
        return Err(empty_batch(subject));
    };
    let id = format!("{}+{}", first.request_id, events.len());
    let batch = UsageBatch {
        events: events
            .iter()
            .map(|(event, parent)| TracedUsageEvent {
                event: Some((*event).clone()),
                trace_context: switchboard_telemetry::context_fields(parent),
            })
            .collect(),
    };
    publish_with_id(js, subject, &id, batch.encode_to_vec(), None).await
}

fn empty_batch(subject: String) -> BusError {
    BusError::Publish {
        subject,
        message: "an empty batch".to_owned(),
    }
}

/// Publishes `payload` to `subject` with `Nats-Msg-Id` = `id` (JetStream de-duplicates on it) and
/// `headers`, if any.
async fn publish_with_id(
    js: &jetstream::Context,
    subject: String,
    id: &str,
    payload: Vec<u8>,
    headers: Option<HeaderMap>,
) -> Result<PublishAckFuture, BusError> {
    let mut message = PublishMessage::build();
    if let Some(headers) = headers {
        message = message.headers(headers);
    }
    let message = message.message_id(id).payload(payload.into());
    js.send_publish(subject.clone(), message)
        .await
        .map_err(|e| BusError::Publish {
            subject,
            message: e.to_string(),
        })
}

/// A usage or audit message that cannot be decoded.
#[derive(Debug, thiserror::Error)]
#[error("undecodable message on {subject}: {message}")]
pub struct DecodeError {
    /// The message's subject.
    pub subject: String,
    /// What was wrong.
    pub message: String,
}

/// The usage events of a message of the usage stream, each with its request's trace context: a
/// [`UsageBatch`] on the batch subject, else one [`UsageEvent`] with the context in the headers.
pub fn decode_usage(
    config: &NatsConfig,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<Vec<(UsageEvent, opentelemetry::Context)>, DecodeError> {
    let invalid = |message: String| DecodeError {
        subject: subject.to_owned(),
        message,
    };
    if subject == config.usage_batch_subject() {
        let batch = UsageBatch::decode(payload).map_err(|e| invalid(e.to_string()))?;
        batch
            .events
            .into_iter()
            .enumerate()
            .map(|(index, traced)| match traced.event {
                Some(event) => Ok((
                    event,
                    switchboard_telemetry::context_from_fields(&traced.trace_context),
                )),
                None => Err(invalid(format!("batch entry {index} holds no event"))),
            })
            .collect()
    } else {
        let event = UsageEvent::decode(payload).map_err(|e| invalid(e.to_string()))?;
        Ok(vec![(event, switchboard_telemetry::extract_nats(headers))])
    }
}

/// Publishes `events` (keep them within [`MAX_USAGE_BATCH_BYTES`], see [`audit_batch_runs`]) as
/// one [`AuditBatch`] message, `Nats-Msg-Id` = `<first event id>+<count>` (a retry of the same run
/// is stored once). Audit events carry their trace id in the event, so the message has no trace
/// headers. Await the returned future to know JetStream has stored every event of it.
pub async fn publish_audit_batch(
    js: &jetstream::Context,
    config: &NatsConfig,
    events: &[&AuditEvent],
) -> Result<PublishAckFuture, BusError> {
    let subject = config.audit_batch_subject();
    let Some(first) = events.first() else {
        return Err(empty_batch(subject));
    };
    let id = format!("{}+{}", first.event_id, events.len());
    let batch = AuditBatch {
        events: events.iter().map(|event| (*event).clone()).collect(),
    };
    publish_with_id(js, subject, &id, batch.encode_to_vec(), None).await
}

/// The audit events of a message of the audit stream: an [`AuditBatch`] on the batch subject,
/// else one [`AuditEvent`].
pub fn decode_audit(
    config: &NatsConfig,
    subject: &str,
    payload: &[u8],
) -> Result<Vec<AuditEvent>, DecodeError> {
    let invalid = |e: prost::DecodeError| DecodeError {
        subject: subject.to_owned(),
        message: e.to_string(),
    };
    if subject == config.audit_batch_subject() {
        Ok(AuditBatch::decode(payload).map_err(invalid)?.events)
    } else {
        Ok(vec![AuditEvent::decode(payload).map_err(invalid)?])
    }
}

/// Publishes an audit event with `Nats-Msg-Id` = its event id and the trace context `parent`.
/// Await the returned future to know JetStream has stored it.
pub async fn publish_audit_in(
    js: &jetstream::Context,
    config: &NatsConfig,
    event: &AuditEvent,
    parent: &opentelemetry::Context,
) -> Result<PublishAckFuture, BusError> {
    let subject = config.audit_subject(&event.app);
    publish_traced(js, subject, &event.event_id, event.encode_to_vec(), parent).await
}

/// Publishes `payload` to `subject` with `Nats-Msg-Id` = `id` (JetStream de-duplicates on it) and
/// the trace context `parent` in the headers.
async fn publish_traced(
    js: &jetstream::Context,
    subject: String,
    id: &str,
    payload: Vec<u8>,
    parent: &opentelemetry::Context,
) -> Result<PublishAckFuture, BusError> {
    let mut headers = HeaderMap::new();
    switchboard_telemetry::inject_nats_context(parent, &mut headers);
    publish_with_id(js, subject, id, payload, Some(headers)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_scoped_and_sanitized() {
        let config = NatsConfig {
            subject_prefix: "test.abc".into(),
            ..Default::default()
        };
        assert_eq!(
            config.usage_subject("billing app.v2"),
            "test.abc.usage.billing_app_v2"
        );
        assert_eq!(config.usage_subject(""), "test.abc.usage._");
        assert_eq!(config.usage_wildcard(), "test.abc.usage.>");
        assert_eq!(config.audit_subject("a.b"), "test.abc.audit.a_b");
        assert_eq!(config.audit_wildcard(), "test.abc.audit.>");
        assert_eq!(config.audit_stream(), "TEST_ABC_AUDIT");
        assert_eq!(NatsConfig::default().audit_stream(), "SWITCHBOARD_AUDIT");
        assert_eq!(config.usage_batch_subject(), "test.abc.usage.batch.v1");
        // The batch subject is under the stream's wildcard, and no app maps to it.
        assert!(config.usage_batch_subject().starts_with("test.abc.usage."));
        assert_ne!(
            config.usage_subject("batch.v1"),
            config.usage_batch_subject()
        );
    }

    fn event(n: usize, tag_bytes: usize) -> UsageEvent {
        UsageEvent {
            request_id: format!("0190c0de-0000-7000-8000-{n:012}"),
            app: "billing".to_owned(),
            tags: [("note".to_owned(), "x".repeat(tag_bytes))].into(),
            ..Default::default()
        }
    }

    fn remote_context(trace: u128, span: u64) -> opentelemetry::Context {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        };
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    #[test]
    fn a_batch_keeps_each_event_and_its_own_trace_context() {
        use opentelemetry::trace::TraceContextExt as _;
        switchboard_telemetry::install_propagator();
        let config = NatsConfig::default();
        let events = [event(1, 10), event(2, 10), event(3, 10)];
        let contexts = [
            remote_context(0xA1, 0xB1),
            opentelemetry::Context::new(),
            remote_context(0xA3, 0xB3),
        ];
        let batch = UsageBatch {
            events: events
                .iter()
                .zip(&contexts)
                .map(|(event, cx)| TracedUsageEvent {
                    event: Some(event.clone()),
                    trace_context: switchboard_telemetry::context_fields(cx),
                })
                .collect(),
        };
        let decoded = decode_usage(
            &config,
            &config.usage_batch_subject(),
            None,
            &batch.encode_to_vec(),
        )
        .unwrap();
        let ids: Vec<_> = decoded.iter().map(|(e, _)| e.request_id.clone()).collect();
        let expected: Vec<_> = events.iter().map(|e| e.request_id.clone()).collect();
        assert_eq!(ids, expected);
        assert_eq!(decoded[0].0, events[0]);
        let trace = |cx: &opentelemetry::Context| cx.span().span_context().trace_id();
        assert_eq!(trace(&decoded[0].1), trace(&contexts[0]));
        assert!(!decoded[1].1.span().span_context().is_valid());
        assert_eq!(trace(&decoded[2].1), trace(&contexts[2]));
        assert_eq!(
            decoded[2].1.span().span_context().span_id(),
            contexts[2].span().span_context().span_id()
        );
    }

    #[test]
    fn a_single_event_message_still_decodes_with_the_context_of_its_headers() {
        use opentelemetry::trace::TraceContextExt as _;
        switchboard_telemetry::install_propagator();
        let config = NatsConfig::default();
        let cx = remote_context(0xC1, 0xD1);
        let mut headers = HeaderMap::new();
        switchboard_telemetry::inject_nats_context(&cx, &mut headers);
        let one = event(7, 0);
        let decoded = decode_usage(
            &config,
            &config.usage_subject("billing"),
            Some(&headers),
            &one.encode_to_vec(),
        )
        .unwrap();
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0].0, one);
        assert_eq!(
            decoded[0].1.span().span_context().trace_id(),
            cx.span().span_context().trace_id()
        );
    }

    #[test]
    fn undecodable_messages_and_empty_entries_are_errors() {
        let config = NatsConfig::default();
        let garbage = [0xFFu8, 0xFF, 0xFF];
        assert!(decode_usage(&config, &config.usage_batch_subject(), None, &garbage).is_err());
        assert!(decode_usage(&config, &config.usage_subject("a"), None, &garbage).is_err());
        let hollow = UsageBatch {
            events: vec![TracedUsageEvent::default()],
        };
        let error = decode_usage(
            &config,
            &config.usage_batch_subject(),
            None,
            &hollow.encode_to_vec(),
        )
        .unwrap_err();
        assert!(error.message.contains("entry 0"), "{error}");
    }

    #[test]
    fn audit_batches_and_single_audit_events_decode() {
        let config = NatsConfig::default();
        assert_eq!(config.audit_batch_subject(), "switchboard.audit.batch.v1");
        assert_ne!(
            config.audit_subject("batch.v1"),
            config.audit_batch_subject()
        );
        let events: Vec<AuditEvent> = (0..3)
            .map(|n| AuditEvent {
                event_id: format!("req-{n}:prompt:0"),
                app: "billing".into(),
                ..Default::default()
            })
            .collect();
        let batch = AuditBatch {
            events: events.clone(),
        };
        let decoded = decode_audit(
            &config,
            &config.audit_batch_subject(),
            &batch.encode_to_vec(),
        )
        .unwrap();
        assert_eq!(decoded, events);
        let single = decode_audit(
            &config,
            &config.audit_subject("billing"),
            &events[1].encode_to_vec(),
        )
        .unwrap();
        assert_eq!(single, vec![events[1].clone()]);
        assert!(decode_audit(&config, &config.audit_batch_subject(), &[0xFF, 0xFF]).is_err());
        let refs: Vec<&AuditEvent> = events.iter().collect();
        assert_eq!(audit_batch_runs(&refs, MAX_USAGE_BATCH_BYTES), vec![3]);
    }

    #[test]
    fn batch_runs_stay_within_the_byte_bound_and_keep_every_event() {
        let small: Vec<UsageEvent> = (0..10).map(|n| event(n, 100)).collect();
        let refs: Vec<&UsageEvent> = small.iter().collect();
        assert_eq!(usage_batch_runs(&refs, MAX_USAGE_BATCH_BYTES), vec![10]);
        // ~1.1 KB each with a 3 KB bound: runs of 2.
        let big: Vec<UsageEvent> = (0..5).map(|n| event(n, 1000)).collect();
        let refs: Vec<&UsageEvent> = big.iter().collect();
        let runs = usage_batch_runs(&refs, 3000);
        assert_eq!(runs, vec![2, 2, 1]);
        // An event larger than the bound goes alone, never dropped.
        let huge = [event(1, 10), event(2, 5000), event(3, 10)];
        let refs: Vec<&UsageEvent> = huge.iter().collect();
        assert_eq!(usage_batch_runs(&refs, 3000), vec![1, 1, 1]);
        assert!(usage_batch_runs(&[], 3000).is_empty());
    }
}
