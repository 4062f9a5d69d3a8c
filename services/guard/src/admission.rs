//! Admission of checks: the calls received and not yet answered are bounded, and a call beyond
//! the bound is refused at once, before its body is even decoded, with UNAVAILABLE
//! (`GUARD_OVERLOADED` reason in the metadata), which the gateway treats like an unreachable guard:
//! a 503 `guard_unavailable`, or unchecked passage on a fail-open route.
//!
//! Why: a check's cost grows with its text (about 15 µs per KB here) and runs on the one worker
//! thread. Calls that arrive faster than they are checked wait as tasks in the runtime's queue,
//! each holding its decoded request; without a bound a sustained overload grows the latency and the
//! memory without limit (975 MB of RSS at 1,000 rps of 50 KB prompts on a slow day). With the bound
//! the queue holds at most `max_in_flight` calls (about 100 ms of 50 KB checks at the default).
//!
//! Tried first and measured worse: checking large texts on a thread of the blocking pool so the
//! I/O thread keeps serving small ones. Every hand-off went back through the busy I/O thread, the
//! checking thread sat idle between checks, and 50 KB checks at 1,000 rps went from a p50 of 4 ms
//! with no error to 76 ms with 9 % refused.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use serde::Deserialize;
use switchboard_config::ConfigError;
use tonic::{
    body::Body,
    codegen::{BoxFuture, Service, http},
    server::NamedService,
};

use crate::{error::GuardError, grpc::DOMAIN};

/// `[guard.admission]`.
///
/// ```toml
/// [guard.admission]
/// max_in_flight = 128   # calls received and not answered; beyond: refused at once
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Check calls received and not yet answered, at most; one more is refused at once.
    pub max_in_flight: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig { max_in_flight: 128 }
    }
}

impl AdmissionConfig {
    /// Checks the values; errors name the dotted field path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "guard.admission.max_in_flight",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Counters of the admission (for tests and operators).
#[derive(Debug, Default)]
pub struct AdmissionStats {
    /// Calls admitted.
    pub admitted: AtomicU64,
    /// Calls refused (overload).
    pub refused: AtomicU64,
}

/// The shared admission state.
#[derive(Debug, Clone)]
pub struct Admission {
    max_in_flight: usize,
    in_flight: Arc<AtomicUsize>,
    stats: Arc<AdmissionStats>,
    /// Seconds since the Unix epoch of the last overload warning (one per second at most).
    last_warning: Arc<AtomicU64>,
}

/// A call's place among those in flight, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// Admission under `config` (validated).
    pub fn new(config: &AdmissionConfig) -> Self {
        Admission {
            max_in_flight: config.max_in_flight.max(1),
            in_flight: Arc::new(AtomicUsize::new(0)),
            stats: Arc::new(AdmissionStats::default()),
            last_warning: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<AdmissionStats> {
        &self.stats
    }

    /// A slot for one more call, or [`GuardError::Overloaded`] when `max_in_flight` are in flight.
    pub fn enter(&self) -> Result<Slot, GuardError> {
        let max = self.max_in_flight;
        match self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            }) {
            Ok(_) => {
                self.stats.admitted.fetch_add(1, Ordering::Relaxed);
                Ok(Slot {
                    in_flight: self.in_flight.clone(),
                })
            }
            Err(in_flight) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.warn_overloaded(in_flight);
                Err(GuardError::Overloaded { in_flight })
            }
        }
    }

    fn warn_overloaded(&self, in_flight: usize) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        if self.last_warning.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(
                in_flight,
                refused_total = self.stats.refused.load(Ordering::Relaxed),
                "guard overloaded: refusing checks"
            );
        }
    }

    /// `service` behind this admission.
    pub fn wrap<S>(&self, service: S) -> Admitted<S> {
        Admitted {
            inner: service,
            admission: self.clone(),
        }
    }
}

/// A gRPC service whose calls pass [`Admission::enter`] first.
#[derive(Debug, Clone)]
pub struct Admitted<S> {
    inner: S,
    admission: Admission,
}

impl<S: NamedService> NamedService for Admitted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Admitted<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self.admission.enter() {
            Ok(slot) => {
                let answered = self.inner.call(request);
                Box::pin(async move {
                    let response = answered.await;
                    drop(slot);
                    response
                })
            }
            Err(error) => {
                let status = switchboard_status::to_status(DOMAIN, &error);
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn calls_beyond_the_bound_are_refused_and_slots_are_given_back() {
        let admission = Admission::new(&AdmissionConfig { max_in_flight: 2 });
        let first = admission.enter().unwrap();
        let second = admission.enter().unwrap();
        assert!(matches!(
            admission.enter(),
            Err(GuardError::Overloaded { in_flight: 2 })
        ));
        drop(first);
        let third = admission.enter().unwrap();
        drop((second, third));
        let stats = admission.stats();
        assert_eq!(stats.admitted.load(Ordering::Relaxed), 3);
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
        assert_eq!(
            admission.in_flight.load(Ordering::Relaxed),
            0,
            "nothing leaks"
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = AdmissionConfig { max_in_flight: 0 };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("guard.admission.max_in_flight")
        );
        assert!(AdmissionConfig::default().validate().is_ok());
    }
}
