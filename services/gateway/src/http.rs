//! The OpenAI-compatible HTTP front end: `POST /v1/chat/completions` (JSON and SSE), `GET /v1/models`,
//! `GET /v1/models/{model}`, `GET /healthz` (the process answers), `GET /readyz` (its dependencies,
//! `ready.rs`), `GET /metrics`; `/v1/messages` and `/v1/embeddings` live in their own modules.
//! Errors are OpenAI-shaped JSON bodies with the status of their [`ErrorCode`]; an unknown path is
//! 404 `unknown_url`, a wrong method 405.

use std::convert::Infallible;

use axum::{
    Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, HeaderValue},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use futures::Stream;
use switchboard_status::ServiceError;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    app::Shared,
    error::GatewayError,
    openai::{self, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest},
    pipeline::{CacheControl, RequestContext, StreamEvent},
};

/// The HTTP routes.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(crate::anthropic::messages))
        .route("/v1/embeddings", post(crate::embeddings::embeddings))
        .route("/v1/models", get(list_models))
        // Model ids may hold slashes (`meta-llama/Llama-3.1-8B` on vLLM, OpenRouter's `vendor/model`).
        .route("/v1/models/{*model}", get(retrieve_model))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(unknown_url)
        .layer(DefaultBodyLimit::disable())
        .with_state(shared)
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let response = (self.code().http_status(), Json(self.body())).into_response();
        with_error_headers(response, &self, None)
    }
}

/// The headers of an error response, the same on every face (OpenAI, Anthropic, embeddings):
/// `Retry-After` when the error says when to retry (rate limits), `x-should-retry: false` when
/// retrying soon is futile (an exhausted budget, an `only-if-cached` miss: statuses the SDKs
/// would otherwise retry), and the request id once the request has one.
pub(crate) fn with_error_headers(
    mut response: Response,
    error: &GatewayError,
    request_id: Option<&str>,
) -> Response {
    let headers = response.headers_mut();
    if let Some(secs) = error.retry_after_secs() {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if error.futile_to_retry() {
        headers.insert("x-should-retry", HeaderValue::from_static("false"));
    }
    if let Some(id) = request_id {
        put_request_id(headers, id);
    }
    response
}

/// The request id under our header and under the names the SDKs read it from (OpenAI's
/// `x-request-id`, exposed as `_request_id`; Anthropic's `request-id`), so a caller can quote it
/// whichever client it uses.
pub(crate) fn put_request_id(headers: &mut HeaderMap, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert("x-request-id", value.clone());
        headers.insert("request-id", value.clone());
        headers.insert("x-switchboard-request-id", value);
    }
}

pub(crate) fn request_span(name: &'static str, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "gateway.http",
        otel.name = name,
        otel.kind = "server",
        request.id = tracing::field::Empty,
        app.id = tracing::field::Empty,
        http.status_code = tracing::field::Empty,
    );
    let _ = span.set_parent(switchboard_telemetry::extract_http(headers));
    span
}

pub(crate) fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Cache control from the request's headers. Directives (case-insensitive, comma-separated, in
/// `Cache-Control` or `x-switchboard-cache`): `no-cache` (skip the lookup), `no-store`, `refresh`
/// (skip the lookup, store the new answer), `only-if-cached` (a miss is 504 `NOT_CACHED`),
/// `max-age=N` / `s-maxage=N` (the stored answer's TTL; `0` means refresh). TTL precedence:
/// `x-switchboard-cache-ttl: N`, then `s-maxage`, then `max-age`. Malformed values are ignored,
/// as HTTP caches do.
pub(crate) fn cache_control(headers: &HeaderMap) -> CacheControl {
    let mut control = CacheControl::default();
    let (mut max_age, mut s_maxage) = (None, None);
    for name in [http::header::CACHE_CONTROL.as_str(), "x-switchboard-cache"] {
        for value in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
            for directive in value.split(',').map(str::trim) {
                let (name, argument) = match directive.split_once('=') {
                    Some((name, argument)) => {
                        (name.trim(), Some(argument.trim().trim_matches('"')))
                    }
                    None => (directive, None),
                };
                match name.to_ascii_lowercase().as_str() {
                    "no-cache" => control.no_cache = true,
                    "no-store" => control.no_store = true,
                    "refresh" => control.refresh = true,
                    "only-if-cached" => control.only_if_cached = true,
                    "max-age" => max_age = argument.and_then(delta_seconds),
                    "s-maxage" => s_maxage = argument.and_then(delta_seconds),
                    _ => {}
                }
            }
        }
    }
    let explicit = headers
        .get("x-switchboard-cache-ttl")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| delta_seconds(v.trim()));
    match (explicit, s_maxage.or(max_age)) {
        (Some(ttl), _) => control.ttl_seconds = ttl,
        // A client that accepts no cached answer older than 0 s asks for a fresh one.
        (None, Some(0)) => control.refresh = true,
        (None, Some(ttl)) => control.ttl_seconds = ttl,
        (None, None) => {}
    }
    control
}

