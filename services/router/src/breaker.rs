//! Circuit breaker and cooldown of one (provider, endpoint, key, model).
//!
//! Closed → open after `failure_threshold` consecutive failures → after `open_ms`, half-open: exactly
//! one probe request is let through → closed on its success, open again on its failure. A 429 puts
//! the key on cooldown until `Retry-After` (or `rate_limit_cooldown_ms`), a 401/403 for
//! `auth_cooldown_ms`; a cooldown neither counts as a failure nor opens the breaker. The lock is a
//! plain mutex held for a few instructions, never across an await.

use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use crate::{provider::ProviderError, route_config::BreakerConfig};

/// Breaker state, as exported in metrics (`0` closed, `1` open, `2` half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Requests flow.
    Closed,
    /// Requests are refused until the instant.
    Open(Instant),
    /// One probe may go (`true`: it is in flight).
    HalfOpen(bool),
}

impl State {
    /// The metrics gauge value.
    pub fn gauge(self) -> u8 {
        match self {
            State::Closed => 0,
            State::Open(_) => 1,
            State::HalfOpen(_) => 2,
        }
    }
}

/// Why a deployment cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// The breaker is open (or half-open with its probe in flight).
    Open,
    /// The key is cooling down after a 429 or an authentication error.
    Cooldown,
}

impl Blocked {
    /// The attempt's reason code when a target is skipped for it.
    pub fn code(self) -> &'static str {
        match self {
            Blocked::Open => "CIRCUIT_OPEN",
            Blocked::Cooldown => "KEY_COOLDOWN",
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    failures: u32,
    cooldown_until: Option<Instant>,
}

/// The breaker of one deployment.
#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
    threshold: u32,
    open_for: Duration,
    rate_limit_cooldown: Duration,
    auth_cooldown: Duration,
}

/// What a failed attempt means for the breaker.
enum Verdict {
    /// Counts towards opening.
    Failure,
    /// Cooldown for this long; the deployment itself answered.
    Cooldown(Duration),
    /// The deployment answered; the request was at fault.
    Healthy,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: &BreakerConfig) -> Self {
        Breaker {
            inner: Mutex::new(Inner {
                state: State::Closed,
                failures: 0,
                cooldown_until: None,
            }),
            threshold: config.failure_threshold.max(1),
            open_for: Duration::from_millis(config.open_ms.max(1)),
            rate_limit_cooldown: Duration::from_millis(config.rate_limit_cooldown_ms),
            auth_cooldown: Duration::from_millis(config.auth_cooldown_ms),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so poisoning is ignored.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes over the state of `old` (the same deployment before a reload). A probe in flight on
    /// `old` is resolved there; here the slot reads as free.
    pub fn carry_from(&self, old: &Breaker) {
        let (state, failures, cooldown_until) = {
            let old = old.lock();
            (old.state, old.failures, old.cooldown_until)
        };
        let mut inner = self.lock();
        inner.state = match state {
            State::HalfOpen(true) => State::HalfOpen(false),
            state => state,
        };
        inner.failures = failures;
        inner.cooldown_until = cooldown_until;
    }

    /// The current state (an expired open state reads as half-open).
    pub fn state(&self, now: Instant) -> State {
        match self.lock().state {
            State::Open(until) if until <= now => State::HalfOpen(false),
            state => state,
        }
    }

    /// Whether a request could go now; otherwise why not and, when known, until when.
    pub fn check(&self, now: Instant) -> Result<(), (Blocked, Option<Instant>)> {
        let inner = self.lock();
        if let Some(until) = inner.cooldown_until.filter(|until| *until > now) {
            return Err((Blocked::Cooldown, Some(until)));
        }
        match inner.state {
            State::Open(until) if until > now => Err((Blocked::Open, Some(until))),
            State::HalfOpen(true) => Err((Blocked::Open, None)),
            _ => Ok(()),
        }
    }

    /// Takes the right to send one request: always while closed, only the single probe while
    /// half-open. The permit must be resolved with [`Permit::finish`]; dropped unresolved it frees
    /// the probe slot without a verdict.
    pub fn acquire(&self, now: Instant) -> Option<Permit<'_>> {
        let mut inner = self.lock();
        if inner.cooldown_until.is_some_and(|until| until > now) {
            return None;
        }
        let probe = match inner.state {
            State::Closed => false,
            State::Open(until) if until > now => return None,
            State::HalfOpen(true) => return None,
            State::Open(_) | State::HalfOpen(false) => {
                inner.state = State::HalfOpen(true);
                true
            }
        };
        Some(Permit {
            breaker: self,
            probe,
            done: false,
        })
    }

    fn verdict(&self, error: &ProviderError) -> Verdict {
        match error {
            ProviderError::RateLimited { retry_after, .. } => {
                Verdict::Cooldown(retry_after.unwrap_or(self.rate_limit_cooldown))
            }
            ProviderError::Authentication { .. } => Verdict::Cooldown(self.auth_cooldown),
            ProviderError::Protocol(_) => Verdict::Failure,
            // 5xx, overload, timeouts, connection errors, broken streams.
            other if other.is_retryable() => Verdict::Failure,
            _ => Verdict::Healthy,
        }
    }

    fn success(&self) {
        let mut inner = self.lock();
        inner.state = State::Closed;
        inner.failures = 0;
    }

    /// Records a failure outside a permit (a stream that broke after it committed).
    pub fn failure(&self, now: Instant, error: &ProviderError) {
        self.resolve(now, error, false);
    }

    fn resolve(&self, now: Instant, error: &ProviderError, probe: bool) {
        let verdict = self.verdict(error);
        let mut inner = self.lock();
        match verdict {
            Verdict::Failure => {
                inner.failures = inner.failures.saturating_add(1);
                let reopen = probe || matches!(inner.state, State::HalfOpen(_));
                if reopen || inner.failures >= self.threshold {
                    inner.state = State::Open(now + self.open_for);
                }
            }
            Verdict::Cooldown(for_how_long) => {
                let until = now + for_how_long;
                inner.cooldown_until = Some(inner.cooldown_until.map_or(until, |u| u.max(until)));
                if probe {
                    inner.state = State::HalfOpen(false);
                }
            }
            Verdict::Healthy => {
                inner.state = State::Closed;
                inner.failures = 0;
            }
        }
    }
}

