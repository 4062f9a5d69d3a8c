//! The gateway's request metrics on `GET /metrics`: what was served and what was refused.
//!
//! Three recording points, a few relaxed atomic adds each, no lock and no allocation:
//! - every usage event ([`served`], `usage.rs`: one per served request) counts the request by
//!   kind (unary or stream) and status (ok, error, partial), its latency in a histogram, and the
//!   cache's outcome (hit, miss, bypass);
//! - every error answer ([`refused`], where `error.rs` turns a `GatewayError` into the HTTP body
//!   or the gRPC status) counts the refusal by face (`openai` — also the embeddings and models
//!   endpoints —, `anthropic`, `grpc`), reason (the error's kind: `budget_exceeded`,
//!   `rate_limited`, `overloaded`, …) and code (the error taxonomy's).
//!
//! - every stream's first chunk handed to the client ([`first_token`], `pipeline.rs`) observes the
//!   time to first token, by source (provider or cache).
//!
//! Labels are bounded: fixed names only, never a request id, a prompt, a key or a model string a
//! caller sent. The counters belong to the process (one gateway per process).

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use switchboard_bus::UsageEvent;
use switchboard_status::{ErrorCode, ServiceError};

use crate::error::GatewayError;

/// The face an error answer went out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Face {
    /// OpenAI-style bodies: chat completions, embeddings, models, unknown paths.
    OpenAi = 0,
    /// Anthropic Messages.
    Anthropic = 1,
    /// The gRPC API.
    Grpc = 2,
}

const FACES: [&str; 3] = ["openai", "anthropic", "grpc"];

/// Every reason of [`reason`], in index order.
const REASONS: [&str; 20] = [
    "missing_key",
    "invalid_key",
    "key_expired",
    "model_not_allowed",
    "model_not_found",
    "unknown_url",
    "invalid_request",
    "payload_too_large",
    "hop_payload_too_large",
    "blocked",
    "downstream",
    "guard_unavailable",
    "answer_blocked",
    "dependency_down",
    "budget_exceeded",
    "rate_limited",
    "tokens_exceed_rate_limit",
    "overloaded",
    "not_cached",
    "internal",
];

/// The index in [`REASONS`] of `error`'s kind.
fn reason(error: &GatewayError) -> usize {
    match error {
        GatewayError::MissingKey => 0,
        GatewayError::InvalidKey => 1,
        GatewayError::KeyExpired { .. } => 2,
        GatewayError::ModelNotAllowed { .. } => 3,
        GatewayError::ModelNotFound { .. } => 4,
        GatewayError::UnknownUrl { .. } => 5,
        GatewayError::InvalidRequest { .. } => 6,
        GatewayError::PayloadTooLarge { .. } => 7,
        GatewayError::HopPayloadTooLarge { .. } => 8,
        GatewayError::Blocked { .. } => 9,
        GatewayError::Downstream { .. } => 10,
        GatewayError::GuardUnavailable { .. } => 11,
        GatewayError::AnswerBlocked { .. } => 12,
        GatewayError::DependencyDown { .. } => 13,
        GatewayError::BudgetExceeded { .. } => 14,
        GatewayError::RateLimited { .. } => 15,
        GatewayError::TokensExceedRateLimit { .. } => 16,
        GatewayError::Overloaded { .. } => 17,
        GatewayError::NotCached => 18,
        GatewayError::Internal(_) => 19,
    }
}

/// Every error code, in index order (bounded label values).
const CODES: [ErrorCode; 12] = ErrorCode::ALL;

fn code_index(code: ErrorCode) -> usize {
    CODES.iter().position(|c| *c == code).unwrap_or(CODES.len())
}

/// Request kinds: unary, stream.
const KINDS: [&str; 2] = ["unary", "stream"];
/// `RequestStatus` values 1..=3 of a usage event (0: unspecified, counted as error).
const STATUSES: [&str; 4] = ["unspecified", "ok", "error", "partial"];
/// `CacheOutcome` values 0..=3 of a usage event.
const CACHE: [&str; 4] = ["unspecified", "miss", "hit", "bypass"];
/// Latency histogram bucket bounds (milliseconds; `le` in seconds).
const BUCKETS_MS: [u64; 14] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000,
];

type Histogram = switchboard_grpc::Histogram<{ BUCKETS_MS.len() }>;

struct Metrics {
    /// [kind][status]
    requests: [[AtomicU64; STATUSES.len()]; KINDS.len()],
    /// [kind]
    latency: [Histogram; KINDS.len()],
    /// [outcome]
    cache: [AtomicU64; CACHE.len()],
    /// [face][reason][code] (the last code slot: a code not in [`CODES`]).
    refusals: [[[AtomicU64; CODES.len() + 1]; REASONS.len()]; FACES.len()],
    /// [source] of a stream's first chunk: a provider (live) or the cache (a replay).
    first_token: [Histogram; SOURCES.len()],
}

/// Where a stream's first chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A provider, through the router.
    Provider = 0,
    /// A cached answer, replayed.
    Cache = 1,
}

const SOURCES: [&str; 2] = ["provider", "cache"];

static METRICS: Metrics = Metrics {
    requests: [const { [const { AtomicU64::new(0) }; STATUSES.len()] }; KINDS.len()],
    latency: [const { Histogram::new() }; KINDS.len()],
    cache: [const { AtomicU64::new(0) }; CACHE.len()],
    refusals: [const { [const { [const { AtomicU64::new(0) }; CODES.len() + 1] }; REASONS.len()] };
        FACES.len()],
    first_token: [const { Histogram::new() }; SOURCES.len()],
};

