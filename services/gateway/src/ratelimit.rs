//! Per-key and per-app rate limits (requests and tokens per minute) shared by every gateway replica
//! (ADR 007). The ledger keeps one counter per scope and minute window in Postgres and grants
//! slices of it (`AcquireRateSlice`); a replica admits requests from its slice locally and asks for
//! another when it is used up. A refused slice is remembered until the window ends, so an
//! exhausted limit costs no RPC either. Unused slices lapse with their window: a replica can only
//! under-admit, never over-admit.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use serde::Deserialize;
use switchboard_config::ConfigError;
use switchboard_grpc::TracedChannel;
use switchboard_proto::{
    chat::v1::ChatRequest,
    ledger::v1::{AcquireRateSliceRequest, budget_service_client::BudgetServiceClient},
};

use crate::{
    auth::Principal,
    budget::{BudgetsConfig, output_bound, prompt_bound},
    error::GatewayError,
};

/// `[[gateway.rate_limits]]`: a limit on one key or one app.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// A key id (exactly one of `key` and `app`).
    #[serde(default)]
    pub key: Option<String>,
    /// An app.
    #[serde(default)]
    pub app: Option<String>,
    /// Requests per minute (0: no request limit).
    #[serde(default)]
    pub requests_per_minute: u64,
    /// Tokens per minute (0: no token limit). A chat request is charged at admission what the
    /// budget estimate bounds it by: the prompt bound plus `max_tokens` × `n`, with
    /// `gateway.budgets.default_max_output_tokens` for a request without `max_tokens`; an
    /// embeddings request its inputs' bytes. A request whose prompt and explicit `max_tokens` × `n`
    /// are more than this is refused as invalid (400 `tokens_exceed_rate_limit`): no window could
    /// ever admit it. Without `max_tokens` the charge is capped at this limit.
    #[serde(default)]
    pub tokens_per_minute: u64,
}

/// Checks `[[gateway.rate_limits]]`.
pub fn validate(limits: &[RateLimitConfig]) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for (index, limit) in limits.iter().enumerate() {
        let path = format!("gateway.rate_limits[{index}]");
        let scope = match (&limit.key, &limit.app) {
            (Some(key), None) if !key.is_empty() => format!("key:{key}"),
            (None, Some(app)) if !app.is_empty() => format!("app:{app}"),
            _ => {
                return Err(ConfigError::invalid(
                    path,
                    "set exactly one of `key` and `app`",
                ));
            }
        };
        if limit.requests_per_minute == 0 && limit.tokens_per_minute == 0 {
            return Err(ConfigError::invalid(
                format!("{path}.requests_per_minute"),
                "set requests_per_minute or tokens_per_minute",
            ));
        }
        if !seen.insert(scope.clone()) {
            return Err(ConfigError::invalid(
                path,
                format!("a second limit for `{scope}`"),
            ));
        }
    }
    Ok(())
}

/// A request's token charge at admission: `tokens`, the upper bound charged, and `floor`, the
/// part the caller asked for (prompt and explicit `max_tokens`), which no limit may be below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCharge {
    pub tokens: u64,
    pub floor: u64,
}

impl From<u64> for TokenCharge {
    /// A charge the caller asked for in full (an embedding's input).
    fn from(tokens: u64) -> Self {
        Self {
            tokens,
            floor: tokens,
        }
    }
}

/// The shared limits of this replica.
#[derive(Clone)]
pub struct RateLimits {
    ledger: BudgetServiceClient<TracedChannel>,
    holder: Arc<str>,
    /// `gateway.budgets.default_max_output_tokens`: a request without `max_tokens` is charged
    /// this per choice, as the budget estimate is.
    default_max_output_tokens: u32,
    keys: Arc<HashMap<String, Arc<Limiter>>>,
    apps: Arc<HashMap<String, Arc<Limiter>>>,
}