/// The right to send one request through a breaker.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    done: bool,
}

impl Permit<'_> {
    /// Records the outcome of the request.
    pub fn finish(mut self, now: Instant, outcome: Result<(), &ProviderError>) {
        self.done = true;
        match outcome {
            Ok(()) => self.breaker.success(),
            Err(error) => self.breaker.resolve(now, error, self.probe),
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done && self.probe {
            let mut inner = self.breaker.lock();
            if inner.state == State::HalfOpen(true) {
                inner.state = State::HalfOpen(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(&BreakerConfig {
            failure_threshold: 3,
            open_ms: 10_000,
            rate_limit_cooldown_ms: 2_000,
            auth_cooldown_ms: 60_000,
        })
    }

    fn fail(breaker: &Breaker, error: &ProviderError) {
        let now = Instant::now();
        breaker.acquire(now).unwrap().finish(now, Err(error));
    }

    const BOOM: ProviderError = ProviderError::Timeout;

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_then_probes_once_and_closes() {
        let breaker = breaker();
        fail(&breaker, &BOOM);
        fail(&breaker, &BOOM);
        // A success resets the count.
        let now = Instant::now();
        breaker.acquire(now).unwrap().finish(now, Ok(()));
        fail(&breaker, &BOOM);
        fail(&breaker, &BOOM);
        assert_eq!(breaker.state(Instant::now()), State::Closed);
        fail(&breaker, &BOOM);
        let opened = Instant::now();
        assert_eq!(
            breaker.state(opened),
            State::Open(opened + Duration::from_secs(10))
        );
        assert!(breaker.acquire(opened).is_none());
        assert_eq!(
            breaker.check(opened),
            Err((Blocked::Open, Some(opened + Duration::from_secs(10))))
        );

        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(breaker.acquire(Instant::now()).is_none());
        tokio::time::advance(Duration::from_millis(1)).await;
        let now = Instant::now();
        assert_eq!(breaker.state(now), State::HalfOpen(false));
        let probe = breaker.acquire(now).unwrap();
        // Only one probe at a time.
        assert!(breaker.acquire(now).is_none());
        assert_eq!(breaker.check(now), Err((Blocked::Open, None)));
        probe.finish(now, Ok(()));
        assert_eq!(breaker.state(now), State::Closed);
        assert!(breaker.acquire(now).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_an_abandoned_probe_frees_the_slot() {
        let breaker = breaker();
        for _ in 0..3 {
            fail(&breaker, &BOOM);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        drop(breaker.acquire(now).unwrap());
        assert_eq!(breaker.state(now), State::HalfOpen(false));
        fail(&breaker, &ProviderError::Connection("refused".into()));
        let now = Instant::now();
        assert_eq!(
            breaker.state(now),
            State::Open(now + Duration::from_secs(10))
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        // A bad request proves the deployment answers: the probe closes the breaker.
        fail(
            &breaker,
            &ProviderError::BadRequest {
                status: 400,
                message: String::new(),
            },
        );
        assert_eq!(breaker.state(Instant::now()), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_cool_the_key_down_without_opening_the_breaker() {
        let breaker = breaker();
        let limited = |retry_after| ProviderError::RateLimited {
            status: 429,
            retry_after,
        };
        for _ in 0..5 {
            let now = Instant::now();
            assert!(breaker.acquire(now).is_some());
            breaker
                .acquire(now)
                .unwrap()
                .finish(now, Err(&limited(Some(Duration::from_secs(7)))));
            let until = now + Duration::from_secs(7);
            assert_eq!(breaker.check(now), Err((Blocked::Cooldown, Some(until))));
            assert!(breaker.acquire(now).is_none());
            tokio::time::advance(Duration::from_secs(7)).await;
        }
        assert_eq!(breaker.state(Instant::now()), State::Closed);
        // Without Retry-After: the configured default.
        fail(&breaker, &limited(None));
        let now = Instant::now();
        assert_eq!(
            breaker.check(now),
            Err((Blocked::Cooldown, Some(now + Duration::from_secs(2))))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(breaker.check(Instant::now()), Ok(()));
        // Authentication errors: a long cooldown.
        fail(&breaker, &ProviderError::Authentication { status: 401 });
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(breaker.acquire(Instant::now()).is_none());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(breaker.acquire(Instant::now()).is_some());
    }
}
