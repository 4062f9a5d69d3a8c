//! Routes: ordered fallback chains of provider targets, with retries of the same target.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use futures::StreamExt;
use rand::Rng;
use switchboard_pricing::allowance as spend;
use switchboard_proto::{
    chat::v1::{Attempt, ChatChunk, ChatRequest, ChatResponse, Model, RouteInfo, Usage},
    ledger::v1::PriceTarget,
    router::v1::{Caller, RouteTargets, SpendAllowance},
};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::{
    app::StartupError,
    balance::{Budget, Deployment, InFlight, Pick, pick},
    breaker::Breaker,
    config::Config,
    error::{Rejection, RouterError, StreamSource, Unserved},
    provider::{ChunkStream, Prepared, ProviderClient, ProviderError, TranslateError},
    route_config::Strategy,
    strategy::{Candidate, Capabilities, Needs, Rule, TargetStats, order},
};

/// Most of a caller's deadline kept back so that the router's own answer arrives first.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

/// The deployments of each target of a route, in configuration order.
pub(crate) type TargetDeployments<'a> = Vec<&'a [Arc<Deployment>]>;

/// Retry and timeout settings.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Extra tries of the same target.
    pub max_retries: u32,
    /// Base of the exponential backoff.
    pub backoff: Duration,
    /// Cap on an honoured `Retry-After`.
    pub max_retry_after: Duration,
    /// Overall deadline of a request when the caller sets none (or a longer one).
    pub request_timeout: Duration,
}

impl Policy {
    /// Delay before try number `retry` (1-based) of a target that last failed with `error`.
    pub(crate) fn delay(&self, retry: u32, error: &ProviderError) -> Duration {
        if let Some(after) = error.retry_after() {
            return after.min(self.max_retry_after);
        }
        let base = self.backoff.as_millis() as u64;
        let exponential = base.saturating_mul(1u64 << (retry.saturating_sub(1)).min(16));
        let jitter = if base == 0 {
            0
        } else {
            rand::rng().random_range(0..=base)
        };
        Duration::from_millis(exponential.saturating_add(jitter))
    }
}

/// One target of a route: a provider model, its capabilities and its deployments (keys).
struct Target {
    name: String,
    weight: u32,
    caps: Capabilities,
    stats: Arc<TargetStats>,
    deployments: Vec<Arc<Deployment>>,
    rotation: AtomicUsize,
}

impl Candidate for Target {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    fn stats(&self) -> &TargetStats {
        &self.stats
    }
}

/// A route: its targets, strategy and rules.
struct Route {
    targets: Vec<Target>,
    strategy: Strategy,
    rules: Vec<Rule>,
}

/// The routing table and provider clients.
pub struct Routes {
    routes: HashMap<String, Route>,
    order: Vec<String>,
    deployments: Vec<Arc<Deployment>>,
    policy: Policy,
    created: i64,
    /// Each deployment with what it was built from, so that a reload keeps its state.
    built: HashMap<DeploymentId, Built>,
    /// Target statistics by target name, kept by a reload.
    stats: HashMap<String, Arc<TargetStats>>,
}

/// (provider, model, key alias) of a deployment.
type DeploymentId = (String, String, Option<String>);

/// A deployment and its settings.
struct Built {
    deployment: Arc<Deployment>,
    spec: Spec,
}

/// What a deployment is built from: its provider settings (endpoint and key included), connect
/// timeout, RPM/TPM limits and breaker settings.
struct Spec {
    provider: crate::config::ProviderConfig,
    connect_timeout: Duration,
    limits: (u32, u32),
    breaker: crate::route_config::BreakerConfig,
}

impl Spec {
    /// Same endpoint, key and protocol settings: the HTTP client (and its connections) can stay.
    fn same_client(&self, other: &Spec) -> bool {
        use secrecy::ExposeSecret;
        let (a, b) = (&self.provider, &other.provider);
        a.kind == b.kind
            && a.base_url == b.base_url
            && a.api_version == b.api_version
            && a.default_max_tokens == b.default_max_tokens
            && a.max_tokens_field == b.max_tokens_field
            && a.api_key.as_ref().map(|k| k.expose_secret())
                == b.api_key.as_ref().map(|k| k.expose_secret())
            && self.connect_timeout == other.connect_timeout
    }
}

/// What a stream producer emits.
#[derive(Debug)]
pub enum StreamEvent {
    /// A chunk to forward.
    Chunk(ChatChunk),
    /// The stream finished; sent after the last chunk.
    Done(RouteInfo),
    /// The stream failed; nothing follows. Before its first chunk, with what its attempts
    /// consumed as their providers reported it.
    Failed(Unserved),
    /// The stream committed to this deployment; sent once, before its first chunk (the response
    /// head carries it: `switchboard_status::serving`). `consumed`: what the attempts so far
    /// consumed as their providers reported it by then (see [`Attempts::so_far`]), when any did,
    /// so that a caller that stops reading (or is stopped) before the end bills it.
    Serving {
        source: StreamSource,
        consumed: Option<RouteInfo>,
    },
    /// The stream broke after its first chunk: every attempt, the cut one last with the usage its
    /// provider reported before the cut (so that the caller can bill it); sent just before the
    /// [`StreamEvent::Failed`] that ends the stream.
    Interrupted(RouteInfo),
}

/// Attempts of one request so far.
struct Attempts {
    route: String,
    list: Vec<Attempt>,
    last_error: Option<ProviderError>,
    /// Why the first target skipped as [`UNTRANSLATABLE_CODE`] could not take the request.
    untranslatable: Option<TranslateError>,
}

/// The attempt on `deployment`, which answered (`outcome`: its error code and message, empty when
/// it served or still serves).
fn answered(
    deployment: &Deployment,
    started: Instant,
    usage: Option<Usage>,
    (error_code, error_message): (String, String),
) -> Attempt {
    Attempt {
        target: deployment.target.clone(),
        provider: deployment.provider.clone(),
        model: deployment.model.clone(),
        error_code,
        error_message,
        http_status: 200,
        duration_ms: started.elapsed().as_millis() as u64,
        usage,
        key_alias: deployment.key_alias.clone(),
    }
}

/// Route `route`'s account: `attempts`, the last on `deployment`.
fn route_info(route: String, deployment: &Deployment, attempts: Vec<Attempt>) -> RouteInfo {
    RouteInfo {
        route,
        provider: deployment.provider.clone(),
        model: deployment.model.clone(),
        target: deployment.target.clone(),
        attempt_count: attempts.len() as u32,
        attempts,
        key_alias: deployment.key_alias.clone(),
    }
}

