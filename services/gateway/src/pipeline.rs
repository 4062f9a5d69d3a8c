//! The request path: guard → cache → router, then cache store and one usage event.
//! HTTP and gRPC front ends both call [`Pipeline`]; they only translate formats and errors.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Instant, SystemTime},
};

use switchboard_bus::UsageEvent;
use switchboard_grpc::TracedChannel;
use switchboard_proto::{
    cache::v1::{LookupRequest, Scope, StoreRequest, cache_service_client::CacheServiceClient},
    chat::v1::{
        ChatChunk, ChatRequest, ChatResponse, Choice, ChoiceDelta, FinishReason, Message, Role,
        RouteInfo, ThinkingBlock, ThinkingDelta, ToolCallDelta, Usage,
    },
    guard::v1::{
        CheckAnswerRequest, CheckPromptRequest, CheckPromptResponse, Decision,
        guard_service_client::GuardServiceClient,
    },
    ledger::v1::{CacheOutcome, RequestStatus},
    router::v1::{
        Caller, RouteRequest, RouteStreamRequest, route_stream_response,
        router_service_client::RouterServiceClient,
    },
};
use switchboard_status::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::{
    answer::{GuardFailure, GuardVerdict, StreamHold, UNCHECKED_TAG},
    auth::Principal,
    budget::{Budgets, Reservation},
    detach::{Abandoned, Detachable},
    error::{GatewayError, GuardDown},
    ratelimit::RateLimits,
    restore::Pseudonyms,
    usage::UsageSink,
};

/// Per-request cache control (HTTP `Cache-Control` / `x-switchboard-cache*` headers, gRPC
/// `CacheControl`).
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheControl {
    /// Skip the lookup (the answer is still stored unless `no_store`, as RFC 9111 `no-cache`).
    pub no_cache: bool,
    /// Skip the store.
    pub no_store: bool,
    /// Skip the lookup and store the new answer, replacing the cached one.
    pub refresh: bool,
    /// Serve only from the cache: anything but a hit is [`GatewayError::NotCached`] and nothing
    /// goes to a provider.
    pub only_if_cached: bool,
    /// TTL of a stored answer, seconds (0: the cache's default).
    pub ttl_seconds: u32,
}

/// How the cache took part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Looked up, not found.
    Miss,
    /// Served from the cache.
    Hit,
    /// Not looked up.
    Bypass,
}

impl CacheStatus {
    /// Lowercase name for headers and bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Miss => "miss",
            CacheStatus::Hit => "hit",
            CacheStatus::Bypass => "bypass",
        }
    }

    fn outcome(self) -> CacheOutcome {
        match self {
            CacheStatus::Miss => CacheOutcome::Miss,
            CacheStatus::Hit => CacheOutcome::Hit,
            CacheStatus::Bypass => CacheOutcome::Bypass,
        }
    }

    /// The protobuf enum of the gateway API.
    pub fn proto(self) -> switchboard_proto::gateway::v1::CacheStatus {
        match self {
            CacheStatus::Miss => switchboard_proto::gateway::v1::CacheStatus::Miss,
            CacheStatus::Hit => switchboard_proto::gateway::v1::CacheStatus::Hit,
            CacheStatus::Bypass => switchboard_proto::gateway::v1::CacheStatus::Bypass,
        }
    }
}

/// What the guard decided about one request, shared by the clones of its [`RequestContext`].
#[derive(Debug, Default)]
struct Checks {
    /// What the prompt check said about the rest of the request (set once, by the guard check).
    verdict: std::sync::OnceLock<GuardVerdict>,
    /// The guard policy that decided the prompt (`policy_version/detector_version`, set once, by
    /// the guard check; unset while the check is out and when the guard did not answer): a cached
    /// answer is served only when it was checked under this one, and a stored answer carries it.
    policy: std::sync::OnceLock<String>,
    /// Some of the answer went out without its CheckAnswer (the guard was unreachable, slow or
    /// overloaded and the route fails open).
    answer_unchecked: std::sync::atomic::AtomicBool,
}

/// One request's identity.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Switchboard's request id (UUIDv7).
    pub request_id: String,
    /// The caller.
    pub principal: Principal,
    started: Instant,
    time: SystemTime,
    /// What the guard decided about the request: one record shared by every clone of the
    /// context (a detached tail, a stream's opening and its pump), so a verdict set on one is
    /// seen by all.
    checks: Arc<Checks>,
    /// When the caller stops waiting (a gRPC caller's `grpc-timeout`): what is left of it bounds
    /// the router, guard and cache calls. `None`: no deadline, and no work for one.
    deadline: Option<Instant>,
}

impl RequestContext {
    /// A new request from `principal`.
    pub fn new(principal: Principal) -> Self {
        RequestContext {
            request_id: uuid::Uuid::now_v7().to_string(),
            principal,
            started: Instant::now(),
            time: SystemTime::now(),
            checks: Arc::default(),
            deadline: None,
        }
    }

    /// The request with the caller's deadline (`None`: none).
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// `message` as a downstream call, its `grpc-timeout` what is left of the caller's deadline
    /// (none without one; zero once it has passed).
    fn bounded<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(deadline) = self.deadline {
            request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        request
    }

    /// Whether the caller's deadline has passed.
    fn expired(&self) -> bool {
        self.deadline
            .is_some_and(|deadline| deadline <= Instant::now())
    }

    /// Whether a cached answer checked under `stored` (its entry's guard policy) may be served to
    /// this request: only when the guard has decided this prompt under that very policy. Before
    /// the verdict (an overlapped check still out), without one (the guard unreachable on a
    /// fail-open route), or for an entry stored without a policy, nothing matches.
    fn checked_under(&self, stored: &str) -> bool {
        self.checks
            .policy
            .get()
            .is_some_and(|current| current == stored)
    }

    /// What the guard decided about the request so far (the default before the prompt check):
    /// `unchecked` once the prompt, or any part of the answer, went through without a check.
    pub fn guard_verdict(&self) -> GuardVerdict {
        let mut verdict = self.checks.verdict.get().copied().unwrap_or_default();
        verdict.unchecked |= self
            .checks
            .answer_unchecked
            .load(std::sync::atomic::Ordering::Relaxed);
        verdict
    }

    /// Notes that (part of) the answer was delivered without its check (a fail-open route whose
    /// CheckAnswer failed): it is then neither cached nor recorded as checked.
    fn mark_answer_unchecked(&self) {
        self.checks
            .answer_unchecked
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The response id shown to callers.
    pub fn response_id(&self) -> String {
        format!("chatcmpl-{}", self.request_id.replace('-', ""))
    }
}

/// A finished unary completion.
#[derive(Debug)]
pub struct Completed {
    /// The answer (its id is the request's response id).
    pub response: ChatResponse,
    /// Which target served.
    pub route: RouteInfo,
    /// Cache outcome.
    pub cache: CacheStatus,
}

/// What a stream delivers to the front end.
#[derive(Debug)]
pub enum StreamEvent {
    /// A chunk (ids already rewritten to the request's response id).
    Chunk(ChatChunk),
    /// The end of a successful stream.
    Done {
        /// Usage of the whole stream.
        usage: Usage,
        /// Which target served.
        route: RouteInfo,
    },
    /// The stream failed after it had started; no `Done` follows.
    Failed(GatewayError),
}

/// An open stream.
pub struct StreamHandle {
    /// Cache outcome.
    pub cache: CacheStatus,
    /// Who serves it, known before its first chunk: the cached answer's route, or the deployment
    /// the router committed to (provider, model, target, key alias, attempts so far; no attempt
    /// list). `None` when the router did not say.
    pub served_by: Option<RouteInfo>,
    /// Events, in order.
    pub events: Events,
}

/// A stream's events. A live stream's handle is returned with its first event already received,
/// so that the caller's response head and first chunk leave together (one write, one wake-up of
/// the client, instead of a head alone and the chunk after it).
pub struct Events {
    first: Option<StreamEvent>,
    rx: mpsc::Receiver<StreamEvent>,
    /// Until the first event is taken: where the stream comes from and when its request arrived
    /// (the time to first token, `metrics.rs`, observed once per stream).
    first_token: Option<(crate::metrics::Source, Instant)>,
}

impl Events {
    fn new(
        first: Option<StreamEvent>,
        rx: mpsc::Receiver<StreamEvent>,
        source: crate::metrics::Source,
        started: Instant,
    ) -> Self {
        Events {
            first,
            rx,
            first_token: Some((source, started)),
        }
    }

    /// The next event; `None` once the stream is over. The front end hands a chunk to its client
    /// as soon as it has it: the first one observes the time to first token.
    pub async fn recv(&mut self) -> Option<StreamEvent> {
        let event = match self.first.take() {
            Some(event) => Some(event),
            None => self.rx.recv().await,
        };
        if let Some((source, started)) = self.first_token.take()
            && matches!(event, Some(StreamEvent::Chunk(_)))
        {
            crate::metrics::first_token(source, started.elapsed());
        }
        event
    }
}

/// The request path.
#[derive(Clone)]
pub struct Pipeline {
    guard: GuardServiceClient<TracedChannel>,
    cache: CacheServiceClient<TracedChannel>,
    router: RouterServiceClient<TracedChannel>,
    usage: UsageSink,
    cache_enabled: bool,
    tasks: TaskTracker,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    /// Budget enforcement (ADR 007); `None` when disabled.
    budgets: Option<Budgets>,
    /// Shared rate limits; `None` when none are configured.
    rate_limits: Option<RateLimits>,
    /// Fail-open routes when the guard is unreachable (default: every route fails closed).
    guard_failure: GuardFailure,
    /// Apps and routes whose prompts go to the router while the guard checks them (ADR 011).
    passthrough: Arc<crate::overlap::Passthrough>,
    /// Whether a unary request whose caller went away runs to its end (`detach.rs`) or is
    /// cancelled with it (`gateway.abandoned_requests`).
    abandoned: crate::config::AbandonedRequests,
}

/// Channels to the services the pipeline calls.
pub struct Downstream {
    /// The guard.
    pub guard: TracedChannel,
    /// The cache.
    pub cache: TracedChannel,
    /// The router.
    pub router: TracedChannel,
}

impl Pipeline {
    /// Builds the pipeline over lazily connected channels.
    pub fn new(
        Downstream {
            guard,
            cache,
            router,
        }: Downstream,
        usage: UsageSink,
        cache_enabled: bool,
        tasks: TaskTracker,
        max_message_bytes: usize,
        max_in_flight: usize,
    ) -> Self {
        // What the hops accept (their `max_message_bytes`, checked against this by `check-config`).
        let limit = switchboard_grpc::internal_message_limit(max_message_bytes);
        Pipeline {
            guard: GuardServiceClient::new(guard)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            cache: CacheServiceClient::new(cache)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            router: RouterServiceClient::new(router)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            usage,
            cache_enabled,
            tasks,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            budgets: None,
            rate_limits: None,
            guard_failure: GuardFailure::default(),
            passthrough: Arc::default(),
            abandoned: crate::config::AbandonedRequests::Finish,
        }
    }

    /// What a unary request whose caller went away does (`gateway.abandoned_requests`).
    pub fn with_abandoned(mut self, abandoned: crate::config::AbandonedRequests) -> Self {
        self.abandoned = abandoned;
        self
    }

    /// Lets prompts of pass-through guard policies go to the router while they are checked
    /// (ADR 011); without it every prompt is checked before it is routed.
    pub fn with_passthrough(mut self, passthrough: crate::overlap::Passthrough) -> Self {
        self.passthrough = Arc::new(passthrough);
        self
    }

    /// Requests whose router call started before their prompt check was in (ADR 011).
    pub fn guard_overlapped_total(&self) -> u64 {
        self.passthrough.overlapped_total()
    }

    /// Which routes fail open when the guard is unreachable (`[gateway.guard]`).
    pub fn with_guard_failure(mut self, guard_failure: GuardFailure) -> Self {
        self.guard_failure = guard_failure;
        self
    }

    /// Requests that went through unchecked because the guard was down and their route fails open.
    pub fn guard_fail_open_total(&self) -> u64 {
        self.guard_failure.fail_open_total()
    }

    /// Enforces budgets and shared rate limits (ADR 007).
    pub fn with_limits(
        mut self,
        budgets: Option<Budgets>,
        rate_limits: Option<RateLimits>,
    ) -> Self {
        self.budgets = budgets;
        self.rate_limits = rate_limits;
        self
    }

    /// Admission against the caller's shared rate limits (no code runs without limits).
    async fn check_rate(
        &self,
        ctx: &RequestContext,
        charge: impl Into<crate::ratelimit::TokenCharge>,
    ) -> Result<(), GatewayError> {
        match &self.rate_limits {
            Some(limits) => limits.check(&ctx.principal, charge).await,
            None => Ok(()),
        }
    }

    /// Reserves the request's estimate against the caller's budgets (none: `None`, no RPC).
    async fn reserve(
        &self,
        ctx: &RequestContext,
        request: &mut ChatRequest,
        chat: bool,
    ) -> Result<Option<Reservation>, GatewayError> {
        match &self.budgets {
            Some(budgets) => budgets.reserve(&ctx.principal, request, chat).await,
            None => Ok(None),
        }
    }

    /// A router refusal for the spend allowance becomes the caller's typed budget error.
    fn budget_error(&self, ctx: &RequestContext, error: GatewayError) -> GatewayError {
        match (&self.budgets, &error) {
            (Some(budgets), GatewayError::Downstream { code, metadata, .. })
                if *code == ErrorCode::RateLimited
                    && metadata.get("budget").is_some_and(|b| b == "exceeded") =>
            {
                budgets.exceeded_for(&ctx.principal).unwrap_or(error)
            }
            _ => error,
        }
    }

    /// Admits a request, or refuses it when `max_in_flight` are already being served, so that
    /// overload costs callers a fast 503 instead of costing the gateway unbounded memory.
    fn admit(&self) -> Result<OwnedSemaphorePermit, GatewayError> {
        self.in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| GatewayError::Overloaded {
                limit: self.max_in_flight,
            })
    }

