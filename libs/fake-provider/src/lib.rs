//! A fake LLM provider for tests and demos, speaking the OpenAI chat-completions, Azure OpenAI,
//! Anthropic Messages and Google Gemini wire formats.
//!
//! # Answers
//! Deterministic in every format: `"echo: " + <text of the last user message>` (the last user-authored
//! message that is not only tool results), cut to `max_tokens` words with finish reason "length".
//! Usage counts whitespace-separated words: every text of the request (system, messages, tool results)
//! for the prompt, the answer for the completion.
//!
//! Tool calls: when the request declares tools and the last user text contains `call tool`, the
//! answer is a call of the first declared tool (`call every tool`: one call per declared tool, in
//! order). The arguments are the JSON object written in the text (from its first `{` to its last
//! `}`), or `{}`. Streamed, the arguments are split into `stream_chunks` pieces (OpenAI
//! `tool_calls[].function.arguments` deltas, Anthropic `input_json_delta`s; Gemini sends a
//! `functionCall` whole, as the real API does).
//!
//! Refusals: when the last user text contains `please refuse`, the model declines with
//! `"I'm sorry, I can't help with that."`: OpenAI/Azure `message.refusal` with `content: null`
//! (streamed: `delta.refusal` pieces), finish reason `stop`; Anthropic the text with
//! `stop_reason: "refusal"`; Gemini the text (`STOP`); the gRPC gateway API `Message.refusal`
//! (streamed: `ChoiceDelta.refusal`).
//!
//! # Endpoints
//! - `POST /v1/chat/completions`: OpenAI chat completions, unary or SSE (`"stream": true`).
//! - `POST /openai/deployments/{deployment}/chat/completions?api-version=…`: Azure OpenAI (the
//!   deployment is the model; `api-key` header; `prompt_filter_results` / `content_filter_results`).
//! - `POST /v1/messages`: Anthropic Messages (`x-api-key` and `anthropic-version` required,
//!   `max_tokens` required), unary or SSE with the real event sequence (`message_start`,
//!   `content_block_start`, `ping`, `content_block_delta`, `content_block_stop`, `message_delta`,
//!   `message_stop`). Requests are validated like the real API does where an adapter could go
//!   wrong: roles, empty text blocks, `tool_result`s answering the previous turn's `tool_use`s.
//!   Extended thinking (`"thinking": {"type": "enabled", "budget_tokens"}`, budget ≥ 1024 and below
//!   `max_tokens`): the answer starts with a `thinking` block signed by the fake
//!   (`thinking_delta` pieces and a `signature_delta` when streamed; its words count as output
//!   tokens); thinking blocks sent back in an assistant turn must carry that signature unchanged.
//!   A text answer containing one of `stop_sequences` ends before it (`stop_reason:
//!   "stop_sequence"` with the matched `stop_sequence`).
//! - `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`: Gemini
//!   (`x-goog-api-key` header or `key=`; roles `user`/`model`; `functionResponse` needs a name).
//!   Streams have no end marker: the last event carries `finishReason` and the usage. When the
//!   request asks for thinking (`generationConfig.thinkingConfig`, `thinkingBudget` not 0), the
//!   first `functionCall` part of an answer carries a `thoughtSignature` (the fake's, standard
//!   base64 with `/`, `+` and `=`), as Gemini's thinking models send it; what comes back in the
//!   next turn can be read from [`FakeProvider::requests`].
//! - `POST /v1/embeddings` and Azure `POST /openai/deployments/{deployment}/embeddings`: OpenAI
//!   embeddings, deterministic (a unit vector seeded by a hash of each input, of
//!   [`embeddings::DEFAULT_DIMENSIONS`] or the requested `dimensions`; `prompt_tokens` = words).
//! - `POST /v1beta/models/{model}:batchEmbedContents`: Gemini embeddings, the same vectors
//!   (`{"embeddings":[{"values":[…]}]}`, no usage; `outputDimensionality` as `dimensions`).
//! - `GET /v1/models`: models seen in requests or mentioned by a control call.
//!
//! # Faults
//! Injected per model, in order, through [`FakeProvider::inject`] (or the older
//! [`FakeProvider::fail_next`] / [`FakeProvider::fail_stream_after`]) or `POST /_fake/fault`
//! `{"model", "kind", <fields of the kind>, "times"}` (`times` defaults to 1). Each request
//! consumes one queued fault; stream-only kinds wait for a streaming request. See [`Fault`] for the
//! kinds (`kind` is the snake_case variant name, e.g. `{"model":"m","kind":"stream_stall","after_chunks":2}`).
//! Every fault is rendered in the format of the endpoint that was called.
//!
//! Other control endpoints: `POST /_fake/fail` `{"model","status","times"}`,
//! `POST /_fake/fail_stream` `{"model","chunks","times"}`, `POST /_fake/latency`
//! `{"model","latency_ms"}`, `GET /_fake/requests` (`{"total":N,"models":{model:N}}`).

