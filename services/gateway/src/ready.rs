//! `GET /readyz`: what this gateway can serve right now, from its dependencies' gRPC health
//! (`grpc.health.v1`, every Switchboard service serves it) and its NATS connection.
//!
//! Each dependency is `required` (the router; the guard unless some routes fail open) or not (the
//! cache, the ledger when budgets or shared rate limits are configured, NATS): a required one down
//! makes the gateway `unavailable` (HTTP 503), any other one down makes it `degraded` (HTTP 200,
//! the degraded mode named in the report). A report is reused for [`REPORT_TTL`], so probes at any
//! rate cost the dependencies at most one health call each per second.
//!
//! The gateway's own `grpc.health.v1` follows the same report ([`Readiness::keep_health`]):
//! NOT_SERVING while it is `unavailable` (a `degraded` gateway still serves), and from the moment
//! it starts draining.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::Mutex;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use switchboard_grpc::TracedChannel;

/// How long a report is served before the dependencies are asked again.
pub const REPORT_TTL: Duration = Duration::from_secs(1);
/// How long one health call may take before its dependency counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// How often the gateway's own gRPC health is brought in line with the report.
pub const HEALTH_EVERY: Duration = REPORT_TTL;

/// The gateway's readiness as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every dependency is up.
    Ready,
    /// A dependency the gateway can serve without is down; requests are served in its degraded mode.
    Degraded,
    /// A dependency every request needs is down.
    Unavailable,
}

/// A dependency's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Its health service answers `SERVING` (NATS: connected).
    Up,
    /// It answers, but not `SERVING` (for example while it drains).
    NotServing,
    /// No answer within [`PROBE_TIMEOUT`] (NATS: disconnected).
    Unreachable,
}

/// One dependency in a report.
#[derive(Debug, Clone, Serialize)]
pub struct Dependency {
    /// `router`, `guard`, `cache`, `ledger` or `nats`.
    pub name: &'static str,
    /// Its state at the time of the report.
    pub state: State,
    /// Whether the gateway is unavailable without it.
    pub required: bool,
    /// What requests get while it is down.
    pub when_down: &'static str,
}

/// What `/readyz` answers.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The gateway as a whole.
    pub status: Status,
    /// Every dependency, in a fixed order.
    pub dependencies: Vec<Dependency>,
}

struct Probe {
    name: &'static str,
    channel: TracedChannel,
    required: bool,
    when_down: &'static str,
}

/// The dependencies of one gateway and its last report.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

struct Inner {
    probes: Vec<Probe>,
    nats: async_nats::Client,
    last: Mutex<Option<(Instant, Report)>>,
}

/// The channels [`Readiness`] probes.
pub struct Channels {
    /// The router's.
    pub router: TracedChannel,
    /// The guard's.
    pub guard: TracedChannel,
    /// The cache's, when the cache is enabled.
    pub cache: Option<TracedChannel>,
    /// The ledger's, when budgets or shared rate limits are configured.
    pub ledger: Option<TracedChannel>,
}

impl Readiness {
    /// Probes `channels` and `nats`. `guard_required`: false when some routes fail open
    /// (`[gateway.guard] fail_open_routes`): requests to them are served without the guard.
    pub fn new(channels: Channels, nats: async_nats::Client, guard_required: bool) -> Self {
        let mut probes = vec![
            Probe {
                name: "router",
                channel: channels.router,
                required: true,
                when_down: "no provider can be called: requests fail with 503 UNAVAILABLE (cache hits excepted)",
            },
            Probe {
                name: "guard",
                channel: channels.guard,
                required: guard_required,
                when_down: "routes that do not fail open are refused with 503 guard_unavailable; fail-open routes proceed unchecked and never from the cache, whose answers were checked under a policy they cannot match (switchboard_guard_fail_open_total)",
            },
        ];
        if let Some(channel) = channels.cache {
            probes.push(Probe {
                name: "cache",
                channel,
                required: false,
                when_down: "lookups and stores are skipped (x-switchboard-cache: bypass)",
            });
        }
        if let Some(channel) = channels.ledger {
            probes.push(Probe {
                name: "ledger",
                channel,
                required: false,
                when_down: "budget leases and shared rate limits are not renewed: hard budgets fail closed (503) once their slice is spent",
            });
        }
        Readiness {
            inner: Arc::new(Inner {
                probes,
                nats,
                last: Mutex::new(None),
            }),
        }
    }

