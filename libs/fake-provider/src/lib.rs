//! A fake LLM provider speaking the OpenAI chat-completions wire format, for tests and demos.
//!
//! Answers are deterministic: `"echo: " + <text of the last user message>`. Faults (HTTP errors,
//! interrupted streams) and latency are injected per model through the [`FakeProvider`] handle or the
//! `/_fake/*` control endpoints.
//!
//! Endpoints:
//! - `POST /v1/chat/completions`: OpenAI chat completions, unary or SSE (`"stream": true`).
//! - `GET /v1/models`: models seen in requests or mentioned by a control call.
//! - `POST /_fake/fail` `{"model","status","times"}`, `POST /_fake/fail_stream` `{"model","chunks","times"}`,
//!   `POST /_fake/latency` `{"model","latency_ms"}`, `GET /_fake/requests` (`{"total":N,"models":{model:N}}`).

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
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

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

/// One request the fake received on `/v1/chat/completions`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedRequest {
    /// The `model` field.
    pub model: String,
    /// The whole JSON body.
    pub body: Value,
    /// Whether `"stream": true` was asked.
    pub stream: bool,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Inner {
    failures: HashMap<String, VecDeque<u16>>,
    stream_failures: HashMap<String, VecDeque<usize>>,
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
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let served = axum::serve(listener, app)
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

    /// The next `times` requests for `model` answer `status` with an OpenAI error body
    /// (429 carries `retry-after: 0`). Calls queue up in order.
    pub fn fail_next(&self, model: &str, status: u16, times: u32) {
        let mut inner = self.shared.lock();
        inner.models.insert(model.to_owned());
        let queue = inner.failures.entry(model.to_owned()).or_default();
        queue.extend(std::iter::repeat_n(status, times as usize));
    }

    /// The next `times` streaming requests for `model` send `chunks` content chunks (after the
    /// role chunk; with `chunks == 0` nothing at all) and then drop the connection without `[DONE]`.
    pub fn fail_stream_after(&self, model: &str, chunks: usize, times: u32) {
        let mut inner = self.shared.lock();
        inner.models.insert(model.to_owned());
        let queue = inner.stream_failures.entry(model.to_owned()).or_default();
        queue.extend(std::iter::repeat_n(chunks, times as usize));
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
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/_fake/fail", post(control_fail))
        .route("/_fake/fail_stream", post(control_fail_stream))
        .route("/_fake/latency", post(control_latency))
        .route("/_fake/requests", get(control_requests))
        .with_state(shared)
}

// === errors ===

fn error_response(status: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, code) = match status.as_u16() {
        400 => ("invalid_request_error", Value::Null),
        401 => ("invalid_request_error", json!("invalid_api_key")),
        403 => ("permission_error", Value::Null),
        404 => ("invalid_request_error", json!("model_not_found")),
        429 => ("requests", json!("rate_limit_exceeded")),
        _ => ("server_error", Value::Null),
    };
    let body =
        json!({ "error": { "message": message, "type": kind, "param": null, "code": code } });
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("0"));
    }
    response
}

// === chat completions ===

/// What the fake answers to one request.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Text {
        content: String,
        finish_reason: &'static str,
    },
    ToolCall {
        name: String,
        arguments: String,
    },
}

fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

fn max_tokens(body: &Value) -> Option<u64> {
    body.get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| body.get("max_tokens").and_then(Value::as_u64))
}

/// The deterministic answer and its usage `(prompt, completion)`.
fn answer_for(body: &Value) -> (Answer, u64, u64) {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let prompt_tokens: usize = messages.iter().map(|m| word_count(&message_text(m))).sum();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(message_text)
        .unwrap_or_default();
    let first_tool = body
        .get("tools")
        .and_then(Value::as_array)
        .and_then(|tools| tools.first())
        .and_then(|tool| tool.pointer("/function/name"))
        .and_then(Value::as_str);
    if let Some(name) = first_tool
        && last_user.contains("call tool")
    {
        let arguments = "{}".to_owned();
        let completion = word_count(name) + word_count(&arguments);
        return (
            Answer::ToolCall {
                name: name.to_owned(),
                arguments,
            },
            prompt_tokens as u64,
            completion as u64,
        );
    }
    let mut content = format!("echo: {last_user}");
    let mut finish_reason = "stop";
    let words: Vec<&str> = content.split_whitespace().collect();
    if let Some(limit) = max_tokens(body)
        && (limit as usize) < words.len()
    {
        content = words[..limit as usize].join(" ");
        finish_reason = "length";
    }
    let completion = word_count(&content);
    (
        Answer::Text {
            content,
            finish_reason,
        },
        prompt_tokens as u64,
        completion as u64,
    )
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn completion_json(
    id: &str,
    model: &str,
    created: u64,
    answer: &Answer,
    prompt: u64,
    completion: u64,
) -> Value {
    let (message, finish_reason) = match answer {
        Answer::Text {
            content,
            finish_reason,
        } => (
            json!({ "role": "assistant", "content": content, "refusal": null }),
            *finish_reason,
        ),
        Answer::ToolCall { name, arguments } => (
            json!({
                "role": "assistant",
                "content": null,
                "refusal": null,
                "tool_calls": [{ "id": "call_1", "type": "function", "function": { "name": name, "arguments": arguments } }],
            }),
            "tool_calls",
        ),
    };
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason }],
        "usage": usage_json(prompt, completion),
        "system_fingerprint": "fp_fake",
    })
}