mod answer;
mod anthropic;
pub mod embeddings;
mod gemini;
pub mod grpc;
mod openai;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{ConnectInfo, Path, RawQuery, State, connect_info::Connected},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::IncomingStream,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

use crate::answer::{Answer, Prompt};

/// Settings of a fake provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeConfig {
    /// Listen address (`127.0.0.1:0` picks a free port).
    pub addr: String,
    /// Latency added before every answer, unless a per-model latency is set.
    pub latency_ms: u64,
    /// Number of pieces the answer content is split into when streaming.
    pub stream_chunks: usize,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            addr: "127.0.0.1:9090".to_owned(),
            latency_ms: 0,
            stream_chunks: 5,
        }
    }
}

/// The wire format of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFormat {
    /// OpenAI chat completions (`/v1/chat/completions`).
    Openai,
    /// Azure OpenAI (`/openai/deployments/{deployment}/chat/completions`).
    Azure,
    /// Anthropic Messages (`/v1/messages`).
    Anthropic,
    /// Google Gemini (`/v1beta/models/{model}:generateContent`).
    Gemini,
}

/// One request the fake received on a chat endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedRequest {
    /// The model (`model` field, Azure deployment or Gemini path segment).
    pub model: String,
    /// The whole JSON body.
    pub body: Value,
    /// Whether a stream was asked.
    pub stream: bool,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The endpoint's format.
    pub format: ApiFormat,
    /// Path and query of the request.
    pub path: String,
    /// Every request header (lowercase names; non-UTF-8 values are skipped).
    pub headers: BTreeMap<String, String>,
}

/// A fault injected into the next request(s) for a model. Rendered in the called endpoint's format.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// An HTTP error with the format's error body (429 carries `retry-after: 0`; Anthropic 529 is
    /// `overloaded_error`).
    Status { status: u16 },
    /// HTTP 429 asking to retry after `retry_after_secs` (`Retry-After` header; Gemini: a
    /// `google.rpc.RetryInfo` `retryDelay` in the error details).
    RateLimited { retry_after_secs: u64 },
    /// The connection is closed without any answer.
    ConnectionReset,
    /// Nothing is sent for `delay_ms` (this request only; see [`FakeProvider::set_latency`]).
    SlowFirstByte { delay_ms: u64 },
    /// Streaming only: the stream's opening events and `after_chunks` more, then the connection
    /// drops without the format's end (`after_chunks == 0`: the body fails at once).
    StreamCut { after_chunks: usize },
    /// Streaming only: the opening events and `after_chunks` more, then nothing, connection open.
    StreamStall { after_chunks: usize },
    /// Streaming only: the stream's opening events alone (OpenAI/Azure: the role delta with empty
    /// content, Azure's prompt filter results first; Anthropic: `message_start`, and with
    /// thinking the thinking block's start and a `ping`; Gemini has none), then the connection
    /// drops without the format's end. Nothing of the answer was sent.
    OpeningThenCut,
    /// Streaming only: the opening events, then `count` SSE comments (`: keep-alive`), one every
    /// `interval_ms`, and nothing of the answer; then the connection drops without the format's
    /// end. A provider that keeps the connection alive but never answers.
    KeepAlive { interval_ms: u64, count: usize },
    /// HTTP 200 with a JSON body cut in the middle (streaming: like [`Fault::MalformedSse`]).
    MalformedJson,
    /// Streaming only: after the opening events, an event whose data is not valid JSON; the stream
    /// then goes on normally.
    MalformedSse,
    /// HTTP 200 with `content-type: text/html` (a proxy's error page).
    WrongContentType,
    /// The format's "context length exceeded" error (OpenAI `context_length_exceeded`, Anthropic
    /// "prompt is too long", Gemini "input token count exceeds").
    ContextLengthExceeded,
    /// The prompt is blocked by the content filter: OpenAI/Azure HTTP 400 `content_filter`;
    /// Gemini `promptFeedback.blockReason` "SAFETY" (HTTP 200); Anthropic has no prompt filter
    /// error and answers `stop_reason: "refusal"`.
    ContentFilter,
    /// The answer is cut by the content filter after its first word: OpenAI/Azure finish reason
    /// `content_filter`, Anthropic `stop_reason: "refusal"`, Gemini `finishReason: "SAFETY"`.
    ContentFilterFinish,
}