impl Attempts {
    fn new(route: &str) -> Self {
        Attempts {
            route: route.to_owned(),
            list: Vec::new(),
            last_error: None,
            untranslatable: None,
        }
    }

    /// A target whose provider format cannot express the request (`n > 1` for Anthropic, ...):
    /// skipped like a capability miss, another target may take it.
    fn untranslatable(&mut self, target: &Target, error: TranslateError) {
        let message = format!(
            "skipped: `request.{}` {} (this provider's format)",
            error.field, error.message
        );
        self.skipped(target, UNTRANSLATABLE_CODE, message);
        self.untranslatable.get_or_insert(error);
    }

    /// A failed try; `usage`: what its provider reported it consumed before failing.
    fn failed(
        &mut self,
        deployment: &Deployment,
        started: Instant,
        error: ProviderError,
        usage: Option<Usage>,
    ) {
        tracing::info!(
            target = %deployment.label,
            error.code = error.code(),
            http.status_code = error.http_status(),
            "provider attempt failed"
        );
        self.list.push(Attempt {
            target: deployment.target.clone(),
            provider: deployment.provider.clone(),
            model: deployment.model.clone(),
            error_code: error.code().to_owned(),
            error_message: error.to_string(),
            http_status: u32::from(error.http_status()),
            duration_ms: started.elapsed().as_millis() as u64,
            usage,
            key_alias: deployment.key_alias.clone(),
        });
        self.last_error = Some(error);
    }

    /// A target passed over without a request: `code` says why.
    fn skipped(&mut self, target: &Target, code: &str, message: String) {
        tracing::info!(target = %target.name, reason = code, "target skipped");
        let deployment = &target.deployments[0];
        self.list.push(Attempt {
            target: target.name.clone(),
            provider: deployment.provider.clone(),
            model: deployment.model.clone(),
            error_code: code.to_owned(),
            error_message: message,
            http_status: 0,
            duration_ms: 0,
            usage: None,
            key_alias: String::new(),
        });
    }

    fn served(self, deployment: &Deployment, started: Instant, usage: Option<Usage>) -> RouteInfo {
        self.last(deployment, started, usage, (String::new(), String::new()))
    }

    /// The attempts of a stream cut after its first chunk, the cut one last with `usage`, what
    /// its provider reported before the cut (`last_error`: why it broke).
    fn cut(
        self,
        deployment: &Deployment,
        started: Instant,
        usage: Option<Usage>,
        last_error: String,
    ) -> RouteInfo {
        let code = ProviderError::Interrupted(String::new()).code().to_owned();
        self.last(deployment, started, usage, (code, last_error))
    }

    /// Every attempt, the last one on `deployment` (which answered, then served or broke off:
    /// `outcome` is its error code and message, empty when it served).
    fn last(
        mut self,
        deployment: &Deployment,
        started: Instant,
        usage: Option<Usage>,
        (error_code, error_message): (String, String),
    ) -> RouteInfo {
        self.list.push(answered(
            deployment,
            started,
            usage,
            (error_code, error_message),
        ));
        let span = Span::current();
        span.record("target", deployment.label.as_str());
        span.record("attempts", self.list.len());
        route_info(self.route, deployment, self.list)
    }

    /// What a stream committing to `deployment` consumed so far, as the providers reported it:
    /// every attempt, the serving one last with `reported` (its provider's usage before its first
    /// chunk: Anthropic's `message_start`, Gemini's `usageMetadata`; the prompt's counts are
    /// final, the output's partial). `None` when no attempt has a report (OpenAI-format streams
    /// report at their end only): the caller estimates, as before.
    fn so_far(
        &self,
        deployment: &Deployment,
        started: Instant,
        reported: Option<Usage>,
    ) -> Option<RouteInfo> {
        if reported.is_none() && self.list.iter().all(|a| a.usage.is_none()) {
            return None;
        }
        let mut list = self.list.clone();
        list.push(answered(
            deployment,
            started,
            reported,
            (String::new(), String::new()),
        ));
        Some(route_info(self.route.clone(), deployment, list))
    }

    /// What the attempts so far consumed, as their providers reported it: every attempt, the
    /// route named after the last one's deployment; `None` when none reported usage.
    fn consumed(&self) -> Option<RouteInfo> {
        if self.list.iter().all(|a| a.usage.is_none()) {
            return None;
        }
        let last = self.list.last()?;
        Some(RouteInfo {
            route: self.route.clone(),
            provider: last.provider.clone(),
            model: last.model.clone(),
            target: last.target.clone(),
            attempt_count: self.list.len() as u32,
            attempts: self.list.clone(),
            key_alias: last.key_alias.clone(),
        })
    }

    /// The request ends unserved: `why` it did, and what its attempts consumed.
    fn ended(self, why: impl FnOnce(Self) -> RouterError) -> Unserved {
        let consumed = self.consumed().map(Box::new);
        Unserved {
            error: why(self),
            consumed,
        }
    }

    fn last_error_text(&self) -> String {
        self.last_error
            .as_ref()
            .map(|e| format!("{}: {e}", e.code()))
            .unwrap_or_default()
    }

