//! Per-deployment metrics (requests, errors by class, latency histogram, breaker state, in
//! flight), kept in atomics on the request path and rendered in the Prometheus text format.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use tokio::time::Instant;

use crate::balance::Deployment;

/// Error classes counted separately (anything else is `OTHER`).
const CLASSES: [&str; 13] = [
    "RATE_LIMITED",
    "UPSTREAM_ERROR",
    "TIMEOUT",
    "CONNECTION_ERROR",
    "BAD_REQUEST",
    "AUTHENTICATION_ERROR",
    "PROVIDER_REFUSED",
    "PROTOCOL_ERROR",
    "STREAM_INTERRUPTED",
    "CONTEXT_LENGTH_EXCEEDED",
    "CONTENT_FILTERED",
    "OVERLOADED",
    "OTHER",
];

/// Upper bounds of the latency buckets, in milliseconds (`+Inf` is implicit).
const BOUNDS_MS: [u64; 10] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];

/// Counters of one deployment.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: AtomicU64,
    errors: [AtomicU64; CLASSES.len()],
    latency: switchboard_grpc::Histogram<{ BOUNDS_MS.len() }>,
}

impl Metrics {
    /// An attempt was sent.
    pub fn request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    /// An attempt failed with taxonomy `code`.
    pub fn error(&self, code: &str) {
        let index = CLASSES
            .iter()
            .position(|class| *class == code)
            .unwrap_or(CLASSES.len() - 1);
        self.errors[index].fetch_add(1, Relaxed);
    }

    /// An attempt took `elapsed` (for a stream: until its first content-bearing chunk).
    pub fn latency(&self, elapsed: Duration) {
        self.latency.observe(&BOUNDS_MS, elapsed);
    }

    /// Requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition of every deployment's metrics.
pub fn render<'a>(deployments: impl Iterator<Item = &'a Deployment> + Clone) -> String {
    let now = Instant::now();
    let mut out = String::new();
    let labels = |d: &Deployment| {
        format!(
            "target=\"{}\",provider=\"{}\",model=\"{}\",key=\"{}\"",
            escape(&d.target),
            escape(&d.provider),
            escape(&d.model),
            escape(&d.alias)
        )
    };
    out.push_str("# HELP switchboard_router_requests_total Provider attempts sent.\n");
    out.push_str("# TYPE switchboard_router_requests_total counter\n");
    for d in deployments.clone() {
        let _ = writeln!(
            out,
            "switchboard_router_requests_total{{{}}} {}",
            labels(d),
            d.metrics.requests()
        );
    }
    out.push_str(
        "# HELP switchboard_router_errors_total Failed provider attempts by error class.\n",
    );
    out.push_str("# TYPE switchboard_router_errors_total counter\n");
    for d in deployments.clone() {
        let labels = labels(d);
        for (class, count) in CLASSES.iter().zip(&d.metrics.errors) {
            let count = count.load(Relaxed);
            if count > 0 {
                let _ = writeln!(
                    out,
                    "switchboard_router_errors_total{{{labels},class=\"{class}\"}} {count}"
                );
            }
        }
    }
    out.push_str("# HELP switchboard_router_attempt_duration_seconds Provider attempt latency (streams: to the first chunk).\n");
    out.push_str("# TYPE switchboard_router_attempt_duration_seconds histogram\n");
    for d in deployments.clone() {
        d.metrics.latency.render(
            &mut out,
            &BOUNDS_MS,
            "switchboard_router_attempt_duration_seconds",
            &labels(d),
        );
    }
    out.push_str(
        "# HELP switchboard_router_breaker_state Circuit breaker: 0 closed, 1 open, 2 half-open.\n",
    );
    out.push_str("# TYPE switchboard_router_breaker_state gauge\n");
    for d in deployments.clone() {
        let _ = writeln!(
            out,
            "switchboard_router_breaker_state{{{}}} {}",
            labels(d),
            d.breaker.state(now).gauge()
        );
    }
    out.push_str("# HELP switchboard_router_in_flight Provider attempts in flight.\n");
    out.push_str("# TYPE switchboard_router_in_flight gauge\n");
    for d in deployments {
        let _ = writeln!(
            out,
            "switchboard_router_in_flight{{{}}} {}",
            labels(d),
            d.in_flight()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_and_latency_bucketed() {
        let metrics = Metrics::default();
        metrics.request();
        metrics.error("TIMEOUT");
        metrics.error("SOMETHING_NEW");
        metrics.latency(Duration::from_millis(70));
        metrics.latency(Duration::from_secs(100));
        assert_eq!(metrics.requests(), 1);
        assert_eq!(metrics.errors[2].load(Relaxed), 1);
        assert_eq!(metrics.errors[CLASSES.len() - 1].load(Relaxed), 1);
        assert_eq!(metrics.latency.bucket(1), 1);
        assert_eq!(metrics.latency.bucket(BOUNDS_MS.len()), 1);
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }
}