    /// Requests being served now (admitted, permit not yet given back): `max_in_flight` less the
    /// admission semaphore's free permits, read at scrape time.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight
            .saturating_sub(self.in_flight.available_permits())
    }

    /// `gateway.max_in_flight`.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// The usage sink (for stats).
    pub fn usage(&self) -> &UsageSink {
        &self.usage
    }

    /// Lists the router's models that `principal` may call.
    pub async fn list_models(
        &self,
        principal: &crate::auth::Principal,
    ) -> Result<Vec<switchboard_proto::chat::v1::Model>, GatewayError> {
        let response = self
            .router
            .clone()
            .list_models(switchboard_proto::router::v1::ListModelsRequest {})
            .await
            .map_err(|status| GatewayError::from_status("router", &status))?;
        let mut models = response.into_inner().models;
        models.retain(|model| principal.models.allows(&model.id));
        Ok(models)
    }

    /// One model of the router that `principal` may call (`GET /v1/models/{model}`): a model
    /// outside the key's list is refused as on every other endpoint, an unknown one is not found.
    pub async fn get_model(
        &self,
        principal: &crate::auth::Principal,
        id: &str,
    ) -> Result<switchboard_proto::chat::v1::Model, GatewayError> {
        principal.check_model(id)?;
        self.list_models(principal)
            .await?
            .into_iter()
            .find(|model| model.id == id)
            .ok_or_else(|| GatewayError::ModelNotFound {
                model: id.to_owned(),
            })
    }

    /// Embeddings: admission, validation, the guard over the inputs (one user message each: block
    /// and redact apply as for prompts), the router's `Embed` (never cached), and one usage event
    /// (prompt tokens only). Its state lives on the heap (see [`Pipeline::complete`]).
    pub async fn embed(
        &self,
        ctx: &RequestContext,
        input: crate::embeddings::EmbedInput,
    ) -> Result<switchboard_proto::router::v1::EmbedResponse, GatewayError> {
        Box::pin(self.embedding(ctx, input)).await
    }

    async fn embedding(
        &self,
        ctx: &RequestContext,
        input: crate::embeddings::EmbedInput,
    ) -> Result<switchboard_proto::router::v1::EmbedResponse, GatewayError> {
        let permit = self.admit()?;
        input.validate()?;
        ctx.principal.check_model(&input.model)?;
        let tokens: usize = input.inputs.iter().map(String::len).sum();
        self.check_rate(ctx, tokens as u64).await?;
        let count = input.inputs.len();
        let mut request = ChatRequest {
            model: input.model,
            messages: input
                .inputs
                .into_iter()
                .map(|text| Message::text(Role::User, text))
                .collect(),
            tags: input.tags,
            ..Default::default()
        };
        ctx.principal.apply_tags(&mut request.tags);
        self.check_guard(ctx, &mut request).await?;
        if request.messages.len() != count {
            return Err(GatewayError::Internal(
                "guard changed the number of inputs".to_owned(),
            ));
        }
        let reservation = self.reserve(ctx, &mut request, false).await?;
        // Taken while the request still has its inputs (the prompt's estimate).
        let cancel = self.unanswered(ctx, &request, CacheStatus::Bypass);
        let inputs = std::mem::take(&mut request.messages)
            .iter()
            .map(Message::joined_text)
            .collect();
        let embed = switchboard_proto::router::v1::EmbedRequest {
            model: request.model.clone(),
            inputs,
            dimensions: input.dimensions,
            user: input.user,
            caller: Some(caller(ctx)),
        };
        // As a unary completion (`complete`): from here it runs to its end, so a caller that goes
        // away still leaves the row of what the provider was paid for.
        let pipeline = self.clone();
        let owned = ctx.clone();
        let tail = move |abandoned| async move {
            let embedded = pipeline
                .route_embed(&owned, &request, embed, reservation, &abandoned)
                .await;
            drop(permit);
            embedded
        };
        self.to_the_end(cancel, tail).await
    }

    /// Awaits the future `tail` makes: finished even if its caller goes away (`detach.rs`), or,
    /// with `cancel` (`abandoned_requests = "cancel"`), dropped with its caller and recorded as
    /// an estimate.
    async fn to_the_end<T, F>(
        &self,
        cancel: Option<Cancelled>,
        tail: impl FnOnce(Abandoned) -> F,
    ) -> T
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        match cancel {
            None => Detachable::new(&self.tasks, tail).await,
            Some(cancel) => cancel.run(Box::pin(tail(Abandoned::default()))).await,
        }
    }

    /// With `abandoned_requests = "cancel"`, what records a unary request dropped with its caller
    /// (the prompt's estimate); `None` when such requests run to their end.
    fn unanswered(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        cache: CacheStatus,
    ) -> Option<Cancelled> {
        (self.abandoned == crate::config::AbandonedRequests::Cancel).then(|| Cancelled {
            pipeline: self.clone(),
            ctx: ctx.clone(),
            request: request.clone(),
            cache,
            streamed: false,
        })
    }

    /// The router's part of [`Pipeline::embed`], and its row; `abandoned` tells whether its
    /// caller went away.
    async fn route_embed(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        embed: switchboard_proto::router::v1::EmbedRequest,
        reservation: Option<Reservation>,
        abandoned: &Abandoned,
    ) -> Result<switchboard_proto::router::v1::EmbedResponse, GatewayError> {
        let routed = if ctx.expired() {
            Err(deadline_passed())
        } else {
            self.router.clone().embed(ctx.bounded(embed)).await
        };
        match routed {
            Ok(response) => {
                let response = response.into_inner();
                let none = RouteInfo::default();
                let route = response.route.as_ref().unwrap_or(&none);
                let usage = response.usage.unwrap_or_default();
                if let Some(reservation) = reservation {
                    reservation.settle_usage(&route.provider, &route.model, &usage);
                }
                let mut served = RecordArgs::served(route, usage, CacheStatus::Bypass, false);
                if abandoned.is_set() {
                    tracing::info!(request.id = %ctx.request_id, "caller went away before the answer");
                    served.status = RequestStatus::Partial;
                    "CLIENT_DISCONNECTED".clone_into(&mut served.error_code);
                }
                self.record(ctx, request, served);
                Ok(response)
            }
            Err(status) => {
                let error = GatewayError::from_status("router", &status);
                let consumed = consumed_in(status.metadata());
                settle_unserved(reservation, consumed.as_ref());
                self.record_failure(ctx, request, CacheStatus::Bypass, &error, false, consumed);
                Err(error)
            }
        }
    }

    /// What both front ends do before the router: admission, validation, the guard (whose
    /// transformation replaces the messages) and the cache lookup. Also returns the guard's
    /// pseudonyms, to restore the answer with (this request only; never logged or stored).
    async fn prepare(
        &self,
        ctx: &RequestContext,
        request: &mut ChatRequest,
        control: CacheControl,
    ) -> Result<(Prepared, Pseudonyms, Option<PendingCheck>), GatewayError> {
        let permit = self.admit()?;
        validate(request)?;
        ctx.principal.check_model(&request.model)?;
        ctx.principal.apply_tags(&mut request.tags);
        if let Some(limits) = &self.rate_limits {
            self.check_rate(ctx, limits.chat_tokens(request)).await?;
        }
        // A prompt whose policy can neither block nor change it is checked while it is routed; the
        // answer waits for the check (`finish_check`).
        let pending = self
            .passthrough
            .may_overlap(&ctx.principal.app, &request.model)
            .then(|| self.start_check(ctx, request));
        let bypass = !self.cache_enabled || control.no_cache || control.refresh;
        if let Some(pending) = pending {
            if bypass && control.only_if_cached {
                return Err(GatewayError::NotCached);
            }
            if bypass {
                let prepared = Prepared::Route(permit, CacheStatus::Bypass);
                return Ok((prepared, Pseudonyms::default(), Some(pending)));
            }
            let looked_up = self.lookup(ctx, request.clone()).await;
            if !matches!(looked_up, Lookup::Hit(_)) {
                let prepared = prepared_from_lookup(ctx, permit, looked_up, control)?;
                return Ok((prepared, Pseudonyms::default(), Some(pending)));
            }
            // A hit waits for the verdict (the answer is held until the check is in), and is
            // served only if its answer was checked under the policy that decided this prompt;
            // else the request is routed, its check already done.
            self.finish_check(ctx, request, Some(pending)).await?;
            let prepared = prepared_from_lookup(ctx, permit, looked_up, control)?;
            return Ok((prepared, Pseudonyms::default(), None));
        }
        if bypass {
            let pseudonyms = match self.check_guard(ctx, request).await? {
                Guarded::Unchanged => Pseudonyms::default(),
                Guarded::Transformed(pseudonyms) => pseudonyms,
            };
            if control.only_if_cached {
                // Nothing was looked up, so nothing can be served; never a provider call.
                return Err(GatewayError::NotCached);
            }
            return Ok((
                Prepared::Route(permit, CacheStatus::Bypass),
                pseudonyms,
                None,
            ));
        }
        // The guard and the exact-cache lookup run together: when the guard lets the prompt through
        // unchanged (the common case), the lookup's key is the key of what goes to the provider, so
        // one round trip is saved. A transformed prompt is looked up again under its new text; a
        // blocked one discards the lookup. The cache only hashes what it is asked; it stores nothing
        // on a lookup, so the untransformed prompt never ends up in the cache.
        let candidate = request.clone();
        let (guarded, looked_up) =
            tokio::join!(self.check_guard(ctx, request), self.lookup(ctx, candidate));
        let (looked_up, pseudonyms) = match guarded? {
            Guarded::Unchanged => (looked_up, Pseudonyms::default()),
            Guarded::Transformed(pseudonyms) => {
                (self.lookup(ctx, request.clone()).await, pseudonyms)
            }
        };
        // Compared with the verdict's policy only now that the verdict is in.
        let prepared = prepared_from_lookup(ctx, permit, looked_up, control)?;
        Ok((prepared, pseudonyms, None))
    }

    /// A unary completion.
    ///
    /// Its state lives on the heap: a request's whole future (guard, cache, router, recording)
    /// is kilobytes, and each layer that awaits it by value (the handler, its span, axum's and
    /// tonic's boxes) would otherwise copy all of it (instruction counts, docs/BENCHMARKS.md).
    pub async fn complete(
        &self,
        ctx: &RequestContext,
        request: ChatRequest,
        control: CacheControl,
    ) -> Result<Completed, GatewayError> {
        Box::pin(self.completion(ctx, request, control)).await
    }

    async fn completion(
        &self,
        ctx: &RequestContext,
        mut request: ChatRequest,
        control: CacheControl,
    ) -> Result<Completed, GatewayError> {
        let (prepared, pseudonyms, pending) = self.prepare(ctx, &mut request, control).await?;
        let (permit, cache_status) = match prepared {
            Prepared::Hit(permit, cached) => {
                drop(permit);
                debug_assert!(pending.is_none(), "a hit is served only after its check");
                let Cached {
                    mut response,
                    route,
                    ..
                } = *cached;
                // The cache holds the placeholder version: restored with this request's mapping.
                pseudonyms.restore_response(&mut response);
                response.id = ctx.response_id();
                let usage = response.usage.unwrap_or_default();
                self.record(ctx, &request, RecordArgs::hit(&route, usage, false));
                return Ok(Completed {
                    response,
                    route,
                    cache: CacheStatus::Hit,
                });
            }
            Prepared::Route(permit, cache_status) => (permit, cache_status),
        };
        let mut routed_request = request.clone();
        let reservation = self.reserve(ctx, &mut routed_request, true).await?;
        // From here the request reaches a provider, and it runs to its end: a caller that goes
        // away (an HTTP client that disconnects, a gRPC reset) does not cancel it (`detach.rs`),
        // so the provider's answer, which is paid for whether or not anyone reads it, is recorded
        // with its real usage and the target that served, priced, and the budget settled with its
        // real cost (the call is still bounded by the caller's deadline and `request_timeout_ms`).
        // `abandoned_requests = "cancel"`: dropped with its caller, the prompt's estimate recorded.
        let cancel = self.unanswered(ctx, &request, cache_status);
        let pipeline = self.clone();
        let owned = ctx.clone();
        let tail = move |abandoned| async move {
            let unary = Unary {
                request,
                routed_request,
                control,
                cache_status,
                pseudonyms,
                pending,
                reservation,
            };
            let completed = pipeline.route_unary(&owned, unary, &abandoned).await;
            drop(permit);
            completed
        };
        self.to_the_end(cancel, tail).await
    }

    /// The part of a unary completion that reaches a provider (see [`Pipeline::complete`]);
    /// `abandoned` tells whether its caller went away.
    async fn route_unary(
        &self,
        ctx: &RequestContext,
        unary: Unary,
        abandoned: &Abandoned,
    ) -> Result<Completed, GatewayError> {
        let Unary {
            request,
            routed_request,
            control,
            cache_status,
            pseudonyms,
            pending,
            reservation,
        } = unary;
        let route = RouteRequest {
            request: Some(routed_request),
            caller: Some(caller(ctx)),
            allowance: reservation.as_ref().and_then(Reservation::allowance),
        };
        // The router gets what is left of the caller's deadline: past it, it answers TIMEOUT
        // with the attempts it made, before the caller gives up.
        let routed = if ctx.expired() {
            Err(deadline_passed())
        } else {
            self.router.clone().route(ctx.bounded(route)).await
        };
        // An overlapped check must be in before anything of the answer is used.
        if let Err(error) = self.finish_check(ctx, &request, pending).await {
            match &routed {
                Ok(response) => {
                    let response = response.get_ref();
                    let route = response.route.clone().unwrap_or_default();
                    let usage = response
                        .response
                        .as_ref()
                        .and_then(|r| r.usage)
                        .unwrap_or_default();
                    if let Some(reservation) = reservation {
                        reservation.settle_route(&route);
                    }
                    // The provider answered and was paid: the row says so, with the refusal.
                    self.record_withheld(ctx, &request, route, usage, cache_status, &error);
                }
                Err(_) => {
                    if let Some(reservation) = reservation {
                        reservation.settle(0);
                    }
                }
            }
            return Err(error);
        }
        let routed = match routed {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let error = self.budget_error(ctx, GatewayError::from_status("router", &status));
                // Failed attempts cost what their providers reported they consumed, if anything.
                let consumed = consumed_in(status.metadata());
                settle_unserved(reservation, consumed.as_ref());
                self.record_failure(ctx, &request, cache_status, &error, false, consumed);
                return Err(error);
            }
        };
        let mut response = routed.response.unwrap_or_default();
        let route = routed.route.unwrap_or_default();
        if let Some(reservation) = reservation {
            reservation.settle_route(&route);
        }
        // The answer check runs on the provider's answer (placeholders) before anything else sees
        // it; a blocked answer is a typed refusal naming entity types only.
        if let Err(error) = self.check_answer(ctx, &request, &mut response).await {
            // The provider answered and was paid: the row carries its usage with the refusal.
            let usage = response.usage.unwrap_or_default();
            self.record_withheld(ctx, &request, route, usage, cache_status, &error);
            return Err(error);
        }
        // The cache stores the checked answer (placeholders), never the restored one, and nothing
        // of a request the guard did not check.
        if self.cache_enabled && !control.no_store && !ctx.guard_verdict().unchecked {
            self.store(ctx, &request, &response, &route, control.ttl_seconds);
        }
        pseudonyms.restore_response(&mut response);
        let mut served = RecordArgs::served(
            &route,
            response.usage.unwrap_or_default(),
            cache_status,
            false,
        );
        if abandoned.is_set() {
            // Answered after its caller left: paid for, never delivered.
            tracing::info!(request.id = %ctx.request_id, "caller went away before the answer");
            served.status = RequestStatus::Partial;
            "CLIENT_DISCONNECTED".clone_into(&mut served.error_code);
        }
        self.record(ctx, &request, served);
        response.id = ctx.response_id();
        Ok(Completed {
            response,
            route,
            cache: cache_status,
        })
    }

    /// A streamed completion. Errors before the first chunk are returned here (so HTTP can answer
    /// with a proper status); later ones arrive as [`StreamEvent::Failed`].
    /// Its state lives on the heap (see [`Pipeline::complete`]).
    pub async fn stream(
        &self,
        ctx: &RequestContext,
        request: ChatRequest,
        control: CacheControl,
    ) -> Result<StreamHandle, GatewayError> {
        Box::pin(self.streaming(ctx, request, control)).await
    }

    async fn streaming(
        &self,
        ctx: &RequestContext,
        mut request: ChatRequest,
        control: CacheControl,
    ) -> Result<StreamHandle, GatewayError> {
        let (prepared, pseudonyms, pending) = self.prepare(ctx, &mut request, control).await?;
        let (permit, cache_status) = match prepared {
            Prepared::Hit(permit, cached) => {
                drop(permit);
                debug_assert!(pending.is_none(), "a hit is served only after its check");
                let Cached {
                    mut response,
                    route,
                    ..
                } = *cached;
                pseudonyms.restore_response(&mut response);
                let usage = response.usage.unwrap_or_default();
                let chunks = replay_chunks(&response, &ctx.response_id());
                // A replay is all there before anyone reads it: its channel holds every event
                // (a bounded one would wait forever for the reader this function has not yet
                // returned).
                let (tx, rx) = mpsc::channel(chunks.len() + 1);
                for chunk in chunks {
                    let _ = tx.try_send(StreamEvent::Chunk(chunk));
                }
                let _ = tx.try_send(StreamEvent::Done {
                    usage,
                    route: route.clone(),
                });
                self.record(ctx, &request, RecordArgs::hit(&route, usage, true));
                return Ok(StreamHandle {
                    cache: CacheStatus::Hit,
                    served_by: Some(route),
                    events: Events::new(None, rx, crate::metrics::Source::Cache, ctx.started),
                });
            }
            Prepared::Route(permit, cache_status) => (permit, cache_status),
        };
        let (tx, mut rx) = mpsc::channel(64);
        let mut routed_request = request.clone();
        let reservation = self.reserve(ctx, &mut routed_request, true).await?;
        // Opened up to its first message. A caller that goes away meanwhile does not cancel it
        // (`detach.rs`): it is opened to its first chunk, which names who serves and what the
        // providers reported, recorded and priced, then cancelled. With
        // `abandoned_requests = "cancel"` it is cancelled at once, the prompt's estimate recorded.
        let cancel = self.unanswered(ctx, &request, cache_status);
        let opening = Opening {
            request,
            routed_request,
            cache_status,
            pending,
            reservation,
        };
        let pipeline = self.clone();
        let owned = ctx.clone();
        // An overlapped prompt check's verdict and policy (ADR 011), set on `owned` while the
        // stream opens, are the pump's too: the clones of a context share them.
        let open =
            move |abandoned| async move { pipeline.open_stream(&owned, opening, &abandoned).await };
        let Opened {
            request,
            serving,
            upstream,
            first,
            reservation,
        } = self
            .to_the_end(cancel.map(Cancelled::streamed), open)
            .await?;
        // From here the pump owns the request's row (it records a client that goes away too).
        let served_by = serving.as_ref().map(|s| s.route_info(&request.model));
        let started = ctx.started;
        let pipeline = self.clone();
        let ctx = ctx.clone();
        let span = tracing::Span::current();
        // On the heap, made once: a task's future is moved several times as it is spawned, and
        // the pump's is kilobytes (`Pipeline::complete`).
        let pump = Box::pin(pipeline.pump(
            ctx,
            request,
            control,
            cache_status,
            pseudonyms,
            first,
            upstream,
            serving,
            tx,
            reservation,
        ));
        self.tasks.spawn(
            async move {
                pump.await;
                drop(permit);
            }
            .instrument(span),
        );
        let first = rx.recv().await;
        Ok(StreamHandle {
            cache: cache_status,
            served_by,
            events: Events::new(first, rx, crate::metrics::Source::Provider, started),
        })
    }

    /// A stream opened up to its first message (see [`Pipeline::stream`]): the router's call,
    /// its response head (who serves, what the providers reported) and first message, and the
    /// overlapped prompt check. Its failures are recorded here. When its caller went away
    /// meanwhile (`abandoned`), the row is recorded here too, against the deployment the head
    /// named, and the router's call is cancelled.
    async fn open_stream(
        &self,
        ctx: &RequestContext,
        opening: Opening,
        abandoned: &Abandoned,
    ) -> Result<Opened, GatewayError> {
        let Opening {
            request,
            routed_request,
            cache_status,
            pending,
            reservation,
        } = opening;
        let route = RouteStreamRequest {
            request: Some(routed_request),
            caller: Some(caller(ctx)),
            allowance: reservation.as_ref().and_then(Reservation::allowance),
        };
        let opened = if ctx.expired() {
            Err(deadline_passed())
        } else {
            self.router.clone().route_stream(ctx.bounded(route)).await
        };
        let (serving, mut upstream) = match opened {
            Ok(response) => (Serving::of(response.metadata()), response.into_inner()),
            Err(status) => {
                return Err(self
                    .stream_failed(ctx, &request, cache_status, &status, reservation, pending)
                    .await);
            }
        };
        // Wait for the first message so that failures before the first token are real errors.
        let first = match upstream.message().await {
            Ok(first) => first,
            Err(status) => {
                return Err(self
                    .stream_failed(ctx, &request, cache_status, &status, reservation, pending)
                    .await);
            }
        };
        // An overlapped check must be in before the first chunk leaves. A refusal cancels the
        // router's stream (dropped here) and records what the provider was paid for so far.
        let checked = self.finish_check(ctx, &request, pending).await;
        if checked.is_err() || abandoned.is_set() {
            drop(upstream);
            let mut assembled = Assembler {
                reported: serving.as_ref().and_then(Serving::reported),
                ..Assembler::default()
            };
            if let Some(route_stream_response::Event::Chunk(chunk)) =
                first.as_ref().and_then(|m| m.event.as_ref())
            {
                assembled.add(chunk);
            }
            let error = checked.err();
            if error.is_none() {
                tracing::info!(request.id = %ctx.request_id, "caller went away before the first chunk");
            }
            let route = self.record_partial(
                ctx,
                &request,
                cache_status,
                &assembled,
                error.as_ref(),
                serving.as_ref(),
            );
            if let Some(reservation) = reservation {
                reservation.settle_route(&route);
            }
            return Err(
                error.unwrap_or_else(|| GatewayError::Internal("the caller went away".to_owned()))
            );
        }
        Ok(Opened {
            request,
            serving,
            upstream,
            first,
            reservation,
        })
    }

    /// A stream that failed before its first chunk: the reservation released, the failure
    /// recorded, and the error to return (the refusal of an overlapped check, if any, says more
    /// than the router's error).
    async fn stream_failed(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        cache_status: CacheStatus,
        status: &tonic::Status,
        reservation: Option<Reservation>,
        pending: Option<PendingCheck>,
    ) -> GatewayError {
        let error = self.budget_error(ctx, GatewayError::from_status("router", status));
        let consumed = consumed_in(status.metadata());
        settle_unserved(reservation, consumed.as_ref());
        let error = match self.finish_check(ctx, request, pending).await {
            Ok(()) => error,
            Err(refused) => refused,
        };
        self.record_failure(ctx, request, cache_status, &error, true, consumed);
        error
    }

    #[allow(clippy::too_many_arguments)]
    async fn pump(
        self,
        ctx: RequestContext,
        request: ChatRequest,
        control: CacheControl,
        cache_status: CacheStatus,
        pseudonyms: Pseudonyms,
        first: Option<switchboard_proto::router::v1::RouteStreamResponse>,
        mut upstream: tonic::Streaming<switchboard_proto::router::v1::RouteStreamResponse>,
        serving: Option<Serving>,
        tx: mpsc::Sender<StreamEvent>,
        reservation: Option<Reservation>,
    ) {
        // Settled with the route recorded for the ledger (the same usage, the same prices).
        let mut reservation = reservation;
        let mut settle = move |route: &RouteInfo| {
            if let Some(reservation) = reservation.take() {
                reservation.settle_route(route);
            }
        };
        // What a stream that ends short consumed (`None`: the caller left), recorded against the
        // deployment the router named.
        let partial = |assembled: &Assembler, error: Option<&GatewayError>| {
            self.record_partial(
                &ctx,
                &request,
                cache_status,
                assembled,
                error,
                serving.as_ref(),
            )
        };
        let response_id = ctx.response_id();
        let mut assembled = Assembler {
            reported: serving.as_ref().and_then(Serving::reported),
            ..Assembler::default()
        };
        let mut restorer = pseudonyms.stream();
        drop(pseudonyms);
        // Answer checking of a stream: text is held back and checked in windows (see `answer`).
        let mut hold = ctx.guard_verdict().check_answer.then(StreamHold::default);
        let mut next = first;
        loop {
            let Some(message) = next.take() else {
                // The router closed the stream without its final route message.
                let error = GatewayError::Downstream {
                    code: ErrorCode::UpstreamUnavailable,
                    message: "stream ended before completion".to_owned(),
                    metadata: Default::default(),
                };
                let route = partial(&assembled, Some(&error));
                settle(&route);
                let _ = tx.send(StreamEvent::Failed(error)).await;
                return;
            };
            match message.event {
                Some(route_stream_response::Event::Chunk(mut chunk)) => {
                    chunk.id = response_id.clone();
                    assembled.received(&chunk);
                    if let Some(hold) = hold.as_mut()
                        && let Err(error) = self
                            .check_stream_chunk(&ctx, &request, hold, &mut chunk)
                            .await
                    {
                        let route = partial(&assembled, Some(&error));
                        settle(&route);
                        let _ = tx.send(StreamEvent::Failed(error)).await;
                        return;
                    }
                    // Assembled (for the cache and the usage count) as the provider sent it, with
                    // placeholders; restored only on the way to the caller.
                    assembled.add(&chunk);
                    if let Some(restorer) = restorer.as_mut() {
                        restorer.chunk(&mut chunk);
                    }
                    if tx.send(StreamEvent::Chunk(chunk)).await.is_err() {
                        // The client went away: stop reading upstream (dropping it cancels the call)
                        // and record what was consumed.
                        tracing::info!(request.id = %ctx.request_id, "client disconnected mid-stream");
                        let route = partial(&assembled, None);
                        settle(&route);
                        return;
                    }
                }
                Some(route_stream_response::Event::Route(route)) => {
                    // Text still held back (a stream without a finish reason) is checked and
                    // sent before the end.
                    if let Some(hold) = hold.as_mut() {
                        match self.flush_hold(&ctx, &request, hold, &response_id).await {
                            Ok(None) => {}
                            Ok(Some(mut chunk)) => {
                                assembled.stamp(&mut chunk);
                                assembled.add(&chunk);
                                if let Some(restorer) = restorer.as_mut() {
                                    restorer.chunk(&mut chunk);
                                }
                                let _ = tx.send(StreamEvent::Chunk(chunk)).await;
                            }
                            Err(error) => {
                                let route = partial(&assembled, Some(&error));
                                settle(&route);
                                let _ = tx.send(StreamEvent::Failed(error)).await;
                                return;
                            }
                        }
                    }
                    let usage = assembled.consumed(&request);
                    // As for unary answers: nothing the guard did not check (prompt or any
                    // window of the answer) is cached.
                    if self.cache_enabled
                        && !control.no_store
                        && !ctx.guard_verdict().unchecked
                        && let Some(response) = assembled.to_response(&route)
                    {
                        self.store(&ctx, &request, &response, &route, control.ttl_seconds);
                    }
                    self.record(
                        &ctx,
                        &request,
                        RecordArgs::served(&route, usage, cache_status, true),
                    );
                    settle(&route);
                    if let Some(mut rest) = restorer.as_mut().and_then(|r| r.finish(&response_id)) {
                        assembled.stamp(&mut rest);
                        let _ = tx.send(StreamEvent::Chunk(rest)).await;
                    }
                    let _ = tx.send(StreamEvent::Done { usage, route }).await;
                    return;
                }
                // The router cut the stream: its account of the attempts comes just before the
                // error status, and bills the row (`Assembler::consumed`).
                Some(route_stream_response::Event::Interrupted(route)) => {
                    assembled.cut = Some(route);
                }
                None => {}
            }
            // A caller that leaves while the provider is quiet (between chunks) is noticed at
            // once, not at the next chunk: upstream is dropped (the call cancelled) and what was
            // consumed recorded.
            let message = tokio::select! {
                biased;
                message = upstream.message() => message,
                () = tx.closed() => {
                    tracing::info!(request.id = %ctx.request_id, "client disconnected mid-stream");
                    let route = partial(&assembled, None);
                    settle(&route);
                    return;
                }
            };
            next = match message {
                Ok(Some(message)) => Some(message),
                Ok(None) => None,
                Err(status) => {
                    let error = GatewayError::from_status("router", &status);
                    // What was received and held back is checked and sent before the error.
                    if let Some(hold) = hold.as_mut()
                        && let Ok(Some(mut chunk)) =
                            self.flush_hold(&ctx, &request, hold, &response_id).await
                    {
                        assembled.stamp(&mut chunk);
                        assembled.add(&chunk);
                        if let Some(restorer) = restorer.as_mut() {
                            restorer.chunk(&mut chunk);
                        }
                        let _ = tx.send(StreamEvent::Chunk(chunk)).await;
                    }
                    let route = partial(&assembled, Some(&error));
                    settle(&route);
                    let _ = tx.send(StreamEvent::Failed(error)).await;
                    return;
                }
            };
        }
    }

    async fn check_guard(
        &self,
        ctx: &RequestContext,
        request: &mut ChatRequest,
    ) -> Result<Guarded, GatewayError> {
        let checked = self
            .guard
            .clone()
            .check_prompt(ctx.bounded(check_prompt_request(ctx, request)))
            .await
            .map(tonic::Response::into_inner);
        let (guarded, messages) = self.guard_outcome(ctx, &request.model, checked)?;
        if let Some(messages) = messages {
            request.messages = messages;
        }
        Ok(guarded)
    }

    /// Starts the prompt check of a request whose policy is pass-through (ADR 011), in a task of
    /// its own so that it runs while the router is called.
    fn start_check(&self, ctx: &RequestContext, request: &ChatRequest) -> PendingCheck {
        self.passthrough.overlapped();
        let mut guard = self.guard.clone();
        let check = ctx.bounded(check_prompt_request(ctx, request));
        PendingCheck(tokio::spawn(
            async move {
                guard
                    .check_prompt(check)
                    .await
                    .map(tonic::Response::into_inner)
            }
            .instrument(tracing::Span::current()),
        ))
    }

    /// Waits for an overlapped check (none: nothing to wait for). `Ok` when the prompt passed
    /// unchanged, or unchecked on a fail-open route; a block, or a change the policy asked for
    /// after all (it changed since the gateway learnt it), refuses the request.
    async fn finish_check(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        pending: Option<PendingCheck>,
    ) -> Result<(), GatewayError> {
        let Some(PendingCheck(task)) = pending else {
            return Ok(());
        };
        let checked = task
            .await
            .map_err(|error| GatewayError::Internal(format!("guard check task: {error}")))?;
        match self.guard_outcome(ctx, &request.model, checked)? {
            (Guarded::Unchanged, _) => Ok(()),
            (Guarded::Transformed(_), _) => {
                tracing::warn!(
                    app = %ctx.principal.app,
                    route = %request.model,
                    "guard policy no longer passes prompts through; request refused"
                );
                Err(GatewayError::Downstream {
                    code: ErrorCode::Unavailable,
                    message: "the guard's policy for this app and route changed while the \
                              request was in flight; retry"
                        .to_owned(),
                    metadata: HashMap::from([
                        ("service".to_owned(), "guard".to_owned()),
                        ("reason".to_owned(), "policy_changed".to_owned()),
                    ]),
                })
            }
        }
    }

    /// What a prompt check means: the verdict (recorded on `ctx`), and the transformed messages
    /// when the guard rewrote the prompt.
    fn guard_outcome(
        &self,
        ctx: &RequestContext,
        route: &str,
        checked: Result<CheckPromptResponse, tonic::Status>,
    ) -> Result<(Guarded, Option<Vec<Message>>), GatewayError> {
        let checked = checked.map_err(|status| self.guard_error(ctx, route, &status, "prompt"));
        let checked = match checked {
            Ok(checked) => checked,
            Err(None) => {
                // The route fails open: nothing was checked, and the usage event says so.
                let _ = ctx.checks.verdict.set(GuardVerdict {
                    check_answer: false,
                    unchecked: true,
                });
                return Ok((Guarded::Unchanged, None));
            }
            Err(Some(error)) => return Err(error),
        };
        let _ = ctx.checks.verdict.set(GuardVerdict {
            check_answer: checked.check_answer,
            unchecked: false,
        });
        let _ = ctx.checks.policy.set(format!(
            "{}/{}",
            checked.policy_version, checked.detector_version
        ));
        self.passthrough
            .learn(&ctx.principal.app, route, checked.prompt_passthrough);
        match Decision::try_from(checked.decision).unwrap_or(Decision::Unspecified) {
            Decision::Allow => Ok((Guarded::Unchanged, None)),
            Decision::Transform => Ok((
                Guarded::Transformed(Pseudonyms::new(
                    checked
                        .pseudonyms
                        .into_iter()
                        .map(|p| (p.placeholder, p.value)),
                )),
                Some(checked.messages),
            )),
            Decision::Block => {
                let mut entities: Vec<String> = checked
                    .findings
                    .iter()
                    .filter(|finding| finding.action == "block")
                    .map(|finding| finding.entity_type.clone())
                    .collect();
                entities.sort();
                entities.dedup();
                Err(GatewayError::Blocked {
                    entities: entities.join(", "),
                })
            }
            Decision::Unspecified => Err(GatewayError::Internal(
                "guard returned no decision".to_owned(),
            )),
        }
    }

    /// The error of a failed guard call: `None` when the guard is unreachable and the route fails
    /// open; else fail closed (503 `guard_unavailable`) or the guard's own error.
    fn guard_error(
        &self,
        ctx: &RequestContext,
        route: &str,
        status: &tonic::Status,
        direction: &'static str,
    ) -> Option<GatewayError> {
        let error = GatewayError::from_status("guard", status);
        let Some(cause) = GuardDown::of(&error) else {
            return Some(error);
        };
        // The caller's own deadline ran out during the check: the request timed out; the guard
        // is not down (no fail-closed 503, no unchecked fail-open).
        if cause == GuardDown::TimedOut && ctx.expired() {
            return Some(GatewayError::Downstream {
                code: ErrorCode::Timeout,
                message: "the request's deadline passed while the guard checked it".to_owned(),
                metadata: HashMap::from([("service".to_owned(), "guard".to_owned())]),
            });
        }
        if self.guard_failure.fails_open(&crate::answer::Unchecked {
            request_id: &ctx.request_id,
            app: &ctx.principal.app,
            team: &ctx.principal.team,
            route,
            direction,
            cause,
        }) {
            None
        } else {
            Some(GatewayError::GuardUnavailable {
                route: route.to_owned(),
                cause,
            })
        }
    }

    /// CheckAnswer on a unary answer, when the prompt check asked for it: a transformed answer
    /// replaces the choices' messages; a blocked one is a typed error naming entity types only.
    async fn check_answer(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        response: &mut ChatResponse,
    ) -> Result<(), GatewayError> {
        if !ctx.guard_verdict().check_answer {
            return Ok(());
        }
        let messages: Vec<Message> = response
            .choices
            .iter()
            .map(|choice| choice.message.clone().unwrap_or_default())
            .collect();
        let Some(checked) = self.call_check_answer(ctx, request, messages, 0).await? else {
            return Ok(());
        };
        match Decision::try_from(checked.decision).unwrap_or(Decision::Unspecified) {
            Decision::Allow => Ok(()),
            Decision::Block => Err(answer_blocked(&checked.findings)),
            Decision::Transform => {
                if checked.messages.len() != response.choices.len() {
                    return Err(GatewayError::Internal(
                        "guard changed the number of answer messages".to_owned(),
                    ));
                }
                for (choice, message) in response.choices.iter_mut().zip(checked.messages) {
                    choice.message = Some(message);
                }
                Ok(())
            }
            Decision::Unspecified => Err(GatewayError::Internal(
                "guard returned no decision".to_owned(),
            )),
        }
    }

    /// CheckAnswer; `Ok(None)` when the guard is unreachable and the route fails open (the request
    /// is then marked unchecked: its answer is not cached and its usage event says so).
    async fn call_check_answer(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        messages: Vec<Message>,
        sequence: u32,
    ) -> Result<Option<switchboard_proto::guard::v1::CheckAnswerResponse>, GatewayError> {
        let checked = self
            .guard
            .clone()
            .check_answer(ctx.bounded(CheckAnswerRequest {
                request_id: ctx.request_id.clone(),
                app: ctx.principal.app.clone(),
                team: ctx.principal.team.clone(),
                messages,
                route: request.model.clone(),
                sequence,
            }))
            .await;
        match checked {
            Ok(checked) => Ok(Some(checked.into_inner())),
            Err(status) => match self.guard_error(ctx, &request.model, &status, "answer") {
                None => {
                    ctx.mark_answer_unchecked();
                    Ok(None)
                }
                Some(error) => Err(error),
            },
        }
    }

    /// Checks the stable text of a streamed chunk (what [`StreamHold`] releases) and puts the
    /// checked text back into the chunk's deltas; held text leaves an empty delta (the chunk's
    /// shape, role, tool calls and finish reason are kept). Reasoning text is held and checked the
    /// same way, per block; a block ends at its signature, at the next block, or where the answer
    /// text, a tool call or the finish follows. A rewritten block's signature is dropped.
    async fn check_stream_chunk(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        hold: &mut StreamHold,
        chunk: &mut ChatChunk,
    ) -> Result<(), GatewayError> {
        for delta in &mut chunk.choices {
            let last = delta.finish_reason != FinishReason::Unspecified as i32;
            let index = delta.index;
            if !delta.thinking.is_empty() {
                let incoming = std::mem::take(&mut delta.thinking);
                let mut out = Vec::with_capacity(incoming.len());
                for mut piece in incoming {
                    for (block, text) in hold.take_thinking(index, Some(piece.index)) {
                        out.push(
                            self.check_thinking(ctx, request, hold, (index, block), text)
                                .await?,
                        );
                    }
                    if !piece.redacted_data.is_empty() {
                        // Encrypted by the provider: nothing to read.
                        out.push(piece);
                        continue;
                    }
                    let ends = !piece.signature.is_empty() || last;
                    let stable = hold.push_thinking(index, piece.index, &piece.text, ends);
                    piece.text = if stable.is_empty() {
                        stable
                    } else {
                        self.check_thinking(ctx, request, hold, (index, piece.index), stable)
                            .await?
                            .text
                    };
                    if hold.is_rewritten(index, piece.index) {
                        piece.signature.clear();
                    }
                    if !piece.text.is_empty() || !piece.signature.is_empty() {
                        out.push(piece);
                    }
                }
                delta.thinking = out;
            }
            if !delta.content.is_empty() || !delta.tool_calls.is_empty() || last {
                for (block, text) in hold.take_thinking(index, None) {
                    delta.thinking.push(
                        self.check_thinking(ctx, request, hold, (index, block), text)
                            .await?,
                    );
                }
            }
            if !delta.refusal.is_empty() {
                hold.push_refusal(index, &std::mem::take(&mut delta.refusal));
            }
            if last && let Some(refusal) = hold.take_refusal(index) {
                hold.windows += 1;
                delta.refusal = self
                    .check_window(ctx, request, refusal, hold.windows)
                    .await?;
            }
            if delta.content.is_empty() && !last {
                continue;
            }
            let stable = hold.push(delta.index, &delta.content, last);
            delta.content = if stable.is_empty() {
                stable
            } else {
                hold.windows += 1;
                self.check_window(ctx, request, stable, hold.windows)
                    .await?
            };
        }
        Ok(())
    }

    /// One window of a reasoning block (`at`: choice index, block) through CheckAnswer, as the
    /// block's delta to send; notes a rewrite in `hold`.
    async fn check_thinking(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        hold: &mut StreamHold,
        at: (u32, u32),
        text: String,
    ) -> Result<ThinkingDelta, GatewayError> {
        hold.windows += 1;
        let checked = self
            .check_window(ctx, request, text.clone(), hold.windows)
            .await?;
        if checked != text {
            hold.mark_rewritten(at.0, at.1);
        }
        Ok(ThinkingDelta {
            index: at.1,
            text: checked,
            ..Default::default()
        })
    }

    /// The checked text still held back (reasoning first), as one chunk (none when nothing is
    /// held).
    async fn flush_hold(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        hold: &mut StreamHold,
        response_id: &str,
    ) -> Result<Option<ChatChunk>, GatewayError> {
        let thinking = hold.drain_thinking();
        let rest = hold.drain();
        let refusals = hold.drain_refusals();
        if rest.is_empty() && thinking.is_empty() && refusals.is_empty() {
            return Ok(None);
        }
        let mut chunk = ChatChunk {
            id: response_id.to_owned(),
            ..Default::default()
        };
        for ((index, block), text) in thinking {
            let piece = self
                .check_thinking(ctx, request, hold, (index, block), text)
                .await?;
            chunk.choices.push(ChoiceDelta {
                index,
                thinking: vec![piece],
                ..Default::default()
            });
        }
        for (index, text) in rest {
            hold.windows += 1;
            let content = self.check_window(ctx, request, text, hold.windows).await?;
            chunk.choices.push(ChoiceDelta {
                index,
                content,
                ..Default::default()
            });
        }
        for (index, text) in refusals {
            hold.windows += 1;
            let refusal = self.check_window(ctx, request, text, hold.windows).await?;
            chunk.choices.push(ChoiceDelta {
                index,
                refusal,
                ..Default::default()
            });
        }
        Ok(Some(chunk))
    }

    /// One window of a streamed answer through CheckAnswer: the text to send instead.
    async fn check_window(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        text: String,
        sequence: u32,
    ) -> Result<String, GatewayError> {
        let messages = vec![Message::text(Role::Assistant, text.clone())];
        let Some(checked) = self
            .call_check_answer(ctx, request, messages, sequence)
            .await?
        else {
            return Ok(text);
        };
        match Decision::try_from(checked.decision).unwrap_or(Decision::Unspecified) {
            Decision::Allow => Ok(text),
            Decision::Transform => Ok(checked
                .messages
                .first()
                .map(Message::joined_text)
                .unwrap_or_default()),
            Decision::Block => Err(answer_blocked(&checked.findings)),
            Decision::Unspecified => Err(GatewayError::Internal(
                "guard returned no decision".to_owned(),
            )),
        }
    }

    async fn lookup(&self, ctx: &RequestContext, request: ChatRequest) -> Lookup {
        let looked_up = self
            .cache
            .clone()
            .lookup(ctx.bounded(LookupRequest {
                scope: Some(cache_scope(ctx)),
                request: Some(request),
            }))
            .await;
        match looked_up {
            Ok(found) => {
                let found = found.into_inner();
                match (found.hit, found.response) {
                    (true, Some(response)) => Lookup::Hit(Box::new(Cached {
                        response,
                        route: found.route.unwrap_or_default(),
                        guard_policy: found.guard_policy,
                    })),
                    _ => Lookup::Miss,
                }
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), "cache lookup failed; bypassing the cache");
                Lookup::Unavailable
            }
        }
    }

    fn store(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        response: &ChatResponse,
        route: &RouteInfo,
        ttl: u32,
    ) {
        let mut cache = self.cache.clone();
        let store = StoreRequest {
            scope: Some(cache_scope(ctx)),
            request: Some(request.clone()),
            response: Some(response.clone()),
            route: Some(route.clone()),
            ttl_seconds: ttl,
            // Only checked answers are stored: the policy that decided the prompt is known.
            guard_policy: ctx.checks.policy.get().cloned().unwrap_or_default(),
        };
        self.tasks.spawn(
            async move {
                if let Err(status) = cache.store(store).await {
                    tracing::warn!(code = ?status.code(), "cache store failed");
                }
            }
            .instrument(tracing::Span::current()),
        );
    }

    fn record(&self, ctx: &RequestContext, request: &ChatRequest, args: RecordArgs) {
        let event = UsageEvent {
            request_id: ctx.request_id.clone(),
            time: Some(ctx.time.into()),
            app: ctx.principal.app.clone(),
            team: ctx.principal.team.clone(),
            key_id: ctx.principal.key_id.clone(),
            requested_model: request.model.clone(),
            route: Some(args.route),
            usage: Some(args.usage),
            cache: args.cache.outcome() as i32,
            saved_usage: args.saved_usage,
            status: args.status as i32,
            error_code: args.error_code,
            streamed: args.streamed,
            latency_ms: ctx.started.elapsed().as_millis() as u64,
            trace_id: switchboard_telemetry::current_trace_id(),
            tags: {
                let mut tags = request.tags.clone();
                if ctx.guard_verdict().unchecked {
                    tags.insert(UNCHECKED_TAG.0.to_owned(), UNCHECKED_TAG.1.to_owned());
                }
                tags
            },
        };
        self.usage.record(event);
    }

    /// A request that failed at the router: recorded when a provider was tried, and whenever its
    /// attempts consumed something (`consumed`, the router's account: each attempt billed what its
    /// provider reported, the last one's deployment named as the row's).
    fn record_failure(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        cache: CacheStatus,
        error: &GatewayError,
        streamed: bool,
        consumed: Option<RouteInfo>,
    ) {
        use switchboard_status::ServiceError;
        let code = error.code();
        if consumed.is_none()
            && !matches!(
                code,
                ErrorCode::UpstreamUnavailable | ErrorCode::UpstreamRejected | ErrorCode::Timeout
            )
        {
            return;
        }
        let (route, usage) = match consumed {
            Some(mut route) => {
                request.model.clone_into(&mut route.route);
                let usage = route
                    .attempts
                    .last()
                    .and_then(|attempt| attempt.usage)
                    .unwrap_or_default();
                (route, usage)
            }
            None => {
                let attempts = match error {
                    GatewayError::Downstream { metadata, .. } => metadata
                        .get("attempts")
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(0),
                    _ => 0,
                };
                let route = RouteInfo {
                    route: request.model.clone(),
                    attempt_count: attempts,
                    ..Default::default()
                };
                (route, Usage::default())
            }
        };
        self.record(
            ctx,
            request,
            RecordArgs {
                route,
                usage,
                saved_usage: None,
                cache,
                status: RequestStatus::Error,
                error_code: code.as_str().to_owned(),
                streamed,
            },
        );
    }

    /// A routed request refused after the provider answered (its answer was blocked, or an
    /// overlapped prompt check refused it, ADR 011): what the provider was paid is recorded, with
    /// the refusal's code.
    fn record_withheld(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        route: RouteInfo,
        usage: Usage,
        cache: CacheStatus,
        error: &GatewayError,
    ) {
        use switchboard_status::ServiceError;
        self.record(
            ctx,
            request,
            RecordArgs {
                route,
                usage,
                saved_usage: None,
                cache,
                status: RequestStatus::Error,
                error_code: error.code().as_str().to_owned(),
                streamed: false,
            },
        );
    }

    fn record_partial(
        &self,
        ctx: &RequestContext,
        request: &ChatRequest,
        cache: CacheStatus,
        assembled: &Assembler,
        error: Option<&GatewayError>,
        serving: Option<&Serving>,
    ) -> RouteInfo {
        use switchboard_status::ServiceError;
        let usage = assembled.consumed(request);
        let route = partial_route(request, assembled, error, usage, serving);
        self.record(
            ctx,
            request,
            RecordArgs {
                route: route.clone(),
                usage,
                saved_usage: None,
                cache,
                status: RequestStatus::Partial,
                error_code: error
                    .map(|e| e.code().as_str().to_owned())
                    .unwrap_or_else(|| "CLIENT_DISCONNECTED".to_owned()),
                streamed: true,
            },
        );
        route
    }
}

