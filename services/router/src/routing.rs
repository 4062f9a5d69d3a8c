//! Routes: ordered fallback chains of provider targets, with retries of the same target.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use rand::Rng;
use switchboard_proto::chat::v1::{
    Attempt, ChatChunk, ChatRequest, ChatResponse, Model, RouteInfo, Usage,
};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::{
    app::StartupError,
    config::Config,
    error::RouterError,
    provider::{ChunkStream, Prepared, ProviderClient, ProviderError, TranslateError},
};

/// Most of a caller's deadline kept back so that the router's own answer arrives first.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

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
    fn delay(&self, retry: u32, error: &ProviderError) -> Duration {
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

struct Target {
    provider: Arc<ProviderClient>,
    provider_name: String,
    model: String,
    name: String,
}

/// The routing table and provider clients.
pub struct Routes {
    routes: HashMap<String, Vec<Target>>,
    order: Vec<String>,
    policy: Policy,
    created: i64,
}

/// What a stream producer emits.
#[derive(Debug)]
pub enum StreamEvent {
    /// A chunk to forward.
    Chunk(ChatChunk),
    /// The stream finished; sent after the last chunk.
    Done(RouteInfo),
    /// The stream failed; nothing follows.
    Failed(RouterError),
}

/// Attempts of one request so far.
struct Attempts {
    route: String,
    list: Vec<Attempt>,
    last_error: Option<ProviderError>,
}

impl Attempts {
    fn new(route: &str) -> Self {
        Attempts {
            route: route.to_owned(),
            list: Vec::new(),
            last_error: None,
        }
    }

    fn failed(&mut self, target: &Target, started: Instant, error: ProviderError) {
        tracing::info!(
            target = %target.name,
            error.code = error.code(),
            http.status_code = error.http_status(),
            "provider attempt failed"
        );
        self.list.push(Attempt {
            target: target.name.clone(),
            provider: target.provider_name.clone(),
            model: target.model.clone(),
            error_code: error.code().to_owned(),
            error_message: error.to_string(),
            http_status: u32::from(error.http_status()),
            duration_ms: started.elapsed().as_millis() as u64,
            usage: None,
        });
        self.last_error = Some(error);
    }

    fn served(mut self, target: &Target, started: Instant, usage: Option<Usage>) -> RouteInfo {
        self.list.push(Attempt {
            target: target.name.clone(),
            provider: target.provider_name.clone(),
            model: target.model.clone(),
            error_code: String::new(),
            error_message: String::new(),
            http_status: 200,
            duration_ms: started.elapsed().as_millis() as u64,
            usage,
        });
        let span = Span::current();
        span.record("target", target.name.as_str());
        span.record("attempts", self.list.len());
        RouteInfo {
            route: self.route,
            provider: target.provider_name.clone(),
            model: target.model.clone(),
            target: target.name.clone(),
            attempt_count: self.list.len() as u32,
            attempts: self.list,
        }
    }

    fn last_error_text(&self) -> String {
        self.last_error
            .as_ref()
            .map(|e| format!("{}: {e}", e.code()))
            .unwrap_or_default()
    }

    fn unavailable(self) -> RouterError {
        Span::current().record("attempts", self.list.len());
        let summary = self
            .list
            .iter()
            .map(|a| {
                if a.http_status == 0 {
                    format!("{} {}", a.target, a.error_code)
                } else {
                    format!("{} {} (HTTP {})", a.target, a.error_code, a.http_status)
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
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

/// What to do after a failed try.
enum Next {
    Retry,
    Fallback,
    Stop(RouterError),
}

fn after_failure(error: &ProviderError, target: &Target) -> Next {
    if !error.allows_fallback() {
        let message = match error {
            ProviderError::BadRequest { message, .. } => message.clone(),
            other => other.to_string(),
        };
        return Next::Stop(RouterError::UpstreamRejected {
            target: target.name.clone(),
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
    pub fn new(config: &Config) -> Result<Self, StartupError> {
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
        let mut providers = HashMap::new();
        for (name, provider) in &config.providers {
            let client =
                ProviderClient::new(name, provider, connect_timeout).map_err(|source| {
                    StartupError::HttpClient {
                        provider: name.clone(),
                        source,
                    }
                })?;
            providers.insert(name.clone(), Arc::new(client));
        }
        let mut routes = HashMap::new();
        let mut order = Vec::new();
        for route in &config.routes {
            let targets = route
                .targets
                .iter()
                .filter_map(|target| {
                    providers.get(&target.provider).map(|provider| Target {
                        provider: provider.clone(),
                        provider_name: target.provider.clone(),
                        model: target.model.clone(),
                        name: format!("{}/{}", target.provider, target.model),
                    })
                })
                .collect();
            routes.insert(route.name.clone(), targets);
            order.push(route.name.clone());
        }
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Ok(Routes {
            routes,
            order,
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

    fn targets(&self, request: &ChatRequest) -> Result<&[Target], RouterError> {
        let targets = self
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
        Ok(targets)
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

    /// Serves `request` through its route. `deadline` is the caller's overall deadline.
    pub async fn route(
        &self,
        request: &ChatRequest,
        deadline: Instant,
    ) -> Result<(ChatResponse, RouteInfo), RouterError> {
        let served = self.attempt_loop(&Unary, request, deadline).await?;
        let usage = served.output.usage;
        let info = served.attempts.served(served.target, served.started, usage);
        Ok((served.output, info))
    }

    /// Serves `request` as a stream, sending events to `tx` until done, failed, `cancel`led or the
    /// receiver is dropped (then upstream reading stops at once).
    pub async fn route_stream(
        &self,
        request: ChatRequest,
        deadline: Instant,
        tx: mpsc::Sender<StreamEvent>,
        cancel: CancellationToken,
    ) {
        let outcome = tokio::select! {
            outcome = self.stream_inner(&request, deadline, &tx) => outcome,
            () = tx.closed() => {
                tracing::info!("client went away, stream stopped");
                return;
            }
            () = cancel.cancelled() => Err(RouterError::StreamInterrupted {
                route: request.model.clone(),
                chunks: 0,
                target: String::new(),
                last_error: "router shutting down".to_owned(),
            }),
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
        deadline: Instant,
        tx: &mpsc::Sender<StreamEvent>,
    ) -> Result<RouteInfo, RouterError> {
        let served = self.attempt_loop(&Streamed, request, deadline).await?;
        let (first, stream) = served.output;
        forward(
            served.attempts,
            served.target,
            served.started,
            first,
            stream,
            tx,
            deadline,
        )
        .await
    }

    /// The one retry/backoff/deadline/fallback loop shared by unary and streamed requests: tries
    /// each target of the route in order, retrying retryable errors with backoff, until one serves.
    async fn attempt_loop<'a, E: Exchange>(
        &'a self,
        exchange: &E,
        request: &ChatRequest,
        deadline: Instant,
    ) -> Result<Served<'a, E::Output>, RouterError> {
        let targets = self.targets(request)?;
        let mut attempts = Attempts::new(&request.model);
        for target in targets {
            let prepared = target
                .provider
                .prepare(&target.model, request, E::STREAM)
                .map_err(invalid)?;
            for retry in 0..=self.policy.max_retries {
                if retry > 0 {
                    let error = attempts
                        .last_error
                        .clone()
                        .unwrap_or(ProviderError::Timeout);
                    if !self.backoff(retry, &error, deadline).await {
                        return Err(attempts.deadline_exceeded());
                    }
                }
                let Some((timeout, capped)) = self.attempt_timeout(deadline) else {
                    return Err(attempts.deadline_exceeded());
                };
                let started = Instant::now();
                match exchange.call(&target.provider, &prepared, timeout).await {
                    Ok(output) => {
                        return Ok(Served {
                            output,
                            attempts,
                            target,
                            started,
                        });
                    }
                    Err(error) => {
                        let next = after_failure(&error, target);
                        let deadline_hit = capped && error == ProviderError::Timeout;
                        attempts.failed(target, started, error);
                        if deadline_hit {
                            return Err(attempts.deadline_exceeded());
                        }
                        match next {
                            Next::Retry => continue,
                            Next::Fallback => break,
                            Next::Stop(error) => return Err(error),
                        }
                    }
                }
            }
        }
        Err(attempts.unavailable())
    }
}

/// A successful attempt: its output, and the attempts that led to it.
struct Served<'a, T> {
    output: T,
    attempts: Attempts,
    target: &'a Target,
    started: Instant,
}

/// One kind of provider call the attempt loop can make.
trait Exchange: Sync {
    /// What a successful call yields.
    type Output: Send;
    /// Whether the request is prepared for streaming.
    const STREAM: bool;
    /// One attempt, bounded by `timeout` (until the first chunk for a stream).
    fn call<'a>(
        &'a self,
        provider: &'a ProviderClient,
        prepared: &'a Prepared,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self::Output, ProviderError>> + Send + 'a;
}

/// A unary chat completion.
struct Unary;

impl Exchange for Unary {
    type Output = ChatResponse;
    const STREAM: bool = false;
    fn call<'a>(
        &'a self,
        provider: &'a ProviderClient,
        prepared: &'a Prepared,
        timeout: Duration,
    ) -> impl Future<Output = Result<ChatResponse, ProviderError>> + Send + 'a {
        provider.chat(prepared, timeout)
    }
}

/// A stream, opened until its first chunk.
struct Streamed;

impl Exchange for Streamed {
    type Output = (ChatChunk, ChunkStream);
    const STREAM: bool = true;
    fn call<'a>(
        &'a self,
        provider: &'a ProviderClient,
        prepared: &'a Prepared,
        timeout: Duration,
    ) -> impl Future<Output = Result<(ChatChunk, ChunkStream), ProviderError>> + Send + 'a {
        open(provider, prepared, timeout)
    }
}

/// Opens a stream and waits for its first chunk: until then the attempt may still fail over.
async fn open(
    provider: &ProviderClient,
    prepared: &Prepared,
    timeout: Duration,
) -> Result<(ChatChunk, ChunkStream), ProviderError> {
    let mut stream = provider.chat_stream(prepared, timeout).await?;
    match stream.next().await {
        Some(Ok(first)) => Ok((first, stream)),
        Some(Err(error)) => Err(error),
        None => Err(ProviderError::Protocol(
            "stream finished without any chunk".to_owned(),
        )),
    }
}

/// Forwards a started stream. After the first chunk there is no fallback any more.
async fn forward(
    attempts: Attempts,
    target: &Target,
    started: Instant,
    first: ChatChunk,
    mut stream: ChunkStream,
    tx: &mpsc::Sender<StreamEvent>,
    deadline: Instant,
) -> Result<RouteInfo, RouterError> {
    let mut usage = first.usage;
    let mut forwarded = 0usize;
    let route = attempts.route.clone();
    let interrupted = |chunks: usize, last_error: String| RouterError::StreamInterrupted {
        route: route.clone(),
        chunks,
        target: target.name.clone(),
        last_error,
    };
    if tx.send(StreamEvent::Chunk(first)).await.is_err() {
        return Err(interrupted(0, "client went away".to_owned()));
    }
    forwarded += 1;
    loop {
        let next = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(next) => next,
            Err(_) => {
                return Err(interrupted(
                    forwarded,
                    "TIMEOUT: deadline exceeded".to_owned(),
                ));
            }
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
                tracing::warn!(target = %target.name, error.code = error.code(), chunks = forwarded, "stream interrupted");
                return Err(interrupted(forwarded, format!("{}: {error}", error.code())));
            }
            None => return Ok(attempts.served(target, started, usage)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
