//! NATS JetStream for Switchboard: the `[nats]` config section, stream set-up, and the usage-event
//! envelope.
//!
//! Subjects (all under the configured prefix, `switchboard` by default):
//! - `<prefix>.usage.<app>`: one [`UsageEvent`] per request, protobuf-encoded, `Nats-Msg-Id` = our
//!   request id (JetStream de-duplicates redeliveries within the stream's duplicate window), W3C
//!   `traceparent` in the headers. Captured by the stream `<STREAM>` (`SWITCHBOARD_USAGE` by default).
//! - `<prefix>.audit.<app>`: one [`AuditEvent`] per guard decision that found something or acted,
//!   `Nats-Msg-Id` = its event id (`<request_id>:<direction>:<sequence>`). Captured by the stream
//!   named after the prefix ([`NatsConfig::audit_stream`]: `SWITCHBOARD_AUDIT` for `switchboard`).

use std::time::Duration;

use async_nats::{
    HeaderMap,
    jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream},
};
use prost::Message as _;
use serde::Deserialize;
pub use switchboard_proto::guard::v1::AuditEvent;
pub use switchboard_proto::ledger::v1::UsageEvent;

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

    /// Wildcard over every usage subject.
    pub fn usage_wildcard(&self) -> String {
        format!("{}.usage.>", self.subject_prefix)
    }

    /// Subject of audit events for `app`.
    pub fn audit_subject(&self, app: &str) -> String {
        format!("{}.audit.{}", self.subject_prefix, sanitize_token(app))
    }

    /// Wildcard over every audit subject.
    pub fn audit_wildcard(&self) -> String {
        format!("{}.audit.>", self.subject_prefix)
    }

    /// Name of the audit stream: the subject prefix in upper case (other characters `_`) and
    /// `_AUDIT`, so `SWITCHBOARD_AUDIT` for the default prefix and one stream per test prefix.
    pub fn audit_stream(&self) -> String {
        let base: String = self
            .subject_prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("{base}_AUDIT")
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
    let message = PublishMessage::build()
        .headers(headers)
        .message_id(id)
        .payload(payload.into());
    js.send_publish(subject.clone(), message)
        .await
        .map_err(|e| BusError::Publish {
            subject,
            message: e.to_string(),
        })
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
    }
}