/// What a cache lookup means for the request, once the guard's verdict on it is in: a hit is
/// served only when its answer was checked under the policy that decided this prompt
/// ([`RequestContext::checked_under`]); one checked under another policy (changed since, or
/// other detectors) is a miss, and the new answer replaces it.
fn prepared_from_lookup(
    ctx: &RequestContext,
    permit: OwnedSemaphorePermit,
    looked_up: Lookup,
    control: CacheControl,
) -> Result<Prepared, GatewayError> {
    let looked_up = match looked_up {
        Lookup::Hit(cached) if !ctx.checked_under(&cached.guard_policy) => {
            tracing::debug!(
                request.id = %ctx.request_id,
                "cached answer checked under another guard policy; not served"
            );
            Lookup::Miss
        }
        looked_up => looked_up,
    };
    Ok(match looked_up {
        Lookup::Hit(cached) => Prepared::Hit(permit, cached),
        // RFC 9111 `only-if-cached`: a miss (or an unreachable cache) is an error, never a
        // provider call.
        Lookup::Miss | Lookup::Unavailable if control.only_if_cached => {
            return Err(GatewayError::NotCached);
        }
        Lookup::Miss => Prepared::Route(permit, CacheStatus::Miss),
        Lookup::Unavailable => Prepared::Route(permit, CacheStatus::Bypass),
    })
}

