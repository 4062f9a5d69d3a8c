//! The OpenAI-compatible HTTP front end: `POST /v1/chat/completions` (JSON and SSE), `GET /v1/models`,
//! `GET /healthz`. Errors are OpenAI-shaped JSON bodies with the status of their [`ErrorCode`].

use std::convert::Infallible;

use axum::{
    Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, State},
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
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::disable())
        .with_state(shared)
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.code().http_status();
        let retry_after = self.retry_after_secs();
        let mut response = (status, Json(self.body())).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        response
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

/// Cache control from `Cache-Control` / `x-switchboard-cache` / `x-switchboard-cache-ttl` headers.
pub(crate) fn cache_control(headers: &HeaderMap) -> CacheControl {
    let mut control = CacheControl::default();
    for name in [http::header::CACHE_CONTROL.as_str(), "x-switchboard-cache"] {
        for value in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
            for directive in value.split(',').map(str::trim) {
                match directive {
                    "no-cache" => control.no_cache = true,
                    "no-store" => control.no_store = true,
                    _ => {}
                }
            }
        }
    }
    control.ttl_seconds = headers
        .get("x-switchboard-cache-ttl")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    control
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
            size: length,
            limit,
        });
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| GatewayError::PayloadTooLarge {
            size: limit + 1,
            limit,
        })
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
                let mut response =
                    Sse::new(sse_events(handle.events, ctx.response_id(), include_usage))
                        .keep_alive(KeepAlive::default())
                        .into_response();
                set_headers(
                    response.headers_mut(),
                    &ctx.request_id,
                    handle.cache.as_str(),
                    None,
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
    let mut response = error.into_response();
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response
            .headers_mut()
            .insert("x-switchboard-request-id", value);
    }
    response
}

pub(crate) fn set_headers(
    headers: &mut HeaderMap,
    request_id: &str,
    cache: &str,
    route: Option<&switchboard_proto::chat::v1::RouteInfo>,
) {
    let mut put = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    put("x-switchboard-request-id", request_id);
    put("x-switchboard-cache", cache);
    if let Some(route) = route {
        put("x-switchboard-provider", &route.provider);
        put("x-switchboard-model", &route.model);
        if !route.key_alias.is_empty() {
            put("x-switchboard-key-alias", &route.key_alias);
        }
        put("x-switchboard-attempts", &route.attempt_count.to_string());
    }
}

fn json_event<T: serde::Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(text) => Event::default().data(text),
        Err(_) => Event::default()
            .data("{\"error\":{\"message\":\"serialisation failed\",\"type\":\"server_error\"}}"),
    }
}

/// SSE events: OpenAI chunks, the usage chunk when asked for, `[DONE]`; or an explicit error event
/// (and no `[DONE]`) when the stream fails after it started.
fn sse_events(
    mut events: tokio::sync::mpsc::Receiver<StreamEvent>,
    response_id: String,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        let mut model = String::new();
        let mut created = 0;
        while let Some(event) = events.recv().await {
            match event {
                StreamEvent::Chunk(chunk) => {
                    if model.is_empty() {
                        model = chunk.model.clone();
                        created = chunk.created;
                    }
                    yield Ok(json_event(&ChatCompletionChunk::from_proto(&chunk, &response_id)));
                }
                StreamEvent::Done { usage, .. } => {
                    if include_usage {
                        yield Ok(json_event(&ChatCompletionChunk::usage_only(&response_id, &model, created, &usage)));
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

async fn list_models(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let span = request_span("GET /v1/models", &headers);
    async move {
        if let Err(error) = shared.keys.authenticate(authorization(&headers)) {
            return error.into_response();
        }
        match shared.pipeline.list_models().await {
            Ok(models) => Json(openai::ModelList {
                object: "list",
                data: models
                    .into_iter()
                    .map(|m| openai::ModelOut {
                        id: m.id,
                        object: "model",
                        created: m.created,
                        owned_by: m.owned_by,
                    })
                    .collect(),
            })
            .into_response(),
            Err(error) => error.into_response(),
        }
    }
    .instrument(span)
    .await
}

/// Prometheus text exposition of the gateway's own counters.
async fn metrics(State(shared): State<Shared>) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = shared.pipeline.usage().stats();
    format!(
        "# TYPE switchboard_usage_events_published_total counter\nswitchboard_usage_events_published_total {}\n\
         # TYPE switchboard_usage_events_dropped_total counter\nswitchboard_usage_events_dropped_total {}\n\
         # TYPE switchboard_usage_events_retried_total counter\nswitchboard_usage_events_retried_total {}\n\
         # TYPE switchboard_usage_outbox_full_total counter\nswitchboard_usage_outbox_full_total {}\n\
         # TYPE switchboard_usage_outbox_bytes gauge\nswitchboard_usage_outbox_bytes {}\n",
        stats.published.load(Relaxed),
        stats.dropped.load(Relaxed),
        stats.retries.load(Relaxed),
        stats.outbox_full.load(Relaxed),
        stats.outbox_bytes.load(Relaxed),
    )
}