/// RFC 9111 delta-seconds: digits only; too large a value saturates.
fn delta_seconds(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        text.parse::<u64>()
            .map_or(u32::MAX, |n| u32::try_from(n).unwrap_or(u32::MAX)),
    )
}

pub(crate) async fn read_body(
    body: Body,
    limit: usize,
    headers: &HeaderMap,
) -> Result<bytes::Bytes, GatewayError> {
    if let Some(length) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && length > limit
    {
        return Err(GatewayError::PayloadTooLarge {
            size: Some(length),
            limit,
        });
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| GatewayError::PayloadTooLarge { size: None, limit })
}

/// Parses a JSON body; errors name the offending field by its path.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, GatewayError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let field = if path == "." || inner.is_syntax() || inner.is_eof() {
            "body".to_owned()
        } else {
            path
        };
        GatewayError::InvalidRequest {
            field,
            message: inner.to_string(),
        }
    })
}

async fn chat_completions(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = request_span("POST /v1/chat/completions", &headers);
    let response = handle_chat(shared, headers, body)
        .instrument(span.clone())
        .await;
    span.record("http.status_code", response.status().as_u16());
    response
}

async fn handle_chat(shared: Shared, headers: HeaderMap, body: Body) -> Response {
    let principal = match shared.keys.authenticate(authorization(&headers)) {
        Ok(principal) => principal,
        Err(error) => return error.into_response(),
    };
    let bytes = match read_body(body, shared.max_body_bytes, &headers).await {
        Ok(bytes) => bytes,
        Err(error) => return error.into_response(),
    };
    let parsed = match parse_json::<ChatCompletionRequest>(&bytes) {
        Ok(parsed) => parsed,
        Err(error) => return error.into_response(),
    };
    let stream = parsed.stream;
    let include_usage = parsed
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let request = match parsed.into_proto() {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    let ctx = RequestContext::new(principal);
    let span = tracing::Span::current();
    span.record("request.id", ctx.request_id.as_str());
    span.record("app.id", ctx.principal.app.as_str());
    let control = cache_control(&headers);
    if stream {
        match shared.pipeline.stream(&ctx, request, control).await {
            Ok(handle) => {
                let events = sse_events(
                    handle.events,
                    ctx.response_id(),
                    ctx.request_id.clone(),
                    handle.cache.as_str(),
                    include_usage,
                );
                let mut response = Sse::new(events)
                    .keep_alive(KeepAlive::default())
                    .into_response();
                // Who serves is known before the first chunk (the router commits to a deployment
                // before its response head): the same headers as a unary answer's.
                set_headers(
                    response.headers_mut(),
                    &ctx.request_id,
                    handle.cache.as_str(),
                    handle.served_by.as_ref(),
                );
                response
            }
            Err(error) => error_with_id(error, &ctx.request_id),
        }
    } else {
        match shared.pipeline.complete(&ctx, request, control).await {
            Ok(done) => {
                let info = openai::switchboard_info(
                    &ctx.request_id,
                    done.cache.as_str(),
                    Some(&done.route),
                );
                let mut response =
                    Json(ChatCompletion::from_proto(&done.response, info)).into_response();
                set_headers(
                    response.headers_mut(),
                    &ctx.request_id,
                    done.cache.as_str(),
                    Some(&done.route),
                );
                response
            }
            Err(error) => error_with_id(error, &ctx.request_id),
        }
    }
}

fn error_with_id(error: GatewayError, request_id: &str) -> Response {
    let response = (error.code().http_status(), Json(error.body())).into_response();
    with_error_headers(response, &error, Some(request_id))
}

pub(crate) fn set_headers(
    headers: &mut HeaderMap,
    request_id: &str,
    cache: &str,
    route: Option<&switchboard_proto::chat::v1::RouteInfo>,
) {
    put_request_id(headers, request_id);
    let mut put = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    put("x-switchboard-cache", cache);
    for (name, value) in route.into_iter().flat_map(served_by) {
        put(name, &value);
    }
}

/// The headers (HTTP) or metadata (gRPC) that say who served: provider, model, the key alias when
/// a configured key served (never the key), attempts.
pub(crate) fn served_by(
    route: &switchboard_proto::chat::v1::RouteInfo,
) -> impl Iterator<Item = (&'static str, String)> + '_ {
    [
        ("x-switchboard-provider", route.provider.clone()),
        ("x-switchboard-model", route.model.clone()),
        ("x-switchboard-key-alias", route.key_alias.clone()),
        ("x-switchboard-attempts", route.attempt_count.to_string()),
    ]
    .into_iter()
    .filter(|(name, value)| *name != "x-switchboard-key-alias" || !value.is_empty())
}

fn json_event<T: serde::Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(text) => Event::default().data(text),
        Err(_) => Event::default()
            .data("{\"error\":{\"message\":\"serialisation failed\",\"type\":\"server_error\"}}"),
    }
}

