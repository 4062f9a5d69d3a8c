//! `switchboard.gateway.v1.GatewayService`: converts protobuf ↔ pipeline and errors ↔ statuses.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use futures::Stream;
use switchboard_proto::gateway::v1::{
    self as pb, gateway_service_server::GatewayService, stream_chat_completion_response::Event,
};
use tonic::{Request, Response, Status};

use crate::{
    app::Shared,
    error::GatewayError,
    pipeline::{CacheControl, RequestContext, StreamEvent},
};

/// The gRPC service.
#[derive(Clone)]
pub struct GatewayGrpc {
    shared: Shared,
}

impl GatewayGrpc {
    /// Wraps the shared state.
    pub fn new(shared: Shared) -> Self {
        GatewayGrpc { shared }
    }

    fn authenticate<T>(
        &self,
        request: &Request<T>,
    ) -> Result<crate::auth::Principal, GatewayError> {
        let value = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.shared.keys.authenticate(value)
    }
}

fn control(cache: Option<pb::CacheControl>) -> CacheControl {
    let cache = cache.unwrap_or_default();
    CacheControl {
        no_cache: cache.no_cache,
        no_store: cache.no_store,
        refresh: cache.refresh,
        only_if_cached: cache.only_if_cached,
        ttl_seconds: cache.ttl_seconds,
    }
}

/// Metadata that names the request (its usage row, logs and trace) on every answer and every
/// error after authentication, as the HTTP API's header of the same name does.
const REQUEST_ID: &str = "x-switchboard-request-id";

/// Metadata with the cache's part in a streamed answer (`hit`, `miss`, `bypass`), as over HTTP.
const CACHE: &str = "x-switchboard-cache";

/// Of a caller's deadline, what the gateway keeps for itself (its answer after the router's):
/// a twentieth, at most this.
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(25);

/// When the caller of `request` stops waiting (its `grpc-timeout`, less the gateway's margin);
/// `None` without one. One header lookup when there is none.
fn deadline_of<T>(request: &Request<T>) -> Option<std::time::Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let timeout = switchboard_grpc::parse_grpc_timeout(value)?;
    std::time::Instant::now().checked_add(timeout - (timeout / 20).min(DEADLINE_MARGIN))
}

/// A new request context for an authenticated caller (bounded by its deadline), with its ids
/// recorded on the current span.
fn begin(
    principal: crate::auth::Principal,
    deadline: Option<std::time::Instant>,
) -> RequestContext {
    let ctx = RequestContext::new(principal).with_deadline(deadline);
    tracing::Span::current()
        .record("request.id", ctx.request_id.as_str())
        .record("app.id", ctx.principal.app.as_str());
    ctx
}

/// The chat request of a call (required).
fn chat_of(
    chat: Option<switchboard_proto::chat::v1::ChatRequest>,
) -> Result<switchboard_proto::chat::v1::ChatRequest, GatewayError> {
    chat.ok_or_else(|| GatewayError::InvalidRequest {
        field: "request".to_owned(),
        message: "must be set".to_owned(),
    })
}

fn put(metadata: &mut tonic::metadata::MetadataMap, name: &'static str, value: &str) {
    if let Ok(value) = tonic::metadata::MetadataValue::try_from(value) {
        metadata.insert(name, value);
    }
}

/// The status of `error`, naming request `request_id`.
fn failed(error: GatewayError, request_id: &str) -> Status {
    let mut status = Status::from(error);
    put(status.metadata_mut(), REQUEST_ID, request_id);
    status
}

/// `message` as the answer of request `request_id`.
fn answer<T>(message: T, request_id: &str) -> Response<T> {
    let mut response = Response::new(message);
    put(response.metadata_mut(), REQUEST_ID, request_id);
    response
}

/// The gateway's gRPC service, its over-size requests refused as HTTP's are (413 there):
/// `INVALID_ARGUMENT` with `ErrorInfo` `PAYLOAD_TOO_LARGE`, `metadata.limit` and a request id.
///
/// tonic's codec refuses a message larger than `max_decoding_message_size` (`max_body_bytes`)
/// before the handler runs, with a bare status (no details, no request id): `OUT_OF_RANGE` from
/// the length prefix of a plain message, before anything is buffered, and `RESOURCE_EXHAUSTED`
/// ("size limit … exceeded while decompressing") for a gzip-compressed one whose decompressed
/// size passes the limit (it stops decompressing there). Every [`GatewayError`] carries
/// `ErrorInfo`, and none maps to `OUT_OF_RANGE`, so these refusals are recognised on the response
/// head and replaced. Other calls pay one header lookup; nothing is allocated.
#[derive(Clone)]
pub struct SizeLimited<S> {
    inner: S,
    limit: usize,
}

impl<S> SizeLimited<S> {
    /// Wraps `inner`, whose decoding limit is `limit` bytes.
    pub fn new(inner: S, limit: usize) -> Self {
        SizeLimited { inner, limit }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for SizeLimited<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for SizeLimited<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    S::Future: Unpin,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Refused<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Refused {
            inner: self.inner.call(request),
            limit: self.limit,
        }
    }
}