impl Fault {
    fn stream_only(&self) -> bool {
        matches!(
            self,
            Fault::StreamCut { .. }
                | Fault::StreamStall { .. }
                | Fault::OpeningThenCut
                | Fault::KeepAlive { .. }
                | Fault::MalformedSse
        )
    }
}

#[derive(Default)]
struct Inner {
    faults: HashMap<String, VecDeque<Fault>>,
    stream_faults: HashMap<String, VecDeque<Fault>>,
    latency: HashMap<String, u64>,
    /// The most recent requests (bounded, so a long benchmark does not grow the fixture's memory).
    requests: VecDeque<ReceivedRequest>,
    /// Every request ever received, by model.
    counts: BTreeMap<String, usize>,
    models: BTreeSet<String>,
}

/// How many recent requests the fake keeps for inspection.
pub const KEPT_REQUESTS: usize = 1000;

struct Shared {
    config: FakeConfig,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` inconsistent, so poisoning is ignored.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Server {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A second handle on an accepted socket, so that a handler can close its own connection.
#[derive(Clone)]
struct Socket(Option<Arc<std::net::TcpStream>>);

#[cfg(unix)]
fn duplicate(stream: &TcpStream) -> Option<std::net::TcpStream> {
    use std::os::fd::AsFd;
    stream
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(std::net::TcpStream::from)
}

#[cfg(not(unix))]
fn duplicate(_stream: &TcpStream) -> Option<std::net::TcpStream> {
    None
}

impl Connected<IncomingStream<'_, TcpListener>> for Socket {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        // Runs once per accepted connection, before it is served.
        let _ = stream.io().set_nodelay(true);
        Socket(duplicate(stream.io()).map(Arc::new))
    }
}

impl Socket {
    /// Closes the connection both ways; the client sees it closed before any answer.
    fn reset(&self) {
        if let Some(socket) = &self.0 {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Handle of a running fake provider. Clones share the same state.
#[derive(Clone)]
pub struct FakeProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Arc<Mutex<Server>>,
}

impl std::fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvider")
            .field("addr", &self.addr)
            .finish()
    }
}

impl FakeProvider {
    /// Binds `config.addr` and serves on a background task.
    pub async fn start(config: FakeConfig) -> anyhow::Result<FakeProvider> {
        let listener = TcpListener::bind(&config.addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            inner: Mutex::new(Inner::default()),
        });
        let app = router(shared.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<Socket>(),
            )
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await;
            if let Err(error) = served {
                tracing::error!(%error, "fake provider server failed");
            }
        });
        Ok(FakeProvider {
            addr,
            shared,
            server: Arc::new(Mutex::new(Server {
                stop: Some(stop_tx),
                task: Some(task),
            })),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI base URL, `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The base URL of the other formats (Azure, Anthropic, Gemini): `http://127.0.0.1:PORT`.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues `fault` for the next `times` requests for `model` (stream-only faults: the next
    /// `times` streaming requests). Calls queue up in order.
    pub fn inject(&self, model: &str, fault: Fault, times: u32) {
        let mut inner = self.shared.lock();
        inner.models.insert(model.to_owned());
        let queues = if fault.stream_only() {
            &mut inner.stream_faults
        } else {
            &mut inner.faults
        };
        queues
            .entry(model.to_owned())
            .or_default()
            .extend(std::iter::repeat_n(fault, times as usize));
    }

    /// The next `times` requests for `model` answer `status` with the format's error body
    /// (429 carries `retry-after: 0`). Same as [`Fault::Status`].
    pub fn fail_next(&self, model: &str, status: u16, times: u32) {
        self.inject(model, Fault::Status { status }, times);
    }

    /// The next `times` streaming requests for `model` send `chunks` content chunks (after the
    /// opening events; with `chunks == 0` nothing at all) and then drop the connection without the
    /// format's end. Same as [`Fault::StreamCut`].
    pub fn fail_stream_after(&self, model: &str, chunks: usize, times: u32) {
        self.inject(
            model,
            Fault::StreamCut {
                after_chunks: chunks,
            },
            times,
        );
    }

    /// Latency before every answer for `model` (overrides [`FakeConfig::latency_ms`]).
    pub fn set_latency(&self, model: &str, latency_ms: u64) {
        let mut inner = self.shared.lock();
        inner.models.insert(model.to_owned());
        inner.latency.insert(model.to_owned(), latency_ms);
    }

    /// The last [`KEPT_REQUESTS`] chat requests received, in order (failed ones included).
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    /// Number of chat requests received for `model`.
    pub fn request_count(&self, model: &str) -> usize {
        self.shared.lock().counts.get(model).copied().unwrap_or(0)
    }

    /// Stops serving: open connections get a moment to finish, then the server task is aborted.
    pub async fn shutdown(self) {
        let (stop, task) = {
            let mut server = self
                .server
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            (server.stop.take(), server.task.take())
        };
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        if let Some(mut task) = task
            && tokio::time::timeout(Duration::from_millis(500), &mut task)
                .await
                .is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai_chat))
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(azure_chat),
        )
        .route("/v1/messages", post(anthropic_messages))
        .route("/v1/embeddings", post(openai_embeddings))
        .route(
            "/openai/deployments/{deployment}/embeddings",
            post(azure_embeddings),
        )
        .route("/v1beta/models/{model_method}", post(gemini_generate))
        .route("/v1/models", get(list_models))
        .route("/_fake/fault", post(control_fault))
        .route("/_fake/fail", post(control_fail))
        .route("/_fake/fail_stream", post(control_fail_stream))
        .route("/_fake/latency", post(control_latency))
        .route("/_fake/requests", get(control_requests))
        .with_state(shared)
}