/// The final usage chunk of a stream: OpenAI's, with the `switchboard` object of a unary answer
/// (who served, after how many attempts) as an extra field, since a stream's headers leave before
/// the route is known.
#[derive(serde::Serialize)]
struct UsageChunk {
    #[serde(flatten)]
    chunk: ChatCompletionChunk,
    switchboard: openai::SwitchboardInfo,
}

fn usage_chunk(
    response_id: &str,
    model: &str,
    created: i64,
    usage: &switchboard_proto::chat::v1::Usage,
    switchboard: openai::SwitchboardInfo,
) -> UsageChunk {
    UsageChunk {
        chunk: ChatCompletionChunk::usage_only(response_id, model, created, usage),
        switchboard,
    }
}

/// SSE events: OpenAI chunks, the usage chunk when asked for, `[DONE]`; or an explicit error event
/// (and no `[DONE]`) when the stream fails after it started.
fn sse_events(
    mut events: crate::pipeline::Events,
    response_id: String,
    request_id: String,
    cache: &'static str,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        let mut model = String::new();
        let mut created = 0;
        let mut finishes = Finishes::default();
        while let Some(event) = events.recv().await {
            match event {
                StreamEvent::Chunk(chunk) => {
                    if model.is_empty() {
                        model = chunk.model.clone();
                        created = chunk.created;
                    }
                    // A chunk without choices only carried the provider's usage: it comes once,
                    // in the usage chunk at the end (when asked for), live or replayed alike.
                    if chunk.choices.is_empty() {
                        continue;
                    }
                    finishes.see(&chunk);
                    yield Ok(json_event(&ChatCompletionChunk::from_proto(&chunk, &response_id)));
                }
                StreamEvent::Done { usage, route } => {
                    if let Some(mut last) = finishes.missing() {
                        last.model.clone_from(&model);
                        last.created = created;
                        yield Ok(json_event(&ChatCompletionChunk::from_proto(&last, &response_id)));
                    }
                    if include_usage {
                        let switchboard = openai::switchboard_info(&request_id, cache, Some(&route));
                        yield Ok(json_event(&usage_chunk(&response_id, &model, created, &usage, switchboard)));
                    }
                    yield Ok(Event::default().data("[DONE]"));
                    return;
                }
                StreamEvent::Failed(error) => {
                    yield Ok(json_event(&error.body()));
                    return;
                }
            }
        }
    }
}

/// Which choices of a stream said how they finished. A provider stream may end properly (`[DONE]`)
/// without a finish reason for a choice (some OpenAI-compatible servers do); OpenAI's clients then
/// never see one, so the stream's end gives it: `tool_calls` for a choice that called tools, else
/// `stop`.
#[derive(Default)]
struct Finishes {
    /// Choice index → (called tools, finished).
    choices: std::collections::BTreeMap<u32, (bool, bool)>,
}

impl Finishes {
    fn see(&mut self, chunk: &switchboard_proto::chat::v1::ChatChunk) {
        for choice in &chunk.choices {
            let seen = self.choices.entry(choice.index).or_default();
            seen.0 |= !choice.tool_calls.is_empty();
            seen.1 |= choice.finish_reason
                != switchboard_proto::chat::v1::FinishReason::Unspecified as i32;
        }
    }