/// The future of a [`SizeLimited`] call.
pub struct Refused<F> {
    inner: F,
    limit: usize,
}

impl<F> Future for Refused<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let limit = self.limit;
        Pin::new(&mut self.inner)
            .poll(cx)
            .map(|answered| answered.map(|response| typed_refusal(response, limit)))
    }
}

/// `response`, or the typed refusal when it is the codec's refusal of an over-size message.
fn typed_refusal(
    response: http::Response<tonic::body::Body>,
    limit: usize,
) -> http::Response<tonic::body::Body> {
    // Only an answer with a status and no details can be the codec's (one header lookup for
    // every other answer); tonic decodes its `grpc-message`.
    let headers = response.headers();
    if !headers.contains_key("grpc-status") || headers.contains_key("grpc-status-details-bin") {
        return response;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return response;
    };
    let size = match status.code() {
        // The length prefix named the size.
        tonic::Code::OutOfRange => found_bytes(status.message()),
        // Decompression stopped at the limit: the size is not known.
        tonic::Code::ResourceExhausted if is_decompression_refusal(status.message()) => None,
        _ => return response,
    };
    // No request context exists yet (the message was refused before the handler), but the answer
    // names the refusal as every other error does, and the log line carries the same id.
    let request_id = uuid::Uuid::now_v7().to_string();
    tracing::Span::current().record("request.id", request_id.as_str());
    tracing::info!(request.id = %request_id, size, limit, "gRPC request over max_body_bytes refused");
    failed(GatewayError::PayloadTooLarge { size, limit }, &request_id).into_http()
}

/// Whether tonic's message is its refusal of a compressed message that decompresses past the
/// limit ("Error decompressing: size limit, of N bytes, exceeded while decompressing message").
fn is_decompression_refusal(message: &str) -> bool {
    message.contains("size limit") && message.contains("decompressing")
}