    fn unavailable(mut self) -> RouterError {
        Span::current().record("attempts", self.list.len());
        // The budget is the reason only when no target was actually tried: a target that was
        // sent and failed (an outage) is the reason the request failed, even if the fallback
        // after it was then too dear for what the budget had left.
        let incapable = |a: &Attempt| {
            CAPABILITY_CODES.contains(&a.error_code.as_str()) || a.error_code == UNTRANSLATABLE_CODE
        };
        let held_back = |a: &Attempt| HELD_BACK_CODES.contains(&a.error_code.as_str());
        let not_sent = |a: &Attempt| a.error_code == BUDGET_CODE || incapable(a) || held_back(a);
        if self.list.iter().any(|a| a.error_code == BUDGET_CODE) && self.list.iter().all(not_sent) {
            return RouterError::BudgetExceeded {
                summary: summarize(&self.list),
                attempts: self.list.len(),
                route: self.route,
            };
        }
        let summary = summarize(&self.list);
        // No target could take the request and at least one could not express it: the request
        // is invalid, as the first such target said.
        if self.list.iter().all(incapable)
            && let Some(error) = self.untranslatable.take()
        {
            return invalid(error);
        }
        if !self.list.is_empty() && self.list.iter().all(incapable) {
            return RouterError::NoCapableTarget {
                route: self.route,
                attempts: self.list.len(),
                summary,
            };
        }
        // Every target sent said the prompt is too long, and the others could not take it
        // either: the request's fault (a provider rejecting it), not an outage.
        let too_long = |a: &Attempt| a.error_code == CONTEXT_LENGTH_CODE;
        if let Some(decisive) = self.list.iter().rev().find(|a| too_long(a))
            && self.list.iter().all(|a| too_long(a) || incapable(a))
        {
            return RouterError::ContextLengthExceeded {
                last: Box::new(Rejection {
                    target: decisive.target.clone(),
                    key_alias: decisive.key_alias.clone(),
                    http_status: u16::try_from(decisive.http_status).unwrap_or_default(),
                    message: decisive.error_message.clone(),
                }),
                route: self.route,
                attempts: self.list.len(),
                summary,
            };
        }
        // Every target was passed over locally because its keys are at their limits or cooling
        // down: nothing was sent, and the caller should slow down.
        if !self.list.is_empty() && self.list.iter().all(held_back) {
            return RouterError::KeysExhausted {
                route: self.route,
                attempts: self.list.len(),
                summary,
            };
        }
        // Every target that was tried answered 429 (the rest were passed over): a rate limit
        // to pass on with the provider's Retry-After, not an outage.
        let rate_limited = |a: &Attempt| a.error_code == PROVIDER_RATE_LIMITED_CODE;
        if self.list.iter().any(rate_limited)
            && self.list.iter().all(|a| rate_limited(a) || not_sent(a))
        {
            let retry_after_secs = self
                .last_error
                .as_ref()
                .and_then(ProviderError::retry_after)
                .map(|wait| wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
            return RouterError::ProviderRateLimited {
                route: self.route,
                attempts: self.list.len(),
                summary,
                retry_after_secs,
            };
        }
        let last_error = self.last_error_text();
        RouterError::UpstreamUnavailable {
            route: self.route,
            attempts: self.list.len(),
            summary,
            last_error,
        }
    }

    fn deadline_exceeded(self) -> RouterError {
        let last_error = self.last_error_text();
        RouterError::DeadlineExceeded {
            route: self.route,
            attempts: self.list.len(),
            last_error,
        }
    }
}

/// `target#key CODE (HTTP n); …` of every attempt.
fn summarize(list: &[Attempt]) -> String {
    list.iter()
        .map(|a| {
            let key = if a.key_alias.is_empty() { "" } else { "#" };
            let target = format!("{}{key}{}", a.target, a.key_alias);
            if a.http_status == 0 {
                format!("{target} {}", a.error_code)
            } else {
                format!("{target} {} (HTTP {})", a.error_code, a.http_status)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What to do after a failed try.
enum Next {
    Retry,
    Fallback,
    Stop(RouterError),
}

fn after_failure(error: &ProviderError, target: &Deployment) -> Next {
    if !error.allows_fallback() {
        let message = match error {
            ProviderError::BadRequest { message, .. } => message.clone(),
            other => other.to_string(),
        };
        return Next::Stop(RouterError::UpstreamRejected {
            target: target.target.clone(),
            key_alias: target.key_alias.clone(),
            http_status: error.http_status(),
            message,
        });
    }
    if error.is_retryable() {
        Next::Retry
    } else {
        Next::Fallback
    }
}

fn invalid(error: TranslateError) -> RouterError {
    RouterError::InvalidArgument {
        field: format!("request.{}", error.field),
        message: error.message,
    }
}

impl Routes {
    /// Builds the provider clients and the routing table from a validated configuration.
    /// Deployments — (provider, endpoint, key, model) — and target statistics are shared by every
    /// route that names them, so their breakers, budgets and latency see all of their traffic.
    pub fn new(config: &Config) -> Result<Self, StartupError> {
        Self::build(config, None)
    }

    /// Builds the table of a reloaded configuration. A deployment that still exists — same
    /// provider, model and key alias, same endpoint and key — keeps its HTTP client, breaker,
    /// cooldown, budget window and metrics (its limits and breaker settings may change); a target
    /// keeps its latency statistics. Requests in flight keep using `previous`.
    pub fn rebuild(config: &Config, previous: &Routes) -> Result<Self, StartupError> {
        Self::build(config, Some(previous))
    }

    fn build(config: &Config, previous: Option<&Routes>) -> Result<Self, StartupError> {
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
        let client = |name: &str, provider: &crate::config::ProviderConfig| {
            ProviderClient::new(name, provider, connect_timeout)
                .map(Arc::new)
                .map_err(|source| StartupError::HttpClient {
                    provider: name.to_owned(),
                    source,
                })
        };
        let mut providers = HashMap::new();
        for (name, provider) in &config.providers {
            providers.insert(name.clone(), client(name, provider)?);
        }
        let mut keyed_clients: HashMap<(String, String, Option<String>), Arc<ProviderClient>> =
            HashMap::new();
        let mut deployments: HashMap<DeploymentId, Built> = HashMap::new();
        let mut all = Vec::new();
        let mut stats: HashMap<String, Arc<TargetStats>> = HashMap::new();
        let mut routes = HashMap::new();
        let mut order = Vec::new();
        for route in &config.routes {
            let mut targets = Vec::new();
            for target in &route.targets {
                let (Some(provider_config), Some(provider_client)) = (
                    config.providers.get(&target.provider),
                    providers.get(&target.provider),
                ) else {
                    continue;
                };
                let name = target.name();
                let mut target_deployments = Vec::new();
                let keys: Vec<Option<&crate::config::KeyConfig>> = if target.keys.is_empty() {
                    vec![None]
                } else {
                    target.keys.iter().map(Some).collect()
                };
                for key in keys {
                    let alias = key.map(|k| k.alias.clone());
                    let id = (target.provider.clone(), target.model.clone(), alias.clone());
                    if let Some(existing) = deployments.get(&id) {
                        target_deployments.push(existing.deployment.clone());
                        continue;
                    }
                    let mut effective = provider_config.clone();
                    if let Some(key) = key {
                        if let Some(base_url) = &key.base_url {
                            effective.base_url.clone_from(base_url);
                        }
                        effective.api_key.clone_from(&key.api_key);
                    }
                    let spec = Spec {
                        provider: effective,
                        connect_timeout,
                        limits: key.map_or((0, 0), |k| (k.rpm, k.tpm)),
                        breaker: config.breaker.clone(),
                    };
                    let old = previous
                        .and_then(|p| p.built.get(&id))
                        .filter(|old| old.spec.same_client(&spec));
                    if let Some(old) = old
                        .filter(|o| o.spec.limits == spec.limits && o.spec.breaker == spec.breaker)
                    {
                        let deployment = old.deployment.clone();
                        all.push(deployment.clone());
                        target_deployments.push(deployment.clone());
                        deployments.insert(id, Built { deployment, spec });
                        continue;
                    }
                    let http = match (old, key) {
                        (Some(old), _) => old.deployment.client.clone(),
                        (None, None) => provider_client.clone(),
                        (None, Some(key)) => {
                            let client_id = (
                                target.provider.clone(),
                                key.alias.clone(),
                                key.base_url.clone(),
                            );
                            match keyed_clients.get(&client_id) {
                                Some(http) => http.clone(),
                                None => {
                                    let http = client(&target.provider, &spec.provider)?;
                                    keyed_clients.insert(client_id, http.clone());
                                    http
                                }
                            }
                        }
                    };
                    let mut deployment = Deployment::new(
                        http,
                        &target.provider,
                        &target.model,
                        alias.as_deref(),
                        Breaker::new(&config.breaker),
                        Budget::new(spec.limits.0, spec.limits.1),
                    );
                    if let Some(old) = old {
                        // The same deployment with new limits or breaker settings: its state stays.
                        deployment.carry_state_from(&old.deployment);
                    }
                    let deployment = Arc::new(deployment);
                    all.push(deployment.clone());
                    target_deployments.push(deployment.clone());
                    deployments.insert(id, Built { deployment, spec });
                }
                let price = match (
                    target.input_usd_nanos_per_mtok,
                    target.output_usd_nanos_per_mtok,
                ) {
                    (None, None) => None,
                    (input, output) => Some((input.unwrap_or(0), output.unwrap_or(0))),
                };
                targets.push(Target {
                    weight: target.weight,
                    caps: Capabilities {
                        context_window: target.context_window,
                        tools: target.tools,
                        images: target.images,
                        price,
                    },
                    stats: stats
                        .entry(name.clone())
                        .or_insert_with(|| {
                            previous
                                .and_then(|p| p.stats.get(&name))
                                .cloned()
                                .unwrap_or_default()
                        })
                        .clone(),
                    deployments: target_deployments,
                    rotation: AtomicUsize::new(0),
                    name,
                });
            }
            let index_of: HashMap<String, usize> = targets
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect();
            let rules = route
                .rules
                .iter()
                .map(|rule| Rule::new(rule, &index_of))
                .collect();
            routes.insert(
                route.name.clone(),
                Route {
                    targets,
                    strategy: route.strategy,
                    rules,
                },
            );
            order.push(route.name.clone());
        }
        let created = match previous {
            Some(previous) => previous.created,
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        };
        Ok(Routes {
            built: deployments,
            stats,
            routes,
            order,
            deployments: all,
            policy: Policy {
                attempt_timeout: Duration::from_millis(config.attempt_timeout_ms),
                max_retries: config.max_retries,
                backoff: Duration::from_millis(config.retry_backoff_ms),
                max_retry_after: Duration::from_millis(config.max_retry_after_ms),
                request_timeout: Duration::from_millis(config.request_timeout_ms),
            },
            created,
        })
    }

    /// Every deployment, for metrics.
    pub fn deployments(&self) -> impl Iterator<Item = &Deployment> + Clone {
        self.deployments.iter().map(|d| &**d)
    }

    /// The configured routes, in configuration order.
    pub fn models(&self) -> Vec<Model> {
        self.order
            .iter()
            .map(|name| Model {
                id: name.clone(),
                owned_by: "switchboard".to_owned(),
                created: self.created,
            })
            .collect()
    }

    /// The targets of every route, for the gateways' budget estimates (ADR 007).
    pub fn route_targets(&self) -> Vec<RouteTargets> {
        self.order
            .iter()
            .filter_map(|name| self.routes.get(name).map(|route| (name, route)))
            .map(|(name, route)| RouteTargets {
                route: name.clone(),
                targets: route
                    .targets
                    .iter()
                    .map(|t| PriceTarget {
                        provider: t.deployments[0].provider.clone(),
                        model: t.deployments[0].model.clone(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// The deployments of each target of route `model`, in configuration order, and the retry
    /// policy: embeddings use a plain ordered fallback (no strategy, rules or capability filter).
    pub(crate) fn embedding_targets(
        &self,
        model: &str,
    ) -> Result<(TargetDeployments<'_>, &Policy), RouterError> {
        let route = self
            .routes
            .get(model)
            .ok_or_else(|| RouterError::NotFound {
                model: model.to_owned(),
            })?;
        let targets = route
            .targets
            .iter()
            .map(|t| t.deployments.as_slice())
            .collect();
        Ok((targets, &self.policy))
    }

    fn route_of(&self, request: &ChatRequest) -> Result<&Route, RouterError> {
        let route = self
            .routes
            .get(&request.model)
            .ok_or_else(|| RouterError::NotFound {
                model: request.model.clone(),
            })?;
        if request.messages.is_empty() {
            return Err(RouterError::InvalidArgument {
                field: "request.messages".to_owned(),
                message: "must not be empty".to_owned(),
            });
        }
        Ok(route)
    }

    /// The targets to walk for this request, in order: the first matching rule's targets (else
    /// all), ordered by the rule's (else the route's) strategy.
    fn plan(
        &self,
        route: &Route,
        request: &ChatRequest,
        caller: &Caller,
        needs: &Needs,
    ) -> Vec<usize> {
        let (mut candidates, strategy) = match route
            .rules
            .iter()
            .find(|rule| rule.matches(caller, request))
        {
            Some(rule) => (
                rule.targets.clone(),
                rule.strategy.unwrap_or(route.strategy),
            ),
            None => ((0..route.targets.len()).collect(), route.strategy),
        };
        order(
            strategy,
            &route.targets,
            &mut candidates,
            needs,
            &mut rand::rng(),
        );
        candidates
    }

    /// The overall deadline of a request: the caller's `grpc-timeout` (less a small margin, so that
    /// the router answers with its attempts before the caller gives up), capped by
    /// `request_timeout`.
    pub fn deadline(&self, caller_timeout: Option<Duration>) -> Instant {
        let timeout = match caller_timeout {
            Some(timeout) => {
                let margin = (timeout / 10).min(DEADLINE_MARGIN);
                (timeout - margin).min(self.policy.request_timeout)
            }
            None => self.policy.request_timeout,
        };
        Instant::now() + timeout
    }

    /// The timeout of the next try and whether the deadline capped it, or `None` when the deadline
    /// has passed.
    fn attempt_timeout(&self, deadline: Instant) -> Option<(Duration, bool)> {
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())?;
        if remaining < self.policy.attempt_timeout {
            Some((remaining, true))
        } else {
            Some((self.policy.attempt_timeout, false))
        }
    }

    /// Sleeps before a retry; `false` when the deadline would pass first.
    async fn backoff(&self, retry: u32, error: &ProviderError, deadline: Instant) -> bool {
        let delay = self.policy.delay(retry, error);
        if Instant::now() + delay >= deadline {
            return false;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        true
    }

    /// Serves `request` through its route. `deadline` is the overall deadline.
    pub async fn route(
        &self,
        request: &ChatRequest,
        caller: &Caller,
        allowance: Option<&SpendAllowance>,
        deadline: Instant,
    ) -> Result<(ChatResponse, RouteInfo), Unserved> {
        let served = self
            .attempt_loop(&Unary, request, caller, allowance, deadline)
            .await?;
        let usage = served.output.usage;
        served.settle(usage.as_ref());
        let info = served
            .attempts
            .served(served.deployment, served.started, usage);
        Ok((served.output, info))
    }

    /// Serves `request` as a stream, sending events to `tx` until done, failed, `cancel`led or the
    /// receiver is dropped (then upstream reading stops at once).
    pub async fn route_stream(
        &self,
        request: ChatRequest,
        caller: Caller,
        allowance: Option<SpendAllowance>,
        deadline: Instant,
        tx: mpsc::Sender<StreamEvent>,
        cancel: CancellationToken,
    ) {
        let outcome = tokio::select! {
            outcome = self.stream_inner(&request, &caller, allowance.as_ref(), deadline, &tx) => outcome,
            () = tx.closed() => {
                tracing::info!("client went away, stream stopped");
                return;
            }
            () = cancel.cancelled() => Err(RouterError::StreamInterrupted {
                route: request.model.clone(),
                chunks: 0,
                from: Box::default(),
                last_error: "router shutting down".to_owned(),
            }
            .into()),
        };
        let event = match outcome {
            Ok(info) => StreamEvent::Done(info),
            Err(error) => StreamEvent::Failed(error),
        };
        let _ = tx.send(event).await;
    }

    async fn stream_inner(
        &self,
        request: &ChatRequest,
        caller: &Caller,
        allowance: Option<&SpendAllowance>,
        deadline: Instant,
        tx: &mpsc::Sender<StreamEvent>,
    ) -> Result<RouteInfo, Unserved> {
        let served = self
            .attempt_loop(&Streamed, request, caller, allowance, deadline)
            .await?;
        let ((opened, stream), served) = served.split();
        Ok(forward(served, opened, stream, tx, deadline).await?)
    }

    /// The one retry/backoff/deadline/fallback loop shared by unary and streamed requests. Walks
    /// the planned targets, skipping (with a stated reason) those that cannot take the request;
    /// within a target picks a usable key, retries retryable errors with backoff, moves to another
    /// key after an authentication error, and waits for a key whose cooldown ends soon.
    async fn attempt_loop<'a, E: Exchange>(
        &'a self,
        exchange: &E,
        request: &ChatRequest,
        caller: &Caller,
        allowance: Option<&SpendAllowance>,
        deadline: Instant,
    ) -> Result<Served<'a, E::Output>, Unserved> {
        let route = self.route_of(request)?;
        let needs = Needs::of(request);
        let budget_tokens = needs.budget_tokens();
        let mut attempts = Attempts::new(&request.model);
        // The largest context window found too small by a provider (context length exceeded).
        let mut too_long_for: Option<u32> = None;
        for index in self.plan(route, request, caller, &needs) {
            let target = &route.targets[index];
            if let Some((code, message)) = target.caps.refuses(&needs) {
                attempts.skipped(target, code, message);
                continue;
            }
            if let (Some(limit), Some(window)) = (too_long_for, target.caps.context_window)
                && window <= limit
            {
                attempts.skipped(
                    target,
                    "CONTEXT_WINDOW_TOO_SMALL",
                    format!("skipped: a context window of {limit} was already too small"),
                );
                continue;
            }
            let prepared = match target.deployments[0].client.prepare(
                &target.deployments[0].model,
                request,
                E::STREAM,
            ) {
                Ok(prepared) => prepared,
                Err(error) => {
                    attempts.untranslatable(target, error);
                    continue;
                }
            };
            let mut excluded = 0u64;
            let mut retries = 0u32;
            let mut waits = 0u32;
            let mut tried = false;
            loop {
                if retries > 0
                    && let Some(error) = attempts.last_error.as_ref()
                    && !matches!(error, ProviderError::RateLimited { .. })
                    && !self.backoff(retries, error, deadline).await
                {
                    return Err(attempts.ended(Attempts::deadline_exceeded));
                }
                // Every attempt, fallbacks and retries included, must fit the spend allowance.
                if let Some(allowance) = allowance
                    && let Err(message) = fits(
                        allowance,
                        &target.deployments[0].provider,
                        &target.deployments[0].model,
                        &attempts.list,
                    )
                {
                    if !tried {
                        attempts.skipped(target, BUDGET_CODE, message);
                    }
                    break;
                }
                let now = Instant::now();
                let (key, permit) = match pick(
                    &target.deployments,
                    excluded,
                    budget_tokens,
                    now,
                    &target.rotation,
                ) {
                    Pick::Ready { index, permit } => (index, permit),
                    Pick::Blocked { code, until } => {
                        // Retrying: wait for a key that frees up soon (an honoured Retry-After).
                        if tried
                            && waits < MAX_WAITS
                            && let Some(until) = until
                            && until.saturating_duration_since(now) <= self.policy.max_retry_after
                            && until < deadline
                        {
                            waits += 1;
                            tokio::time::sleep_until(until).await;
                            continue;
                        }
                        if !tried {
                            attempts.skipped(
                                target,
                                code,
                                format!("skipped: no usable key ({code})"),
                            );
                        }
                        break;
                    }
                };
                let Some((timeout, capped)) = self.attempt_timeout(deadline) else {
                    return Err(attempts.ended(Attempts::deadline_exceeded));
                };
                tried = true;
                let deployment = &*target.deployments[key];
                let in_flight = InFlight::new(deployment, &target.stats.in_flight);
                deployment.metrics.request();
                let started = Instant::now();
                let result = exchange.call(&deployment.client, &prepared, timeout).await;
                let elapsed = started.elapsed();
                deployment.metrics.latency(elapsed);
                let (error, consumed) = match result {
                    Ok(output) => {
                        target.stats.observe(elapsed);
                        permit.finish(Instant::now(), Ok(()));
                        return Ok(Served {
                            output,
                            attempts,
                            deployment,
                            started,
                            budget_tokens,
                            _in_flight: in_flight,
                        });
                    }
                    Err(Failure { error, usage }) => (error, usage),
                };
                drop(in_flight);
                if error == ProviderError::Timeout {
                    target.stats.observe(elapsed);
                }
                deployment.metrics.error(error.code());
                permit.finish(Instant::now(), Err(&error));
                let next = after_failure(&error, deployment);
                let deadline_hit = capped && error == ProviderError::Timeout;
                let authentication = matches!(error, ProviderError::Authentication { .. });
                if error.code() == CONTEXT_LENGTH_CODE {
                    too_long_for = too_long_for.max(target.caps.context_window);
                }
                attempts.failed(deployment, started, error, consumed);
                if deadline_hit {
                    return Err(attempts.ended(Attempts::deadline_exceeded));
                }
                match next {
                    Next::Stop(error) => return Err(attempts.ended(|_| error)),
                    // Never the same key again; another key of this target may serve.
                    Next::Fallback if authentication && key < 64 => excluded |= 1 << key,
                    Next::Fallback => break,
                    Next::Retry => {
                        retries += 1;
                        if retries > self.policy.max_retries {
                            break;
                        }
                    }
                }
            }
        }
        Err(attempts.ended(Attempts::unavailable))
    }
}

/// Reason code of a target not sent because its estimate does not fit the spend allowance.
const BUDGET_CODE: &str = "BUDGET_EXCEEDED";

/// Error code of an attempt the provider answered with 429 (`ProviderError::RateLimited`).
const PROVIDER_RATE_LIMITED_CODE: &str = "RATE_LIMITED";

/// Whether the next attempt at (`provider`, `model`) fits `allowance` after what the earlier attempts
/// consumed (each priced at its own target's rates): its estimate (the prompt bound at the input
/// rate plus the output bound at the output rate) must not exceed what is left. A target without a
/// price cannot be estimated, so it does not fit.
fn fits(
    allowance: &SpendAllowance,
    provider: &str,
    model: &str,
    earlier: &[Attempt],
) -> Result<(), String> {
    let Some(price) = spend::find(&allowance.prices, provider, model) else {
        return Err("skipped: no price for this target under a budget".to_owned());
    };
    let spent: i64 = earlier
        .iter()
        .filter_map(|a| {
            let usage = a.usage.as_ref()?;
            Some(
                match spend::find(&allowance.prices, &a.provider, &a.model) {
                    Some(p) => spend::cost(&spend::pricing_of(p), usage),
                    None => i64::MAX,
                },
            )
        })
        .fold(0i64, i64::saturating_add);
    let estimate = spend::estimate(
        &spend::pricing_of(price),
        allowance.prompt_tokens,
        allowance.max_output_tokens,
    );
    let left = allowance.allowance_usd_nanos.saturating_sub(spent);
    if estimate > left {
        return Err(format!(
            "skipped: estimated {estimate} nano-USD, {left} left of the request's allowance"
        ));
    }
    Ok(())
}

/// Reason code of a target skipped because its provider's format cannot express the request.
const UNTRANSLATABLE_CODE: &str = "UNSUPPORTED_REQUEST";

/// Error code of an attempt whose provider found the prompt longer than its context window.
const CONTEXT_LENGTH_CODE: &str = "CONTEXT_LENGTH_EXCEEDED";

/// Reason codes of targets skipped because they cannot take the request at all.
const CAPABILITY_CODES: [&str; 3] = [
    "CONTEXT_WINDOW_TOO_SMALL",
    "NO_TOOL_SUPPORT",
    "NO_IMAGE_INPUT",
];

/// Reason codes of targets skipped because every key is at its limit or cooling down.
const HELD_BACK_CODES: [&str; 2] = ["RATE_BUDGET_EXHAUSTED", "KEY_COOLDOWN"];

/// Waits for a cooling-down key within one target, at most.
const MAX_WAITS: u32 = 3;

/// A successful attempt: its output, and the attempts that led to it.
struct Served<'a, T> {
    output: T,
    attempts: Attempts,
    deployment: &'a Deployment,
    started: Instant,
    budget_tokens: u64,
    _in_flight: InFlight<'a>,
}

impl<'a, T> Served<'a, T> {
    /// The output, and the rest.
    fn split(self) -> (T, Served<'a, ()>) {
        let Served {
            output,
            attempts,
            deployment,
            started,
            budget_tokens,
            _in_flight,
        } = self;
        let rest = Served {
            output: (),
            attempts,
            deployment,
            started,
            budget_tokens,
            _in_flight,
        };
        (output, rest)
    }

    /// Charges the key's budget with tokens used beyond the estimate.
    fn settle(&self, usage: Option<&Usage>) {
        if let (Some(budget), Some(usage)) = (&self.deployment.budget, usage) {
            budget.settle(
                Instant::now(),
                self.budget_tokens,
                u64::from(usage.total_tokens),
            );
        }
    }
}

/// A failed try: the provider's error, and the usage the provider reported before it (a stream
/// that broke before its first content-bearing chunk, after Anthropic's `message_start` or a
/// Gemini `usageMetadata`: the prompt was read, and is billed with the attempt).
struct Failure {
    error: ProviderError,
    usage: Option<Usage>,
}

impl From<ProviderError> for Failure {
    fn from(error: ProviderError) -> Self {
        Failure { error, usage: None }
    }
}

/// One kind of provider call the attempt loop can make.
trait Exchange: Sync {
    /// What a successful call yields.
    type Output: Send;
    /// Whether the request is prepared for streaming.
    const STREAM: bool;
    /// One attempt, bounded by `timeout` (until the first content-bearing chunk for a stream).
    fn call<'a>(
        &'a self,
        provider: &'a ProviderClient,
        prepared: &'a Prepared,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self::Output, Failure>> + Send + 'a;
}

/// A unary chat completion.
struct Unary;

impl Exchange for Unary {
    type Output = ChatResponse;
    const STREAM: bool = false;
    async fn call<'a>(
        &'a self,
        provider: &'a ProviderClient,
        prepared: &'a Prepared,
        timeout: Duration,
    ) -> Result<ChatResponse, Failure> {
        Ok(provider.chat(prepared, timeout).await?)
    }
}

/// A stream, opened until its first content-bearing chunk.
struct Streamed;

impl Exchange for Streamed {
    type Output = (Vec<ChatChunk>, ChunkStream);
    const STREAM: bool = true;
    fn call<'a>(
        &'a self,
        provider: &'a ProviderClient,
        prepared: &'a Prepared,
        timeout: Duration,
    ) -> impl Future<Output = Result<(Vec<ChatChunk>, ChunkStream), Failure>> + Send + 'a {
        open(provider, prepared, timeout)
    }
}

/// Whether a chunk carries something of the answer: text, a refusal, a tool-call delta,
/// reasoning, a stop sequence, a finish reason or the usage. Opening chunks (Anthropic's `message_start` role
/// chunk, OpenAI's first delta `{"role":"assistant","content":""}`) do not.
fn carries_content(chunk: &ChatChunk) -> bool {
    chunk.usage.is_some()
        || chunk.choices.iter().any(|choice| {
            !choice.content.is_empty()
                || !choice.refusal.is_empty()
                || !choice.tool_calls.is_empty()
                || choice.finish_reason != 0
                || !choice.stop_sequence.is_empty()
                || choice.thinking.iter().any(|piece| {
                    !piece.text.is_empty()
                        || !piece.signature.is_empty()
                        || !piece.redacted_data.is_empty()
                })
        })
}

/// Opens a stream and reads it up to its first content-bearing chunk, which commits the attempt:
/// until then it may still fail over, and the content-less chunks before it are held back (and
/// dropped if it fails). Returns the chunks read, that chunk last, and the rest of the stream.
/// The whole of it is bounded by `timeout`: each read is too, but a provider that sends only
/// keep-alives (SSE comments, Anthropic `ping`s, opening chunks) would otherwise never time out.
/// A failure carries the usage the provider reported before it.
async fn open(
    provider: &ProviderClient,
    prepared: &Prepared,
    timeout: Duration,
) -> Result<(Vec<ChatChunk>, ChunkStream), Failure> {
    let deadline = Instant::now() + timeout;
    let mut stream = tokio::time::timeout_at(deadline, provider.chat_stream(prepared, timeout))
        .await
        .unwrap_or(Err(ProviderError::Timeout))?;
    let mut held = Vec::new();
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or(Some(Err(ProviderError::Timeout)));
        match next {
            Some(Ok(chunk)) => {
                let commits = carries_content(&chunk);
                held.push(chunk);
                if commits {
                    return Ok((held, stream));
                }
            }
            Some(Err(error)) => {
                let usage = stream.reported();
                return Err(Failure { error, usage });
            }
            // The format's proper end after opening chunks alone: an empty answer, served as is.
            None if !held.is_empty() => return Ok((held, stream)),
            None => {
                return Err(ProviderError::Protocol(
                    "stream finished without any chunk".to_owned(),
                )
                .into());
            }
        }
    }
}

/// Forwards a started stream: the chunks `open` read, then the rest. After them there is no
/// fallback any more: a stream that breaks ends with the attempts so far
/// ([`StreamEvent::Interrupted`], the cut one with the usage its provider reported), then
/// [`RouterError::StreamInterrupted`].
async fn forward(
    served: Served<'_, ()>,
    opened: Vec<ChatChunk>,
    mut stream: ChunkStream,
    tx: &mpsc::Sender<StreamEvent>,
    deadline: Instant,
) -> Result<RouteInfo, RouterError> {
    let deployment = served.deployment;
    let mut usage = None;
    let mut forwarded = 0usize;
    let route = served.attempts.route.clone();
    let attempts = served.attempts.list.len() + 1;
    let source = || StreamSource {
        target: deployment.target.clone(),
        provider: deployment.provider.clone(),
        model: deployment.model.clone(),
        key_alias: deployment.key_alias.clone(),
        attempts,
    };
    let interrupted = |chunks: usize, last_error: String| RouterError::StreamInterrupted {
        route: route.clone(),
        chunks,
        from: Box::new(source()),
        last_error,
    };
    // The head names the deployment and, when a provider reported usage by now, what the
    // attempts consumed so far (Anthropic's `message_start` came before the first chunk).
    let consumed = served
        .attempts
        .so_far(deployment, served.started, stream.reported());
    let serving = StreamEvent::Serving {
        source: source(),
        consumed,
    };
    if tx.send(serving).await.is_err() {
        return Err(interrupted(forwarded, "client went away".to_owned()));
    }
    // The chunks `open` read go first, then the rest of the stream.
    let mut opened = opened.into_iter();
    let last_error = loop {
        let next = match opened.next() {
            Some(chunk) => Some(Ok(chunk)),
            None => match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(next) => next,
                Err(_) => break "TIMEOUT: deadline exceeded".to_owned(),
            },
        };
        match next {
            Some(Ok(chunk)) => {
                if chunk.usage.is_some() {
                    usage = chunk.usage;
                }
                if tx.send(StreamEvent::Chunk(chunk)).await.is_err() {
                    return Err(interrupted(forwarded, "client went away".to_owned()));
                }
                forwarded += 1;
            }
            Some(Err(error)) => {
                tracing::warn!(target = %deployment.label, error.code = error.code(), chunks = forwarded, "stream interrupted");
                deployment.metrics.error(error.code());
                deployment.breaker.failure(Instant::now(), &error);
                break format!("{}: {error}", error.code());
            }
            None => {
                served.settle(usage.as_ref());
                let started = served.started;
                return Ok(served.attempts.served(deployment, started, usage));
            }
        }
    };
    let error = interrupted(forwarded, last_error.clone());
    // What the provider reported before the cut (its prompt's counts at least), else the usage
    // of a chunk: the caller bills it, with what it saw streamed.
    let reported = stream.reported().or(usage);
    let started = served.started;
    let info = served
        .attempts
        .cut(deployment, started, reported, last_error);
    let _ = tx.send(StreamEvent::Interrupted(info)).await;
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_piece_carries_content() {
        use switchboard_proto::chat::v1::{ChoiceDelta, Role};
        let chunk = |delta: ChoiceDelta| ChatChunk {
            choices: vec![delta],
            ..Default::default()
        };
        let opening = ChoiceDelta {
            role: Role::Assistant as i32,
            ..Default::default()
        };
        assert!(!carries_content(&chunk(opening)));
        let refusal = ChoiceDelta {
            refusal: "I can't".into(),
            ..Default::default()
        };
        assert!(carries_content(&chunk(refusal)));
    }

    #[test]
    fn a_budget_refusal_is_the_reason_only_when_no_target_was_tried() {
        let attempt = |code: &str, http_status: u32| Attempt {
            target: "p/m".into(),
            provider: "p".into(),
            model: "m".into(),
            error_code: code.into(),
            http_status,
            ..Default::default()
        };
        let outcome = |list: Vec<Attempt>| {
            let mut attempts = Attempts::new("chat");
            attempts.list = list;
            attempts.unavailable()
        };
        // The primary was down, the fallback too dear: an outage, not an exhausted budget.
        let error = outcome(vec![
            attempt("UPSTREAM_ERROR", 503),
            attempt(BUDGET_CODE, 0),
        ]);
        assert!(
            matches!(error, RouterError::UpstreamUnavailable { .. }),
            "{error:?}"
        );
        // Nothing was sent: every target too dear (or unable to take it).
        let error = outcome(vec![attempt(BUDGET_CODE, 0), attempt(BUDGET_CODE, 0)]);
        assert!(
            matches!(error, RouterError::BudgetExceeded { .. }),
            "{error:?}"
        );
        let error = outcome(vec![
            attempt("CONTEXT_WINDOW_TOO_SMALL", 0),
            attempt(BUDGET_CODE, 0),
        ]);
        assert!(
            matches!(error, RouterError::BudgetExceeded { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn targets_that_all_answered_429_are_a_rate_limit_with_the_providers_retry_after() {
        let attempt = |code: &str, http_status: u32| Attempt {
            target: "p/m".into(),
            error_code: code.into(),
            http_status,
            ..Default::default()
        };
        let mut attempts = Attempts::new("chat");
        attempts.list = vec![
            attempt("RATE_LIMITED", 429),
            attempt("KEY_COOLDOWN", 0),
            attempt("RATE_LIMITED", 429),
        ];
        attempts.last_error = Some(ProviderError::RateLimited {
            status: 429,
            retry_after: Some(Duration::from_millis(2_500)),
        });
        let error = attempts.unavailable();
        assert!(
            matches!(
                &error,
                RouterError::ProviderRateLimited {
                    retry_after_secs: Some(3),
                    attempts: 3,
                    ..
                }
            ),
            "{error:?}"
        );
        use switchboard_status::ServiceError;
        assert_eq!(error.code(), switchboard_status::ErrorCode::RateLimited);
        assert_eq!(error.metadata()["retry_after_secs"], "3");
        // One target down for another reason: an outage.
        let mut attempts = Attempts::new("chat");
        attempts.list = vec![attempt("RATE_LIMITED", 429), attempt("UPSTREAM_ERROR", 503)];
        assert!(matches!(
            attempts.unavailable(),
            RouterError::UpstreamUnavailable { .. }
        ));
    }

    #[test]
    fn an_attempt_is_sent_only_when_its_estimate_fits_what_earlier_attempts_left() {
        use switchboard_proto::ledger::v1::{TargetPrice, TokenRates};
        let price = |provider: &str, rate: i64| TargetPrice {
            provider: provider.into(),
            model: "m".into(),
            base: Some(TokenRates {
                input: rate,
                cached_input: rate,
                cache_write: rate,
                output: rate,
                reasoning: rate,
            }),
            ..Default::default()
        };
        // 1 and 10 USD per million tokens: 100 tokens estimate 100,000 and 1,000,000 nano-USD.
        let allowance = SpendAllowance {
            allowance_usd_nanos: 150_000,
            prompt_tokens: 60,
            max_output_tokens: 40,
            prices: vec![price("cheap", 1_000_000_000), price("dear", 10_000_000_000)],
        };
        assert!(fits(&allowance, "cheap", "m", &[]).is_ok());
        assert!(fits(&allowance, "dear", "m", &[]).is_err());
        assert!(fits(&allowance, "unpriced", "m", &[]).is_err());
        // A cut attempt consumed 60 tokens at the cheap rate: 60,000 spent, 90,000 left.
        let cut = Attempt {
            provider: "cheap".into(),
            model: "m".into(),
            usage: Some(Usage {
                prompt_tokens: 60,
                ..Default::default()
            }),
            ..Default::default()
        };
        let error = fits(&allowance, "cheap", "m", std::slice::from_ref(&cut)).unwrap_err();
        assert!(error.contains("90000 left"), "{error}");
    }

    #[test]
    fn backoff_grows_and_honours_capped_retry_after() {
        let policy = Policy {
            attempt_timeout: Duration::from_secs(1),
            max_retries: 3,
            backoff: Duration::from_millis(100),
            max_retry_after: Duration::from_secs(2),
            request_timeout: Duration::from_secs(60),
        };
        let error = ProviderError::Timeout;
        let first = policy.delay(1, &error);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        let third = policy.delay(3, &error);
        assert!(third >= Duration::from_millis(400) && third <= Duration::from_millis(500));
        let limited = ProviderError::RateLimited {
            status: 429,
            retry_after: Some(Duration::from_secs(30)),
        };
        assert_eq!(policy.delay(1, &limited), Duration::from_secs(2));
        let limited = ProviderError::RateLimited {
            status: 429,
            retry_after: Some(Duration::ZERO),
        };
        assert_eq!(policy.delay(1, &limited), Duration::ZERO);
    }

    fn routes(attempt_timeout_ms: u64, request_timeout_ms: u64) -> Routes {
        Routes::new(&Config {
            attempt_timeout_ms,
            request_timeout_ms,
            ..Config::default()
        })
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_caps_attempts_and_honours_the_caller() {
        let routes = routes(1_000, 10_000);
        // No caller deadline: the request timeout.
        let deadline = routes.deadline(None);
        assert_eq!(deadline - Instant::now(), Duration::from_secs(10));
        assert_eq!(
            routes.attempt_timeout(deadline),
            Some((Duration::from_secs(1), false))
        );
        // A caller deadline shorter than the request timeout wins, less the margin.
        let deadline = routes.deadline(Some(Duration::from_millis(500)));
        assert_eq!(deadline - Instant::now(), Duration::from_millis(450));
        assert_eq!(
            routes.attempt_timeout(deadline),
            Some((Duration::from_millis(450), true))
        );
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(
            routes.attempt_timeout(deadline),
            Some((Duration::from_millis(50), true))
        );
        // A retry whose backoff would pass the deadline is not made.
        let limited = ProviderError::RateLimited {
            status: 429,
            retry_after: Some(Duration::from_millis(100)),
        };
        assert!(!routes.backoff(1, &limited, deadline).await);
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(routes.attempt_timeout(deadline), None);
        // A longer caller deadline is capped by the request timeout.
        let deadline = routes.deadline(Some(Duration::from_secs(3_600)));
        assert_eq!(deadline - Instant::now(), Duration::from_secs(10));
    }
}