/// A prompt check running while the request is routed (ADR 011).
struct PendingCheck(tokio::task::JoinHandle<Result<CheckPromptResponse, tonic::Status>>);

fn check_prompt_request(ctx: &RequestContext, request: &ChatRequest) -> CheckPromptRequest {
    CheckPromptRequest {
        request_id: ctx.request_id.clone(),
        app: ctx.principal.app.clone(),
        team: ctx.principal.team.clone(),
        messages: request.messages.clone(),
        route: request.model.clone(),
    }
}

enum Prepared {
    /// Answered by the cache (checked under the policy that decided this prompt).
    Hit(OwnedSemaphorePermit, Box<Cached>),
    /// To be routed.
    Route(OwnedSemaphorePermit, CacheStatus),
}

/// The typed refusal of a blocked answer: entity types, never values.
fn answer_blocked(findings: &[switchboard_proto::guard::v1::Finding]) -> GatewayError {
    let mut entities: Vec<String> = findings
        .iter()
        .filter(|finding| finding.action == "block")
        .map(|finding| finding.entity_type.clone())
        .collect();
    entities.sort();
    entities.dedup();
    GatewayError::AnswerBlocked {
        entities: entities.join(", "),
    }
}

/// What the guard did to an allowed prompt.
enum Guarded {
    /// Passed as it was.
    Unchanged,
    /// Rewritten (redacted, masked, pseudonymised, …): `request.messages` now holds the new text;
    /// the pseudonyms (possibly none) restore the answer.
    Transformed(Pseudonyms),
}

enum Lookup {
    Hit(Box<Cached>),
    Miss,
    Unavailable,
}

/// A cache hit as the cache returned it.
struct Cached {
    response: ChatResponse,
    route: RouteInfo,
    /// The guard policy its answer was checked under (`StoreRequest.guard_policy`).
    guard_policy: String,
}

/// With `abandoned_requests = "cancel"`, a request dropped while it is routed (its caller went
/// away: an HTTP client that disconnects, a gRPC reset, a client timeout) still leaves its one
/// usage row: `PARTIAL`, `CLIENT_DISCONNECTED`, the prompt's estimate and no provider (the
/// router's call is cancelled with it, before it said which target was serving). Armed once the
/// request may reach a provider ([`Cancelled`]); disarmed when the request ends by itself, so only
/// a dropped future records through it. (By default nothing is cancelled: `detach.rs`.)
struct AbandonedStream<'a> {
    pipeline: &'a Pipeline,
    ctx: &'a RequestContext,
    request: &'a ChatRequest,
    cache: CacheStatus,
    /// False for a unary request cancelled with its caller ([`Cancelled`]).
    streamed: bool,
}

impl<'a> AbandonedStream<'a> {
    fn arm(
        pipeline: &'a Pipeline,
        ctx: &'a RequestContext,
        request: &'a ChatRequest,
        cache: CacheStatus,
    ) -> Self {
        AbandonedStream {
            pipeline,
            ctx,
            request,
            cache,
            streamed: true,
        }
    }

    /// The same for a unary request ([`Cancelled`]).
    fn unary(mut self) -> Self {
        self.streamed = false;
        self
    }

    /// The request ended on a path that records (or deliberately does not record) it.
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for AbandonedStream<'_> {
    fn drop(&mut self) {
        tracing::info!(request.id = %self.ctx.request_id, "caller went away before the answer");
        let usage = Assembler::default().estimate_usage(self.request);
        self.pipeline.record(
            self.ctx,
            self.request,
            RecordArgs {
                route: RouteInfo {
                    route: self.request.model.clone(),
                    ..Default::default()
                },
                usage,
                saved_usage: None,
                cache: self.cache,
                status: RequestStatus::Partial,
                error_code: "CLIENT_DISCONNECTED".to_owned(),
                streamed: self.streamed,
            },
        );
    }
}

/// What the provider-bound part of a unary completion takes ([`Pipeline::route_unary`]).
struct Unary {
    /// The request as the guard left it (placeholders; what is recorded and cached).
    request: ChatRequest,
    /// The request as routed (its output bound set by the budget reservation).
    routed_request: ChatRequest,
    control: CacheControl,
    cache_status: CacheStatus,
    pseudonyms: Pseudonyms,
    pending: Option<PendingCheck>,
    reservation: Option<Reservation>,
}

/// What [`Pipeline::open_stream`] takes.
struct Opening {
    request: ChatRequest,
    routed_request: ChatRequest,
    cache_status: CacheStatus,
    pending: Option<PendingCheck>,
    reservation: Option<Reservation>,
}

/// A stream opened up to its first message, for the pump.
struct Opened {
    request: ChatRequest,
    serving: Option<Serving>,
    upstream: tonic::Streaming<switchboard_proto::router::v1::RouteStreamResponse>,
    first: Option<switchboard_proto::router::v1::RouteStreamResponse>,
    reservation: Option<Reservation>,
}

/// A unary request that is cancelled with its caller (`abandoned_requests = "cancel"`): its tail is
/// awaited in place, and if it is dropped unfinished the request's row is the prompt's estimate,
/// as a stream dropped before its first chunk ([`AbandonedStream`]).
struct Cancelled {
    pipeline: Pipeline,
    ctx: RequestContext,
    request: ChatRequest,
    cache: CacheStatus,
    streamed: bool,
}

impl Cancelled {
    /// The same for a stream before its first chunk.
    fn streamed(mut self) -> Self {
        self.streamed = true;
        self
    }

    async fn run<T>(self, tail: impl std::future::Future<Output = T>) -> T {
        let mut guard = AbandonedStream::arm(&self.pipeline, &self.ctx, &self.request, self.cache);
        if !self.streamed {
            guard = guard.unary();
        }
        let output = tail.await;
        guard.disarm();
        output
    }
}

struct RecordArgs {
    route: RouteInfo,
    usage: Usage,
    saved_usage: Option<Usage>,
    cache: CacheStatus,
    status: RequestStatus,
    error_code: String,
    streamed: bool,
}

impl RecordArgs {
    fn hit(route: &RouteInfo, saved: Usage, streamed: bool) -> Self {
        RecordArgs {
            route: route.clone(),
            usage: Usage::default(),
            saved_usage: Some(saved),
            cache: CacheStatus::Hit,
            status: RequestStatus::Ok,
            error_code: String::new(),
            streamed,
        }
    }

