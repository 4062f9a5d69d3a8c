//! Provider clients: one pooled HTTP client per configured provider, the wire-format adapters and the
//! provider error taxonomy.
//!
//! Each [`ProviderKind`] has an adapter module that translates a `ChatRequest` into the provider's
//! body, the provider's answer into a `ChatResponse`, and its stream into `ChatChunk`s through a
//! [`StreamDecoder`], which also knows how that format's stream ends properly (OpenAI `[DONE]`,
//! Anthropic `message_stop`, Gemini end of body after a finished candidate). A stream that ends any
//! other way is [`ProviderError::Interrupted`].

pub mod anthropic;
pub mod embeddings;
pub mod gemini;
#[cfg(test)]
mod golden;
pub mod openai;
pub mod sse;

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{Stream, StreamExt};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use switchboard_proto::chat::v1::{ChatChunk, ChatRequest, ChatResponse, Usage};
use tracing::{Instrument, Span, field::Empty};

use crate::config::{MaxTokensField, ProviderConfig, ProviderKind};

pub use openai::TranslateError;

/// The first Azure OpenAI api-version that takes `stream_options` (earlier ones reject it).
const AZURE_STREAM_OPTIONS_SINCE: &str = "2024-09-01-preview";
/// The first Azure OpenAI api-version that takes the `developer` role.
const AZURE_DEVELOPER_ROLE_SINCE: &str = "2024-12-01-preview";

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
    /// The prompt does not fit this model's context window; a larger-context target may take it.
    #[error("context length exceeded (HTTP {status}): {message}")]
    ContextLength { status: u16, message: String },
    /// The provider's content filter blocked the prompt (OpenAI/Azure `content_filter`, Gemini
    /// `promptFeedback.blockReason`). An answer cut by a filter is not an error: it finishes with
    /// `FINISH_REASON_CONTENT_FILTER`.
    #[error("content filtered (HTTP {status}): {message}")]
    ContentFiltered { status: u16, message: String },
    /// The provider is overloaded (Anthropic 529 / `overloaded_error`, Gemini 503 "overloaded").
    #[error("provider overloaded (HTTP {status}): {message}")]
    Overloaded {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// HTTP 401/403: this target's credentials are wrong.
    #[error("authentication failed (HTTP {status})")]
    Authentication { status: u16 },
    /// Another 4xx (for example 404 for an unknown provider model).
    #[error("provider refused (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    /// The answer does not follow the wire format.
    #[error("{0}")]
    Protocol(String),
    /// The stream broke (read error, or the body ended without the format's proper end).
    #[error("stream interrupted: {0}")]
    Interrupted(String),
}

impl ProviderError {
    /// An answer that does not parse as the provider's format.
    pub fn malformed(error: impl std::fmt::Display) -> Self {
        ProviderError::Protocol(format!("malformed provider response: {error}"))
    }