    /// A chunk finishing every choice that did not say how it finished (none when all did).
    fn missing(&self) -> Option<switchboard_proto::chat::v1::ChatChunk> {
        use switchboard_proto::chat::v1::{ChatChunk, ChoiceDelta, FinishReason};
        let choices: Vec<ChoiceDelta> = self
            .choices
            .iter()
            .filter(|(_, (_, finished))| !finished)
            .map(|(index, (called, _))| ChoiceDelta {
                index: *index,
                finish_reason: if *called {
                    FinishReason::ToolCalls
                } else {
                    FinishReason::Stop
                } as i32,
                ..Default::default()
            })
            .collect();
        (!choices.is_empty()).then(|| ChatChunk {
            choices,
            ..Default::default()
        })
    }
}

/// Whether a request comes from an Anthropic client: Anthropic's SDKs send `anthropic-version` on
/// every call. Such a caller gets Anthropic's shapes on the paths both APIs share (`/v1/models`)
/// and Anthropic-shaped errors, so its SDK parses them.
fn from_anthropic_client(headers: &HeaderMap) -> bool {
    headers.contains_key("anthropic-version")
}

/// An error in the shape the caller's API uses, with the shared error headers.
fn error_for(error: GatewayError, anthropic: bool) -> Response {
    if anthropic {
        let response = (error.code().http_status(), Json(error.anthropic_body())).into_response();
        with_error_headers(response, &error, None)
    } else {
        error.into_response()
    }
}

/// The caller of a models call: Anthropic clients may use `x-api-key`.
fn models_caller(
    shared: &Shared,
    headers: &HeaderMap,
    anthropic: bool,
) -> Result<crate::auth::Principal, GatewayError> {
    if anthropic {
        let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        shared
            .keys
            .authenticate_api_key(x_api_key, authorization(headers))
    } else {
        shared.keys.authenticate(authorization(headers))
    }
}

/// Anthropic's model object (`GET /v1/models` of the Messages API).
#[derive(Debug, serde::Serialize)]
struct AnthropicModel {
    #[serde(rename = "type")]
    kind: &'static str,
    id: String,
    display_name: String,
    /// RFC 3339.
    created_at: String,
}