    fn served(route: &RouteInfo, usage: Usage, cache: CacheStatus, streamed: bool) -> Self {
        RecordArgs {
            route: route.clone(),
            usage,
            saved_usage: None,
            cache,
            status: RequestStatus::Ok,
            error_code: String::new(),
            streamed,
        }
    }
}

/// The route of a stream cut short, with `usage` (what the stream consumed) on its cut attempt, so
/// that the ledger prices those tokens at that deployment's rates. A stream the router cut comes
/// with the router's account of its attempts (earlier ones with what they consumed); otherwise the
/// route names the deployment the router named (the metadata of its interrupted-stream error, or
/// its response head) and lists the cut attempt alone.
fn partial_route(
    request: &ChatRequest,
    assembled: &Assembler,
    error: Option<&GatewayError>,
    usage: Usage,
    serving: Option<&Serving>,
) -> RouteInfo {
    use switchboard_status::ServiceError;
    if let Some(cut) = assembled.cut.as_ref().filter(|r| !r.attempts.is_empty()) {
        let mut route = cut.clone();
        if let Some(attempt) = route.attempts.last_mut() {
            attempt.usage = Some(usage);
        }
        return route;
    }
    let mut route = RouteInfo {
        route: request.model.clone(),
        model: assembled.model.clone(),
        ..Default::default()
    };
    // The router's own account of a cut (its error names the deployment) comes first; otherwise
    // the deployment its response head named (the caller gone, a refusal, a missing route info).
    let (source, error_code, error_message) = match error {
        Some(GatewayError::Downstream { metadata, .. })
            if metadata.contains_key("provider") && metadata.contains_key("model") =>
        {
            let get = |name: &str| metadata.get(name).cloned().unwrap_or_default();
            let source = Serving {
                provider: get("provider"),
                model: get("model"),
                target: get("target"),
                key_alias: get("key_alias"),
                attempts: metadata
                    .get("attempts")
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(1),
                consumed: None,
            };
            (source, "STREAM_INTERRUPTED".to_owned(), get("last_error"))
        }
        _ => {
            let Some(serving) = serving else {
                return route;
            };
            let code = error.map_or("CLIENT_DISCONNECTED", |e| e.code().as_str());
            // The router's account by the first chunk: the failed attempts (billed what their
            // providers reported), the serving one last.
            if let Some(mut consumed) = serving.consumed.clone() {
                if let Some(attempt) = consumed.attempts.last_mut() {
                    code.clone_into(&mut attempt.error_code);
                    attempt.usage = Some(usage);
                }
                consumed.attempt_count = consumed.attempt_count.max(serving.attempts);
                return consumed;
            }
            (serving.clone(), code.to_owned(), String::new())
        }
    };
    route.provider.clone_from(&source.provider);
    route.model.clone_from(&source.model);
    route.target.clone_from(&source.target);
    route.key_alias.clone_from(&source.key_alias);
    route.attempt_count = source.attempts;
    route.attempts = vec![switchboard_proto::chat::v1::Attempt {
        target: source.target,
        provider: source.provider,
        model: source.model,
        key_alias: source.key_alias,
        error_code,
        error_message,
        usage: Some(usage),
        ..Default::default()
    }];
    route
}

/// The deployment a stream committed to, as the router's response head names it
/// (`switchboard_status::serving`): a stream cut short before the router's final route info (the
/// caller gone, an answer refused, the route info missing) is recorded against it and priced.
#[derive(Debug, Clone, Default, PartialEq)]
struct Serving {
    provider: String,
    model: String,
    target: String,
    key_alias: String,
    attempts: u32,
    /// What the attempts consumed by the first chunk, as their providers reported it
    /// (`switchboard_status::serving::CONSUMED`): the failed attempts, then the serving one with
    /// the usage its provider reported before its first chunk. `None` when none reported any.
    consumed: Option<RouteInfo>,
}

impl Serving {
    /// As the caller sees it before the stream's end: who serves route `route`.
    fn route_info(&self, route: &str) -> RouteInfo {
        RouteInfo {
            route: route.to_owned(),
            provider: self.provider.clone(),
            model: self.model.clone(),
            target: self.target.clone(),
            key_alias: self.key_alias.clone(),
            attempt_count: self.attempts,
            ..Default::default()
        }
    }

    fn of(metadata: &tonic::metadata::MetadataMap) -> Option<Serving> {
        use switchboard_status::serving;
        let get = |name: &str| {
            metadata
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        Some(Serving {
            provider: get(serving::PROVIDER)?,
            model: get(serving::MODEL)?,
            target: get(serving::TARGET).unwrap_or_default(),
            key_alias: get(serving::KEY_ALIAS).unwrap_or_default(),
            attempts: get(serving::ATTEMPTS)
                .and_then(|a| a.parse().ok())
                .unwrap_or(1),
            consumed: consumed_in(metadata),
        })
    }

    /// The usage the serving attempt's provider reported before its first chunk.
    fn reported(&self) -> Option<Usage> {
        self.consumed
            .as_ref()
            .and_then(|route| route.attempts.last())
            .and_then(|attempt| attempt.usage)
    }
}

/// The router's account of what a request's attempts consumed (`serving::CONSUMED`), in a
/// stream's response head or an error's status. One that cannot be read is left out: the request
/// bills as before the account existed.
fn consumed_in(metadata: &tonic::metadata::MetadataMap) -> Option<RouteInfo> {
    metadata
        .get_bin(switchboard_status::serving::CONSUMED)
        .and_then(|value| value.to_bytes().ok())
        .and_then(|bytes| <RouteInfo as prost::Message>::decode(bytes).ok())
        .filter(|route| !route.attempts.is_empty())
}

/// Settles the reservation of a request no attempt served: what its attempts consumed (nothing
/// when they reported nothing).
fn settle_unserved(reservation: Option<Reservation>, consumed: Option<&RouteInfo>) {
    match (reservation, consumed) {
        (Some(reservation), Some(route)) => reservation.settle_route(route),
        (Some(reservation), None) => reservation.settle(0),
        (None, _) => {}
    }
}

/// The cache scope of a request: its app and its team. The team, like the request's tags (in the
/// request itself), is part of the cache key because the router may route on it: another team's
/// identical request may be served by another provider, so it never shares a cached answer.
fn cache_scope(ctx: &RequestContext) -> Scope {
    Scope {
        app: ctx.principal.app.clone(),
        team: ctx.principal.team.clone(),
    }
}

/// A router call not made because the caller's deadline had passed: as a router past it would
/// fail.
fn deadline_passed() -> tonic::Status {
    tonic::Status::deadline_exceeded("the caller's deadline passed before the request was routed")
}

fn caller(ctx: &RequestContext) -> Caller {
    Caller {
        request_id: ctx.request_id.clone(),
        app: ctx.principal.app.clone(),
        team: ctx.principal.team.clone(),
    }
}

/// Refuses caller tags in the gateway's own namespace (`switchboard.`): they would pass for what the
/// gateway records (e.g. a prompt the guard did not check).
pub fn validate_tags(tags: &HashMap<String, String>) -> Result<(), GatewayError> {
    match tags
        .keys()
        .find(|name| name.starts_with(crate::auth::RESERVED_TAG_PREFIX))
    {
        Some(name) => Err(GatewayError::InvalidRequest {
            field: format!("tags.{name}"),
            message: format!(
                "tag names starting with `{}` are reserved (`metadata` over HTTP)",
                crate::auth::RESERVED_TAG_PREFIX
            ),
        }),
        None => Ok(()),
    }
}

/// Checks what every provider would reject anyway, with errors that name the field.
pub fn validate(request: &ChatRequest) -> Result<(), GatewayError> {
    let invalid = |field: &str, message: &str| GatewayError::InvalidRequest {
        field: field.to_owned(),
        message: message.to_owned(),
    };
    if request.model.trim().is_empty() {
        return Err(invalid("model", "must not be empty"));
    }
    validate_tags(&request.tags)?;
    if request.messages.is_empty() {
        return Err(invalid("messages", "must contain at least one message"));
    }
    for (index, message) in request.messages.iter().enumerate() {
        if Role::try_from(message.role).unwrap_or(Role::Unspecified) == Role::Unspecified {
            return Err(invalid(&format!("messages[{index}].role"), "must be set"));
        }
    }
    if let Some(sampling) = &request.sampling {
        if let Some(t) = sampling.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(invalid("temperature", "must be between 0 and 2"));
        }
        // 0 included, as OpenAI's and Anthropic's ranges are (greedy decoding in eval harnesses).
        if let Some(p) = sampling.top_p
            && !(0.0..=1.0).contains(&p)
        {
            return Err(invalid("top_p", "must be between 0 and 1"));
        }
        if sampling.max_tokens == Some(0) {
            return Err(invalid("max_tokens", "must be at least 1"));
        }
        if sampling.n == Some(0) {
            return Err(invalid("n", "must be at least 1"));
        }
    }
    for (index, tool) in request.tools.iter().enumerate() {
        if tool.name.is_empty() {
            return Err(invalid(
                &format!("tools[{index}].function.name"),
                "must not be empty",
            ));
        }
    }
    Ok(())
}

/// Most bytes of content in one replayed chunk (pieces end after whitespace when they can).
const REPLAY_PIECE_BYTES: usize = 64;

/// Splits `text` into pieces of about [`REPLAY_PIECE_BYTES`], cut after whitespace.
fn replay_pieces(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut end = 0;
    for word in text.split_inclusive(char::is_whitespace) {
        if end > start && end - start + word.len() > REPLAY_PIECE_BYTES {
            pieces.push(&text[start..end]);
            start = end;
        }
        end += word.len();
    }
    if end > start {
        pieces.push(&text[start..end]);
    }
    pieces
}

/// Replays a cached answer as a stream of the same shape as a live one: per choice a role chunk
/// (empty content), the reasoning blocks (text in pieces, then the block's signature; a redacted
/// block in one delta), content chunks, a finish chunk (with the stop sequence, when the answer
/// named one); the usage follows in [`StreamEvent::Done`] (the HTTP front end's usage chunk, the
/// gRPC summary).
fn replay_chunks(response: &ChatResponse, id: &str) -> Vec<ChatChunk> {
    let mut chunks = Vec::new();
    let chunk = |delta: ChoiceDelta| ChatChunk {
        id: id.to_owned(),
        model: response.model.clone(),
        created: response.created,
        choices: vec![delta],
        usage: None,
    };
    for choice in &response.choices {
        let message = choice.message.as_ref();
        let text = message.map(Message::joined_text).unwrap_or_default();
        chunks.push(chunk(ChoiceDelta {
            index: choice.index,
            role: Role::Assistant as i32,
            ..Default::default()
        }));
        let thinking_delta = |delta: ThinkingDelta| ChoiceDelta {
            index: choice.index,
            thinking: vec![delta],
            ..Default::default()
        };
        for (position, block) in message.into_iter().flat_map(|m| &m.thinking).enumerate() {
            let index = position as u32;
            if !block.redacted_data.is_empty() {
                chunks.push(chunk(thinking_delta(ThinkingDelta {
                    index,
                    redacted_data: block.redacted_data.clone(),
                    ..Default::default()
                })));
                continue;
            }
            for piece in replay_pieces(&block.text) {
                chunks.push(chunk(thinking_delta(ThinkingDelta {
                    index,
                    text: piece.to_owned(),
                    ..Default::default()
                })));
            }
            if !block.signature.is_empty() {
                chunks.push(chunk(thinking_delta(ThinkingDelta {
                    index,
                    signature: block.signature.clone(),
                    ..Default::default()
                })));
            }
        }
        for piece in replay_pieces(&text) {
            chunks.push(chunk(ChoiceDelta {
                index: choice.index,
                content: piece.to_owned(),
                ..Default::default()
            }));
        }
        if let Some(refusal) = message.map(|m| &m.refusal).filter(|r| !r.is_empty()) {
            chunks.push(chunk(ChoiceDelta {
                index: choice.index,
                refusal: refusal.clone(),
                ..Default::default()
            }));
        }
        // Tool calls (an answer that finished with `stop` may carry them: OpenAI does when
        // `tool_choice` names the function), each whole in one delta, as a provider's first
        // delta of a call carries its id and name.
        for (position, call) in message.into_iter().flat_map(|m| &m.tool_calls).enumerate() {
            chunks.push(chunk(ChoiceDelta {
                index: choice.index,
                tool_calls: vec![ToolCallDelta {
                    index: position as u32,
                    id: call.id.clone(),
                    name: call.name.clone(),
                    arguments_delta: call.arguments_json.clone(),
                    signature: call.signature.clone(),
                }],
                ..Default::default()
            }));
        }
        chunks.push(chunk(ChoiceDelta {
            index: choice.index,
            finish_reason: choice.finish_reason,
            stop_sequence: message.map(|m| m.stop_sequence.clone()).unwrap_or_default(),
            ..Default::default()
        }));
    }
    chunks
}

/// Reassembles a stream, to cache it and to count what was consumed.
#[derive(Default)]
struct Assembler {
    model: String,
    created: i64,
    text: BTreeMap<u32, String>,
    /// Reasoning blocks per (choice, block index); a map, so a block index is a key, never a
    /// length to allocate.
    thinking: BTreeMap<(u32, u32), ThinkingBlock>,
    stop_sequence: BTreeMap<u32, String>,
    finish: BTreeMap<u32, i32>,
    /// The model's refusal per choice (OpenAI `refusal`).
    refusal: BTreeMap<u32, String>,
    has_tool_calls: bool,
    /// The provider's usage, when a chunk carried it (its count at the end).
    usage: Option<Usage>,
    /// The router's account of a stream it cut (`RouteStreamResponse.interrupted`): every
    /// attempt, the cut one last with what its provider reported before the cut.
    cut: Option<RouteInfo>,
    /// What the serving attempt's provider reported before the first chunk (the response head's
    /// account, [`Serving::reported`]): bills a stream that ends short without the router's
    /// account of a cut (the caller gone, an answer refused).
    reported: Option<Usage>,
    /// Answer and reasoning bytes as the router sent them, before the answer check held any back
    /// or blocked them: what the provider was paid for, even if the caller never saw it.
    received_bytes: usize,
    received_thinking_bytes: usize,
}

impl Assembler {
    /// Gives a chunk the gateway made (released held-back text, restored placeholders) the
    /// stream's model and creation time, as every provider chunk has.
    fn stamp(&self, chunk: &mut ChatChunk) {
        if chunk.model.is_empty() {
            chunk.model.clone_from(&self.model);
        }
        if chunk.created == 0 {
            chunk.created = self.created;
        }
    }

    /// Counts a chunk as it came from the router (before the answer check).
    fn received(&mut self, chunk: &ChatChunk) {
        for choice in &chunk.choices {
            self.received_bytes += choice.content.len() + choice.refusal.len();
            self.received_thinking_bytes +=
                choice.thinking.iter().map(|t| t.text.len()).sum::<usize>();
        }
    }

    fn add(&mut self, chunk: &ChatChunk) {
        if self.model.is_empty() {
            self.model = chunk.model.clone();
            self.created = chunk.created;
        }
        for choice in &chunk.choices {
            self.text
                .entry(choice.index)
                .or_default()
                .push_str(&choice.content);
            if !choice.tool_calls.is_empty() {
                self.has_tool_calls = true;
            }
            if !choice.refusal.is_empty() {
                self.refusal
                    .entry(choice.index)
                    .or_default()
                    .push_str(&choice.refusal);
            }
            for delta in &choice.thinking {
                let block = self
                    .thinking
                    .entry((choice.index, delta.index))
                    .or_default();
                block.text.push_str(&delta.text);
                block.signature.push_str(&delta.signature);
                block.redacted_data.push_str(&delta.redacted_data);
            }
            if !choice.stop_sequence.is_empty() {
                self.stop_sequence
                    .insert(choice.index, choice.stop_sequence.clone());
            }
            if choice.finish_reason != FinishReason::Unspecified as i32 {
                self.finish.insert(choice.index, choice.finish_reason);
            }
        }
        if let Some(usage) = &chunk.usage {
            self.usage = Some(*usage);
        }
    }

    /// The complete answer, when every choice finished normally with text only.
    fn to_response(&self, _route: &RouteInfo) -> Option<ChatResponse> {
        if self.has_tool_calls || self.text.is_empty() || self.usage.is_none() {
            return None;
        }
        let mut choices = Vec::with_capacity(self.text.len());
        for (index, text) in &self.text {
            let finish = *self.finish.get(index)?;
            if finish != FinishReason::Stop as i32 {
                return None;
            }
            let mut message = Message::text(Role::Assistant, text.clone());
            message.thinking = self
                .thinking
                .range((*index, 0)..=(*index, u32::MAX))
                .map(|(_, block)| block.clone())
                .collect();
            message.stop_sequence = self.stop_sequence.get(index).cloned().unwrap_or_default();
            message.refusal = self.refusal.get(index).cloned().unwrap_or_default();
            choices.push(Choice {
                index: *index,
                message: Some(message),
                finish_reason: finish,
            });
        }
        Some(ChatResponse {
            id: String::new(),
            model: self.model.clone(),
            choices,
            usage: self.usage,
            created: self.created,
        })
    }