    /// Whether the same target may be tried again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. }
                | ProviderError::Upstream { .. }
                | ProviderError::Overloaded { .. }
                | ProviderError::Timeout
                | ProviderError::Connection(_)
                | ProviderError::Interrupted(_)
        )
    }

    /// Whether the next target of the route may be tried (everything but a bad request and a
    /// blocked prompt, which every target would reject as well; a context-length error falls over
    /// to the next, possibly larger, target).
    pub fn allows_fallback(&self) -> bool {
        !matches!(
            self,
            ProviderError::BadRequest { .. } | ProviderError::ContentFiltered { .. }
        )
    }

    /// The taxonomy code (`Attempt.error_code`).
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::RateLimited { .. } => "RATE_LIMITED",
            ProviderError::Upstream { .. } => "UPSTREAM_ERROR",
            ProviderError::Timeout => "TIMEOUT",
            ProviderError::Connection(_) => "CONNECTION_ERROR",
            ProviderError::BadRequest { .. } => "BAD_REQUEST",
            ProviderError::ContextLength { .. } => "CONTEXT_LENGTH_EXCEEDED",
            ProviderError::ContentFiltered { .. } => "CONTENT_FILTERED",
            ProviderError::Overloaded { .. } => "OVERLOADED",
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
            | ProviderError::ContextLength { status, .. }
            | ProviderError::ContentFiltered { status, .. }
            | ProviderError::Overloaded { status, .. }
            | ProviderError::Authentication { status }
            | ProviderError::Refused { status, .. } => *status,
            _ => 0,
        }
    }

    /// The provider's `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. }
            | ProviderError::Overloaded { retry_after, .. } => *retry_after,
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

    /// Maps a non-success HTTP answer of any provider kind: the status, then the error body (OpenAI
    /// `{"error":{"message","type","code"}}`, Anthropic `{"type":"error","error":{"type","message"}}`,
    /// Gemini `{"error":{"code","message","status","details"}}`) refine it.
    pub fn from_status(status: u16, retry_after: Option<&str>, body: &[u8]) -> Self {
        let detail = ErrorDetail::parse(body);
        let message = detail
            .message
            .clone()
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
            .chars()
            .take(MAX_MESSAGE)
            .collect::<String>();
        let retry_after = retry_after
            .and_then(parse_retry_after)
            .or(detail.retry_delay);
        if status == 529
            || detail.kind.as_deref() == Some("overloaded_error")
            || (status == 503 && message.to_ascii_lowercase().contains("overloaded"))
        {
            return ProviderError::Overloaded {
                status,
                message,
                retry_after,
            };
        }
        match status {
            429 => ProviderError::RateLimited {
                status,
                retry_after,
            },
            401 | 403 => ProviderError::Authentication { status },
            // Gemini answers a wrong or expired API key with 400 INVALID_ARGUMENT: the key's
            // fault, not the request's (another key or target may serve).
            400 if detail.is_invalid_key(&message) => ProviderError::Authentication { status },
            // The key's account cannot pay (Anthropic: credit balance too low, a spend limit
            // reached; Gemini: FAILED_PRECONDITION for billing, the free tier or the region): not
            // the request's fault either; the key cools down, another key or target serves.
            400 if detail.is_account_unusable(&message) => ProviderError::Authentication { status },
            400 | 413 | 422 if detail.is_context_length(&message) => {
                ProviderError::ContextLength { status, message }
            }
            400 | 413 | 422 if detail.is_content_filter() => {
                ProviderError::ContentFiltered { status, message }
            }
            400 | 413 | 422 => ProviderError::BadRequest { status, message },
            408 | 409 | 500..=599 => ProviderError::Upstream { status, message },
            _ => ProviderError::Refused { status, message },
        }
    }

    /// Maps an error object sent inside a successful answer (a stream's error event, or a 200 body
    /// that is an error), using the HTTP status its type stands for.
    pub fn from_error_value(value: &Value) -> Self {
        let error = value.get("error").unwrap_or(value);
        let nominal = match error.get("type").and_then(Value::as_str) {
            Some("overloaded_error") => 529,
            Some("rate_limit_error") => 429,
            Some("invalid_request_error") => 400,
            Some("authentication_error") => 401,
            Some("permission_error") => 403,
            Some("not_found_error") => 404,
            Some("request_too_large") => 413,
            _ => error
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|code| u16::try_from(code).ok())
                .filter(|code| (400..600).contains(code))
                .unwrap_or(500),
        };
        let body = serde_json::to_vec(value).unwrap_or_default();
        Self::from_status(nominal, None, &body)
    }
}

/// The parts of a provider error body that classify it.
#[derive(Debug, Default)]
struct ErrorDetail {
    message: Option<String>,
    /// OpenAI `error.code` (string), or Azure's `innererror.code`.
    codes: Vec<String>,
    /// OpenAI / Anthropic `error.type`.
    kind: Option<String>,
    /// Gemini `google.rpc.RetryInfo.retryDelay`.
    retry_delay: Option<Duration>,
    /// Gemini `google.rpc.ErrorInfo.reason`s (`API_KEY_INVALID`, ...).
    reasons: Vec<String>,
}