    /// The current report: the last one if younger than [`REPORT_TTL`], else a new one (one
    /// probe round at a time; concurrent callers wait for it).
    pub async fn report(&self) -> Report {
        let mut last = self.inner.last.lock().await;
        if let Some((at, report)) = last.as_ref()
            && at.elapsed() < REPORT_TTL
        {
            return report.clone();
        }
        let report = self.probe().await;
        *last = Some((Instant::now(), report.clone()));
        report
    }

    /// Keeps `health` (the gateway's own `grpc.health.v1`) in line with the report until `cancel`:
    /// SERVING unless the gateway is [`Status::Unavailable`]. The reports are the ones `/readyz`
    /// serves (one probe round per [`REPORT_TTL`] between them).
    pub async fn keep_health(
        self,
        health: switchboard_grpc::Health,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let report = tokio::select! {
                report = self.report() => report,
                () = cancel.cancelled() => return,
            };
            health
                .set_serving(report.status != Status::Unavailable)
                .await;
            tokio::select! {
                () = tokio::time::sleep(HEALTH_EVERY) => {}
                () = cancel.cancelled() => return,
            }
        }
    }

    async fn probe(&self) -> Report {
        let states =
            futures::future::join_all(self.inner.probes.iter().map(|p| check(p.channel.clone())))
                .await;
        let mut dependencies: Vec<Dependency> = self
            .inner
            .probes
            .iter()
            .zip(states)
            .map(|(probe, state)| Dependency {
                name: probe.name,
                state,
                required: probe.required,
                when_down: probe.when_down,
            })
            .collect();
        let nats = match self.inner.nats.connection_state() {
            async_nats::connection::State::Connected => State::Up,
            _ => State::Unreachable,
        };
        dependencies.push(Dependency {
            name: "nats",
            state: nats,
            required: false,
            when_down: "usage events wait in the gateway's outbox and reach the ledger once NATS is back (switchboard_usage_outbox_bytes)",
        });
        Report {
            status: status(&dependencies),
            dependencies,
        }
    }
}

/// The whole from its parts.
fn status(dependencies: &[Dependency]) -> Status {
    let down = |d: &&Dependency| d.state != State::Up;
    if dependencies.iter().filter(down).any(|d| d.required) {
        Status::Unavailable
    } else if dependencies.iter().any(|d| down(&d)) {
        Status::Degraded
    } else {
        Status::Ready
    }
}

/// One health call for the server as a whole (service name "").
async fn check(channel: TracedChannel) -> State {
    let mut client = HealthClient::new(channel);
    let call = client.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(PROBE_TIMEOUT, call).await {
        Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32 => State::Up,
        Ok(Ok(_)) => State::NotServing,
        // A server that says NOT_SERVING for "" may answer with an error status instead.
        Ok(Err(status)) if status.code() == tonic::Code::NotFound => State::NotServing,
        Ok(Err(_)) | Err(_) => State::Unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(name: &'static str, state: State, required: bool) -> Dependency {
        Dependency {
            name,
            state,
            required,
            when_down: "",
        }
    }

    #[test]
    fn a_required_dependency_down_makes_the_gateway_unavailable() {
        let all_up = [
            dep("router", State::Up, true),
            dep("guard", State::Up, true),
            dep("nats", State::Up, false),
        ];
        assert_eq!(status(&all_up), Status::Ready);
        let cache_down = [
            dep("router", State::Up, true),
            dep("cache", State::NotServing, false),
        ];
        assert_eq!(status(&cache_down), Status::Degraded);
        let nats_down = [
            dep("router", State::Up, true),
            dep("nats", State::Unreachable, false),
        ];
        assert_eq!(status(&nats_down), Status::Degraded);
        let router_down = [
            dep("router", State::Unreachable, true),
            dep("cache", State::NotServing, false),
        ];
        assert_eq!(status(&router_down), Status::Unavailable);
        let guard_draining = [
            dep("router", State::Up, true),
            dep("guard", State::NotServing, true),
        ];
        assert_eq!(status(&guard_draining), Status::Unavailable);
        let guard_optional = [
            dep("router", State::Up, true),
            dep("guard", State::Unreachable, false),
        ];
        assert_eq!(status(&guard_optional), Status::Degraded);
    }
}
