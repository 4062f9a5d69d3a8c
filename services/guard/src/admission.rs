//! Admission of checks, with two bounds. A call beyond `max_in_flight` calls received and not yet
//! answered is refused at once, before its body is decoded (memory); a call that waited longer
//! than `max_wait_ms` between its arrival and its turn is refused instead of checked (latency).
//! Both are UNAVAILABLE with `GUARD_OVERLOADED` as the reason in the metadata, which the gateway
//! treats like an unreachable guard (a 503 `guard_unavailable`, or unchecked passage on a
//! fail-open route) but names: the refusal's message and `metadata.cause` say `overloaded`.
//!
//! Why: a check's cost grows with its text (about 15 µs per KB here) and runs on the one worker
//! thread. Calls that arrive faster than they are checked wait as tasks in the runtime's queue,
//! each holding its decoded request; without a bound a sustained overload grows the latency and the
//! memory without limit (975 MB of RSS at 1,000 rps of 50 KB prompts on a slow day). The wait
//! bound sheds only a sustained overload: a short stall of the machine (tens of milliseconds)
//! queues calls without refusing any, which a count of 128 in flight did in a full bench run (96
//! streams refused at 1,000 rps). The count bound is the memory backstop.
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
    time::{Duration, Instant},
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
/// max_in_flight = 2048  # calls received and not answered; beyond: refused at once
/// max_wait_ms = 500     # a call that waited longer for its turn is refused, not checked (0: off)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Check calls received and not yet answered, at most; one more is refused at once.
    pub max_in_flight: usize,
    /// Longest wait between a call's arrival and the start of its check (milliseconds); a call
    /// that waited longer is refused without being checked. 0: no limit.
    pub max_wait_ms: u64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_in_flight: 2048,
            max_wait_ms: 500,
        }
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
    /// Calls refused (overload): the two below together.
    pub refused: AtomicU64,
    /// Calls refused at once, `max_in_flight` being in flight.
    pub refused_in_flight: AtomicU64,
    /// Calls refused unchecked, having waited longer than `max_wait_ms` for their turn.
    pub refused_waited: AtomicU64,
}

/// The shared admission state.
#[derive(Debug, Clone)]
pub struct Admission {
    max_in_flight: usize,
    max_wait: Option<Duration>,
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
            max_wait: (config.max_wait_ms > 0).then(|| Duration::from_millis(config.max_wait_ms)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            stats: Arc::new(AdmissionStats::default()),
            last_warning: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<AdmissionStats> {
        &self.stats
    }

    /// Calls received and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
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
                self.stats.refused_in_flight.fetch_add(1, Ordering::Relaxed);
                self.warn_overloaded(in_flight);
                Err(GuardError::Overloaded { in_flight })
            }
        }
    }

    /// Refuses a call whose turn came after its [`Deadline`] (it waited too long to be checked).
    pub fn check_wait(&self, deadline: Option<&Deadline>) -> Result<(), GuardError> {
        let Some(Deadline(deadline)) = deadline else {
            return Ok(());
        };
        let now = Instant::now();
        if now <= *deadline {
            return Ok(());
        }
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        self.stats.refused_waited.fetch_add(1, Ordering::Relaxed);
        let waited_ms = self
            .max_wait
            .map(|max| (max + (now - *deadline)).as_millis() as u64)
            .unwrap_or_default();
        self.warn_overloaded(self.in_flight.load(Ordering::Relaxed));
        Err(GuardError::WaitedTooLong { waited_ms })
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

/// When a call's check must have started (its arrival plus `max_wait_ms`), in the request's
/// extensions.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

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

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match self.admission.enter() {
            Ok(slot) => {
                if let Some(max_wait) = self.admission.max_wait {
                    request
                        .extensions_mut()
                        .insert(Deadline(Instant::now() + max_wait));
                }
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
        let admission = Admission::new(&AdmissionConfig {
            max_in_flight: 2,
            max_wait_ms: 0,
        });
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
        assert_eq!(stats.refused_in_flight.load(Ordering::Relaxed), 1);
        assert_eq!(
            admission.in_flight.load(Ordering::Relaxed),
            0,
            "nothing leaks"
        );
    }

    #[test]
    fn a_call_whose_turn_comes_after_its_deadline_is_refused() {
        let admission = Admission::new(&AdmissionConfig {
            max_in_flight: 10,
            max_wait_ms: 50,
        });
        let now = Instant::now();
        assert!(admission.check_wait(None).is_ok(), "no deadline: no limit");
        assert!(
            admission
                .check_wait(Some(&Deadline(now + Duration::from_secs(5))))
                .is_ok()
        );
        let late = Deadline(now - Duration::from_millis(20));
        match admission.check_wait(Some(&late)) {
            Err(GuardError::WaitedTooLong { waited_ms }) => assert!(waited_ms >= 70, "{waited_ms}"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(admission.stats().refused.load(Ordering::Relaxed), 1);
        assert_eq!(admission.stats().refused_waited.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = AdmissionConfig {
            max_in_flight: 0,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("guard.admission.max_in_flight")
        );
        assert!(AdmissionConfig::default().validate().is_ok());
    }
}