struct Limiter {
    scope: String,
    requests_per_minute: u64,
    tokens_per_minute: u64,
    window: Mutex<Window>,
    refill: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Window {
    /// End of the window the slice belongs to (wall clock, as the ledger's windows are).
    ends: Option<SystemTime>,
    requests: u64,
    tokens: u64,
    /// The ledger granted nothing more in this window.
    exhausted: bool,
}

impl Window {
    fn current(&mut self, now: SystemTime) -> bool {
        match self.ends {
            Some(ends) if now < ends => true,
            _ => {
                *self = Window::default();
                false
            }
        }
    }
}

/// Admission outcome of one limiter.
enum Admit {
    /// Admitted: this much was taken from the window's slice.
    Yes(Taken),
    Ask,
    /// Refused until the window ends, by this limit.
    No(Duration, Short),
}

/// What an admission took from a window (given back when another limit refuses the request).
#[derive(Debug, Clone, Copy)]
struct Taken {
    ends: SystemTime,
    requests: u64,
    tokens: u64,
}

/// The limit that refused a request: its configuration name and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Short {
    limit: &'static str,
    value: u64,
}

impl Limiter {
    /// Which of this limiter's limits the window cannot cover for a request of `tokens`.
    fn short(&self, window: &Window, tokens: u64) -> Short {
        let tokens_short = self.tokens_per_minute > 0 && window.tokens < tokens;
        if tokens_short && (self.requests_per_minute == 0 || window.requests > 0) {
            Short {
                limit: "tokens_per_minute",
                value: self.tokens_per_minute,
            }
        } else {
            Short {
                limit: "requests_per_minute",
                value: self.requests_per_minute,
            }
        }
    }

    fn admit(&self, tokens: u64, now: SystemTime) -> Admit {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if !window.current(now) {
            return Admit::Ask;
        }
        let need_requests = u64::from(self.requests_per_minute > 0);
        let need_tokens = if self.tokens_per_minute > 0 {
            tokens
        } else {
            0
        };
        if let Some(ends) = window.ends
            && window.requests >= need_requests
            && window.tokens >= need_tokens
        {
            window.requests -= need_requests;
            window.tokens -= need_tokens;
            return Admit::Yes(Taken {
                ends,
                requests: need_requests,
                tokens: need_tokens,
            });
        }
        if window.exhausted {
            let wait = window
                .ends
                .and_then(|ends| ends.duration_since(now).ok())
                .unwrap_or_default();
            return Admit::No(wait, self.short(&window, need_tokens));
        }
        Admit::Ask
    }

    /// Gives back what an admission took, while its window lasts.
    fn refund(&self, taken: Taken) {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if window.ends == Some(taken.ends) {
            window.requests += taken.requests;
            window.tokens += taken.tokens;
        }
    }

    /// Slice size: a twentieth of the limit, at least what this request needs.
    fn want(&self, tokens: u64) -> (u64, u64) {
        let requests = if self.requests_per_minute > 0 {
            (self.requests_per_minute / 20).max(1)
        } else {
            0
        };
        let tokens = if self.tokens_per_minute > 0 {
            (self.tokens_per_minute / 20).max(tokens)
        } else {
            0
        };
        (requests, tokens)
    }
}

fn limiter(scope: String, config: &RateLimitConfig) -> Arc<Limiter> {
    Arc::new(Limiter {
        scope,
        requests_per_minute: config.requests_per_minute,
        tokens_per_minute: config.tokens_per_minute,
        window: Mutex::new(Window::default()),
        refill: tokio::sync::Mutex::new(()),
    })
}

impl RateLimits {
    /// The configured limits; `None` when there are none (no code on the request path then).
    /// `budgets` gives the ledger holder name and the output bound of a request without
    /// `max_tokens`.
    pub fn new(
        limits: &[RateLimitConfig],
        ledger: TracedChannel,
        budgets: &BudgetsConfig,
    ) -> Option<Self> {
        if limits.is_empty() {
            return None;
        }
        let mut keys = HashMap::new();
        let mut apps = HashMap::new();
        for limit in limits {
            if let Some(key) = &limit.key {
                keys.insert(key.clone(), limiter(format!("key:{key}"), limit));
            } else if let Some(app) = &limit.app {
                apps.insert(app.clone(), limiter(format!("app:{app}"), limit));
            }
        }
        Some(RateLimits {
            ledger: BudgetServiceClient::new(ledger),
            holder: Arc::from(budgets.holder.as_str()),
            default_max_output_tokens: budgets.default_max_output_tokens,
            keys: Arc::new(keys),
            apps: Arc::new(apps),
        })
    }