/// Splits `text` into at most `pieces` parts of roughly equal length (on char boundaries).
fn split_pieces(text: &str, pieces: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return Vec::new();
    }
    let pieces = pieces.max(1);
    let size = chars.len().div_ceil(pieces);
    chars
        .chunks(size)
        .map(|chunk| chunk.iter().collect())
        .collect()
}

/// The `data:` payloads of a streamed answer, `[DONE]` excluded. The first is the role chunk.
fn stream_events(
    id: &str,
    model: &str,
    created: u64,
    answer: &Answer,
    usage: Option<Value>,
    stream_chunks: usize,
) -> Vec<Value> {
    let chunk = |delta: Value, finish_reason: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }],
        })
    };
    let mut events = Vec::new();
    let finish_reason = match answer {
        Answer::Text {
            content,
            finish_reason,
        } => {
            events.push(chunk(
                json!({ "role": "assistant", "content": "", "refusal": null }),
                Value::Null,
            ));
            for piece in split_pieces(content, stream_chunks) {
                events.push(chunk(json!({ "content": piece }), Value::Null));
            }
            *finish_reason
        }
        Answer::ToolCall { name, arguments } => {
            events.push(chunk(
                json!({ "role": "assistant", "content": null, "refusal": null }),
                Value::Null,
            ));
            events.push(chunk(
                json!({ "tool_calls": [{ "index": 0, "id": "call_1", "type": "function", "function": { "name": name, "arguments": "" } }] }),
                Value::Null,
            ));
            for piece in split_pieces(arguments, stream_chunks) {
                events.push(chunk(
                    json!({ "tool_calls": [{ "index": 0, "function": { "arguments": piece } }] }),
                    Value::Null,
                ));
            }
            "tool_calls"
        }
    };
    events.push(chunk(json!({}), json!(finish_reason)));
    if let Some(usage) = usage {
        events.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [],
            "usage": usage,
        }));
    }
    events
}

fn sse_frame(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(value @ Value::Object(_)) => value,
        Ok(_) => return error_response(400, "request body must be a JSON object"),
        Err(error) => {
            return error_response(
                400,
                &format!("could not parse the JSON body of your request: {error}"),
            );
        }
    };
    let Some(model) = body.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return error_response(400, "you must provide a model parameter");
    };
    if body
        .get("messages")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        return error_response(400, "'messages' must be a non-empty array");
    }
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (failure, stream_failure, latency) = {
        let mut inner = shared.lock();
        inner.models.insert(model.clone());
        if inner.requests.len() >= KEPT_REQUESTS {
            inner.requests.pop_front();
        }
        inner.requests.push_back(ReceivedRequest {
            model: model.clone(),
            body: body.clone(),
            stream,
            authorization,
        });
        *inner.counts.entry(model.clone()).or_default() += 1;
        let failure = inner.failures.get_mut(&model).and_then(VecDeque::pop_front);
        let stream_failure = if stream && failure.is_none() {
            inner
                .stream_failures
                .get_mut(&model)
                .and_then(VecDeque::pop_front)
        } else {
            None
        };
        let latency = inner
            .latency
            .get(&model)
            .copied()
            .unwrap_or(shared.config.latency_ms);
        (failure, stream_failure, latency)
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if let Some(status) = failure {
        return error_response(status, &format!("injected failure with status {status}"));
    }
    let (answer, prompt, completion) = answer_for(&body);
    let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
    let created = now_secs();
    if !stream {
        return Json(completion_json(
            &id, &model, created, &answer, prompt, completion,
        ))
        .into_response();
    }
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let usage = include_usage.then(|| usage_json(prompt, completion));
    let events = stream_events(
        &id,
        &model,
        created,
        &answer,
        usage,
        shared.config.stream_chunks,
    );
    let frames: Vec<Result<Bytes, std::io::Error>> = match stream_failure {
        None => events
            .iter()
            .map(|event| Ok(sse_frame(&event.to_string())))
            .chain(std::iter::once(Ok(sse_frame("[DONE]"))))
            .collect(),
        Some(0) => vec![Err(std::io::Error::other("injected stream failure"))],
        Some(chunks) => events
            .iter()
            .take(chunks + 1)
            .map(|event| Ok(sse_frame(&event.to_string())))
            .chain(std::iter::once(Err(std::io::Error::other(
                "injected stream failure",
            ))))
            .collect(),
    };
    let body = Body::from_stream(async_stream::stream! {
        for frame in frames {
            // Yield between frames so that each one is flushed as its own network write.
            tokio::task::yield_now().await;
            yield frame;
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| error_response(500, "cannot build the response"))
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
