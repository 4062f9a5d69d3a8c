//! gRPC handlers: convert protobuf <-> domain and map errors.

use std::sync::Arc;

use switchboard_proto::cache::v1::{
    LookupRequest, LookupResponse, MatchKind, PurgeRequest, PurgeResponse, Scope, StoreRequest,
    StoreResponse, cache_service_server::CacheService,
};
use tonic::{Request, Response, Status};

use crate::{
    cache::{Answer, Cache, Stored},
    error::CacheError,
    metrics::{Lookup, Metrics},
};

/// Error domain of the cache's statuses.
pub const DOMAIN: &str = "cache";

/// The `switchboard.cache.v1.CacheService` implementation.
pub struct CacheGrpc {
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
}

impl CacheGrpc {
    /// Serves `cache`, counting every lookup, store and purge in `metrics`.
    pub fn new(cache: Arc<Cache>, metrics: Arc<Metrics>) -> Self {
        CacheGrpc { cache, metrics }
    }
}

fn app_of(scope: &Option<Scope>) -> &str {
    scope.as_ref().map(|s| s.app.as_str()).unwrap_or_default()
}

fn team_of(scope: &Option<Scope>) -> &str {
    scope.as_ref().map(|s| s.team.as_str()).unwrap_or_default()
}

fn model_of(request: &Option<switchboard_proto::chat::v1::ChatRequest>) -> &str {
    request
        .as_ref()
        .map(|r| r.model.as_str())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl CacheService for CacheGrpc {
    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        let answered = self.lookup_counted(request.into_inner()).await;
        self.metrics.lookup(match &answered {
            Ok((_, Some(MatchKind::Exact))) => Lookup::ExactHit,
            Ok((_, Some(_))) => Lookup::SemanticHit,
            Ok((_, None)) => Lookup::Miss,
            Err(_) => Lookup::Error,
        });
        answered.map(|(response, _)| Response::new(response))
    }

    async fn store(
        &self,
        request: Request<StoreRequest>,
    ) -> Result<Response<StoreResponse>, Status> {
        let request = request.into_inner();
        let to_status = |error: CacheError| switchboard_status::to_status(DOMAIN, &error);
        let failed = |error: CacheError| {
            self.metrics.store_failed(&error);
            to_status(error)
        };
        let key = Cache::key(
            app_of(&request.scope),
            team_of(&request.scope),
            request.request.as_ref(),
        )
        .map_err(failed)?;
        // The RPC's server span (`switchboard_telemetry::grpc_server_span`) takes the fields.
        let span = tracing::Span::current();
        span.record("app.id", app_of(&request.scope))
            .record("model", model_of(&request.request))
            .record("key", key.prefix());
        let outcome = self
            .cache
            .store(
                app_of(&request.scope),
                key,
                Answer {
                    response: request.response,
                    route: request.route,
                    guard_policy: request.guard_policy,
                },
                request.ttl_seconds,
            )
            .await
            .map_err(failed)?;
        self.metrics.stored(&outcome);
        let response = match outcome {
            Stored::Yes { ttl } => {
                if let Some(chat) = request.request.as_ref() {
                    self.cache
                        .index_semantic(
                            app_of(&request.scope),
                            team_of(&request.scope),
                            chat,
                            key,
                            ttl,
                        )
                        .await;
                }
                span.record("stored", true);
                tracing::debug!(key = %key.prefix(), ttl_seconds = ttl.as_secs(), "answer stored");
                StoreResponse {
                    stored: true,
                    reason: String::new(),
                }
            }
            Stored::No(refusal) => {
                span.record("stored", false);
                tracing::debug!(key = %key.prefix(), reason = %refusal, "answer not stored");
                StoreResponse {
                    stored: false,
                    reason: refusal.to_string(),
                }
            }
        };
        Ok(Response::new(response))
    }

    async fn purge(
        &self,
        request: Request<PurgeRequest>,
    ) -> Result<Response<PurgeResponse>, Status> {
        let request = request.into_inner();
        let app = app_of(&request.scope);
        tracing::Span::current().record("app.id", app);
        let removed = self
            .cache
            .purge(app)
            .await
            .map_err(|error| switchboard_status::to_status(DOMAIN, &error))?;
        self.metrics.purge(removed);
        tracing::info!(app.id = %app, removed, "cache purged");
        Ok(Response::new(PurgeResponse { removed }))
    }
}

impl CacheGrpc {
    /// A lookup's answer and how it matched (`None`: a miss).
    async fn lookup_counted(
        &self,
        request: LookupRequest,
    ) -> Result<(LookupResponse, Option<MatchKind>), Status> {
        let to_status = |error| switchboard_status::to_status(DOMAIN, &error);
        let key = Cache::key(
            app_of(&request.scope),
            team_of(&request.scope),
            request.request.as_ref(),
        )
        .map_err(to_status)?;
        // The RPC's server span (`switchboard_telemetry::grpc_server_span`) takes the fields.
        let span = tracing::Span::current();
        span.record("app.id", app_of(&request.scope))
            .record("model", model_of(&request.request))
            .record("key", key.prefix());
        let mut hit = self
            .cache
            .lookup(key)
            .await
            .map_err(to_status)?
            .map(|hit| (hit, MatchKind::Exact, 1.0));
        if hit.is_none()
            && let Some(chat) = request.request.as_ref()
        {
            hit = self
                .cache
                .lookup_semantic(app_of(&request.scope), team_of(&request.scope), chat)
                .await
                .map_err(to_status)?
                .map(|(hit, similarity)| (hit, MatchKind::Semantic, similarity));
        }
        span.record("hit", hit.is_some());
        let matched = hit.as_ref().map(|(_, kind, _)| *kind);
        let response = match hit {
            Some((hit, kind, similarity)) => {
                tracing::debug!(
                    key = %key.prefix(),
                    age_seconds = hit.age.as_secs(),
                    r#match = kind.as_str_name(),
                    similarity,
                    "cache hit"
                );
                LookupResponse {
                    hit: true,
                    response: Some(hit.response),
                    route: hit.route,
                    key: key.hex(),
                    age_seconds: hit.age.as_secs(),
                    r#match: kind as i32,
                    similarity,
                    guard_policy: hit.guard_policy,
                }
            }
            None => {
                tracing::debug!(key = %key.prefix(), "cache miss");
                LookupResponse {
                    hit: false,
                    key: key.hex(),
                    ..Default::default()
                }
            }
        };
        Ok((response, matched))
    }
}