    /// The tokens a chat request is charged at admission: the same upper bound as the budget
    /// estimate's (`budget::prompt_bound` plus `budget::output_bound`: `max_tokens`, or the
    /// default, × `n`). Only the prompt and an explicit `max_tokens` are the caller's own
    /// demand (`floor`); the default output bound is ours, so it never makes a request
    /// inadmissible by itself (see `check`).
    pub fn chat_tokens(&self, request: &ChatRequest) -> TokenCharge {
        let prompt = u64::from(prompt_bound(request));
        let sampling = request.sampling.as_ref();
        let tokens = prompt + u64::from(output_bound(sampling, self.default_max_output_tokens));
        let floor = if sampling.is_some_and(|s| s.max_tokens.is_some()) {
            tokens
        } else {
            prompt
        };
        TokenCharge { tokens, floor }
    }

    /// Admits one request of about `charge.tokens` tokens for `principal`, or refuses it with a
    /// rate-limit error naming the limit and carrying the time until the window ends. A request
    /// whose own demand (`charge.floor`) is more than a whole `tokens_per_minute` limit can never
    /// be admitted: it is refused as invalid (`TokensExceedRateLimit`), not told to retry. A
    /// charge above a limit only because of the default output bound is capped at that limit
    /// (it takes a whole window, but it can be admitted). When the app's limit refuses a request
    /// the key's admitted, the key's share is given back.
    pub async fn check(
        &self,
        principal: &Principal,
        charge: impl Into<TokenCharge>,
    ) -> Result<(), GatewayError> {
        let charge = charge.into();
        let limiters = [
            self.keys.get(&principal.key_id),
            self.apps.get(&principal.app),
        ];
        for limiter in limiters.iter().flatten() {
            if limiter.tokens_per_minute > 0 && charge.floor > limiter.tokens_per_minute {
                return Err(GatewayError::TokensExceedRateLimit {
                    scope: limiter.scope.clone(),
                    limit: limiter.tokens_per_minute,
                    charge: charge.floor,
                });
            }
        }
        let mut taken: Vec<(&Limiter, Taken)> = Vec::with_capacity(limiters.len());
        for limiter in limiters.into_iter().flatten() {
            let tokens = if limiter.tokens_per_minute > 0 {
                charge.tokens.min(limiter.tokens_per_minute)
            } else {
                charge.tokens
            };
            match self.check_one(limiter, tokens).await {
                Ok(took) => taken.push((limiter, took)),
                Err(error) => {
                    for (limiter, took) in taken {
                        limiter.refund(took);
                    }
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    async fn check_one(&self, limiter: &Limiter, tokens: u64) -> Result<Taken, GatewayError> {
        // Each round either admits, refuses, or records a grant; three rounds bound a race with
        // the window's end.
        for _ in 0..3 {
            match limiter.admit(tokens, SystemTime::now()) {
                Admit::Yes(taken) => return Ok(taken),
                Admit::No(wait, short) => return Err(limited(limiter, short, wait)),
                Admit::Ask => {}
            }
            let _one = limiter.refill.lock().await;
            match limiter.admit(tokens, SystemTime::now()) {
                Admit::Yes(taken) => return Ok(taken),
                Admit::No(wait, short) => return Err(limited(limiter, short, wait)),
                Admit::Ask => {}
            }
            let (want_requests, want_tokens) = limiter.want(tokens);
            let granted = self
                .ledger
                .clone()
                .acquire_rate_slice(AcquireRateSliceRequest {
                    scope: limiter.scope.clone(),
                    holder: self.holder.to_string(),
                    requests_per_minute: limiter.requests_per_minute,
                    tokens_per_minute: limiter.tokens_per_minute,
                    want_requests,
                    want_tokens,
                })
                .await
                .map_err(|status| {
                    tracing::warn!(code = ?status.code(), "rate-limit slice refused by the ledger");
                    GatewayError::DependencyDown { service: "ledger" }
                })?
                .into_inner();
            let ends = granted
                .window_end
                .and_then(|end| {
                    let secs = u64::try_from(end.seconds).ok()?;
                    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
                })
                .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(60));
            let mut window = limiter
                .window
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if window.ends != Some(ends) {
                *window = Window {
                    ends: Some(ends),
                    ..Window::default()
                };
            }
            window.requests += granted.granted_requests;
            window.tokens += granted.granted_tokens;
            let short_requests =
                limiter.requests_per_minute > 0 && granted.granted_requests < want_requests;
            let short_tokens = limiter.tokens_per_minute > 0 && granted.granted_tokens < tokens;
            if (short_requests && window.requests == 0) || (short_tokens && window.tokens < tokens)
            {
                window.exhausted = true;
            }
        }
        let short = {
            let window = limiter
                .window
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            limiter.short(&window, tokens)
        };
        Err(limited(limiter, short, Duration::from_secs(1)))
    }
}

fn limited(limiter: &Limiter, short: Short, wait: Duration) -> GatewayError {
    // Whole seconds, rounded up, at least one.
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    GatewayError::RateLimited {
        scope: limiter.scope.clone(),
        limit: short.limit,
        limit_value: short.value,
        retry_after_secs: secs.max(1),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limit() -> Limiter {
        Limiter {
            scope: "key:k".into(),
            requests_per_minute: 40,
            tokens_per_minute: 0,
            window: Mutex::new(Window::default()),
            refill: tokio::sync::Mutex::new(()),
        }
    }

    #[test]
    fn a_slice_admits_locally_then_asks_and_an_exhausted_window_refuses_until_it_ends() {
        let limiter = limit();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_020);
        assert!(matches!(limiter.admit(1, now), Admit::Ask));
        assert_eq!(limiter.want(1), (2, 0));
        *limiter.window.lock().unwrap() = Window {
            ends: Some(now + Duration::from_secs(40)),
            requests: 1,
            tokens: 0,
            exhausted: false,
        };
        assert!(matches!(limiter.admit(1, now), Admit::Yes(_)));
        assert!(matches!(limiter.admit(1, now), Admit::Ask));
        limiter.window.lock().unwrap().exhausted = true;
        let short = match limiter.admit(1, now + Duration::from_millis(500)) {
            Admit::No(wait, short) => {
                assert_eq!(wait, Duration::from_millis(39_500));
                short
            }
            _ => panic!("expected a refusal"),
        };
        assert_eq!(
            short,
            Short {
                limit: "requests_per_minute",
                value: 40
            }
        );
        let error = limited(&limiter, short, Duration::from_millis(39_500));
        assert!(matches!(
            error,
            GatewayError::RateLimited {
                retry_after_secs: 40,
                limit: "requests_per_minute",
                limit_value: 40,
                ..
            }
        ));
        // The next window starts afresh.
        assert!(matches!(
            limiter.admit(1, now + Duration::from_secs(41)),
            Admit::Ask
        ));
    }

    fn principal() -> Principal {
        Principal {
            key_id: "k".into(),
            app: "a".into(),
            team: "t".into(),
            models: crate::auth::ModelAccess::default(),
            tags: Arc::from(Vec::new()),
        }
    }

    /// Limits whose ledger is never reached (the tests fill the windows themselves).
    fn limits(configs: &[RateLimitConfig]) -> RateLimits {
        let ledger = switchboard_grpc::channel("http://127.0.0.1:9").unwrap();
        RateLimits::new(configs, ledger, &BudgetsConfig::default()).unwrap()
    }

    fn on_key(requests_per_minute: u64, tokens_per_minute: u64) -> RateLimitConfig {
        RateLimitConfig {
            key: Some("k".into()),
            app: None,
            requests_per_minute,
            tokens_per_minute,
        }
    }

    /// A window of this replica that the ledger will not add to before it ends.
    fn fill(limiter: &Limiter, requests: u64, tokens: u64) {
        *limiter.window.lock().unwrap() = Window {
            ends: Some(SystemTime::now() + Duration::from_secs(600)),
            requests,
            tokens,
            exhausted: true,
        };
    }

    #[tokio::test]
    async fn the_token_charge_bounds_the_answer_as_the_budget_estimate_does() {
        use switchboard_proto::chat::v1::{Message, Role, SamplingParams};
        let limits = limits(&[on_key(0, 100_000)]);
        let mut request = ChatRequest {
            model: "m".into(),
            messages: vec![Message::text(Role::User, "hi")],
            ..Default::default()
        };
        let prompt = u64::from(prompt_bound(&request));
        // No max_tokens: the default output bound (4096), not nothing.
        assert_eq!(limits.chat_tokens(&request).tokens, prompt + 4_096);
        assert_eq!(
            limits.chat_tokens(&request).floor,
            prompt,
            "the default is not the caller's"
        );
        request.sampling = Some(SamplingParams {
            n: Some(3),
            ..Default::default()
        });
        assert_eq!(limits.chat_tokens(&request).tokens, prompt + 3 * 4_096);
        request.sampling = Some(SamplingParams {
            n: Some(3),
            max_tokens: Some(100),
            ..Default::default()
        });
        assert_eq!(
            limits.chat_tokens(&request),
            TokenCharge {
                tokens: prompt + 300,
                floor: prompt + 300
            }
        );
        // The same bound the budget estimate reserves.
        let estimate = crate::budget::output_bound(request.sampling.as_ref(), 4_096);
        assert_eq!(
            limits.chat_tokens(&request).tokens,
            prompt + u64::from(estimate)
        );

        // What is left of the window covers the prompt and 1,000 tokens of answer: a request
        // that may answer with 4,096 is refused, one with max_tokens 100 × 3 is admitted.
        fill(&limits.keys["k"], 0, prompt + 1_000);
        request.sampling = None;
        let error = limits
            .check(&principal(), limits.chat_tokens(&request))
            .await
            .unwrap_err();
        assert!(matches!(error, GatewayError::RateLimited { .. }), "{error}");
        request.sampling = Some(SamplingParams {
            n: Some(3),
            max_tokens: Some(100),
            ..Default::default()
        });
        limits
            .check(&principal(), limits.chat_tokens(&request))
            .await
            .unwrap();
        assert_eq!(limits.keys["k"].window.lock().unwrap().tokens, 700);
    }

    #[tokio::test]
    async fn a_limit_below_the_default_answer_bound_admits_requests_without_max_tokens() {
        use switchboard_proto::chat::v1::{Message, Role, SamplingParams};
        // 2,000 tokens a minute, below the default output bound (4,096).
        let limits = limits(&[on_key(0, 2_000)]);
        let mut request = ChatRequest {
            model: "m".into(),
            messages: vec![Message::text(Role::User, "hi")],
            ..Default::default()
        };
        // Without max_tokens the default bound is capped at the limit: admitted, taking the
        // whole window...
        fill(&limits.keys["k"], 0, 2_000);
        limits
            .check(&principal(), limits.chat_tokens(&request))
            .await
            .unwrap();
        assert_eq!(limits.keys["k"].window.lock().unwrap().tokens, 0);
        // ...so the next one waits for the next window (a 429 with Retry-After, not a 400).
        let error = limits
            .check(&principal(), limits.chat_tokens(&request))
            .await
            .unwrap_err();
        assert!(matches!(error, GatewayError::RateLimited { .. }), "{error}");
        // An explicit max_tokens beyond the limit is the caller's demand: never admissible.
        request.sampling = Some(SamplingParams {
            max_tokens: Some(3_000),
            ..Default::default()
        });
        fill(&limits.keys["k"], 0, 2_000);
        let error = limits
            .check(&principal(), limits.chat_tokens(&request))
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                GatewayError::TokensExceedRateLimit { limit: 2_000, .. }
            ),
            "{error}"
        );
        assert_eq!(limits.keys["k"].window.lock().unwrap().tokens, 2_000);
    }

    #[tokio::test]
    async fn a_refusal_names_the_limit_and_the_app_refusing_gives_the_keys_share_back() {
        let limits = limits(&[
            on_key(40, 0),
            RateLimitConfig {
                key: None,
                app: Some("a".into()),
                requests_per_minute: 10,
                tokens_per_minute: 5_000,
            },
        ]);
        let (key, app) = (&limits.keys["k"], &limits.apps["a"]);
        // The key's slice has one request left; the app's window is used up.
        fill(key, 1, 0);
        fill(app, 0, 5_000);
        let error = limits.check(&principal(), 10).await.unwrap_err();
        match &error {
            GatewayError::RateLimited {
                scope,
                limit,
                limit_value,
                ..
            } => {
                assert_eq!(scope, "app:a");
                assert_eq!(*limit, "requests_per_minute");
                assert_eq!(*limit_value, 10);
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
        let message = error.to_string();
        assert!(message.contains("requests_per_minute = 10"), "{message}");
        // The key's request came back: the app refused the request, the key did not.
        assert_eq!(key.window.lock().unwrap().requests, 1);

        // The app has requests but too few tokens: the token limit is named.
        fill(app, 3, 50);
        let error = limits.check(&principal(), 100).await.unwrap_err();
        assert!(
            matches!(
                error,
                GatewayError::RateLimited {
                    limit: "tokens_per_minute",
                    limit_value: 5_000,
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(key.window.lock().unwrap().requests, 1);

        // Both admit: each takes its share.
        fill(app, 3, 5_000);
        limits.check(&principal(), 100).await.unwrap();
        assert_eq!(key.window.lock().unwrap().requests, 0);
        let window = app.window.lock().unwrap();
        assert_eq!((window.requests, window.tokens), (2, 4_900));
    }

    #[tokio::test]
    async fn a_request_larger_than_the_whole_token_limit_is_invalid_not_told_to_retry() {
        let limits = limits(&[on_key(40, 1_000)]);
        fill(&limits.keys["k"], 40, 1_000);
        // The whole limit is admitted...
        limits.check(&principal(), 1_000).await.unwrap();
        // ...one token more never can be, in any window: a client error, without Retry-After,
        // naming the limit and the charge; nothing is taken.
        let error = limits.check(&principal(), 1_001).await.unwrap_err();
        assert!(
            matches!(
                &error,
                GatewayError::TokensExceedRateLimit {
                    scope,
                    limit: 1_000,
                    charge: 1_001,
                } if scope == "key:k"
            ),
            "{error:?}"
        );
        use switchboard_status::ServiceError;
        assert_eq!(error.code(), switchboard_status::ErrorCode::InvalidArgument);
        assert_eq!(error.retry_after_secs(), None);
        let message = error.to_string();
        assert!(message.contains("1001 tokens"), "{message}");
        assert!(message.contains("tokens_per_minute"), "{message}");
        assert!(message.contains("(1000)"), "{message}");
        assert_eq!(limits.keys["k"].window.lock().unwrap().requests, 39);
    }

    #[test]
    fn configuration_names_the_bad_limit() {
        let both = RateLimitConfig {
            key: Some("k".into()),
            app: Some("a".into()),
            requests_per_minute: 1,
            tokens_per_minute: 0,
        };
        let error = validate(&[both]).unwrap_err().to_string();
        assert!(error.contains("gateway.rate_limits[0]"), "{error}");
        let none = RateLimitConfig {
            key: Some("k".into()),
            app: None,
            requests_per_minute: 0,
            tokens_per_minute: 0,
        };
        let error = validate(&[none]).unwrap_err().to_string();
        assert!(
            error.contains("gateway.rate_limits[0].requests_per_minute"),
            "{error}"
        );
    }
}