/// The size tonic's refusal names ("…: found N bytes, …").
fn found_bytes(message: &str) -> Option<usize> {
    let (_, rest) = message.split_once("found")?;
    let digits = rest
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?;
    digits.parse().ok()
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<pb::StreamChatCompletionResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl GatewayService for GatewayGrpc {
    async fn create_chat_completion(
        &self,
        request: Request<pb::CreateChatCompletionRequest>,
    ) -> Result<Response<pb::CreateChatCompletionResponse>, Status> {
        let principal = self.authenticate(&request)?;
        let deadline = deadline_of(&request);
        let inner = request.into_inner();
        let ctx = begin(principal, deadline);
        let id = ctx.request_id.as_str();
        let chat = chat_of(inner.request).map_err(|e| failed(e, id))?;
        let done = self
            .shared
            .pipeline
            .complete(&ctx, chat, control(inner.cache))
            .await
            .map_err(|e| failed(e, id))?;
        Ok(answer(
            pb::CreateChatCompletionResponse {
                response: Some(done.response),
                route: Some(done.route),
                request_id: ctx.request_id.clone(),
                cache: done.cache.proto() as i32,
            },
            id,
        ))
    }

    type StreamChatCompletionStream = EventStream;

    async fn stream_chat_completion(
        &self,
        request: Request<pb::StreamChatCompletionRequest>,
    ) -> Result<Response<Self::StreamChatCompletionStream>, Status> {
        let principal = self.authenticate(&request)?;
        let deadline = deadline_of(&request);
        let inner = request.into_inner();
        let ctx = begin(principal, deadline);
        let id = ctx.request_id.as_str();
        let chat = chat_of(inner.request).map_err(|e| failed(e, id))?;
        let handle = self
            .shared
            .pipeline
            .stream(&ctx, chat, control(inner.cache))
            .await
            .map_err(|e| failed(e, id))?;
        let cache = handle.cache.proto() as i32;
        let cache_label = handle.cache.as_str();
        let served_by = handle.served_by;
        let request_id = ctx.request_id.clone();
        let mut events = handle.events;
        let stream = async_stream::stream! {
            while let Some(event) = events.recv().await {
                match event {
                    // A chunk without choices only carried the provider's usage, which the summary
                    // has: live and replayed streams have the same shape.
                    StreamEvent::Chunk(chunk) if chunk.choices.is_empty() => {}
                    StreamEvent::Chunk(chunk) => yield Ok(pb::StreamChatCompletionResponse { event: Some(Event::Chunk(chunk)) }),
                    StreamEvent::Done { usage, route } => {
                        yield Ok(pb::StreamChatCompletionResponse {
                            event: Some(Event::Summary(pb::StreamSummary {
                                usage: Some(usage),
                                route: Some(route),
                                request_id: request_id.clone(),
                                cache,
                            })),
                        });
                        return;
                    }
                    StreamEvent::Failed(error) => {
                        yield Err(failed(error, &request_id));
                        return;
                    }
                }
            }
        };
        let mut response = answer(Box::pin(stream) as EventStream, id);
        let metadata = response.metadata_mut();
        put(metadata, CACHE, cache_label);
        // Who serves, before the first chunk (as over HTTP); the summary repeats it with the
        // attempts' details.
        for (name, value) in served_by.iter().flat_map(crate::http::served_by) {
            put(metadata, name, &value);
        }
        Ok(response)
    }

    async fn create_embeddings(
        &self,
        request: Request<pb::CreateEmbeddingsRequest>,
    ) -> Result<Response<pb::CreateEmbeddingsResponse>, Status> {
        let principal = self.authenticate(&request)?;
        let deadline = deadline_of(&request);
        let inner = request.into_inner();
        let ctx = begin(principal, deadline);
        let id = ctx.request_id.as_str();
        let input = crate::embeddings::EmbedInput {
            model: inner.model,
            inputs: inner.inputs,
            dimensions: inner.dimensions,
            user: inner.user,
            tags: inner.tags,
        };
        let response = self
            .shared
            .pipeline
            .embed(&ctx, input)
            .await
            .map_err(|e| failed(e, id))?;
        Ok(answer(
            pb::CreateEmbeddingsResponse {
                embeddings: response
                    .embeddings
                    .into_iter()
                    .map(|e| pb::Embedding {
                        index: e.index,
                        values: e.values,
                    })
                    .collect(),
                model: response.model,
                usage: response.usage,
                route: response.route,
                request_id: ctx.request_id.clone(),
            },
            id,
        ))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let principal = self.authenticate(&request)?;
        // Named like every other answer after authentication (no usage row: nothing is routed).
        let ctx = begin(principal, None);
        let id = ctx.request_id.as_str();
        let models = self
            .shared
            .pipeline
            .list_models(&ctx.principal)
            .await
            .map_err(|e| failed(e, id))?;
        Ok(answer(pb::ListModelsResponse { models }, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    #[test]
    fn the_codecs_size_refusal_becomes_the_typed_payload_too_large() {
        let refusal = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 9437219 bytes, the limit is: 8388608 bytes",
        )
        .into_http::<tonic::body::Body>();
        let typed = typed_refusal(refusal, 8_388_608);
        let status = tonic::Status::from_header_map(typed.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "PAYLOAD_TOO_LARGE");
        assert_eq!(info.metadata["limit"], "8388608");
        assert!(status.message().contains("9437219 bytes"), "{status:?}");
        assert!(typed.headers().contains_key(REQUEST_ID));

        // A gzip-compressed message stopped while decompressing: typed, its size unknown.
        let refusal = tonic::Status::resource_exhausted(
            "Error decompressing: size limit, of 8388608 bytes, exceeded while decompressing message",
        )
        .into_http::<tonic::body::Body>();
        let status =
            tonic::Status::from_header_map(typed_refusal(refusal, 8_388_608).headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            "PAYLOAD_TOO_LARGE"
        );
        assert_eq!(
            status.message(),
            "request body exceeds the limit of 8388608 bytes"
        );
        // Other RESOURCE_EXHAUSTED answers without details pass untouched.
        let other = tonic::Status::resource_exhausted("too many streams").into_http();
        assert_eq!(typed_refusal(other, 1).headers()["grpc-status"], "8");

        // Any other answer passes untouched, typed errors included.
        let typed_error = Status::from(GatewayError::InvalidKey).into_http::<tonic::body::Body>();
        let passed = typed_refusal(typed_error, 1);
        assert_eq!(passed.headers()["grpc-status"], "16");
        let ok = http::Response::new(tonic::body::Body::empty());
        assert!(!typed_refusal(ok, 1).headers().contains_key("grpc-status"));
    }

    #[test]
    fn a_callers_deadline_is_read_from_grpc_timeout() {
        let now = std::time::Instant::now();
        assert_eq!(deadline_of(&Request::new(())), None);
        let mut request = Request::new(());
        request.set_timeout(std::time::Duration::from_secs(2));
        let deadline = deadline_of(&request).unwrap();
        // Less the gateway's margin (25 ms of 2 s).
        assert!(deadline > now + std::time::Duration::from_millis(1_900));
        assert!(deadline < std::time::Instant::now() + std::time::Duration::from_millis(1_976));
        // The largest value the header can hold is no deadline to speak of, not a panic.
        let mut far = Request::new(());
        far.metadata_mut()
            .insert("grpc-timeout", "99999999H".parse().unwrap());
        let _ = deadline_of(&far);
    }

    #[test]
    fn the_refused_size_is_read_from_the_encoded_message() {
        let mut refusal = http::Response::new(tonic::body::Body::empty());
        refusal
            .headers_mut()
            .insert("grpc-status", "11".parse().unwrap());
        refusal.headers_mut().insert(
            "grpc-message",
            "Error,%20decoded%20message%20length%20too%20large:%20found%209437219%20bytes,%20the%20limit%20is:%208388608%20bytes"
                .parse()
                .unwrap(),
        );
        let typed = typed_refusal(refusal, 8_388_608);
        let status = tonic::Status::from_header_map(typed.headers()).unwrap();
        assert!(status.message().contains("9437219 bytes"), "{status:?}");
        assert_eq!(found_bytes("found 12 bytes"), Some(12));
        assert_eq!(found_bytes("too large"), None);
    }
}