// === chat endpoints ===

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The frames of a streamed answer: `head` opens the stream, `body` carries the content, `tail`
/// ends it (its last frame is the format's end marker, if the format has one).
pub(crate) struct StreamPlan {
    pub head: Vec<Bytes>,
    pub body: Vec<Bytes>,
    pub tail: Vec<Bytes>,
    /// An event whose data is not valid JSON.
    pub malformed: Bytes,
}

/// A request the format's validation rejects (rendered as the format's error).
#[derive(Debug)]
pub(crate) struct Rejected {
    pub status: u16,
    pub message: String,
}

impl Rejected {
    /// HTTP 400.
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Rejected {
            status: 400,
            message: message.into(),
        }
    }
}

/// One incoming chat request, before parsing.
struct Incoming {
    format: ApiFormat,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    /// The model named by the path (Azure deployment, Gemini model).
    path_model: Option<String>,
    /// The query string ("" when none).
    query: String,
    /// Gemini: the streaming method was called.
    stream_method: bool,
}

impl ApiFormat {
    fn error(self, status: u16, message: &str) -> Response {
        match self {
            ApiFormat::Openai | ApiFormat::Azure => openai::error_response(status, message, None),
            ApiFormat::Anthropic => anthropic::error_response(status, message),
            ApiFormat::Gemini => gemini::error_response(status, message),
        }
    }