impl ErrorDetail {
    fn parse(body: &[u8]) -> Self {
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return ErrorDetail::default();
        };
        let Some(error) = value.get("error") else {
            return ErrorDetail::default();
        };
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let codes = [
            error.get("code"),
            error.pointer("/innererror/code"),
            error.get("status"),
        ]
        .into_iter()
        .filter_map(&text)
        .collect();
        let details = || {
            error
                .get("details")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        };
        let retry_delay = details()
            .filter_map(|detail| detail.get("retryDelay").and_then(Value::as_str))
            .find_map(|delay| parse_retry_after(delay.trim_end_matches('s')));
        let reasons = details()
            .filter_map(|detail| text(detail.get("reason")))
            .collect();
        ErrorDetail {
            message: match error {
                Value::String(message) => Some(message.clone()),
                _ => text(error.get("message")).or_else(|| Some(error.to_string())),
            },
            codes,
            kind: text(error.get("type")),
            retry_delay,
            reasons,
        }
    }

    /// A Gemini (Google API) key that is wrong, unknown or expired: `ErrorInfo.reason`
    /// `API_KEY_INVALID` / `API_KEY_EXPIRED`, or the message Google sends with them.
    fn is_invalid_key(&self, message: &str) -> bool {
        const PATTERNS: [&str; 3] = ["api key not valid", "api key not found", "api key expired"];
        let message = message.to_ascii_lowercase();
        self.reasons
            .iter()
            .any(|r| matches!(r.as_str(), "API_KEY_INVALID" | "API_KEY_EXPIRED"))
            || PATTERNS.iter().any(|p| message.contains(p))
    }

    /// An account that cannot be used as it is, whatever the request: Anthropic's 400
    /// `invalid_request_error` "Your credit balance is too low …" and "You have reached your
    /// specified (workspace) API usage limits …", Gemini's 400 `FAILED_PRECONDITION` about billing,
    /// the free tier or the caller's location.
    fn is_account_unusable(&self, message: &str) -> bool {
        let message = message.to_ascii_lowercase();
        let anthropic = self.kind.as_deref() == Some("invalid_request_error")
            && (message.contains("credit balance is too low")
                || (message.contains("reached your specified")
                    && message.contains("api usage limits")));
        let gemini = self.codes.iter().any(|c| c == "FAILED_PRECONDITION")
            && ["billing", "free tier", "location is not supported"]
                .iter()
                .any(|p| message.contains(p));
        anthropic || gemini
    }

    fn is_context_length(&self, message: &str) -> bool {
        const PATTERNS: [&str; 7] = [
            "context_length_exceeded",
            "context length",
            "maximum context",
            "context window",
            "context limit",
            "prompt is too long",
            "exceeds the maximum number of tokens",
        ];
        let message = message.to_ascii_lowercase();
        self.codes.iter().any(|c| c == "context_length_exceeded")
            || PATTERNS.iter().any(|p| message.contains(p))
    }

    fn is_content_filter(&self) -> bool {
        self.codes.iter().any(|c| {
            matches!(
                c.as_str(),
                "content_filter" | "content_policy_violation" | "ResponsibleAIPolicyViolation"
            )
        })
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

/// A stream of translated chunks; ends after the format's proper end, or with an error item.
/// [`ChunkStream::reported`] is the usage the provider reported so far, which a chunk carries
/// only at the end: what a stream cut now consumed, as far as the provider said.
pub struct ChunkStream {
    reads: Pin<Box<dyn Stream<Item = Read> + Send>>,
    reported: Option<Usage>,
}

/// What the reading task of a [`ChunkStream`] produces.
enum Read {
    Item(Result<ChatChunk, ProviderError>),
    /// The decoder's usage changed ([`StreamDecoder::reported_usage`]).
    Reported(Usage),
}

impl ChunkStream {
    /// The usage the provider reported so far (normalised as a chunk's), `None` when it reported
    /// none yet: Anthropic's `message_start` (and `message_delta`), Gemini's latest
    /// `usageMetadata`; OpenAI-format streams report theirs only in a chunk at their end.
    pub fn reported(&self) -> Option<Usage> {
        self.reported
    }
}

impl Stream for ChunkStream {
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match self.reads.as_mut().poll_next(cx) {
                Poll::Ready(Some(Read::Reported(usage))) => self.reported = Some(usage),
                Poll::Ready(Some(Read::Item(item))) => return Poll::Ready(Some(item)),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// What a [`StreamDecoder`] made of one event.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    /// Translated chunks, in order.
    pub chunks: Vec<ChatChunk>,
    /// The event was the format's proper end of stream: nothing more is read.
    pub done: bool,
}

/// Turns one provider format's server-sent events into chunks, and knows how its streams end.
pub trait StreamDecoder: Send {
    /// Translates one event (an error event becomes the matching [`ProviderError`]).
    fn event(&mut self, event: &sse::SseEvent) -> Result<Decoded, ProviderError>;

    /// The body ended (between events) before [`Decoded::done`]: the last chunks when that is this
    /// format's proper end, else [`ProviderError::Interrupted`].
    fn end_of_body(&mut self) -> Result<Vec<ChatChunk>, ProviderError>;

    /// The usage the provider reported so far, normalised, even when no chunk carried it yet
    /// (what a stream cut now consumed, as far as the provider said); `None` when it reported none.
    fn reported_usage(&self) -> Option<Usage> {
        None
    }
}

/// The decoder of `kind`'s streams; `call_tag` goes in the ids of calls a format sends without
/// one (Gemini, [`gemini::call_tag`]).
pub fn decoder(kind: ProviderKind, created: i64, call_tag: &str) -> Box<dyn StreamDecoder> {
    match kind {
        ProviderKind::Openai | ProviderKind::Azure => Box::new(openai::OpenaiDecoder::default()),
        ProviderKind::Anthropic => Box::new(anthropic::AnthropicDecoder::new(created)),
        ProviderKind::Gemini => Box::new(gemini::GeminiDecoder::new(created, call_tag)),
    }
}

/// Parses a successful unary answer of `kind` (`call_tag`: as for [`decoder`]).
pub fn parse_response(
    kind: ProviderKind,
    body: &[u8],
    created: i64,
    call_tag: &str,
) -> Result<ChatResponse, ProviderError> {
    match kind {
        ProviderKind::Openai | ProviderKind::Azure => openai::parse_response(body),
        ProviderKind::Anthropic => anthropic::parse_response(body, created),
        ProviderKind::Gemini => gemini::parse_response(body, created, call_tag),
    }
}

/// Unix seconds now (the `created` of formats that do not send one).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A request translated for one provider model: its URL and body.
#[derive(Debug, Clone)]
pub struct Prepared {
    body: Value,
    model: String,
    call: Call,
    /// Tag of the ids invented for calls the answer sends without one (Gemini; else empty).
    call_tag: String,
}

/// The thinking budget of an OpenAI-style reasoning effort, for providers that take a budget
/// (Anthropic, Gemini) when the request names no budget: minimal and low 1,024 (Anthropic's
/// minimum), medium 2,048, high 4,096 tokens; `None` for an empty or unknown effort.
pub(crate) fn effort_budget(effort: &str) -> Option<u32> {
    match effort {
        "minimal" | "low" => Some(1024),
        "medium" => Some(2048),
        "high" => Some(4096),
        _ => None,
    }
}

/// The thinking budget of `thinking`: its own, else its effort's (see [`effort_budget`]), else 0.
pub(crate) fn thinking_budget(thinking: &switchboard_proto::chat::v1::ThinkingConfig) -> u32 {
    if thinking.budget_tokens > 0 {
        thinking.budget_tokens
    } else {
        effort_budget(&thinking.effort).unwrap_or(0)
    }
}

/// Which endpoint a prepared body goes to.
#[derive(Debug, Clone, Copy)]
enum Call {
    Chat { stream: bool },
    Embeddings,
}

/// A configured provider with its pooled HTTP client.
pub struct ProviderClient {
    name: String,
    kind: ProviderKind,
    /// The configured base URL, parsed once, not per call (an error when it does not parse: every
    /// call then fails with it, which configuration validation prevents).
    base: Result<reqwest::Url, String>,
    api_version: Option<String>,
    default_max_tokens: u32,
    /// The field of the output-token limit (kinds `openai` and `azure`).
    max_tokens_field: MaxTokensField,
    api_key: Option<SecretString>,
    http: reqwest::Client,
}

impl std::fmt::Debug for ProviderClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderClient")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base.as_ref().map(reqwest::Url::as_str))
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
        Ok(ProviderClient {
            name: name.to_owned(),
            kind: config.kind,
            base: reqwest::Url::parse(config.base_url.trim_end_matches('/'))
                .map_err(|e| e.to_string()),
            api_version: config.api_version.clone().filter(|v| !v.is_empty()),
            default_max_tokens: config.default_max_tokens,
            max_tokens_field: config.effective_max_tokens_field(),
            api_key: config.api_key.clone(),
            http,
        })
    }

    /// Whether chat requests may carry `top_k`: OpenAI-compatible servers (vLLM, Ollama, ...) take
    /// it as an extension; OpenAI itself (`api.openai.com`) and Azure OpenAI have no such parameter,
    /// and it is dropped for them.
    fn takes_top_k(&self) -> bool {
        self.kind == ProviderKind::Openai && !self.is_openai_itself()
    }

    /// Whether the base URL is OpenAI's own API (`api.openai.com`).
    fn is_openai_itself(&self) -> bool {
        let host = self
            .base
            .as_ref()
            .ok()
            .and_then(|url| url.host_str().map(str::to_ascii_lowercase))
            .unwrap_or_default();
        host == "api.openai.com"
    }

    /// Whether this is Azure OpenAI with a dated api-version before `since` (dated versions,
    /// `2024-06-01` or `2024-08-01-preview`, compare as text; others, `v1`, `preview`, `latest`,
    /// are recent).
    fn azure_version_before(&self, since: &str) -> bool {
        let version = self.api_version.as_deref().unwrap_or_default();
        self.kind == ProviderKind::Azure
            && version.starts_with(|c: char| c.is_ascii_digit())
            && version < since
    }

    /// Whether chat requests may carry the `developer` role: OpenAI itself (`api.openai.com`) and
    /// Azure api-versions from 2024-12-01-preview. OpenAI-compatible servers (DeepSeek, DeepInfra,
    /// vLLM, ...) and older Azure api-versions reject it (400/422); they get `system`, which is
    /// what the role means to providers that lack it.
    fn takes_developer_role(&self) -> bool {
        match self.kind {
            ProviderKind::Openai => self.is_openai_itself(),
            ProviderKind::Azure => !self.azure_version_before(AZURE_DEVELOPER_ROLE_SINCE),
            _ => false,
        }
    }

    /// Translates `request` for provider model `model` (for Azure: the deployment).
    pub fn prepare(
        &self,
        model: &str,
        request: &ChatRequest,
        stream: bool,
    ) -> Result<Prepared, TranslateError> {
        let body = match self.kind {
            ProviderKind::Openai | ProviderKind::Azure => {
                let mut body =
                    openai::to_openai_request(model, request, stream, self.max_tokens_field)?;
                if let Some(body) = body.as_object_mut() {
                    if let Some(top_k) = request.sampling.as_ref().and_then(|s| s.top_k)
                        && self.takes_top_k()
                    {
                        body.insert("top_k".into(), Value::from(top_k));
                    }
                    if !self.takes_developer_role()
                        && let Some(Value::Array(messages)) = body.get_mut("messages")
                    {
                        for message in messages {
                            if message["role"] == "developer" {
                                message["role"] = Value::from("system");
                            }
                        }
                    }
                    if self.azure_version_before(AZURE_STREAM_OPTIONS_SINCE) {
                        body.remove("stream_options");
                    }
                }
                body
            }
            ProviderKind::Anthropic => {
                anthropic::to_anthropic_request(model, request, stream, self.default_max_tokens)?
            }
            ProviderKind::Gemini => gemini::to_gemini_request(
                request,
                gemini::ToolSchemas::for_version(self.api_version.as_deref()),
            )?,
        };
        let call_tag = if self.kind == ProviderKind::Gemini {
            gemini::call_tag(request)
        } else {
            String::new()
        };
        // The URL is built at send time by the client that sends: the keys of one target share the
        // body, not necessarily the endpoint (`keys[].base_url`, validated with the configuration).
        Ok(Prepared {
            body,
            model: model.to_owned(),
            call: Call::Chat { stream },
            call_tag,
        })
    }

    /// The endpoint of `model`: OpenAI `{base}/chat/completions`; Azure
    /// `{base}/openai/deployments/{model}/chat/completions?api-version=…`; Anthropic
    /// `{base}/v1/messages`; Gemini `{base}/{version}/models/{model}:generateContent` (streaming:
    /// `:streamGenerateContent?alt=sse`).
    fn url(&self, model: &str, stream: bool) -> Result<reqwest::Url, TranslateError> {
        let bad = |message: String| TranslateError {
            field: "model".to_owned(),
            message,
        };
        let mut url = self
            .base
            .clone()
            .map_err(|e| bad(format!("provider base URL is invalid: {e}")))?;
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| bad("provider base URL cannot have a path".to_owned()))?;
            path.pop_if_empty();
            match self.kind {
                ProviderKind::Openai => {
                    path.push("chat").push("completions");
                }
                ProviderKind::Azure => {
                    path.extend(["openai", "deployments", model, "chat", "completions"]);
                }
                ProviderKind::Anthropic => {
                    path.extend(["v1", "messages"]);
                }
                ProviderKind::Gemini => {
                    let version = self.api_version.as_deref().unwrap_or("v1beta");
                    let method = if stream {
                        "streamGenerateContent"
                    } else {
                        "generateContent"
                    };
                    path.extend([version, "models", &format!("{model}:{method}")]);
                }
            }
        }
        match self.kind {
            ProviderKind::Azure => {
                let version = self.api_version.as_deref().unwrap_or_default();
                url.query_pairs_mut().append_pair("api-version", version);
            }
            ProviderKind::Gemini if stream => {
                url.query_pairs_mut().append_pair("alt", "sse");
            }
            _ => {}
        }
        Ok(url)
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
        let url = match prepared.call {
            Call::Chat { stream } => self.url(&prepared.model, stream),
            Call::Embeddings => self.embeddings_url(&prepared.model),
        }
        .map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let mut request = self.http.post(url).json(&prepared.body);
        if let Some(key) = &self.api_key {
            let key = key.expose_secret();
            request = match self.kind {
                ProviderKind::Openai => request.bearer_auth(key),
                ProviderKind::Azure => request.header("api-key", key),
                ProviderKind::Anthropic => request.header("x-api-key", key),
                ProviderKind::Gemini => request.header("x-goog-api-key", key),
            };
        }
        if self.kind == ProviderKind::Anthropic {
            request = request.header(
                "anthropic-version",
                self.api_version
                    .as_deref()
                    .unwrap_or(anthropic::API_VERSION),
            );
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

    /// Sends `prepared` and reads a successful JSON answer's body (any other content type is a
    /// protocol error, even with a 200).
    async fn json_body(&self, prepared: &Prepared) -> Result<bytes::Bytes, ProviderError> {
        let response = self.send(prepared).await?;
        let content_type = content_type(&response);
        let body = response
            .bytes()
            .await
            .map_err(|e| ProviderError::from_reqwest(&e))?;
        if let Some(content_type) = content_type
            && !content_type.contains("json")
        {
            return Err(ProviderError::Protocol(format!(
                "unexpected content type `{content_type}`"
            )));
        }
        Ok(body)
    }

    /// One unary attempt, bounded by `timeout`.
    pub async fn chat(
        &self,
        prepared: &Prepared,
        timeout: Duration,
    ) -> Result<ChatResponse, ProviderError> {
        let span = self.span(&prepared.model, false);
        let attempt = async {
            let body = self.json_body(prepared).await?;
            parse_response(self.kind, &body, unix_now(), &prepared.call_tag)
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
        if let Some(content_type) = content_type(&response)
            && !content_type.contains("event-stream")
        {
            let error = if content_type.contains("json") {
                let body = read_capped(response).await;
                match serde_json::from_slice::<Value>(&body) {
                    Ok(value) if value.get("error").is_some() => {
                        ProviderError::from_error_value(&value)
                    }
                    _ => ProviderError::Protocol(format!(
                        "expected an event stream, got `{content_type}`"
                    )),
                }
            } else {
                ProviderError::Protocol(format!("expected an event stream, got `{content_type}`"))
            };
            record_outcome(&span, &Err(&error));
            return Err(error);
        }
        let mut decoder = decoder(self.kind, unix_now(), &prepared.call_tag);
        let stream = async_stream::stream! {
            let span = span;
            let mut body = response.bytes_stream();
            let mut parser = sse::SseParser::new();
            let mut model = String::new();
            let mut usage: Option<Usage> = None;
            let mut reported: Option<Usage> = None;
            loop {
                let read = match tokio::time::timeout(timeout, body.next()).await {
                    Ok(read) => read,
                    Err(_) => {
                        let error = ProviderError::Timeout;
                        record_outcome(&span, &Err(&error));
                        yield Read::Item(Err(error));
                        return;
                    }
                };
                let (decoded, done) = match read {
                    Some(Ok(bytes)) => {
                        let mut chunks = Vec::new();
                        let mut outcome = Ok(false);
                        for event in parser.push(&bytes) {
                            match decoder.event(&event) {
                                Ok(decoded) => {
                                    chunks.extend(decoded.chunks);
                                    if decoded.done {
                                        outcome = Ok(true);
                                        break;
                                    }
                                }
                                Err(error) => {
                                    outcome = Err(error);
                                    break;
                                }
                            }
                        }
                        (chunks, outcome)
                    }
                    Some(Err(e)) => (
                        Vec::new(),
                        Err(ProviderError::Interrupted(format!("read failed: {}", error_chain(&e)))),
                    ),
                    None if parser.has_partial() => (
                        Vec::new(),
                        Err(ProviderError::Interrupted("stream cut mid-event".to_owned())),
                    ),
                    None => match decoder.end_of_body() {
                        Ok(chunks) => (chunks, Ok(true)),
                        Err(error) => (Vec::new(), Err(error)),
                    },
                };
                // Before the chunks of this read: a consumer that stops at one of them, or at the
                // error after them, knows what the provider had reported by then.
                if let Some(now) = decoder.reported_usage()
                    && reported != Some(now)
                {
                    reported = Some(now);
                    yield Read::Reported(now);
                }
                for chunk in decoded {
                    if model.is_empty() {
                        model.clone_from(&chunk.model);
                    }
                    if chunk.usage.is_some() {
                        usage = chunk.usage;
                    }
                    yield Read::Item(Ok(chunk));
                }
                match done {
                    Ok(false) => {}
                    Ok(true) => {
                        record_outcome(&span, &Ok((model.as_str(), usage.as_ref())));
                        return;
                    }
                    Err(error) => {
                        record_outcome(&span, &Err(&error));
                        yield Read::Item(Err(error));
                        return;
                    }
                }
            }
        };
        Ok(ChunkStream {
            reads: Box::pin(stream),
            reported: None,
        })
    }
}

fn content_type(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
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
    #[allow(clippy::unwrap_used)]
    fn a_reasoning_effort_reaches_every_provider_in_its_own_terms() {
        use switchboard_proto::chat::v1::{Message, Role, SamplingParams, ThinkingConfig};
        let ask = |enabled: bool, budget_tokens: u32, effort: &str| ChatRequest {
            model: "m".into(),
            messages: vec![Message::text(Role::User, "why")],
            sampling: Some(SamplingParams {
                max_tokens: Some(8192),
                ..Default::default()
            }),
            thinking: Some(ThinkingConfig {
                enabled,
                budget_tokens,
                effort: effort.into(),
            }),
            ..Default::default()
        };
        let high = ask(true, 0, "high");
        let openai =
            openai::to_openai_request("o3", &high, false, MaxTokensField::MaxCompletionTokens)
                .unwrap();
        assert_eq!(openai["reasoning_effort"], "high");
        let anthropic = anthropic::to_anthropic_request("claude", &high, false, 1024).unwrap();
        assert_eq!(
            anthropic["thinking"],
            serde_json::json!({ "type": "enabled", "budget_tokens": 4096 })
        );
        let gemini = gemini::to_gemini_request(&high, gemini::ToolSchemas::JsonSchema).unwrap();
        assert_eq!(
            gemini["generationConfig"]["thinkingConfig"],
            serde_json::json!({ "includeThoughts": true, "thinkingBudget": 4096 })
        );
        // A budget of its own wins over the effort; low is Anthropic's minimum.
        let budgeted = ask(true, 3000, "low");
        let anthropic = anthropic::to_anthropic_request("claude", &budgeted, false, 1024).unwrap();
        assert_eq!(anthropic["thinking"]["budget_tokens"], 3000);
        let low = ask(true, 0, "low");
        let anthropic = anthropic::to_anthropic_request("claude", &low, false, 1024).unwrap();
        assert_eq!(anthropic["thinking"]["budget_tokens"], 1024);
        // `none`: thinking off for Anthropic, the effort as is for OpenAI.
        let none = ask(false, 0, "none");
        let anthropic = anthropic::to_anthropic_request("claude", &none, false, 1024).unwrap();
        assert_eq!(
            anthropic["thinking"],
            serde_json::json!({ "type": "disabled" })
        );
        let openai =
            openai::to_openai_request("o3", &none, false, MaxTokensField::MaxCompletionTokens)
                .unwrap();
        assert_eq!(openai["reasoning_effort"], "none");
        // Anthropic's switch and budget without an effort: OpenAI gets nothing.
        let switched = ask(true, 2048, "");
        let openai =
            openai::to_openai_request("o3", &switched, false, MaxTokensField::MaxCompletionTokens)
                .unwrap();
        assert!(openai.get("reasoning_effort").is_none());
    }

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
        assert_eq!(
            ProviderError::from_status(429, None, b"").retry_after(),
            None
        );
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
    }

    #[test]
    fn an_account_that_cannot_pay_is_the_keys_fault_not_the_requests() {
        // The key's account is out of credit, over its spend limit or without billing: another
        // key or target may serve (key cooldown, fallback), unlike a bad request.
        for body in [
            &br#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#[..],
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"You have reached your specified API usage limits. You will regain access on 2025-07-01 at 00:00 UTC."}}"#,
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"You have reached your specified workspace API usage limits. You will regain access on 2025-07-01 at 00:00 UTC."}}"#,
            br#"{"error":{"code":400,"message":"Gemini API free tier is not available in your country. Please enable billing on your project in Google AI Studio.","status":"FAILED_PRECONDITION"}}"#,
            br#"{"error":{"code":400,"message":"User location is not supported for the API use.","status":"FAILED_PRECONDITION"}}"#,
        ] {
            let text = String::from_utf8_lossy(body);
            let error = ProviderError::from_status(400, None, body);
            assert_eq!(error, ProviderError::Authentication { status: 400 }, "{text}");
            assert!(error.allows_fallback() && !error.is_retryable(), "{text}");
            // The same sent as an error event (a 200 answer or a stream).
            let value: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(
                ProviderError::from_error_value(&value).code(),
                "AUTHENTICATION_ERROR",
                "{text}"
            );
        }
        // Narrow: other invalid requests and other FAILED_PRECONDITIONs stay bad requests.
        for body in [
            &br#"{"type":"error","error":{"type":"invalid_request_error","message":"messages: roles must alternate"}}"#[..],
            br#"{"error":{"code":400,"message":"Precondition check failed.","status":"FAILED_PRECONDITION"}}"#,
            br#"{"error":{"message":"Invalid value for 'billing_details'.","type":"invalid_request_error"}}"#,
        ] {
            let error = ProviderError::from_status(400, None, body);
            assert_eq!(error.code(), "BAD_REQUEST", "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn error_bodies_refine_the_taxonomy() {
        // OpenAI / Azure context length and content filter.
        let error = ProviderError::from_status(
            400,
            None,
            br#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
        );
        assert_eq!(error.code(), "CONTEXT_LENGTH_EXCEEDED");
        assert!(!error.is_retryable() && error.allows_fallback());
        assert_eq!(error.http_status(), 400);
        let error = ProviderError::from_status(
            400,
            None,
            br#"{"error":{"message":"filtered","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation"}}}"#,
        );
        assert_eq!(error.code(), "CONTENT_FILTERED");
        assert!(!error.is_retryable() && !error.allows_fallback());
        // Anthropic.
        let error = ProviderError::from_status(
            400,
            None,
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 208310 tokens > 200000 maximum"}}"#,
        );
        assert_eq!(error.code(), "CONTEXT_LENGTH_EXCEEDED");
        let error = ProviderError::from_status(
            529,
            Some("3"),
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert_eq!(
            error,
            ProviderError::Overloaded {
                status: 529,
                message: "Overloaded".into(),
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert!(error.is_retryable() && error.allows_fallback());
        assert_eq!(error.code(), "OVERLOADED");
        let error = ProviderError::from_error_value(&serde_json::json!({
            "type": "error", "error": { "type": "overloaded_error", "message": "Overloaded" } }));
        assert_eq!(error.code(), "OVERLOADED");
        let error = ProviderError::from_error_value(&serde_json::json!({
            "type": "error", "error": { "type": "api_error", "message": "Internal server error" } }));
        assert_eq!(error.code(), "UPSTREAM_ERROR");
        // Gemini.
        let error = ProviderError::from_status(
            400,
            None,
            br#"{"error":{"code":400,"message":"The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}"#,
        );
        assert_eq!(error.code(), "CONTEXT_LENGTH_EXCEEDED");
        let error = ProviderError::from_status(
            429,
            None,
            br#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"37s"}]}}"#,
        );
        assert_eq!(error.retry_after(), Some(Duration::from_secs(37)));
        let error = ProviderError::from_status(
            503,
            None,
            br#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#,
        );
        assert_eq!(error.code(), "OVERLOADED");
        // Gemini's wrong API key is a 400 INVALID_ARGUMENT: an authentication error (the next key
        // or target, a cooldown for this key), not a bad request that stops the route.
        let invalid_key = br#"{
          "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [
              {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": { "service": "generativelanguage.googleapis.com" }
              },
              {
                "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                "locale": "en-US",
                "message": "API key not valid. Please pass a valid API key."
              }
            ]
          }
        }"#;
        let error = ProviderError::from_status(400, None, invalid_key);
        assert_eq!(error, ProviderError::Authentication { status: 400 });
        assert_eq!(error.code(), "AUTHENTICATION_ERROR");
        assert!(!error.is_retryable() && error.allows_fallback());
        // The reason alone, or the message alone, is enough.
        let error = ProviderError::from_status(
            400,
            None,
            br#"{"error":{"code":400,"message":"API Key not found. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#,
        );
        assert_eq!(error.code(), "AUTHENTICATION_ERROR");
        let error = ProviderError::from_status(
            400,
            None,
            br#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT"}}"#,
        );
        assert_eq!(error.code(), "AUTHENTICATION_ERROR");
        // Gemini's other INVALID_ARGUMENTs stay bad requests.
        let error = ProviderError::from_status(
            400,
            None,
            br#"{"error":{"code":400,"message":"Please use a valid role: user, model.","status":"INVALID_ARGUMENT"}}"#,
        );
        assert_eq!(error.code(), "BAD_REQUEST");
        // A plain 400 stays a bad request; plain bodies are kept as the message.
        let error = ProviderError::from_status(400, None, b"bad things");
        assert_eq!(
            error,
            ProviderError::BadRequest {
                status: 400,
                message: "bad things".into()
            }
        );
    }
}
