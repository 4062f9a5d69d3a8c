//! Provider clients: one pooled HTTP client per configured provider, the wire-format adapters and the
//! provider error taxonomy.

pub mod openai;
pub mod sse;

use std::{pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use switchboard_proto::chat::v1::{ChatChunk, ChatRequest, ChatResponse, Usage};
use tracing::{Instrument, Span, field::Empty};

use crate::config::{ProviderConfig, ProviderKind};

pub use openai::TranslateError;

/// Largest error body read from a provider.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// Longest provider error message kept.
const MAX_MESSAGE: usize = 300;

/// One failed provider attempt, in one taxonomy for every provider kind.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// HTTP 429; `retry_after` from the `Retry-After` header.
    #[error("rate limited (HTTP {status})")]
    RateLimited {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// HTTP 5xx (and 408/409).
    #[error("upstream error (HTTP {status}): {message}")]
    Upstream { status: u16, message: String },
    /// The attempt timed out.
    #[error("attempt timed out")]
    Timeout,
    /// The provider could not be reached.
    #[error("connection error: {0}")]
    Connection(String),
    /// HTTP 400/413/422: the request itself is wrong; other targets would reject it too.
    #[error("request rejected (HTTP {status}): {message}")]
    BadRequest { status: u16, message: String },
    /// HTTP 401/403: this target's credentials are wrong.
    #[error("authentication failed (HTTP {status})")]
    Authentication { status: u16 },
    /// Another 4xx (for example 404 for an unknown provider model).
    #[error("provider refused (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    /// The answer does not follow the wire format.
    #[error("{0}")]
    Protocol(String),
    /// The stream broke (read error, or the body ended without `[DONE]`).
    #[error("stream interrupted: {0}")]
    Interrupted(String),
}

impl ProviderError {
    /// Whether the same target may be tried again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. }
                | ProviderError::Upstream { .. }
                | ProviderError::Timeout
                | ProviderError::Connection(_)
                | ProviderError::Interrupted(_)
        )
    }

    /// Whether the next target of the route may be tried (everything but a bad request).
    pub fn allows_fallback(&self) -> bool {
        !matches!(self, ProviderError::BadRequest { .. })
    }

    /// The taxonomy code (`Attempt.error_code`).
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::RateLimited { .. } => "RATE_LIMITED",
            ProviderError::Upstream { .. } => "UPSTREAM_ERROR",
            ProviderError::Timeout => "TIMEOUT",
            ProviderError::Connection(_) => "CONNECTION_ERROR",
            ProviderError::BadRequest { .. } => "BAD_REQUEST",
            ProviderError::Authentication { .. } => "AUTHENTICATION_ERROR",
            ProviderError::Refused { .. } => "PROVIDER_REFUSED",
            ProviderError::Protocol(_) => "PROTOCOL_ERROR",
            ProviderError::Interrupted(_) => "STREAM_INTERRUPTED",
        }
    }

    /// The HTTP status the provider answered (0 when none).
    pub fn http_status(&self) -> u16 {
        match self {
            ProviderError::RateLimited { status, .. }
            | ProviderError::Upstream { status, .. }
            | ProviderError::BadRequest { status, .. }
            | ProviderError::Authentication { status }
            | ProviderError::Refused { status, .. } => *status,
            _ => 0,
        }
    }

    /// The provider's `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    fn from_reqwest(error: &reqwest::Error) -> Self {
        if error.is_timeout() {
            ProviderError::Timeout
        } else if error.is_connect() {
            ProviderError::Connection("cannot connect".to_owned())
        } else {
            ProviderError::Connection(error_chain(error))
        }
    }

    /// Maps a non-success HTTP answer.
    pub fn from_status(status: u16, retry_after: Option<&str>, body: &[u8]) -> Self {
        let message = openai::error_body_message(body)
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
            .chars()
            .take(MAX_MESSAGE)
            .collect::<String>();
        match status {
            429 => ProviderError::RateLimited {
                status,
                retry_after: retry_after.and_then(parse_retry_after),
            },
            401 | 403 => ProviderError::Authentication { status },
            400 | 413 | 422 => ProviderError::BadRequest { status, message },
            408 | 409 | 500..=599 => ProviderError::Upstream { status, message },
            _ => ProviderError::Refused { status, message },
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// `Retry-After` in seconds (integer or decimal); HTTP dates are ignored.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(86_400.0)))
}

/// A stream of translated chunks; ends after `[DONE]`, or with an error item.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, ProviderError>> + Send>>;

/// A request body translated for one provider model.
#[derive(Debug, Clone)]
pub struct Prepared {
    body: Value,
    model: String,
}

/// A configured provider with its pooled HTTP client.
pub struct ProviderClient {
    name: String,
    kind: ProviderKind,
    endpoint: String,
    api_key: Option<SecretString>,
    http: reqwest::Client,
}

impl std::fmt::Debug for ProviderClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderClient")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl ProviderClient {
    /// Builds the client (keep-alive pool, `TCP_NODELAY`).
    pub fn new(
        name: &str,
        config: &ProviderConfig,
        connect_timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_keepalive(Duration::from_secs(30))
            .connect_timeout(connect_timeout)
            .build()?;
        let endpoint = match config.kind {
            ProviderKind::Openai => {
                format!("{}/chat/completions", config.base_url.trim_end_matches('/'))
            }
        };
        Ok(ProviderClient {
            name: name.to_owned(),
            kind: config.kind,
            endpoint,
            api_key: config.api_key.clone(),
            http,
        })
    }

    /// Translates `request` for provider model `model`.
    pub fn prepare(
        &self,
        model: &str,
        request: &ChatRequest,
        stream: bool,
    ) -> Result<Prepared, TranslateError> {
        let body = match self.kind {
            ProviderKind::Openai => openai::to_openai_request(model, request, stream)?,
        };
        Ok(Prepared {
            body,
            model: model.to_owned(),
        })
    }

    fn span(&self, model: &str, stream: bool) -> Span {
        tracing::info_span!(
            "provider.chat",
            otel.kind = "client",
            otel.status_code = Empty,
            provider = %self.name,
            gen_ai.system = self.kind.gen_ai_system(),
            gen_ai.operation.name = "chat",
            gen_ai.request.model = %model,
            gen_ai.response.model = Empty,
            stream,
            http.status_code = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            error.type = Empty,
        )
    }

    async fn send(&self, prepared: &Prepared) -> Result<reqwest::Response, ProviderError> {
        let mut request = self.http.post(&self.endpoint).json(&prepared.body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        let response = request
            .send()
            .await
            .map_err(|e| ProviderError::from_reqwest(&e))?;
        let status = response.status().as_u16();
        Span::current().record("http.status_code", status);
        if response.status().is_success() {
            return Ok(response);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_capped(response).await;
        Err(ProviderError::from_status(
            status,
            retry_after.as_deref(),
            &body,
        ))
    }

    /// One unary attempt, bounded by `timeout`.
    pub async fn chat(
        &self,
        prepared: &Prepared,
        timeout: Duration,
    ) -> Result<ChatResponse, ProviderError> {
        let span = self.span(&prepared.model, false);
        let attempt = async {
            let response = self.send(prepared).await?;
            let body = response
                .bytes()
                .await
                .map_err(|e| ProviderError::from_reqwest(&e))?;
            match self.kind {
                ProviderKind::Openai => openai::from_openai_response(&body)
                    .map_err(|e| ProviderError::Protocol(e.to_string())),
            }
        };

        async {
            let result = tokio::time::timeout(timeout, attempt)
                .await
                .unwrap_or(Err(ProviderError::Timeout));
            record_outcome(
                &Span::current(),
                &result
                    .as_ref()
                    .map(|r| (r.model.as_str(), r.usage.as_ref())),
            );
            result
        }
        .instrument(span)
        .await
    }

    /// Opens a stream: resolves once the provider answered with a success status. Each read after
    /// that is bounded by `timeout` too (an idle stream times out).
    pub async fn chat_stream(
        &self,
        prepared: &Prepared,
        timeout: Duration,
    ) -> Result<ChunkStream, ProviderError> {
        let span = self.span(&prepared.model, true);
        let opened = tokio::time::timeout(timeout, self.send(prepared).instrument(span.clone()))
            .await
            .unwrap_or(Err(ProviderError::Timeout));
        let response = match opened {
            Ok(response) => response,
            Err(error) => {
                record_outcome(&span, &Err(&error));
                return Err(error);
            }
        };
        let kind = self.kind;
        let stream = async_stream::stream! {
            let span = span;
            let mut body = response.bytes_stream();
            let mut parser = sse::SseParser::new();
            let mut model = String::new();
            let mut usage: Option<Usage> = None;
            loop {
                let read = match tokio::time::timeout(timeout, body.next()).await {
                    Ok(read) => read,
                    Err(_) => {
                        let error = ProviderError::Timeout;
                        record_outcome(&span, &Err(&error));
                        yield Err(error);
                        return;
                    }
                };
                let bytes = match read {
                    Some(Ok(bytes)) => bytes,
                    Some(Err(e)) => {
                        let error = ProviderError::Interrupted(format!("read failed: {}", error_chain(&e)));
                        record_outcome(&span, &Err(&error));
                        yield Err(error);
                        return;
                    }
                    None => {
                        let detail = if parser.has_partial() { " (cut mid-event)" } else { "" };
                        let error = ProviderError::Interrupted(format!("stream ended without [DONE]{detail}"));
                        record_outcome(&span, &Err(&error));
                        yield Err(error);
                        return;
                    }
                };
                for event in parser.push(&bytes) {
                    if event.data.trim() == "[DONE]" {
                        record_outcome(&span, &Ok((model.as_str(), usage.as_ref())));
                        return;
                    }
                    let chunk = match kind {
                        ProviderKind::Openai => openai::from_openai_chunk(&event.data),
                    };
                    match chunk {
                        Ok(chunk) => {
                            if model.is_empty() {
                                model.clone_from(&chunk.model);
                            }
                            if chunk.usage.is_some() {
                                usage = chunk.usage;
                            }
                            yield Ok(chunk);
                        }
                        Err(e) => {
                            let error = ProviderError::Protocol(e.to_string());
                            record_outcome(&span, &Err(&error));
                            yield Err(error);
                            return;
                        }
                    }
                }
            }
        };
        Ok(Box::pin(stream))
    }
}

async fn read_capped(response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(bytes)) = stream.next().await {
        body.extend_from_slice(&bytes);
        if body.len() >= MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    body
}

fn record_outcome(span: &Span, outcome: &Result<(&str, Option<&Usage>), &ProviderError>) {
    match outcome {
        Ok((model, usage)) => {
            if !model.is_empty() {
                span.record("gen_ai.response.model", *model);
            }
            if let Some(usage) = usage {
                span.record("gen_ai.usage.input_tokens", usage.prompt_tokens);
                span.record("gen_ai.usage.output_tokens", usage.completion_tokens);
            }
        }
        Err(error) => {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", error.code());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_taxonomy() {
        let error = ProviderError::from_status(429, Some("2"), b"");
        assert_eq!(
            error,
            ProviderError::RateLimited {
                status: 429,
                retry_after: Some(Duration::from_secs(2))
            }
        );
        assert!(error.is_retryable() && error.allows_fallback());
        let error = ProviderError::from_status(500, None, br#"{"error":{"message":"boom"}}"#);
        assert_eq!(
            error,
            ProviderError::Upstream {
                status: 500,
                message: "boom".into()
            }
        );
        assert!(error.is_retryable());
        let error = ProviderError::from_status(400, None, br#"{"error":{"message":"too long"}}"#);
        assert!(!error.is_retryable() && !error.allows_fallback());
        assert_eq!(error.code(), "BAD_REQUEST");
        let error = ProviderError::from_status(401, None, b"");
        assert!(!error.is_retryable() && error.allows_fallback());
        assert_eq!(error.http_status(), 401);
        let error = ProviderError::from_status(404, None, b"nope");
        assert!(!error.is_retryable() && error.allows_fallback());
        assert!(ProviderError::Timeout.is_retryable());
        assert!(ProviderError::Connection("x".into()).is_retryable());
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
    }
}