    /// What the stream consumed, by one rule for every row of a stream: the provider's usage when
    /// a chunk carried it; for a stream the router cut, what its provider had reported (the
    /// prompt's counts, cache reads and writes included, are final from the start; the output's
    /// were partial) with, on the output side, the local estimate of what was streamed where it is
    /// larger; without any report, the local estimate ([`Assembler::estimate_usage`]).
    fn consumed(&self, request: &ChatRequest) -> Usage {
        if let Some(usage) = self.usage {
            return usage;
        }
        let estimate = self.estimate_usage(request);
        let reported = self
            .cut
            .as_ref()
            .and_then(|route| route.attempts.last())
            .and_then(|attempt| attempt.usage)
            .or(self.reported);
        let Some(reported) = reported else {
            return estimate;
        };
        let prompt = if reported.prompt_tokens > 0 {
            reported
        } else {
            estimate
        };
        let completion_tokens = reported.completion_tokens.max(estimate.completion_tokens);
        Usage {
            prompt_tokens: prompt.prompt_tokens,
            cached_prompt_tokens: prompt.cached_prompt_tokens,
            cache_write_tokens: prompt.cache_write_tokens,
            completion_tokens,
            reasoning_tokens: reported.reasoning_tokens.max(estimate.reasoning_tokens),
            total_tokens: prompt.prompt_tokens.saturating_add(completion_tokens),
        }
    }