impl From<switchboard_proto::chat::v1::Model> for AnthropicModel {
    fn from(model: switchboard_proto::chat::v1::Model) -> Self {
        let created_at = time::OffsetDateTime::from_unix_timestamp(model.created)
            .ok()
            .and_then(|at| {
                at.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned());
        AnthropicModel {
            kind: "model",
            display_name: model.id.clone(),
            id: model.id,
            created_at,
        }
    }
}

/// Anthropic's page of models (the whole list in one page).
#[derive(Debug, serde::Serialize)]
struct AnthropicModelList {
    data: Vec<AnthropicModel>,
    has_more: bool,
    first_id: Option<String>,
    last_id: Option<String>,
}

/// `GET /v1/models`: OpenAI's list, or Anthropic's page for an Anthropic client.
async fn list_models(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let span = request_span("GET /v1/models", &headers);
    async move {
        let anthropic = from_anthropic_client(&headers);
        let principal = match models_caller(&shared, &headers, anthropic) {
            Ok(principal) => principal,
            Err(error) => return error_for(error, anthropic),
        };
        match shared.pipeline.list_models(&principal).await {
            Ok(models) if anthropic => {
                let data: Vec<AnthropicModel> = models.into_iter().map(Into::into).collect();
                Json(AnthropicModelList {
                    has_more: false,
                    first_id: data.first().map(|m| m.id.clone()),
                    last_id: data.last().map(|m| m.id.clone()),
                    data,
                })
                .into_response()
            }
            Ok(models) => Json(openai::ModelList {
                object: "list",
                data: models.into_iter().map(openai::ModelOut::from).collect(),
            })
            .into_response(),
            Err(error) => error_for(error, anthropic),
        }
    }
    .instrument(span)
    .await
}

/// `GET /v1/models/{model}` (OpenAI's "retrieve model", Anthropic's "get a model"): the model
/// object, 404 `model_not_found` for a model the router does not serve, 403 `model_not_allowed`
/// for one outside the key's list.
async fn retrieve_model(
    State(shared): State<Shared>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    let span = request_span("GET /v1/models/{model}", &headers);
    async move {
        let anthropic = from_anthropic_client(&headers);
        let principal = match models_caller(&shared, &headers, anthropic) {
            Ok(principal) => principal,
            Err(error) => return error_for(error, anthropic),
        };
        match shared.pipeline.get_model(&principal, &model).await {
            Ok(model) if anthropic => Json(AnthropicModel::from(model)).into_response(),
            Ok(model) => Json(openai::ModelOut::from(model)).into_response(),
            Err(error) => error_for(error, anthropic),
        }
    }
    .instrument(span)
    .await
}

/// Whether a path the gateway does not serve was meant for Anthropic's API (its `/v1/messages/…`
/// sub-resources such as `count_tokens` or `batches`, or any call of an Anthropic client).
fn meant_for_anthropic(headers: &HeaderMap, uri: &http::Uri) -> bool {
    from_anthropic_client(headers) || uri.path().starts_with("/v1/messages")
}

/// Any path the gateway does not serve: a 404 (`unknown_url`) in the caller's API's shape instead
/// of an empty body, so that a client with a wrong base URL sees what it called. The query string
/// is left out (clients put keys there).
async fn unknown_url(method: http::Method, uri: http::Uri, headers: HeaderMap) -> Response {
    let error = GatewayError::UnknownUrl {
        method: method.to_string(),
        path: uri.path().to_owned(),
    };
    error_for(error, meant_for_anthropic(&headers, &uri))
}

/// A known path with the wrong method: 405 with a body in the caller's API's shape (axum adds
/// `Allow`).
async fn method_not_allowed(method: http::Method, uri: http::Uri, headers: HeaderMap) -> Response {
    let message = format!("method {method} is not allowed on {}", uri.path());
    if meant_for_anthropic(&headers, &uri) {
        let body = serde_json::json!({
            "type": "error",
            "error": { "type": "invalid_request_error", "message": message },
        });
        return (http::StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response();
    }
    let body = openai::ErrorBody {
        error: openai::ErrorDetail {
            message,
            kind: "invalid_request_error",
            param: None,
            code: "method_not_allowed",
        },
    };
    (http::StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// `GET /readyz`: 200 when ready or degraded, 503 when a required dependency is down; the body
/// names every dependency, its state and what requests get while it is down (`ready.rs`).
async fn readyz(State(shared): State<Shared>) -> Response {
    let report = shared.readiness.report().await;
    let status = match report.status {
        crate::ready::Status::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
        crate::ready::Status::Ready | crate::ready::Status::Degraded => http::StatusCode::OK,
    };
    (
        status,
        [(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        )],
        Json(report),
    )
        .into_response()
}

/// Prometheus text exposition of the gateway's own counters and of the readiness report.
async fn metrics(State(shared): State<Shared>) -> String {
    use std::{fmt::Write, sync::atomic::Ordering::Relaxed};
    let stats = shared.pipeline.usage().stats();
    let mut out = format!(
        "# TYPE switchboard_usage_events_published_total counter\nswitchboard_usage_events_published_total {}\n\
         # TYPE switchboard_usage_events_dropped_total counter\nswitchboard_usage_events_dropped_total {}\n\
         # TYPE switchboard_usage_events_retried_total counter\nswitchboard_usage_events_retried_total {}\n\
         # TYPE switchboard_usage_outbox_full_total counter\nswitchboard_usage_outbox_full_total {}\n\
         # TYPE switchboard_usage_outbox_bytes gauge\nswitchboard_usage_outbox_bytes {}\n\
         # TYPE switchboard_guard_fail_open_total counter\nswitchboard_guard_fail_open_total {}\n\
         # TYPE switchboard_guard_overlapped_total counter\nswitchboard_guard_overlapped_total {}\n",
        stats.published.load(Relaxed),
        stats.dropped.load(Relaxed),
        stats.retries.load(Relaxed),
        stats.outbox_full.load(Relaxed),
        stats.outbox_bytes.load(Relaxed),
        shared.pipeline.guard_fail_open_total(),
        shared.pipeline.guard_overlapped_total(),
    );
    // The readiness report's view (one probe round per second at most, `ready.rs`): each
    // dependency up (1) or not, and the gateway ready or degraded (1) or unavailable (0).
    let report = shared.readiness.report().await;
    out.push_str("# TYPE switchboard_dependency_up gauge\n");
    for dependency in &report.dependencies {
        let _ = writeln!(
            out,
            "switchboard_dependency_up{{dependency=\"{}\",required=\"{}\"}} {}",
            dependency.name,
            dependency.required,
            u8::from(dependency.state == crate::ready::State::Up)
        );
    }
    let _ = writeln!(
        out,
        "# TYPE switchboard_ready gauge\nswitchboard_ready {}",
        u8::from(report.status != crate::ready::Status::Unavailable)
    );
    let _ = writeln!(
        out,
        "# HELP switchboard_gateway_in_flight Requests being served (admitted under gateway.max_in_flight).\n\
         # TYPE switchboard_gateway_in_flight gauge\nswitchboard_gateway_in_flight {}\n\
         # HELP switchboard_gateway_max_in_flight gateway.max_in_flight: beyond it a request is refused (overloaded).\n\
         # TYPE switchboard_gateway_max_in_flight gauge\nswitchboard_gateway_max_in_flight {}",
        shared.pipeline.in_flight(),
        shared.pipeline.max_in_flight(),
    );
    // Served requests, latency, time to first token, cache outcomes and refusals (`metrics.rs`).
    crate::metrics::render(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(pairs: &[(&'static str, &'static str)]) -> CacheControl {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        cache_control(&headers)
    }

    #[test]
    fn a_rate_limit_refusal_carries_retry_after_and_the_request_id() {
        let limited = || GatewayError::RateLimited {
            scope: "key:k".into(),
            limit: "requests_per_minute",
            limit_value: 40,
            retry_after_secs: 7,
        };
        let response = error_with_id(limited(), "req-1");
        assert_eq!(response.status(), http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[http::header::RETRY_AFTER], "7");
        assert_eq!(response.headers()["x-switchboard-request-id"], "req-1");
        let response = limited().into_response();
        assert_eq!(response.headers()[http::header::RETRY_AFTER], "7");
        // A rate limit is worth retrying after its Retry-After: the SDKs may.
        assert!(response.headers().get("x-should-retry").is_none());
    }

    #[test]
    fn a_choice_that_never_said_how_it_finished_is_finished_at_the_end() {
        use switchboard_proto::chat::v1::{ChatChunk, ChoiceDelta, FinishReason, ToolCallDelta};
        let chunk = |choices: Vec<ChoiceDelta>| ChatChunk {
            choices,
            ..Default::default()
        };
        let mut finishes = Finishes::default();
        finishes.see(&chunk(vec![
            ChoiceDelta {
                index: 0,
                content: "hi".into(),
                ..Default::default()
            },
            ChoiceDelta {
                index: 1,
                tool_calls: vec![ToolCallDelta {
                    id: "c".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            ChoiceDelta {
                index: 2,
                content: "done".into(),
                finish_reason: FinishReason::Length as i32,
                ..Default::default()
            },
        ]));
        let last = finishes.missing().unwrap();
        let reasons: Vec<(u32, i32)> = last
            .choices
            .iter()
            .map(|c| (c.index, c.finish_reason))
            .collect();
        assert_eq!(
            reasons,
            [
                (0, FinishReason::Stop as i32),
                (1, FinishReason::ToolCalls as i32)
            ]
        );
        // Once every choice said it, nothing is added.
        finishes.see(&last);
        assert!(finishes.missing().is_none());
    }

    #[test]
    fn refusals_a_retry_cannot_cure_tell_the_sdks_not_to_retry() {
        let budget = GatewayError::BudgetExceeded {
            budget_id: "b".into(),
            scope: "team:t".into(),
            limit_usd_nanos: 1,
            resets_at: String::new(),
        };
        for (error, status) in [
            (budget, http::StatusCode::TOO_MANY_REQUESTS),
            (GatewayError::NotCached, http::StatusCode::GATEWAY_TIMEOUT),
        ] {
            let response = error_with_id(error, "req-2");
            assert_eq!(response.status(), status);
            assert_eq!(response.headers()["x-should-retry"], "false");
        }
        let overloaded = error_with_id(GatewayError::Overloaded { limit: 1 }, "req-3");
        assert!(overloaded.headers().get("x-should-retry").is_none());
    }

    #[test]
    fn the_request_id_is_where_each_sdk_reads_it() {
        let response = error_with_id(GatewayError::NotCached, "req-4");
        let mut answered = HeaderMap::new();
        set_headers(&mut answered, "req-5", "miss", None);
        for (headers, id) in [(response.headers(), "req-4"), (&answered, "req-5")] {
            // Ours, OpenAI's (the SDK's `_request_id`) and Anthropic's (`_request_id` too).
            for name in ["x-switchboard-request-id", "x-request-id", "request-id"] {
                assert_eq!(headers[name], id, "{name}");
            }
        }
    }

    #[test]
    fn a_streams_usage_chunk_says_who_served_after_how_many_attempts() {
        let route = switchboard_proto::chat::v1::RouteInfo {
            provider: "openai".into(),
            model: "gpt-4o-mini-2024-07-18".into(),
            target: "openai/gpt-4o-mini".into(),
            attempt_count: 2,
            ..Default::default()
        };
        let usage = switchboard_proto::chat::v1::Usage {
            prompt_tokens: 3,
            completion_tokens: 5,
            total_tokens: 8,
            ..Default::default()
        };
        let switchboard = openai::switchboard_info("req-1", "miss", Some(&route));
        let chunk = serde_json::to_value(usage_chunk(
            "chatcmpl-1",
            "gpt-4o-mini",
            7,
            &usage,
            switchboard,
        ))
        .unwrap();
        // OpenAI's usage chunk, unchanged...
        assert_eq!(chunk["id"], "chatcmpl-1");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-4o-mini");
        assert_eq!(chunk["choices"], serde_json::json!([]));
        assert_eq!(chunk["usage"]["total_tokens"], 8);
        // ...with the unary answer's `switchboard` object.
        let unary =
            serde_json::to_value(openai::switchboard_info("req-1", "miss", Some(&route))).unwrap();
        assert_eq!(chunk["switchboard"], unary);
        assert_eq!(chunk["switchboard"]["provider"], "openai");
        assert_eq!(
            chunk["switchboard"]["served_model"],
            "gpt-4o-mini-2024-07-18"
        );
        assert_eq!(chunk["switchboard"]["attempts"], 2);
    }

    #[test]
    fn cache_directives_are_read_from_both_headers_case_insensitively() {
        let c = control(&[]);
        assert!(!c.no_cache && !c.no_store && !c.refresh && !c.only_if_cached);
        assert_eq!(c.ttl_seconds, 0);
        let c = control(&[("cache-control", "No-Cache, no-store")]);
        assert!(c.no_cache && c.no_store && !c.refresh);
        let c = control(&[("x-switchboard-cache", "refresh")]);
        assert!(c.refresh && !c.no_cache);
        let c = control(&[("cache-control", "only-if-cached")]);
        assert!(c.only_if_cached);
        let c = control(&[("x-switchboard-cache", "only-if-cached, no-store")]);
        assert!(c.only_if_cached && c.no_store);
    }

    #[test]
    fn ttl_comes_from_the_explicit_header_then_s_maxage_then_max_age() {
        assert_eq!(control(&[("cache-control", "max-age=60")]).ttl_seconds, 60);
        assert_eq!(
            control(&[("cache-control", "max-age=60, s-maxage=30")]).ttl_seconds,
            30
        );
        assert_eq!(
            control(&[
                ("cache-control", "s-maxage=30"),
                ("x-switchboard-cache-ttl", "7")
            ])
            .ttl_seconds,
            7
        );
        assert_eq!(
            control(&[("cache-control", "max-age=\"90\"")]).ttl_seconds,
            90
        );
        assert_eq!(
            control(&[("cache-control", "max-age=99999999999")]).ttl_seconds,
            u32::MAX
        );
        // max-age=0: no cached answer is acceptable, so a fresh one is fetched and stored.
        let c = control(&[("cache-control", "max-age=0")]);
        assert!(c.refresh && c.ttl_seconds == 0);
        // Malformed values are ignored.
        for bad in ["max-age=-1", "max-age=1.5", "max-age=", "max-age"] {
            let c = control(&[("cache-control", bad)]);
            assert_eq!(c.ttl_seconds, 0, "{bad}");
            assert!(!c.refresh, "{bad}");
        }
        assert_eq!(
            control(&[("x-switchboard-cache-ttl", "soon")]).ttl_seconds,
            0
        );
    }
}
