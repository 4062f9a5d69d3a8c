//! gRPC handlers: convert protobuf <-> domain and map errors.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use switchboard_grpc::parse_grpc_timeout;
use switchboard_proto::chat::v1::RouteInfo;
use switchboard_proto::router::v1::{
    EmbedRequest, EmbedResponse, ListModelsRequest, ListModelsResponse, RouteRequest,
    RouteResponse, RouteStreamRequest, RouteStreamResponse, route_stream_response::Event,
    router_service_server::RouterService,
};
use switchboard_status::to_status;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span};

use crate::{
    error::{RouterError, StreamSource, Unserved},
    reload::Live,
    routing::StreamEvent,
};

const DOMAIN: &str = "router";

/// The RouterService implementation.
#[derive(Clone)]
pub struct RouterGrpc {
    /// The live routing table: each call loads it once and keeps that `Arc` to its end.
    routes: Arc<Live>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl RouterGrpc {
    pub(crate) fn new(routes: Arc<Live>, tracker: TaskTracker, cancel: CancellationToken) -> Self {
        RouterGrpc {
            routes,
            tracker,
            cancel,
        }
    }
}

/// The caller's timeout from the `grpc-timeout` header.
fn caller_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value)
}

fn record_request(model: &str, request_id: &str) {
    let span = Span::current();
    span.record("route", model);
    span.record("request.id", request_id);
}

fn status(error: &RouterError) -> Status {
    to_status(DOMAIN, error)
}

/// The status of a request no attempt served, with what its attempts consumed when a provider
/// reported usage (`switchboard_status::serving::CONSUMED`, as in a stream's response head).
fn unserved(unserved: &Unserved) -> Status {
    let mut status = status(&unserved.error);
    if let Some(consumed) = &unserved.consumed {
        insert_consumed(status.metadata_mut(), consumed);
    }
    status
}

/// `consumed`, the attempts' account, as `switchboard_status::serving::CONSUMED`.
fn insert_consumed(metadata: &mut tonic::metadata::MetadataMap, consumed: &RouteInfo) {
    let encoded = prost::Message::encode_to_vec(consumed);
    metadata.insert_bin(
        switchboard_status::serving::CONSUMED,
        tonic::metadata::MetadataValue::from_bytes(&encoded),
    );
}

type EventStream = Pin<Box<dyn Stream<Item = Result<RouteStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RouterService for RouterGrpc {
    async fn route(
        &self,
        request: Request<RouteRequest>,
    ) -> Result<Response<RouteResponse>, Status> {
        let routes = self.routes.load();
        let deadline = routes.deadline(caller_timeout(&request));
        let RouteRequest {
            request,
            caller,
            allowance,
        } = request.into_inner();
        let request = request.ok_or_else(|| {
            status(&RouterError::InvalidArgument {
                field: "request".to_owned(),
                message: "is required".to_owned(),
            })
        })?;
        let caller = caller.unwrap_or_default();
        record_request(&request.model, &caller.request_id);
        let (mut response, route) = routes
            .route(&request, &caller, allowance.as_ref(), deadline)
            .await
            .map_err(|e| unserved(&e))?;
        if !caller.request_id.is_empty() {
            response.id = caller.request_id;
        }
        Ok(Response::new(RouteResponse {
            response: Some(response),
            route: Some(route),
        }))
    }

    type RouteStreamStream = EventStream;

    async fn route_stream(
        &self,
        request: Request<RouteStreamRequest>,
    ) -> Result<Response<Self::RouteStreamStream>, Status> {
        let routes = self.routes.load();
        let deadline = routes.deadline(caller_timeout(&request));
        let RouteStreamRequest {
            request,
            caller,
            allowance,
        } = request.into_inner();
        let request = request.ok_or_else(|| {
            status(&RouterError::InvalidArgument {
                field: "request".to_owned(),
                message: "is required".to_owned(),
            })
        })?;
        let caller = caller.unwrap_or_default();
        let request_id = caller.request_id.clone();
        record_request(&request.model, &request_id);
        let (tx, mut rx) = mpsc::channel::<StreamEvent>(16);
        let cancel = self.cancel.child_token();
        self.tracker.spawn(
            async move {
                routes
                    .route_stream(request, caller, allowance, deadline, tx, cancel)
                    .await
            }
            .instrument(Span::current()),
        );
        // The response head waits for the first event (the first chunk, or the failure that ended
        // every attempt): head and first chunk then leave in one write, and a stream that never
        // started is answered with its status alone.
        // The head also says which deployment the stream committed to (sent just before the
        // first chunk), so a stream cut short later is still recorded against its provider.
        let mut first = rx.recv().await;
        let mut serving = None;
        if let Some(StreamEvent::Serving { source, consumed }) = first {
            serving = Some((source, consumed));
            first = rx.recv().await;
        }
        if let Some(StreamEvent::Failed(error)) = &first {
            return Err(unserved(error));
        }
        let events = futures::stream::iter(first)
            .chain(ReceiverStream::new(rx))
            .filter_map(move |event| {
                std::future::ready(match event {
                    StreamEvent::Chunk(mut chunk) => {
                        if !request_id.is_empty() {
                            chunk.id.clone_from(&request_id);
                        }
                        Some(Ok(RouteStreamResponse {
                            event: Some(Event::Chunk(chunk)),
                        }))
                    }
                    StreamEvent::Done(info) => Some(Ok(RouteStreamResponse {
                        event: Some(Event::Route(info)),
                    })),
                    StreamEvent::Interrupted(info) => Some(Ok(RouteStreamResponse {
                        event: Some(Event::Interrupted(info)),
                    })),
                    StreamEvent::Failed(error) => Some(Err(unserved(&error))),
                    // Sent once, before the first chunk (taken above).
                    StreamEvent::Serving { .. } => None,
                })
            });
        let mut response = Response::new(Box::pin(events) as Self::RouteStreamStream);
        if let Some((source, consumed)) = serving {
            serving_metadata(response.metadata_mut(), &source, consumed.as_ref());
        }
        Ok(response)
    }

    async fn embed(
        &self,
        request: Request<EmbedRequest>,
    ) -> Result<Response<EmbedResponse>, Status> {
        let routes = self.routes.load();
        let deadline = routes.deadline(caller_timeout(&request));
        let request = request.into_inner();
        let request_id = request
            .caller
            .as_ref()
            .map(|c| c.request_id.as_str())
            .unwrap_or_default();
        record_request(&request.model, request_id);
        let response = crate::provider::embeddings::embed(&routes, &request, deadline)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(response))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(ListModelsResponse {
            models: self.routes.load().models(),
            routes: self.routes.load().route_targets(),
        }))
    }
}

/// The committed deployment in the response head (`switchboard_status::serving`); a value that
/// cannot be a header (not visible ASCII) is left out.
fn serving_metadata(
    metadata: &mut tonic::metadata::MetadataMap,
    source: &StreamSource,
    consumed: Option<&RouteInfo>,
) {
    use switchboard_status::serving;
    if let Some(consumed) = consumed {
        insert_consumed(metadata, consumed);
    }
    let attempts = source.attempts.to_string();
    for (name, value) in [
        (serving::PROVIDER, source.provider.as_str()),
        (serving::MODEL, source.model.as_str()),
        (serving::TARGET, source.target.as_str()),
        (serving::KEY_ALIAS, source.key_alias.as_str()),
        (serving::ATTEMPTS, attempts.as_str()),
    ] {
        if value.is_empty() {
            continue;
        }
        if let Ok(value) = tonic::metadata::MetadataValue::try_from(value) {
            metadata.insert(name, value);
        }
    }
}
