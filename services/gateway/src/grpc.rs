//! `switchboard.gateway.v1.GatewayService`: converts protobuf ↔ pipeline and errors ↔ statuses.

use std::pin::Pin;

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

/// A new request context for an authenticated caller, with its ids recorded on the current span.
fn begin(principal: crate::auth::Principal) -> RequestContext {
    let ctx = RequestContext::new(principal);
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

type EventStream =
    Pin<Box<dyn Stream<Item = Result<pb::StreamChatCompletionResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl GatewayService for GatewayGrpc {
    async fn create_chat_completion(
        &self,
        request: Request<pb::CreateChatCompletionRequest>,
    ) -> Result<Response<pb::CreateChatCompletionResponse>, Status> {
        let principal = self.authenticate(&request)?;
        let inner = request.into_inner();
        let ctx = begin(principal);
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
        let inner = request.into_inner();
        let ctx = begin(principal);
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
        let inner = request.into_inner();
        let ctx = begin(principal);
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
        let models = self.shared.pipeline.list_models(&principal).await?;
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