/// A served request's usage event (`usage.rs`).
pub fn served(event: &UsageEvent) {
    let kind = usize::from(event.streamed);
    let status = usize::try_from(event.status)
        .ok()
        .filter(|s| *s < STATUSES.len())
        .unwrap_or(2);
    METRICS.requests[kind][status].fetch_add(1, Relaxed);
    METRICS.latency[kind].observe(
        &BUCKETS_MS,
        std::time::Duration::from_millis(event.latency_ms),
    );
    if let Some(cache) = usize::try_from(event.cache)
        .ok()
        .filter(|c| (1..CACHE.len()).contains(c))
    {
        METRICS.cache[cache].fetch_add(1, Relaxed);
    }
}

/// A stream's first chunk went to the client `elapsed` after the request arrived (`pipeline.rs`,
/// once per stream).
pub fn first_token(source: Source, elapsed: std::time::Duration) {
    METRICS.first_token[source as usize].observe(&BUCKETS_MS, elapsed);
}

/// An error answer on `face` (`error.rs`).
pub fn refused(face: Face, error: &GatewayError) {
    METRICS.refusals[face as usize][reason(error)][code_index(error.code())].fetch_add(1, Relaxed);
}

/// The metrics in the Prometheus text format (appended to `/metrics`).
pub fn render(out: &mut String) {
    out.push_str(
        "# HELP switchboard_gateway_requests_total Served requests (one per usage event) by kind and status.\n\
         # TYPE switchboard_gateway_requests_total counter\n",
    );
    for (kind, row) in KINDS.iter().zip(&METRICS.requests) {
        for (status, count) in STATUSES.iter().zip(row).skip(1) {
            let _ = writeln!(
                out,
                "switchboard_gateway_requests_total{{kind=\"{kind}\",status=\"{status}\"}} {}",
                count.load(Relaxed)
            );
        }
    }
    out.push_str(
        "# HELP switchboard_gateway_request_duration_seconds Latency of served requests (whole answer).\n\
         # TYPE switchboard_gateway_request_duration_seconds histogram\n",
    );
    for (kind, histogram) in KINDS.iter().zip(&METRICS.latency) {
        histogram.render(
            out,
            &BUCKETS_MS,
            "switchboard_gateway_request_duration_seconds",
            &format!("kind=\"{kind}\""),
        );
    }
    out.push_str(
        "# HELP switchboard_gateway_time_to_first_token_seconds Streams: from the request's arrival to its first chunk handed to the client, by source (provider, cache).\n\
         # TYPE switchboard_gateway_time_to_first_token_seconds histogram\n",
    );
    for (source, histogram) in SOURCES.iter().zip(&METRICS.first_token) {
        histogram.render(
            out,
            &BUCKETS_MS,
            "switchboard_gateway_time_to_first_token_seconds",
            &format!("source=\"{source}\""),
        );
    }
    out.push_str(
        "# HELP switchboard_gateway_cache_total Served requests by cache outcome.\n\
         # TYPE switchboard_gateway_cache_total counter\n",
    );
    for (outcome, count) in CACHE.iter().zip(&METRICS.cache).skip(1) {
        let _ = writeln!(
            out,
            "switchboard_gateway_cache_total{{outcome=\"{outcome}\"}} {}",
            count.load(Relaxed)
        );
    }
    out.push_str(
        "# HELP switchboard_gateway_refusals_total Error answers by face, reason and code (budget_exceeded, rate_limited, overloaded, ...).\n\
         # TYPE switchboard_gateway_refusals_total counter\n",
    );
    for (face, reasons) in FACES.iter().zip(&METRICS.refusals) {
        for (reason, codes) in REASONS.iter().zip(reasons) {
            for (i, count) in codes.iter().enumerate() {
                let count = count.load(Relaxed);
                if count == 0 {
                    continue;
                }
                let code = CODES.get(i).map_or("OTHER", |c| c.as_str());
                let _ = writeln!(
                    out,
                    "switchboard_gateway_refusals_total{{face=\"{face}\",reason=\"{reason}\",code=\"{code}\"}} {count}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0, |v| v.parse().unwrap_or(0))
    }

    #[test]
    fn a_served_request_and_a_refusal_move_their_counters() {
        let mut before = String::new();
        render(&mut before);
        served(&UsageEvent {
            streamed: true,
            status: 1,
            cache: 2,
            latency_ms: 30,
            ..UsageEvent::default()
        });
        refused(
            Face::Anthropic,
            &GatewayError::BudgetExceeded {
                budget_id: "b".into(),
                scope: "team t".into(),
                limit_usd_nanos: 1,
                resets_at: String::new(),
            },
        );
        first_token(Source::Provider, std::time::Duration::from_millis(70));
        let mut after = String::new();
        render(&mut after);
        for series in [
            "switchboard_gateway_time_to_first_token_seconds_bucket{source=\"provider\",le=\"0.1\"}",
            "switchboard_gateway_time_to_first_token_seconds_count{source=\"provider\"}",
            "switchboard_gateway_requests_total{kind=\"stream\",status=\"ok\"}",
            "switchboard_gateway_cache_total{outcome=\"hit\"}",
            "switchboard_gateway_request_duration_seconds_bucket{kind=\"stream\",le=\"0.05\"}",
            "switchboard_gateway_request_duration_seconds_count{kind=\"stream\"}",
            "switchboard_gateway_refusals_total{face=\"anthropic\",reason=\"budget_exceeded\",code=\"RATE_LIMITED\"}",
        ] {
            assert!(
                value(&after, series) > value(&before, series),
                "{series} did not move:\n{after}"
            );
        }
        // 30 ms is not in the 25 ms bucket.
        let le25 =
            "switchboard_gateway_request_duration_seconds_bucket{kind=\"stream\",le=\"0.025\"}";
        assert_eq!(value(&after, le25), value(&before, le25));
    }
}