    /// A local count when the provider reported no usage: about four characters per token
    /// (reasoning text and refusals are output too), of what the router sent, held back and
    /// blocked text included.
    fn estimate_usage(&self, request: &ChatRequest) -> Usage {
        let prompt_chars: usize = request.messages.iter().map(|m| m.joined_text().len()).sum();
        let thinking_chars: usize = self
            .thinking
            .values()
            .map(|block| block.text.len())
            .sum::<usize>()
            .max(self.received_thinking_bytes);
        let completion_chars: usize = (self.text.values().map(String::len).sum::<usize>()
            + self.refusal.values().map(String::len).sum::<usize>())
        .max(self.received_bytes)
            + thinking_chars;
        let prompt_tokens = prompt_chars.div_ceil(4) as u32;
        let completion_tokens = completion_chars.div_ceil(4) as u32;
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            reasoning_tokens: thinking_chars.div_ceil(4) as u32,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: vec![Message::text(Role::User, "hi")],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn admission_is_bounded_and_released() {
        let channel = || switchboard_grpc::channel("http://127.0.0.1:9").unwrap();
        let (sink, _publisher) = crate::usage::channel(switchboard_bus::NatsConfig::default(), 8);
        let downstream = Downstream {
            guard: channel(),
            cache: channel(),
            router: channel(),
        };
        let pipeline = Pipeline::new(downstream, sink, true, TaskTracker::new(), 1024, 1);
        let first = pipeline.admit().unwrap();
        assert!(matches!(
            pipeline.admit(),
            Err(GatewayError::Overloaded { limit: 1 })
        ));
        drop(first);
        assert!(pipeline.admit().is_ok());
    }

    #[test]
    fn validation_names_fields() {
        let mut r = request();
        r.model.clear();
        assert!(
            matches!(validate(&r), Err(GatewayError::InvalidRequest { field, .. }) if field == "model")
        );
        let mut r = request();
        r.messages.clear();
        assert!(
            matches!(validate(&r), Err(GatewayError::InvalidRequest { field, .. }) if field == "messages")
        );
        let mut r = request();
        r.sampling = Some(switchboard_proto::chat::v1::SamplingParams {
            temperature: Some(3.0),
            ..Default::default()
        });
        assert!(
            matches!(validate(&r), Err(GatewayError::InvalidRequest { field, .. }) if field == "temperature")
        );
        assert!(validate(&request()).is_ok());
    }

    #[test]
    fn assembler_rebuilds_a_complete_stream_and_refuses_a_truncated_one() {
        let mut a = Assembler::default();
        for (content, finish) in [("he", 0), ("llo", 0), ("", FinishReason::Stop as i32)] {
            a.add(&ChatChunk {
                model: "m".into(),
                choices: vec![ChoiceDelta {
                    index: 0,
                    content: content.into(),
                    finish_reason: finish,
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        assert!(
            a.to_response(&RouteInfo::default()).is_none(),
            "no usage yet"
        );
        a.add(&ChatChunk {
            usage: Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3,
                ..Default::default()
            }),
            ..Default::default()
        });
        let response = a.to_response(&RouteInfo::default()).unwrap();
        assert_eq!(
            response.choices[0].message.as_ref().unwrap().joined_text(),
            "hello"
        );

        let mut cut = Assembler::default();
        cut.add(&ChatChunk {
            choices: vec![ChoiceDelta {
                index: 0,
                content: "x".into(),
                finish_reason: FinishReason::Length as i32,
                ..Default::default()
            }],
            usage: Some(Usage::default()),
            ..Default::default()
        });
        assert!(cut.to_response(&RouteInfo::default()).is_none());
    }

    #[test]
    fn a_cut_stream_names_the_deployment_and_the_cut_attempt_with_its_usage() {
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
            total_tokens: 5,
            ..Default::default()
        };
        let error = GatewayError::Downstream {
            code: ErrorCode::UpstreamUnavailable,
            message: "stream interrupted after 3 chunks".into(),
            metadata: [
                ("provider", "primary"),
                ("model", "gpt"),
                ("target", "primary/gpt"),
                ("key_alias", "k1"),
                ("attempts", "2"),
                ("last_error", "STREAM_INTERRUPTED: cut"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        };
        let route = partial_route(&request(), &Assembler::default(), Some(&error), usage, None);
        assert_eq!(
            (
                route.provider.as_str(),
                route.model.as_str(),
                route.key_alias.as_str()
            ),
            ("primary", "gpt", "k1")
        );
        assert_eq!(route.attempt_count, 2);
        assert_eq!(route.attempts.len(), 1);
        assert_eq!(route.attempts[0].usage, Some(usage));
        assert_eq!(route.attempts[0].error_code, "STREAM_INTERRUPTED");
        // A client that went away: nothing known about the deployment.
        let route = partial_route(&request(), &Assembler::default(), None, usage, None);
        assert!(route.provider.is_empty() && route.attempts.is_empty());
    }

    #[test]
    fn a_cut_stream_counts_the_prompt_its_provider_reported_and_the_larger_output_count() {
        let streamed = |text: &str| {
            let mut assembled = Assembler::default();
            assembled.add(&ChatChunk {
                choices: vec![ChoiceDelta {
                    content: text.into(),
                    ..Default::default()
                }],
                ..Default::default()
            });
            assembled
        };
        let cut_with = |assembled: &mut Assembler, usage: Usage| {
            assembled.cut = Some(RouteInfo {
                attempts: vec![switchboard_proto::chat::v1::Attempt {
                    error_code: "STREAM_INTERRUPTED".into(),
                    usage: Some(usage),
                    ..Default::default()
                }],
                ..Default::default()
            });
        };
        // 40 characters streamed: 10 tokens locally. Gemini said 900 prompt tokens (600 of them
        // cached) and 25 output tokens (5 of them reasoning) so far: its counts win.
        let mut assembled = streamed(&"x".repeat(40));
        cut_with(
            &mut assembled,
            Usage {
                prompt_tokens: 900,
                cached_prompt_tokens: 600,
                completion_tokens: 25,
                reasoning_tokens: 5,
                total_tokens: 925,
                ..Default::default()
            },
        );
        let usage = assembled.consumed(&request());
        assert_eq!(
            (usage.prompt_tokens, usage.cached_prompt_tokens),
            (900, 600)
        );
        assert_eq!((usage.completion_tokens, usage.reasoning_tokens), (25, 5));
        assert_eq!(usage.total_tokens, 925);
        // A report without the prompt: the prompt's estimate, the larger output count.
        let mut assembled = streamed(&"x".repeat(40));
        cut_with(
            &mut assembled,
            Usage {
                completion_tokens: 4,
                total_tokens: 4,
                ..Default::default()
            },
        );
        let estimate = assembled.estimate_usage(&request());
        assert_eq!(assembled.consumed(&request()), estimate);
        // The provider's final usage, when a chunk carried it, stands as it is.
        let mut assembled = streamed("ab");
        let last = Usage {
            prompt_tokens: 7,
            completion_tokens: 1,
            total_tokens: 8,
            ..Default::default()
        };
        assembled.usage = Some(last);
        cut_with(&mut assembled, Usage::default());
        assert_eq!(assembled.consumed(&request()), last);
        // A route info for the row: the router's attempts, the cut one with what was consumed.
        let route = partial_route(&request(), &assembled, None, last, None);
        assert_eq!(route.attempts.len(), 1);
        assert_eq!(route.attempts[0].usage, Some(last));
    }

    #[test]
    fn replay_has_the_shape_of_a_stream() {
        let response = ChatResponse {
            model: "m".into(),
            choices: vec![Choice {
                index: 0,
                message: Some(Message::text(Role::Assistant, "cached")),
                finish_reason: FinishReason::Stop as i32,
            }],
            ..Default::default()
        };
        let chunks = replay_chunks(&response, "id");
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0].choices[0].role, Role::Assistant as i32);
        assert!(chunks[0].choices[0].content.is_empty());
        assert_eq!(chunks[1].choices[0].content, "cached");
        assert_eq!(chunks[1].choices[0].role, Role::Unspecified as i32);
        assert_eq!(
            chunks[2].choices[0].finish_reason,
            FinishReason::Stop as i32
        );
        assert!(chunks.iter().all(|c| c.id == "id" && c.model == "m"));
    }

    #[test]
    fn reasoning_and_the_stop_sequence_survive_caching_and_replay() {
        let delta = |thinking: Vec<ThinkingDelta>, content: &str| ChatChunk {
            model: "m".into(),
            choices: vec![ChoiceDelta {
                index: 0,
                content: content.into(),
                thinking,
                ..Default::default()
            }],
            ..Default::default()
        };
        let think = |index: u32, text: &str, signature: &str, redacted: &str| ThinkingDelta {
            index,
            text: text.into(),
            signature: signature.into(),
            redacted_data: redacted.into(),
        };
        let mut live = Assembler::default();
        live.add(&delta(vec![think(0, "first ", "", "")], ""));
        live.add(&delta(vec![think(0, "thought", "", "")], ""));
        live.add(&delta(vec![think(0, "", "sig-0", "")], ""));
        live.add(&delta(vec![think(1, "", "", "opaque")], ""));
        live.add(&delta(vec![], "the answer"));
        live.add(&ChatChunk {
            choices: vec![ChoiceDelta {
                index: 0,
                finish_reason: FinishReason::Stop as i32,
                stop_sequence: "END".into(),
                ..Default::default()
            }],
            usage: Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 9,
                total_tokens: 10,
                reasoning_tokens: 5,
                ..Default::default()
            }),
            ..Default::default()
        });
        let cached = live.to_response(&RouteInfo::default()).unwrap();
        let message = cached.choices[0].message.as_ref().unwrap();
        assert_eq!(
            message.thinking,
            vec![
                ThinkingBlock {
                    text: "first thought".into(),
                    signature: "sig-0".into(),
                    redacted_data: String::new(),
                },
                ThinkingBlock {
                    redacted_data: "opaque".into(),
                    ..Default::default()
                },
            ]
        );
        assert_eq!(message.stop_sequence, "END");
        assert_eq!(message.joined_text(), "the answer");

        // The replay streams the same blocks, text and stop sequence back.
        let chunks = replay_chunks(&cached, "id");
        let first_content = chunks
            .iter()
            .position(|c| !c.choices[0].content.is_empty())
            .unwrap();
        assert!(
            chunks[..first_content]
                .iter()
                .skip(1)
                .all(|c| !c.choices[0].thinking.is_empty()),
            "reasoning precedes the content"
        );
        let mut replayed = Assembler::default();
        for chunk in &chunks {
            replayed.add(chunk);
        }
        replayed.add(&ChatChunk {
            usage: cached.usage,
            ..Default::default()
        });
        assert_eq!(replayed.to_response(&RouteInfo::default()), Some(cached));

        // A cut stream's local count includes the reasoning it consumed.
        let mut cut = Assembler::default();
        cut.add(&delta(vec![think(0, &"x".repeat(40), "", "")], "abcd"));
        let usage = cut.estimate_usage(&request());
        assert_eq!((usage.completion_tokens, usage.reasoning_tokens), (11, 10));
    }

    /// Stand-ins for the guard, the cache and the router, served over real gRPC on loopback, and a
    /// pipeline over them.
    mod stubs {
        use std::sync::Mutex;

        use switchboard_proto::chat::v1::Attempt;

        use switchboard_proto::{
            cache::v1::{
                LookupResponse, PurgeRequest, PurgeResponse, StoreResponse,
                cache_service_server::{CacheService, CacheServiceServer},
            },
            guard::v1::{
                CheckAnswerResponse,
                guard_service_server::{GuardService, GuardServiceServer},
            },
            router::v1::{
                EmbedRequest, EmbedResponse, ListModelsRequest, ListModelsResponse, RouteResponse,
                RouteStreamResponse,
                router_service_server::{RouterService, RouterServiceServer},
            },
        };
        use tonic::{Request, Response, Status};

        use super::*;

        /// What the guard does.
        #[derive(Clone, Copy)]
        pub struct GuardBehaviour {
            /// CheckPrompt answers (allow) instead of failing as unreachable.
            pub prompt_up: bool,
            /// The policy acts on answers (`check_answer`).
            pub check_answer: bool,
            /// CheckAnswer answers (allow) instead of failing as unreachable.
            pub answer_up: bool,
        }

        impl GuardBehaviour {
            pub const HEALTHY: GuardBehaviour = GuardBehaviour {
                prompt_up: true,
                check_answer: true,
                answer_up: true,
            };
        }

        struct Guard(GuardBehaviour);

        #[tonic::async_trait]
        impl GuardService for Guard {
            async fn check_prompt(
                &self,
                _request: Request<CheckPromptRequest>,
            ) -> Result<Response<CheckPromptResponse>, Status> {
                if !self.0.prompt_up {
                    return Err(Status::unavailable("guard down"));
                }
                Ok(Response::new(CheckPromptResponse {
                    decision: Decision::Allow as i32,
                    check_answer: self.0.check_answer,
                    ..Default::default()
                }))
            }

            async fn check_answer(
                &self,
                _request: Request<CheckAnswerRequest>,
            ) -> Result<Response<CheckAnswerResponse>, Status> {
                if !self.0.answer_up {
                    return Err(Status::unavailable("guard down"));
                }
                Ok(Response::new(CheckAnswerResponse {
                    decision: Decision::Allow as i32,
                    ..Default::default()
                }))
            }
        }

        /// A cache that never hits and records what it is asked.
        #[derive(Clone, Default)]
        pub struct Cache {
            pub lookups: Arc<Mutex<Vec<LookupRequest>>>,
            pub stores: Arc<Mutex<Vec<StoreRequest>>>,
        }

        #[tonic::async_trait]
        impl CacheService for Cache {
            async fn lookup(
                &self,
                request: Request<LookupRequest>,
            ) -> Result<Response<LookupResponse>, Status> {
                self.lookups.lock().unwrap().push(request.into_inner());
                Ok(Response::new(LookupResponse::default()))
            }

            async fn store(
                &self,
                request: Request<StoreRequest>,
            ) -> Result<Response<StoreResponse>, Status> {
                self.stores.lock().unwrap().push(request.into_inner());
                Ok(Response::new(StoreResponse {
                    stored: true,
                    reason: String::new(),
                }))
            }

            async fn purge(
                &self,
                _request: Request<PurgeRequest>,
            ) -> Result<Response<PurgeResponse>, Status> {
                Err(Status::unimplemented("purge"))
            }
        }

        /// A router whose provider answers "Hello there." (complete, with usage).
        struct Router;

        const ANSWER: &str = "Hello there.";

        fn usage() -> Usage {
            Usage {
                prompt_tokens: 3,
                completion_tokens: 3,
                total_tokens: 6,
                ..Default::default()
            }
        }

        fn route_info() -> RouteInfo {
            RouteInfo {
                route: "m".into(),
                provider: "p".into(),
                model: "pm".into(),
                attempt_count: 1,
                ..Default::default()
            }
        }

        /// What the provider reported before the stream of route `cut` broke (Anthropic's
        /// `message_start` of a prompt that wrote 50,000 tokens to the cache).
        pub const CUT_REPORTED: Usage = Usage {
            prompt_tokens: 50_012,
            completion_tokens: 1,
            total_tokens: 50_013,
            cached_prompt_tokens: 0,
            reasoning_tokens: 0,
            cache_write_tokens: 50_000,
        };

        /// What an earlier attempt of route `cut` consumed before it failed (before its first
        /// chunk, after its provider reported its prompt).
        pub const EARLIER_REPORTED: Usage = Usage {
            prompt_tokens: 40,
            completion_tokens: 0,
            total_tokens: 40,
            cached_prompt_tokens: 0,
            reasoning_tokens: 0,
            cache_write_tokens: 0,
        };

        /// Route `route`'s account of two attempts on model `pm`: one on provider `earlier` that
        /// failed (`OVERLOADED`) after its provider reported [`EARLIER_REPORTED`], then one on
        /// `last` (its error code `code`) whose provider reported [`CUT_REPORTED`].
        fn two_attempts(route: &str, earlier: &str, (last, code): (&str, &str)) -> RouteInfo {
            let attempt = |provider: &str, code: &str, usage: Usage| Attempt {
                target: format!("{provider}/pm"),
                provider: provider.into(),
                model: "pm".into(),
                error_code: code.into(),
                usage: Some(usage),
                ..Default::default()
            };
            RouteInfo {
                route: route.into(),
                provider: last.into(),
                model: "pm".into(),
                target: format!("{last}/pm"),
                attempt_count: 2,
                attempts: vec![
                    attempt(earlier, "OVERLOADED", EARLIER_REPORTED),
                    attempt(last, code, CUT_REPORTED),
                ],
                ..Default::default()
            }
        }

        /// How the router ends a stream cut after its first chunks: its account of the attempts
        /// (the cut one last, with what its provider reported), then the error status.
        fn cut_stream() -> Vec<Result<RouteStreamResponse, Status>> {
            let info = two_attempts("cut", "p", ("q", "STREAM_INTERRUPTED"));
            let metadata = [
                ("route", "cut"),
                ("chunks", "2"),
                ("target", "q/pm"),
                ("provider", "q"),
                ("model", "pm"),
                ("attempts", "2"),
                (
                    "last_error",
                    "STREAM_INTERRUPTED: stream ended without message_stop",
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            vec![
                Ok(RouteStreamResponse {
                    event: Some(route_stream_response::Event::Interrupted(info)),
                }),
                Err(switchboard_status::status(
                    ErrorCode::UpstreamUnavailable,
                    "router",
                    "stream interrupted after 2 chunks",
                    metadata,
                )),
            ]
        }

        /// How the router refuses a request no attempt served after both attempts' providers
        /// reported usage (route `unserved`): its status carries their account.
        fn unserved() -> Status {
            let mut status = switchboard_status::status(
                ErrorCode::UpstreamUnavailable,
                "router",
                "all 2 attempts for route `unserved` failed",
                [("route", "unserved"), ("attempts", "2")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            );
            let consumed = two_attempts("unserved", "o", ("p", "OVERLOADED"));
            status.metadata_mut().insert_bin(
                switchboard_status::serving::CONSUMED,
                tonic::metadata::MetadataValue::from_bytes(&prost::Message::encode_to_vec(
                    &consumed,
                )),
            );
            status
        }

        /// Calls of route `hang` the router received (and never answers).
        pub static HUNG: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

        /// Calls of route `held` the router received (answered once [`RELEASE`] lets one go).
        pub static HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        /// Lets one held call of route `held` answer.
        pub static RELEASE: std::sync::LazyLock<tokio::sync::Notify> =
            std::sync::LazyLock::new(tokio::sync::Notify::new);

        async fn hang_if_asked(request: Option<&ChatRequest>) {
            if request.is_some_and(|r| r.model == "hang") {
                HUNG.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            if request.is_some_and(|r| r.model == "held") {
                HELD.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                RELEASE.notified().await;
            }
        }

        #[tonic::async_trait]
        impl RouterService for Router {
            async fn route(
                &self,
                request: Request<RouteRequest>,
            ) -> Result<Response<RouteResponse>, Status> {
                hang_if_asked(request.get_ref().request.as_ref()).await;
                if request.get_ref().request.as_ref().map(|r| r.model.as_str()) == Some("unserved")
                {
                    return Err(unserved());
                }
                Ok(Response::new(RouteResponse {
                    response: Some(ChatResponse {
                        model: "pm".into(),
                        choices: vec![Choice {
                            index: 0,
                            message: Some(Message::text(Role::Assistant, ANSWER)),
                            finish_reason: FinishReason::Stop as i32,
                        }],
                        usage: Some(usage()),
                        ..Default::default()
                    }),
                    route: Some(route_info()),
                }))
            }

            type RouteStreamStream = std::pin::Pin<
                Box<dyn futures::Stream<Item = Result<RouteStreamResponse, Status>> + Send>,
            >;

            async fn route_stream(
                &self,
                request: Request<RouteStreamRequest>,
            ) -> Result<Response<Self::RouteStreamStream>, Status> {
                hang_if_asked(request.get_ref().request.as_ref()).await;
                let chunk = |content: &str, finish: FinishReason, usage: Option<Usage>| {
                    Ok(RouteStreamResponse {
                        event: Some(route_stream_response::Event::Chunk(ChatChunk {
                            model: "pm".into(),
                            choices: vec![ChoiceDelta {
                                index: 0,
                                content: content.into(),
                                finish_reason: finish as i32,
                                ..Default::default()
                            }],
                            usage,
                            ..Default::default()
                        })),
                    })
                };
                let model = request.get_ref().request.as_ref().map(|r| r.model.clone());
                if model.as_deref() == Some("unserved") {
                    return Err(unserved());
                }
                // Route `stall-reported`: as `stall`, its head carrying what the providers
                // reported by the first chunk (an earlier attempt's prompt, the serving one's).
                let reports = model.as_deref() == Some("stall-reported");
                let stalls = model.as_deref() == Some("stall") || reports;
                // Route `cut`: two chunks, then the provider's stream breaks (see `cut_stream`).
                if model.as_deref() == Some("cut") {
                    let events = vec![
                        chunk("Hello ", FinishReason::Unspecified, None),
                        chunk("there.", FinishReason::Unspecified, None),
                    ];
                    let events: Self::RouteStreamStream = Box::pin(futures::stream::iter(
                        events.into_iter().chain(cut_stream()),
                    ));
                    return Ok(Response::new(events));
                }
                let events = vec![
                    chunk("Hello ", FinishReason::Unspecified, None),
                    chunk("there.", FinishReason::Unspecified, None),
                    chunk("", FinishReason::Stop, Some(usage())),
                    Ok(RouteStreamResponse {
                        event: Some(route_stream_response::Event::Route(route_info())),
                    }),
                ];
                // Route `stall`: two chunks, then nothing more (the caller will leave).
                let events: Self::RouteStreamStream = if stalls {
                    Box::pin(futures::StreamExt::chain(
                        futures::stream::iter(events.into_iter().take(2)),
                        futures::stream::pending(),
                    ))
                } else {
                    Box::pin(futures::stream::iter(events))
                };
                // Like the router: the head names the deployment the stream committed to.
                let mut response = Response::new(events);
                let metadata = response.metadata_mut();
                metadata.insert(switchboard_status::serving::PROVIDER, "p".parse().unwrap());
                metadata.insert(switchboard_status::serving::MODEL, "pm".parse().unwrap());
                metadata.insert(switchboard_status::serving::TARGET, "p/pm".parse().unwrap());
                metadata.insert(switchboard_status::serving::ATTEMPTS, "2".parse().unwrap());
                if reports {
                    let consumed = two_attempts("stall-reported", "o", ("p", ""));
                    metadata.insert_bin(
                        switchboard_status::serving::CONSUMED,
                        tonic::metadata::MetadataValue::from_bytes(&prost::Message::encode_to_vec(
                            &consumed,
                        )),
                    );
                }
                Ok(response)
            }

            async fn list_models(
                &self,
                _request: Request<ListModelsRequest>,
            ) -> Result<Response<ListModelsResponse>, Status> {
                Err(Status::unimplemented("list_models"))
            }

            async fn embed(
                &self,
                request: Request<EmbedRequest>,
            ) -> Result<Response<EmbedResponse>, Status> {
                // Route `held`: answered once `RELEASE` lets it go.
                if request.get_ref().model != "held" {
                    return Err(Status::unimplemented("embed"));
                }
                HELD.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                RELEASE.notified().await;
                Ok(Response::new(EmbedResponse {
                    model: "pm".into(),
                    usage: Some(Usage {
                        prompt_tokens: 5,
                        total_tokens: 5,
                        ..Default::default()
                    }),
                    route: Some(route_info()),
                    ..Default::default()
                }))
            }
        }

        /// A pipeline whose route `m` fails open, over stand-ins; the cache records its calls and
        /// the publisher holds the usage events.
        pub struct Harness {
            pub pipeline: Pipeline,
            pub cache: Cache,
            pub usage: crate::usage::UsagePublisher,
            tasks: TaskTracker,
            stop: tokio_util::sync::CancellationToken,
        }

        impl Harness {
            pub async fn start(guard: GuardBehaviour) -> Harness {
                let cache = Cache::default();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let url = format!("http://{}", listener.local_addr().unwrap());
                let stop = tokio_util::sync::CancellationToken::new();
                let until = stop.clone();
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(GuardServiceServer::new(Guard(guard)))
                        .add_service(CacheServiceServer::new(cache.clone()))
                        .add_service(RouterServiceServer::new(Router))
                        .serve_with_incoming_shutdown(
                            tokio_stream::wrappers::TcpListenerStream::new(listener),
                            async move { until.cancelled().await },
                        ),
                );
                let channel = || switchboard_grpc::channel(&url).unwrap();
                let (sink, usage) =
                    crate::usage::channel(switchboard_bus::NatsConfig::default(), 64);
                let tasks = TaskTracker::new();
                let downstream = Downstream {
                    guard: channel(),
                    cache: channel(),
                    router: channel(),
                };
                let pipeline = Pipeline::new(downstream, sink, true, tasks.clone(), 1 << 20, 16)
                    .with_guard_failure(GuardFailure::new(&crate::answer::GuardConfig {
                        fail_open_routes: vec!["m".into()],
                        ..Default::default()
                    }));
                Harness {
                    pipeline,
                    cache,
                    usage,
                    tasks,
                    stop,
                }
            }

            /// Waits for the pipeline's background work (streams, cache stores) to end.
            pub async fn settle(&self) {
                self.tasks.close();
                self.tasks.wait().await;
                self.tasks.reopen();
            }

            pub fn stores(&self) -> usize {
                self.cache.stores.lock().unwrap().len()
            }

            /// Every usage event recorded so far.
            pub fn usage_events(&mut self) -> Vec<UsageEvent> {
                std::iter::from_fn(|| self.usage.try_next()).collect()
            }
        }

        impl Drop for Harness {
            fn drop(&mut self) {
                self.stop.cancel();
            }
        }

        pub fn principal(team: &str) -> Principal {
            Principal {
                key_id: "k".into(),
                app: "app".into(),
                team: team.into(),
                models: Default::default(),
                tags: Arc::from(Vec::new()),
            }
        }

        /// Drives a stream to its end; the text delivered to the caller.
        pub async fn drain(mut handle: StreamHandle) -> String {
            let mut text = String::new();
            while let Some(event) = handle.events.recv().await {
                match event {
                    StreamEvent::Chunk(chunk) => {
                        for delta in &chunk.choices {
                            text.push_str(&delta.content);
                        }
                    }
                    StreamEvent::Done { .. } => {}
                    StreamEvent::Failed(error) => panic!("stream failed: {error}"),
                }
            }
            text
        }
    }

    fn unchecked_tagged(event: &UsageEvent) -> bool {
        event.tags.get(UNCHECKED_TAG.0).map(String::as_str) == Some(UNCHECKED_TAG.1)
    }

    #[tokio::test]
    async fn a_stream_the_guard_did_not_check_is_not_cached() {
        use stubs::*;
        // Control: the guard up, the streamed answer is stored.
        let mut checked = Harness::start(GuardBehaviour::HEALTHY).await;
        let ctx = RequestContext::new(principal("t"));
        let handle = checked
            .pipeline
            .stream(&ctx, request(), CacheControl::default())
            .await
            .unwrap();
        assert_eq!(drain(handle).await, "Hello there.");
        checked.settle().await;
        assert_eq!(checked.stores(), 1, "a checked stream is cached");
        assert!(!checked.usage_events().iter().any(unchecked_tagged));

        // The guard down on a fail-open route: served, tagged, never stored.
        let down = GuardBehaviour {
            prompt_up: false,
            ..GuardBehaviour::HEALTHY
        };
        let mut unchecked = Harness::start(down).await;
        let ctx = RequestContext::new(principal("t"));
        let handle = unchecked
            .pipeline
            .stream(&ctx, request(), CacheControl::default())
            .await
            .unwrap();
        assert_eq!(drain(handle).await, "Hello there.");
        unchecked.settle().await;
        assert_eq!(unchecked.stores(), 0, "an unchecked stream was cached");
        let events = unchecked.usage_events();
        assert_eq!(events.len(), 1);
        assert!(unchecked_tagged(&events[0]));
    }

    /// The row of a stream of route `model` (a stand-in that sends two chunks, then nothing)
    /// whose caller goes away after its first chunk, before the router's final route info; no
    /// answer check, so every chunk goes out as it comes.
    async fn left_after_its_first_chunk(model: &str) -> UsageEvent {
        use stubs::*;
        let mut harness = Harness::start(GuardBehaviour {
            check_answer: false,
            ..GuardBehaviour::HEALTHY
        })
        .await;
        let ctx = RequestContext::new(principal("t"));
        let mut stalling = request();
        stalling.model = model.into();
        let mut handle = harness
            .pipeline
            .stream(&ctx, stalling, CacheControl::default())
            .await
            .unwrap();
        assert!(matches!(
            handle.events.recv().await,
            Some(StreamEvent::Chunk(_))
        ));
        drop(handle);
        harness.settle().await;
        the_abandoned_row(&mut harness, &ctx.request_id)
    }

    #[tokio::test]
    async fn a_stream_its_caller_leaves_is_recorded_against_the_deployment_the_router_named() {
        let event = left_after_its_first_chunk("stall").await;
        let route = event.route.as_ref().unwrap();
        // Priced like any served row: provider, model and the attempt's usage.
        assert_eq!(
            (
                route.provider.as_str(),
                route.model.as_str(),
                route.target.as_str()
            ),
            ("p", "pm", "p/pm")
        );
        assert_eq!(route.attempt_count, 2);
        assert_eq!(route.attempts.len(), 1);
        let attempt = &route.attempts[0];
        assert_eq!(
            (attempt.provider.as_str(), attempt.model.as_str()),
            ("p", "pm")
        );
        assert_eq!(attempt.error_code, "CLIENT_DISCONNECTED");
        assert_eq!(attempt.usage, event.usage);
        assert!(
            attempt.usage.unwrap().completion_tokens > 0,
            "what was streamed"
        );
    }

    /// A caller that leaves mid-stream does not lose what the providers reported before the
    /// first chunk (the router's response head): the serving attempt's prompt counts (a 50,000-
    /// token cache write, not the prompt text's estimate) and an earlier attempt's.
    #[tokio::test]
    async fn a_stream_its_caller_leaves_is_billed_what_the_providers_reported_by_its_first_chunk() {
        use stubs::*;
        let event = left_after_its_first_chunk("stall-reported").await;
        let usage = event.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.cache_write_tokens,
                usage.cached_prompt_tokens
            ),
            (50_012, 50_000, 0),
            "the prompt as its provider reported it"
        );
        // The output: what was streamed ("Hello " or "Hello there.", as far as the gateway read
        // before the caller left: 2 or 3 tokens locally) over the provider's 1 so far.
        assert!((2..=3).contains(&usage.completion_tokens), "{usage:?}");
        let route = event.route.as_ref().unwrap();
        assert_eq!(route.target, "p/pm");
        assert_eq!(route.attempt_count, 2);
        let attempts: Vec<_> = route
            .attempts
            .iter()
            .map(|a| (a.target.as_str(), a.error_code.as_str(), a.usage))
            .collect();
        assert_eq!(
            attempts,
            vec![
                ("o/pm", "OVERLOADED", Some(EARLIER_REPORTED)),
                ("p/pm", "CLIENT_DISCONNECTED", Some(usage)),
            ]
        );
    }

    /// A request no attempt served, whose attempts' providers reported what they consumed (an
    /// Anthropic stream's `message_start` before an overloaded error), is billed that: its row
    /// lists every attempt with its usage, the last one's deployment named, unary or streamed.
    #[tokio::test]
    async fn a_request_no_attempt_served_is_billed_what_its_attempts_reported() {
        use stubs::*;
        let mut harness = Harness::start(GuardBehaviour::HEALTHY).await;
        let mut unserved = request();
        unserved.model = "unserved".into();
        let ctx = RequestContext::new(principal("t"));
        let error = harness
            .pipeline
            .complete(&ctx, unserved.clone(), CacheControl::default())
            .await
            .expect_err("no attempt served");
        assert_eq!(
            switchboard_status::ServiceError::code(&error),
            ErrorCode::UpstreamUnavailable
        );
        let ctx = RequestContext::new(principal("t"));
        let Err(error) = harness
            .pipeline
            .stream(&ctx, unserved, CacheControl::default())
            .await
        else {
            panic!("no attempt served the stream");
        };
        assert_eq!(
            switchboard_status::ServiceError::code(&error),
            ErrorCode::UpstreamUnavailable
        );
        harness.settle().await;
        let events = harness.usage_events();
        assert_eq!(events.len(), 2);
        for (event, streamed) in events.iter().zip([false, true]) {
            assert_eq!(event.streamed, streamed);
            assert_eq!(event.status, RequestStatus::Error as i32);
            assert_eq!(event.error_code, "UPSTREAM_UNAVAILABLE");
            assert_eq!(event.usage, Some(CUT_REPORTED), "the last attempt's report");
            let route = event.route.as_ref().unwrap();
            assert_eq!(
                (
                    route.route.as_str(),
                    route.provider.as_str(),
                    route.model.as_str(),
                    route.attempt_count
                ),
                ("unserved", "p", "pm", 2)
            );
            let attempts: Vec<_> = route
                .attempts
                .iter()
                .map(|a| (a.target.as_str(), a.usage))
                .collect();
            assert_eq!(
                attempts,
                vec![
                    ("o/pm", Some(EARLIER_REPORTED)),
                    ("p/pm", Some(CUT_REPORTED))
                ]
            );
        }
    }

    #[tokio::test]
    async fn a_stream_cut_upstream_is_billed_the_prompt_its_provider_reported() {
        use stubs::*;
        let mut harness = Harness::start(GuardBehaviour {
            check_answer: false,
            ..GuardBehaviour::HEALTHY
        })
        .await;
        let ctx = RequestContext::new(principal("t"));
        let mut cut = request();
        cut.model = "cut".into();
        let mut handle = harness
            .pipeline
            .stream(&ctx, cut.clone(), CacheControl::default())
            .await
            .unwrap();
        let mut failed = None;
        while let Some(event) = handle.events.recv().await {
            if let StreamEvent::Failed(error) = event {
                failed = Some(error);
            }
        }
        assert!(failed.is_some(), "the cut reaches the caller as an error");
        harness.settle().await;
        let events = harness.usage_events();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(event.status, RequestStatus::Partial as i32);
        assert_eq!(event.error_code, "UPSTREAM_UNAVAILABLE");
        // The prompt side as the provider reported it (its cache write included), not the
        // prompt's text estimate; the output side as streamed ("Hello there.": 3 tokens locally,
        // more than the provider's 1 so far).
        let usage = event.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.cache_write_tokens,
                usage.cached_prompt_tokens
            ),
            (50_012, 50_000, 0)
        );
        let streamed = {
            let mut assembled = Assembler::default();
            for text in ["Hello ", "there."] {
                let chunk = ChatChunk {
                    choices: vec![ChoiceDelta {
                        content: text.into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                assembled.received(&chunk);
                assembled.add(&chunk);
            }
            assembled.estimate_usage(&cut)
        };
        assert_eq!(usage.completion_tokens, streamed.completion_tokens);
        assert!(usage.completion_tokens > CUT_REPORTED.completion_tokens);
        assert_eq!(
            usage.total_tokens,
            usage.prompt_tokens + usage.completion_tokens
        );
        // Every attempt the router listed: the earlier one with what it consumed, the cut one
        // (against the deployment that was streaming) with the row's usage.
        let route = event.route.as_ref().unwrap();
        assert_eq!(
            (route.provider.as_str(), route.target.as_str()),
            ("q", "q/pm")
        );
        assert_eq!(route.attempt_count, 2);
        assert_eq!(route.attempts.len(), 2);
        assert_eq!(route.attempts[0].usage, Some(EARLIER_REPORTED));
        let attempt = &route.attempts[1];
        assert_eq!(attempt.error_code, "STREAM_INTERRUPTED");
        assert_eq!(attempt.usage, event.usage);
    }

    /// A pipeline call of the abandonment tests.
    enum Call {
        Stream(ChatRequest),
        Complete(ChatRequest),
        /// An embedding of route `held`.
        Embed,
    }

    /// Starts `call` as a new request and, once the router has it (its stand-in counted it in
    /// `routed`), abandons it as a caller that goes away would; returns its request id.
    async fn abandon_while_routed(
        pipeline: &Pipeline,
        call: Call,
        routed: &std::sync::atomic::AtomicUsize,
    ) -> String {
        use std::sync::atomic::Ordering;
        let ctx = RequestContext::new(stubs::principal("t"));
        let request_id = ctx.request_id.clone();
        let pipeline = pipeline.clone();
        let before = routed.load(Ordering::SeqCst);
        let caller = tokio::spawn(async move {
            match call {
                Call::Stream(request) => {
                    let _ = pipeline
                        .stream(&ctx, request, CacheControl::default())
                        .await;
                }
                Call::Complete(request) => {
                    let _ = pipeline
                        .complete(&ctx, request, CacheControl::default())
                        .await;
                }
                Call::Embed => {
                    let input = crate::embeddings::EmbedInput {
                        model: "held".into(),
                        inputs: vec!["hello".into()],
                        dimensions: None,
                        user: String::new(),
                        tags: HashMap::new(),
                    };
                    let _ = pipeline.embed(&ctx, input).await;
                }
            }
        });
        while routed.load(Ordering::SeqCst) == before {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        request_id
    }

    /// The one usage event recorded so far, which must be request `request_id`'s, abandoned by its
    /// caller (`PARTIAL`, `CLIENT_DISCONNECTED`).
    fn the_abandoned_row(harness: &mut stubs::Harness, request_id: &str) -> UsageEvent {
        let mut events = harness.usage_events();
        assert_eq!(events.len(), 1, "one row for the abandoned request");
        let event = events.remove(0);
        assert_eq!(event.request_id, request_id);
        assert_eq!(event.status, RequestStatus::Partial as i32);
        assert_eq!(event.error_code, "CLIENT_DISCONNECTED");
        event
    }

    fn model(name: &str) -> ChatRequest {
        ChatRequest {
            model: name.into(),
            ..request()
        }
    }

    /// A stream whose caller goes away before its first chunk is opened to that chunk, whose
    /// head names who serves: its row is priced against that deployment, and the router's call is
    /// then cancelled.
    #[tokio::test]
    async fn a_stream_its_caller_abandons_before_its_first_chunk_is_recorded_against_who_served() {
        use stubs::*;
        let mut harness = Harness::start(GuardBehaviour::HEALTHY).await;
        let id = abandon_while_routed(&harness.pipeline, Call::Stream(model("held")), &HELD).await;
        // The caller went away while the router had the call; then the stream starts.
        RELEASE.notify_one();
        harness.settle().await;
        let event = the_abandoned_row(&mut harness, &id);
        assert!(event.streamed);
        let route = event.route.as_ref().unwrap();
        assert_eq!(
            (
                route.provider.as_str(),
                route.model.as_str(),
                route.target.as_str()
            ),
            ("p", "pm", "p/pm"),
            "priced against the deployment the head named"
        );
        let usage = event.usage.unwrap();
        assert!(
            usage.prompt_tokens > 0 && usage.completion_tokens > 0,
            "{usage:?}"
        );
        // A request that ends by itself leaves exactly its own row, none from the guard.
        let ctx = RequestContext::new(principal("t"));
        harness
            .pipeline
            .complete(&ctx, request(), CacheControl::default())
            .await
            .unwrap();
        let events = harness.usage_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].status, RequestStatus::Ok as i32);
    }

    /// A unary request is not cancelled with its caller: the provider's answer (paid for whether
    /// or not anyone reads it) comes back and its row is exact: the target that served, the
    /// provider's usage, priced like any other; `PARTIAL` / `CLIENT_DISCONNECTED` says it was
    /// never delivered. An embedding request too (it left no row at all).
    #[tokio::test]
    async fn a_unary_request_its_caller_abandons_is_recorded_with_the_answers_real_usage() {
        use stubs::*;
        let mut harness = Harness::start(GuardBehaviour::HEALTHY).await;
        for (call, usage) in [
            // The stand-in provider's usage: 3 + 3 for chat, 5 for an embedding.
            (Call::Complete(model("held")), (3, 3)),
            (Call::Embed, (5, 0)),
        ] {
            let id = abandon_while_routed(&harness.pipeline, call, &HELD).await;
            // The caller went away while the router had the call; then the provider answers.
            RELEASE.notify_one();
            harness.settle().await;
            let event = the_abandoned_row(&mut harness, &id);
            assert!(!event.streamed);
            assert_eq!(
                event.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
                Some(usage),
                "the provider's usage, not an estimate"
            );
            let route = event.route.as_ref().unwrap();
            assert_eq!(
                (route.provider.as_str(), route.model.as_str()),
                ("p", "pm"),
                "priced against the target that served"
            );
        }
    }

    /// With `abandoned_requests = "cancel"` a request is dropped with its caller (the router's
    /// call cancelled, so a self-hosted provider stops): its row is the prompt's estimate, no
    /// provider, as before requests ran to their end; embeddings and streams too.
    #[tokio::test]
    async fn with_abandoned_requests_cancel_a_unary_request_stops_with_its_caller() {
        use stubs::*;
        let mut harness = Harness::start(GuardBehaviour::HEALTHY).await;
        harness.pipeline = harness
            .pipeline
            .clone()
            .with_abandoned(crate::config::AbandonedRequests::Cancel);
        for (call, routed, streamed) in [
            (Call::Complete(model("hang")), &HUNG, false),
            (Call::Embed, &HELD, false),
            (Call::Stream(model("hang")), &HUNG, true),
        ] {
            let id = abandon_while_routed(&harness.pipeline, call, routed).await;
            // Nothing runs on: the row is there at once.
            let event = the_abandoned_row(&mut harness, &id);
            assert_eq!(event.streamed, streamed);
            assert!(
                event.usage.unwrap().prompt_tokens > 0,
                "the prompt's estimate"
            );
            assert_eq!(
                event.route.as_ref().map(|r| r.provider.as_str()),
                Some(""),
                "no provider: the router never said"
            );
        }
        harness.settle().await;
        assert!(harness.usage_events().is_empty(), "nothing finished later");
    }

    #[tokio::test]
    async fn an_answer_whose_check_failed_on_a_fail_open_route_is_served_tagged_and_not_cached() {
        use stubs::*;
        // CheckPrompt answers (and asks for the answer check); CheckAnswer is unreachable.
        let answer_down = GuardBehaviour {
            answer_up: false,
            ..GuardBehaviour::HEALTHY
        };
        let mut harness = Harness::start(answer_down).await;
        let ctx = RequestContext::new(principal("t"));
        let completed = harness
            .pipeline
            .complete(&ctx, request(), CacheControl::default())
            .await
            .unwrap();
        assert_eq!(
            completed.response.choices[0]
                .message
                .as_ref()
                .unwrap()
                .joined_text(),
            "Hello there.",
            "fail-open: the answer is delivered"
        );
        assert!(ctx.guard_verdict().unchecked);
        let ctx = RequestContext::new(principal("t"));
        let handle = harness
            .pipeline
            .stream(&ctx, request(), CacheControl::default())
            .await
            .unwrap();
        assert_eq!(drain(handle).await, "Hello there.");
        harness.settle().await;
        assert_eq!(harness.stores(), 0, "an unchecked answer was cached");
        let events = harness.usage_events();
        assert_eq!(events.len(), 2);
        assert!(
            events.iter().all(unchecked_tagged),
            "the usage events say the answers went unchecked"
        );

        // Control: with CheckAnswer up, both answers are stored and nothing is tagged.
        let mut healthy = Harness::start(GuardBehaviour::HEALTHY).await;
        let ctx = RequestContext::new(principal("t"));
        healthy
            .pipeline
            .complete(&ctx, request(), CacheControl::default())
            .await
            .unwrap();
        assert!(!ctx.guard_verdict().unchecked);
        let ctx = RequestContext::new(principal("t"));
        let handle = healthy
            .pipeline
            .stream(&ctx, request(), CacheControl::default())
            .await
            .unwrap();
        drain(handle).await;
        healthy.settle().await;
        assert_eq!(healthy.stores(), 2);
        assert!(!healthy.usage_events().iter().any(unchecked_tagged));
    }

    #[tokio::test]
    async fn the_cache_is_asked_with_the_team_and_every_tag_the_router_may_route_on() {
        use stubs::*;
        let harness = Harness::start(GuardBehaviour::HEALTHY).await;
        let mut principal = principal("ops");
        principal.tags = Arc::from(vec![("region".to_owned(), "eu".to_owned())]);
        let ctx = RequestContext::new(principal);
        let mut asked = request();
        asked.tags.insert("task".into(), "chat".into());
        harness
            .pipeline
            .complete(&ctx, asked, CacheControl::default())
            .await
            .unwrap();
        harness.settle().await;
        let lookups = harness.cache.lookups.lock().unwrap().clone();
        let stores = harness.cache.stores.lock().unwrap().clone();
        assert_eq!((lookups.len(), stores.len()), (1, 1));
        let expected_scope = Scope {
            app: "app".into(),
            team: "ops".into(),
        };
        assert_eq!(lookups[0].scope.as_ref(), Some(&expected_scope));
        assert_eq!(stores[0].scope.as_ref(), Some(&expected_scope));
        let expected_tags: HashMap<String, String> = [("region", "eu"), ("task", "chat")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        // The key's tags and the caller's, as the router gets them: the cache keys on both.
        assert_eq!(lookups[0].request.as_ref().unwrap().tags, expected_tags);
        assert_eq!(stores[0].request.as_ref().unwrap().tags, expected_tags);
    }

    #[test]
    fn top_p_takes_the_closed_unit_interval() {
        let with = |top_p: f64| {
            let mut request = request();
            request.sampling = Some(switchboard_proto::chat::v1::SamplingParams {
                top_p: Some(top_p),
                ..Default::default()
            });
            validate(&request)
        };
        for ok in [0.0, 0.5, 1.0] {
            assert!(with(ok).is_ok(), "{ok}");
        }
        for bad in [-0.1, 1.1, f64::NAN] {
            assert!(
                matches!(with(bad), Err(GatewayError::InvalidRequest { ref field, .. }) if field == "top_p"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_streamed_refusal_is_assembled_replayed_and_counted() {
        let refusal = "I can't help with that.";
        let chunk = |delta: ChoiceDelta| ChatChunk {
            model: "gpt-x".into(),
            created: 7,
            choices: vec![delta],
            ..Default::default()
        };
        let mut assembled = Assembler::default();
        for piece in ["I can't ", "help with that."] {
            let piece = chunk(ChoiceDelta {
                refusal: piece.into(),
                ..Default::default()
            });
            assembled.received(&piece);
            assembled.add(&piece);
        }
        assembled.add(&chunk(ChoiceDelta {
            finish_reason: FinishReason::Stop as i32,
            ..Default::default()
        }));
        // Without usage from the provider, the refusal is output like any text.
        assert_eq!(
            assembled.estimate_usage(&request()).completion_tokens,
            refusal.len().div_ceil(4) as u32
        );
        assembled.usage = Some(Usage::default());
        let response = assembled.to_response(&RouteInfo::default()).unwrap();
        let message = response.choices[0].message.as_ref().unwrap();
        assert_eq!(message.refusal, refusal);
        assert_eq!(message.joined_text(), "");
        // Replayed from the cache as a stream, it is a refusal again.
        let replayed: String = replay_chunks(&response, "id")
            .iter()
            .flat_map(|c| &c.choices)
            .map(|d| d.refusal.as_str())
            .collect();
        assert_eq!(replayed, refusal);
    }

    #[test]
    fn text_the_check_held_back_or_blocked_still_counts_as_output() {
        let mut assembled = Assembler::default();
        let raw = ChatChunk {
            model: "gpt-x".into(),
            created: 7,
            choices: vec![ChoiceDelta {
                content: "x".repeat(400),
                thinking: vec![ThinkingDelta {
                    text: "t".repeat(40),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        assembled.received(&raw);
        // The answer check held all of it back: the caller got an empty delta.
        let mut sent = raw.clone();
        sent.choices[0].content.clear();
        sent.choices[0].thinking.clear();
        assembled.add(&sent);
        let usage = assembled.estimate_usage(&request());
        assert_eq!(usage.completion_tokens, 110);
        assert_eq!(usage.reasoning_tokens, 10);
        // A chunk the gateway makes (released text) gets the stream's model and time.
        let mut made = ChatChunk::default();
        assembled.stamp(&mut made);
        assert_eq!((made.model.as_str(), made.created), ("gpt-x", 7));
    }

    #[test]
    fn a_replayed_answer_keeps_its_tool_calls_before_its_finish() {
        let mut message = Message::text(Role::Assistant, "looking it up");
        message.tool_calls = vec![
            switchboard_proto::chat::v1::ToolCall {
                id: "call_1".into(),
                name: "lookup".into(),
                arguments_json: r#"{"q":1}"#.into(),
                signature: String::new(),
            },
            switchboard_proto::chat::v1::ToolCall {
                id: "call_2".into(),
                name: "fetch".into(),
                arguments_json: "{}".into(),
                signature: "sig".into(),
            },
        ];
        let response = ChatResponse {
            model: "m".into(),
            choices: vec![Choice {
                index: 0,
                message: Some(message),
                finish_reason: FinishReason::Stop as i32,
            }],
            ..Default::default()
        };
        let chunks = replay_chunks(&response, "id");
        let calls: Vec<&ToolCallDelta> = chunks
            .iter()
            .flat_map(|c| &c.choices)
            .flat_map(|d| &d.tool_calls)
            .collect();
        assert_eq!(calls.len(), 2);
        for (position, (call, (id, name, args, signature))) in calls
            .iter()
            .zip([
                ("call_1", "lookup", r#"{"q":1}"#, ""),
                ("call_2", "fetch", "{}", "sig"),
            ])
            .enumerate()
        {
            assert_eq!(call.index, position as u32);
            assert_eq!(
                (
                    call.id.as_str(),
                    call.name.as_str(),
                    call.arguments_delta.as_str(),
                    call.signature.as_str()
                ),
                (id, name, args, signature)
            );
        }
        let last = &chunks.last().unwrap().choices[0];
        assert_eq!(last.finish_reason, FinishReason::Stop as i32);
        assert!(last.tool_calls.is_empty());
    }

    #[test]
    fn a_long_cached_answer_is_replayed_in_pieces_that_concatenate_back() {
        let text = "word ".repeat(100) + "ünïcödé end";
        let pieces = replay_pieces(&text);
        assert!(pieces.len() > 5, "{}", pieces.len());
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| p.len() <= REPLAY_PIECE_BYTES));
        let long_word = "x".repeat(200);
        assert_eq!(replay_pieces(&long_word), vec![long_word.as_str()]);
        assert!(replay_pieces("").is_empty());
    }
}