    fn parse(self, incoming: &Incoming) -> Result<Prompt, Rejected> {
        let body: Value = match serde_json::from_slice(&incoming.body) {
            Ok(value @ Value::Object(_)) => value,
            Ok(_) => return Err(Rejected::bad("request body must be a JSON object")),
            Err(error) => {
                return Err(Rejected::bad(format!(
                    "could not parse the JSON body of your request: {error}"
                )));
            }
        };
        match self {
            ApiFormat::Openai | ApiFormat::Azure => {
                openai::parse(&body, incoming.path_model.clone())
            }
            ApiFormat::Anthropic => anthropic::parse(&incoming.headers, &body),
            ApiFormat::Gemini => gemini::parse(
                &incoming.headers,
                &incoming.query,
                incoming.path_model.clone().unwrap_or_default(),
                incoming.stream_method,
                &body,
            ),
        }
    }

    fn rate_limited(self, retry_after_secs: u64) -> Response {
        if self == ApiFormat::Gemini {
            return gemini::rate_limited(retry_after_secs);
        }
        let mut response = self.error(429, "rate limit reached, retry later");
        if let Ok(value) = header::HeaderValue::from_str(&retry_after_secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }

    fn context_length_exceeded(self, prompt: &Prompt) -> Response {
        match self {
            ApiFormat::Openai | ApiFormat::Azure => openai::context_length_exceeded(prompt),
            ApiFormat::Anthropic => anthropic::context_length_exceeded(prompt),
            ApiFormat::Gemini => gemini::context_length_exceeded(prompt),
        }
    }

    /// The prompt-blocked answer, or `None` when the format answers with a filtered completion.
    fn prompt_filtered(self, id: &str, prompt: &Prompt, prompt_tokens: u64) -> Option<Response> {
        match self {
            ApiFormat::Openai | ApiFormat::Azure => Some(openai::prompt_filtered()),
            ApiFormat::Anthropic => None,
            ApiFormat::Gemini => {
                let blocked = gemini::blocked_json(id, &prompt.model, prompt_tokens);
                Some(if prompt.stream {
                    with_type(
                        StatusCode::OK,
                        SSE,
                        event_stream(vec![Ok(gemini::frame(&blocked))], false),
                    )
                } else {
                    Json(blocked).into_response()
                })
            }
        }
    }

    fn unary(
        self,
        id: &str,
        request: &Prompt,
        answer: &Answer,
        prompt: u64,
        completion: u64,
    ) -> Value {
        let model = request.model.as_str();
        match self {
            ApiFormat::Openai | ApiFormat::Azure => {
                let ctx = openai::Ctx {
                    id,
                    model,
                    created: now_secs(),
                    azure: self == ApiFormat::Azure,
                };
                openai::completion_json(&ctx, answer, prompt, completion)
            }
            ApiFormat::Anthropic => {
                anthropic::message_json(id, request, answer, prompt, completion)
            }
            ApiFormat::Gemini => gemini::response_json(id, request, answer, prompt, completion),
        }
    }

    fn stream(
        self,
        id: &str,
        request: &Prompt,
        answer: &Answer,
        usage: (u64, u64),
        pieces: usize,
    ) -> StreamPlan {
        match self {
            ApiFormat::Openai | ApiFormat::Azure => {
                let ctx = openai::Ctx {
                    id,
                    model: &request.model,
                    created: now_secs(),
                    azure: self == ApiFormat::Azure,
                };
                let usage = request
                    .include_usage
                    .then(|| openai::usage_json(usage.0, usage.1));
                openai::stream_plan(&ctx, answer, usage, pieces)
            }
            ApiFormat::Anthropic => anthropic::stream_plan(id, request, answer, usage, pieces),
            ApiFormat::Gemini => gemini::stream_plan(id, request, answer, usage, pieces),
        }
    }

    fn id(self) -> String {
        let id = uuid::Uuid::now_v7().simple();
        match self {
            ApiFormat::Openai | ApiFormat::Azure => format!("chatcmpl-{id}"),
            ApiFormat::Anthropic => format!("msg_{id}"),
            ApiFormat::Gemini => id.to_string(),
        }
    }
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

fn event_stream(frames: Vec<Result<Bytes, std::io::Error>>, stall: bool) -> Body {
    Body::from_stream(async_stream::stream! {
        for frame in frames {
            // Yield between frames so that each one is flushed as its own network write.
            tokio::task::yield_now().await;
            yield frame;
        }
        if stall {
            futures::future::pending::<()>().await;
        }
    })
}

fn with_type(status: StatusCode, content_type: &'static str, body: Body) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

const SSE: &str = "text/event-stream; charset=utf-8";

fn streamed(plan: StreamPlan, fault: Option<&Fault>) -> Response {
    let StreamPlan {
        head,
        body,
        tail,
        malformed,
    } = plan;
    let opening = head.len();
    let all: Vec<Bytes> = head.into_iter().chain(body).chain(tail).collect();
    let cut_at = |after: usize| (opening + after).min(all.len().saturating_sub(1));
    if let Some(Fault::KeepAlive { interval_ms, count }) = fault {
        let (interval, count) = (Duration::from_millis(*interval_ms), *count);
        let opening: Vec<Bytes> = all[..opening].to_vec();
        let body = Body::from_stream(async_stream::stream! {
            for frame in opening {
                tokio::task::yield_now().await;
                yield Ok::<Bytes, std::io::Error>(frame);
            }
            for _ in 0..count {
                tokio::time::sleep(interval).await;
                yield Ok(Bytes::from_static(b": keep-alive\n\n"));
            }
            // Let the last comment leave before the connection drops.
            tokio::task::yield_now().await;
            yield Err(std::io::Error::other("injected stream failure"));
        });
        return with_type(StatusCode::OK, SSE, body);
    }
    let (frames, stall): (Vec<Result<Bytes, std::io::Error>>, bool) = match fault {
        Some(Fault::StreamCut { after_chunks: 0 }) => (
            vec![Err(std::io::Error::other("injected stream failure"))],
            false,
        ),
        Some(Fault::StreamCut { after_chunks }) => (
            all[..cut_at(*after_chunks)]
                .iter()
                .cloned()
                .map(Ok)
                .chain(std::iter::once(Err(std::io::Error::other(
                    "injected stream failure",
                ))))
                .collect(),
            false,
        ),
        Some(Fault::OpeningThenCut) => (
            all[..opening]
                .iter()
                .cloned()
                .map(Ok)
                .chain(std::iter::once(Err(std::io::Error::other(
                    "injected stream failure",
                ))))
                .collect(),
            false,
        ),
        Some(Fault::StreamStall { after_chunks }) => (
            all[..cut_at(*after_chunks)]
                .iter()
                .cloned()
                .map(Ok)
                .collect(),
            true,
        ),
        Some(Fault::MalformedSse | Fault::MalformedJson) => {
            let mut frames = all;
            frames.insert(opening.min(frames.len()), malformed);
            (frames.into_iter().map(Ok).collect(), false)
        }
        _ => (all.into_iter().map(Ok).collect(), false),
    };
    with_type(StatusCode::OK, SSE, event_stream(frames, stall))
}

async fn chat(shared: Arc<Shared>, socket: Socket, incoming: Incoming) -> Response {
    let format = incoming.format;
    let prompt = match format.parse(&incoming) {
        Ok(prompt) => prompt,
        Err(rejected) => return format.error(rejected.status, &rejected.message),
    };
    let model = prompt.model.clone();
    let (fault, latency) = {
        let mut inner = shared.lock();
        inner.models.insert(model.clone());
        if inner.requests.len() >= KEPT_REQUESTS {
            inner.requests.pop_front();
        }
        inner.requests.push_back(ReceivedRequest {
            model: model.clone(),
            body: serde_json::from_slice(&incoming.body).unwrap_or(Value::Null),
            stream: prompt.stream,
            authorization: incoming
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            format,
            path: incoming.path.clone(),
            headers: header_map(&incoming.headers),
        });
        *inner.counts.entry(model.clone()).or_default() += 1;
        let mut fault = inner.faults.get_mut(&model).and_then(VecDeque::pop_front);
        if prompt.stream && fault.is_none() {
            fault = inner
                .stream_faults
                .get_mut(&model)
                .and_then(VecDeque::pop_front);
        }
        let latency = inner
            .latency
            .get(&model)
            .copied()
            .unwrap_or(shared.config.latency_ms);
        (fault, latency)
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let (mut answer, prompt_tokens, completion_tokens) = answer::answer(&prompt);
    match &fault {
        Some(Fault::Status { status }) => {
            return format.error(*status, &format!("injected failure with status {status}"));
        }
        Some(Fault::RateLimited { retry_after_secs }) => {
            return format.rate_limited(*retry_after_secs);
        }
        Some(Fault::ConnectionReset) => {
            socket.reset();
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Some(Fault::SlowFirstByte { delay_ms }) => {
            tokio::time::sleep(Duration::from_millis(*delay_ms)).await;
        }
        Some(Fault::MalformedJson) if !prompt.stream => {
            return with_type(
                StatusCode::OK,
                "application/json",
                Body::from(
                    "{\"id\":\"chatcmpl-broken\",\"choices\":[{\"index\":0,\"message\":{\"content\":\"ec",
                ),
            );
        }
        Some(Fault::WrongContentType) => {
            return with_type(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Body::from(
                    "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>",
                ),
            );
        }
        Some(Fault::ContextLengthExceeded) => return format.context_length_exceeded(&prompt),
        Some(Fault::ContentFilter) => {
            match format.prompt_filtered(&format.id(), &prompt, prompt_tokens) {
                Some(response) => return response,
                None => answer = answer::filtered(answer),
            }
        }
        Some(Fault::ContentFilterFinish) => answer = answer::filtered(answer),
        _ => {}
    }
    let completion_tokens = match &fault {
        Some(Fault::ContentFilter | Fault::ContentFilterFinish) => match &answer {
            Answer::Text { content, .. } => answer::word_count(content),
            Answer::ToolCalls(_) => completion_tokens,
        },
        _ => completion_tokens,
    };
    let id = format.id();
    if !prompt.stream {
        return Json(format.unary(&id, &prompt, &answer, prompt_tokens, completion_tokens))
            .into_response();
    }
    let plan = format.stream(
        &id,
        &prompt,
        &answer,
        (prompt_tokens, completion_tokens),
        shared.config.stream_chunks,
    );
    streamed(plan, fault.as_ref())
}

fn path_of(uri: &axum::http::Uri) -> String {
    uri.path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default()
}

async fn openai_chat(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(socket): ConnectInfo<Socket>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let incoming = Incoming {
        format: ApiFormat::Openai,
        path: path_of(&uri),
        headers,
        body,
        path_model: None,
        query: String::new(),
        stream_method: false,
    };
    chat(shared, socket, incoming).await
}

async fn azure_chat(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(socket): ConnectInfo<Socket>,
    Path(deployment): Path<String>,
    RawQuery(query): RawQuery,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let has_version = query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .any(|pair| pair.starts_with("api-version=") && pair.len() > "api-version=".len());
    if !has_version {
        return openai::error_response(
            404,
            "Resource not found: the api-version query parameter is required",
            Some("404"),
        );
    }
    if !headers.contains_key("api-key") && !headers.contains_key(header::AUTHORIZATION) {
        return openai::error_response(
            401,
            "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API.",
            Some("401"),
        );
    }
    let incoming = Incoming {
        format: ApiFormat::Azure,
        path: path_of(&uri),
        headers,
        body,
        path_model: Some(deployment),
        query: query.unwrap_or_default(),
        stream_method: false,
    };
    chat(shared, socket, incoming).await
}

async fn anthropic_messages(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(socket): ConnectInfo<Socket>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let incoming = Incoming {
        format: ApiFormat::Anthropic,
        path: path_of(&uri),
        headers,
        body,
        path_model: None,
        query: String::new(),
        stream_method: false,
    };
    chat(shared, socket, incoming).await
}

async fn gemini_generate(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(socket): ConnectInfo<Socket>,
    Path(model_method): Path<String>,
    RawQuery(query): RawQuery,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (model, stream_method) = match model_method.rsplit_once(':') {
        Some((model, "generateContent")) => (model.to_owned(), false),
        Some((model, "streamGenerateContent")) => (model.to_owned(), true),
        Some((model, "batchEmbedContents")) => {
            let path = path_of(&uri);
            return embeddings::handle(
                shared,
                socket,
                ApiFormat::Gemini,
                Some(model.to_owned()),
                path,
                query.as_deref().unwrap_or_default(),
                headers,
                body,
            )
            .await;
        }
        _ => {
            return gemini::error_response(
                404,
                &format!(
                    "unknown method in `{model_method}`: use :generateContent, :streamGenerateContent or :batchEmbedContents"
                ),
            );
        }
    };
    let incoming = Incoming {
        format: ApiFormat::Gemini,
        path: path_of(&uri),
        headers,
        body,
        path_model: Some(model),
        query: query.unwrap_or_default(),
        stream_method,
    };
    chat(shared, socket, incoming).await
}

async fn openai_embeddings(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(socket): ConnectInfo<Socket>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = path_of(&uri);
    embeddings::handle(
        shared,
        socket,
        ApiFormat::Openai,
        None,
        path,
        "",
        headers,
        body,
    )
    .await
}

async fn azure_embeddings(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(socket): ConnectInfo<Socket>,
    Path(deployment): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !headers.contains_key("api-key") && !headers.contains_key(header::AUTHORIZATION) {
        return openai::error_response(
            401,
            "Access denied due to missing subscription key.",
            Some("401"),
        );
    }
    let path = path_of(&uri);
    embeddings::handle(
        shared,
        socket,
        ApiFormat::Azure,
        Some(deployment),
        path,
        "",
        headers,
        body,
    )
    .await
}

async fn list_models(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let models: Vec<Value> = shared
        .lock()
        .models
        .iter()
        .map(|id| json!({ "id": id, "object": "model", "created": 0, "owned_by": "fake" }))
        .collect();
    Json(json!({ "object": "list", "data": models }))
}

// === control endpoints ===

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
struct FailRequest {
    model: String,
    status: u16,
    #[serde(default = "one")]
    times: u32,
}

#[derive(Deserialize)]
struct FailStreamRequest {
    model: String,
    chunks: usize,
    #[serde(default = "one")]
    times: u32,
}

#[derive(Deserialize)]
struct FaultRequest {
    model: String,
    #[serde(flatten)]
    fault: Fault,
    #[serde(default = "one")]
    times: u32,
}

#[derive(Deserialize)]
struct LatencyRequest {
    model: String,
    latency_ms: u64,
}

fn handle(shared: Arc<Shared>) -> FakeProvider {
    // Control endpoints reuse the handle's methods; the server part is not needed for that.
    FakeProvider {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        shared,
        server: Arc::new(Mutex::new(Server {
            stop: None,
            task: None,
        })),
    }
}

async fn control_fault(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<FaultRequest>,
) -> Json<Value> {
    handle(shared).inject(&req.model, req.fault, req.times);
    Json(json!({ "ok": true }))
}

async fn control_fail(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<FailRequest>,
) -> Json<Value> {
    handle(shared).fail_next(&req.model, req.status, req.times);
    Json(json!({ "ok": true }))
}

async fn control_fail_stream(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<FailStreamRequest>,
) -> Json<Value> {
    handle(shared).fail_stream_after(&req.model, req.chunks, req.times);
    Json(json!({ "ok": true }))
}

async fn control_latency(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<LatencyRequest>,
) -> Json<Value> {
    handle(shared).set_latency(&req.model, req.latency_ms);
    Json(json!({ "ok": true }))
}

async fn control_requests(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, Infallible> {
    let inner = shared.lock();
    let total: usize = inner.counts.values().sum();
    Ok(Json(json!({ "total": total, "models": inner.counts })))
}

#[cfg(test)]
mod tests;
