//! A usage event turned into a priced ledger row.

use std::collections::BTreeMap;

use switchboard_bus::UsageEvent;
use switchboard_proto::ledger::v1::{CacheOutcome, RequestStatus};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{money::Tokens, pricing::PriceBook};

/// One ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// Switchboard's request id.
    pub request_id: Uuid,
    /// When the request arrived.
    pub time: OffsetDateTime,
    /// Application id.
    pub app: String,
    /// Team id.
    pub team: String,
    /// Virtual key id.
    pub key_id: String,
    /// Requested model (route).
    pub requested_model: String,
    /// Serving provider.
    pub provider: String,
    /// Serving provider model.
    pub model: String,
    /// Attempts made.
    pub attempts: u32,
    /// Tokens of the serving attempt.
    pub tokens: Tokens,
    /// The attempts before the serving one that consumed tokens (a stream cut short, then a retry
    /// or fallback), each priced at its own provider and model and included in `cost_usd_nanos`.
    /// Written whenever `attempts > 1` (an empty list when none consumed tokens); `None` for a
    /// single attempt, and for a row recorded before they were kept (see
    /// [`UsageRow::known_earlier_attempts`]).
    pub earlier_attempts: Option<Vec<AttemptUsage>>,
    /// Cost in nano-USD; `None` when the model has no known price.
    pub cost_usd_nanos: Option<i64>,
    /// Saved by a cache hit, nano-USD.
    pub saved_usd_nanos: i64,
    /// Cache outcome.
    pub cache: CacheOutcome,
    /// How the request ended.
    pub status: RequestStatus,
    /// Error code when not OK.
    pub error_code: String,
    /// Streamed or not.
    pub streamed: bool,
    /// Arrival to last byte.
    pub latency_ms: u64,
    /// W3C trace id.
    pub trace_id: String,
    /// Caller tags.
    pub tags: BTreeMap<String, String>,
}

impl UsageRow {
    /// The earlier attempts that consumed tokens, when known: `None` for a row with more than one
    /// attempt recorded before they were kept on the row (its cost includes them, but what they
    /// consumed is lost, so it cannot be re-priced).
    pub fn known_earlier_attempts(&self) -> Option<&[AttemptUsage]> {
        known_earlier_attempts(self.attempts, self.earlier_attempts.as_deref())
    }
}

/// [`UsageRow::known_earlier_attempts`] from the stored `attempts` and `earlier_attempts`.
pub(crate) fn known_earlier_attempts(
    attempts: u32,
    earlier: Option<&[AttemptUsage]>,
) -> Option<&[AttemptUsage]> {
    match earlier {
        Some(earlier) => Some(earlier),
        None if attempts <= 1 => Some(&[]),
        None => None,
    }
}

/// What one attempt consumed, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptUsage {
    /// The attempt's provider.
    pub provider: String,
    /// The attempt's provider model.
    pub model: String,
    /// Its tokens.
    pub tokens: Tokens,
}

/// Why a request has no cost (it is recorded unpriced: NULL, never 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NoCost {
    /// An attempt consumed tokens on a model without a price.
    NoPrice {
        /// Whether it is an earlier attempt (else the serving one).
        earlier: bool,
        provider: String,
        model: String,
    },
    /// The cost does not fit in an i64 of nano-USD.
    Overflow,
}

/// The cost of a request that was not served from our cache: the serving attempt's `tokens` on
/// `provider`/`model`, plus each earlier attempt that consumed tokens, each at its own provider's
/// and model's price in effect at `at`. The one pricing rule of recording and of re-pricing:
/// nothing consumed costs 0, priced or not; any consumed token without a price makes the whole
/// request unpriced, never cheaper.
pub(crate) fn request_cost(
    provider: &str,
    model: &str,
    tokens: Tokens,
    earlier: &[AttemptUsage],
    at: OffsetDateTime,
    prices: &PriceBook,
) -> Result<i64, NoCost> {
    let attempt_cost = |provider: &str, model: &str, tokens: Tokens, earlier: bool| {
        if tokens.is_zero() {
            return Ok(0);
        }
        let pricing = prices
            .lookup(provider, model, at)
            .ok_or_else(|| NoCost::NoPrice {
                earlier,
                provider: provider.to_owned(),
                model: model.to_owned(),
            })?;
        pricing.cost(tokens).map_err(|_| NoCost::Overflow)
    };
    let mut total = attempt_cost(provider, model, tokens, false)?;
    for attempt in earlier {
        let cost = attempt_cost(&attempt.provider, &attempt.model, attempt.tokens, true)?;
        total = total.checked_add(cost).ok_or(NoCost::Overflow)?;
    }
    Ok(total)
}

/// Why an event cannot become a row (the message is terminated, never retried).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The payload is not a `UsageEvent`.
    #[error("payload is not a usage event: {0}")]
    Decode(String),
    /// `request_id` is not a UUID.
    #[error("request id is not a UUID")]
    RequestId,
}

/// Database text for a cache outcome.
pub fn cache_str(cache: CacheOutcome) -> &'static str {
    match cache {
        CacheOutcome::Unspecified => "unspecified",
        CacheOutcome::Miss => "miss",
        CacheOutcome::Hit => "hit",
        CacheOutcome::Bypass => "bypass",
    }
}

/// Cache outcome from database text.
pub fn cache_from_str(text: &str) -> CacheOutcome {
    match text {
        "miss" => CacheOutcome::Miss,
        "hit" => CacheOutcome::Hit,
        "bypass" => CacheOutcome::Bypass,
        _ => CacheOutcome::Unspecified,
    }
}

/// Database text for a request status.
pub fn status_str(status: RequestStatus) -> &'static str {
    match status {
        RequestStatus::Unspecified => "unspecified",
        RequestStatus::Ok => "ok",
        RequestStatus::Error => "error",
        RequestStatus::Partial => "partial",
    }
}

/// Request status from database text.
pub fn status_from_str(text: &str) -> RequestStatus {
    match text {
        "ok" => RequestStatus::Ok,
        "error" => RequestStatus::Error,
        "partial" => RequestStatus::Partial,
        _ => RequestStatus::Unspecified,
    }
}

/// Postgres rejects NUL in text and jsonb; drop it so one odd event can never wedge a batch.
fn clean(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "")
    } else {
        text
    }
}

fn tokens_of(usage: Option<&switchboard_proto::chat::v1::Usage>) -> Tokens {
    usage
        .map(|u| Tokens {
            prompt: u.prompt_tokens,
            cached_prompt: u.cached_prompt_tokens,
            cache_write: u.cache_write_tokens,
            completion: u.completion_tokens,
            reasoning: u.reasoning_tokens,
        })
        .unwrap_or_default()
}

/// Converts a timestamp; `None` when out of range.
pub fn timestamp_to_time(ts: &switchboard_proto::Timestamp) -> Option<OffsetDateTime> {
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// Converts a time to a protobuf timestamp.
pub fn time_to_timestamp(time: OffsetDateTime) -> switchboard_proto::Timestamp {
    switchboard_proto::Timestamp {
        seconds: time.unix_timestamp(),
        nanos: time.nanosecond() as i32,
    }
}

/// The attempts before the last one (the serving attempt, whose tokens are the event's `usage`)
/// that consumed tokens.
fn earlier_attempts(route: &switchboard_proto::chat::v1::RouteInfo) -> Vec<AttemptUsage> {
    let Some((_, earlier)) = route.attempts.split_last() else {
        return Vec::new();
    };
    earlier
        .iter()
        .map(|attempt| AttemptUsage {
            provider: clean(attempt.provider.clone()),
            model: clean(attempt.model.clone()),
            tokens: tokens_of(attempt.usage.as_ref()),
        })
        .filter(|attempt| !attempt.tokens.is_zero())
        .collect()
}

/// The time embedded in a UUIDv7 (Unix milliseconds).
fn uuid_v7_time(id: &Uuid) -> Option<OffsetDateTime> {
    if id.get_version_num() != 7 {
        return None;
    }
    let (seconds, nanos) = id.get_timestamp()?.to_unix();
    let nanos = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// Prices an event. An event without a (valid) time takes the time of its UUIDv7 request id, so
/// that a redelivery gets the same time (the row's key is (request id, time)); only an id of
/// another version falls back to `fallback_time`.
pub fn price_event(
    event: UsageEvent,
    fallback_time: OffsetDateTime,
    prices: &PriceBook,
) -> Result<UsageRow, Rejected> {
    let request_id = Uuid::parse_str(event.request_id.trim()).map_err(|_| Rejected::RequestId)?;
    // Microsecond precision: what Postgres stores, so a row reads back equal to what was written.
    let time = event
        .time
        .as_ref()
        .and_then(timestamp_to_time)
        .or_else(|| uuid_v7_time(&request_id))
        .unwrap_or(fallback_time);
    let time = time
        .replace_nanosecond(time.nanosecond() / 1000 * 1000)
        .unwrap_or(time);
    let route = event.route.unwrap_or_default();
    let attempts = if route.attempt_count == 0 {
        u32::try_from(route.attempts.len()).unwrap_or(u32::MAX)
    } else {
        route.attempt_count
    };
    let tokens = tokens_of(event.usage.as_ref());
    let cache = CacheOutcome::try_from(event.cache).unwrap_or(CacheOutcome::Unspecified);
    let status = RequestStatus::try_from(event.status).unwrap_or(RequestStatus::Unspecified);
    let earlier = earlier_attempts(&route);
    let provider = clean(route.provider);
    let model = clean(route.model);
    let pricing = prices.lookup(&provider, &model, time);

    let (cost_usd_nanos, saved_usd_nanos) = if cache == CacheOutcome::Hit {
        // Served from our cache: nothing paid. What it saved is the cached answer's usage at today's rates.
        let saved_tokens = tokens_of(event.saved_usage.as_ref());
        let saved = match pricing {
            Some(pricing) => pricing.cost(saved_tokens).unwrap_or_else(|error| {
                tracing::error!(request.id = %request_id, %error, "saved cost overflow");
                0
            }),
            None => {
                if !saved_tokens.is_zero() {
                    tracing::warn!(
                        request.id = %request_id, %provider, %model,
                        "no price for model; cache hit recorded without saved cost"
                    );
                }
                0
            }
        };
        (Some(0), saved)
    } else {
        let cost = match request_cost(&provider, &model, tokens, &earlier, time, prices) {
            Ok(cost) => Some(cost),
            Err(NoCost::NoPrice {
                earlier: false,
                provider,
                model,
            }) => {
                tracing::warn!(
                    request.id = %request_id, %provider, %model,
                    "no price for model; recorded as unpriced"
                );
                None
            }
            Err(NoCost::NoPrice {
                earlier: true,
                provider,
                model,
            }) => {
                tracing::warn!(
                    request.id = %request_id, %provider, %model,
                    "no price for the model of a failed attempt that consumed tokens; recorded as unpriced"
                );
                None
            }
            Err(NoCost::Overflow) => {
                tracing::error!(request.id = %request_id, "cost overflow; recorded as unpriced");
                None
            }
        };
        (cost, 0)
    };

    Ok(UsageRow {
        request_id,
        time,
        app: clean(event.app),
        team: clean(event.team),
        key_id: clean(event.key_id),
        requested_model: clean(event.requested_model),
        provider,
        model,
        attempts,
        tokens,
        earlier_attempts: (attempts > 1 || !earlier.is_empty()).then_some(earlier),
        cost_usd_nanos,
        saved_usd_nanos,
        cache,
        status,
        error_code: clean(event.error_code),
        streamed: event.streamed,
        latency_ms: event.latency_ms,
        trace_id: clean(event.trace_id),
        tags: event
            .tags
            .into_iter()
            .map(|(k, v)| (clean(k), clean(v)))
            .collect(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        money::{Rate, Rates},
        pricing::Price,
    };
    use switchboard_proto::chat::v1::{RouteInfo, Usage};
    use time::macros::{date, datetime};

    pub(crate) fn book() -> PriceBook {
        PriceBook::new([Price::configured(
            "*",
            "gpt-4o-mini",
            date!(2024 - 01 - 01),
            Rates::flat(Rate(150_000_000), Rate(75_000_000), Rate(600_000_000)),
        )])
    }

    pub(crate) fn event(request_id: &str, model: &str) -> UsageEvent {
        UsageEvent {
            request_id: request_id.into(),
            time: Some(time_to_timestamp(datetime!(2025-03-01 12:00:00.123456 UTC))),
            app: "billing".into(),
            team: "finance".into(),
            key_id: "key_1".into(),
            requested_model: "fast".into(),
            route: Some(RouteInfo {
                route: "fast".into(),
                provider: "openai".into(),
                model: model.into(),
                target: format!("openai/{model}"),
                attempt_count: 1,
                attempts: vec![],
                key_alias: String::new(),
            }),
            usage: Some(Usage {
                prompt_tokens: 1000,
                completion_tokens: 500,
                total_tokens: 1500,
                cached_prompt_tokens: 200,
                ..Default::default()
            }),
            cache: CacheOutcome::Miss as i32,
            saved_usage: None,
            status: RequestStatus::Ok as i32,
            error_code: String::new(),
            streamed: false,
            latency_ms: 42,
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            tags: [("env".to_owned(), "prod".to_owned())].into(),
        }
    }

    const ID: &str = "0195f0e2-7f4c-7000-8000-000000000001";
    fn now() -> OffsetDateTime {
        datetime!(2030-01-01 0:00 UTC)
    }

    #[test]
    fn priced_miss() {
        let row = price_event(event(ID, "gpt-4o-mini"), now(), &book()).unwrap();
        assert_eq!(row.cost_usd_nanos, Some(435_000));
        assert_eq!(row.earlier_attempts, None);
        assert_eq!(row.saved_usd_nanos, 0);
        assert_eq!(
            row.tokens,
            Tokens {
                prompt: 1000,
                cached_prompt: 200,
                completion: 500,
                ..Default::default()
            }
        );
        assert_eq!(row.time, datetime!(2025-03-01 12:00:00.123456 UTC));
    }

    #[test]
    fn a_failed_attempt_that_consumed_tokens_is_billed_with_the_serving_one() {
        use switchboard_proto::chat::v1::Attempt;
        // A stream cut after 100 output tokens, then the fallback served 1000 in / 500 out.
        let mut e = event(ID, "gpt-4o-mini");
        let route = e.route.as_mut().unwrap();
        route.attempt_count = 2;
        route.attempts = vec![
            Attempt {
                target: "primary/gpt-4o-mini".into(),
                provider: "primary".into(),
                model: "gpt-4o-mini".into(),
                error_code: "STREAM_INTERRUPTED".into(),
                usage: Some(Usage {
                    prompt_tokens: 1000,
                    completion_tokens: 100,
                    total_tokens: 1100,
                    ..Default::default()
                }),
                ..Default::default()
            },
            Attempt {
                target: "openai/gpt-4o-mini".into(),
                provider: "openai".into(),
                model: "gpt-4o-mini".into(),
                usage: e.usage,
                ..Default::default()
            },
        ];
        let row = price_event(e.clone(), now(), &book()).unwrap();
        // 435_000 served + 1000 x 150 + 100 x 600 for the cut attempt.
        assert_eq!(row.cost_usd_nanos, Some(435_000 + 150_000 + 60_000));
        assert_eq!(row.attempts, 2);
        // The cut attempt's usage stays on the row, so that a re-pricing prices it again.
        let cut = AttemptUsage {
            provider: "primary".into(),
            model: "gpt-4o-mini".into(),
            tokens: Tokens {
                prompt: 1000,
                completion: 100,
                ..Default::default()
            },
        };
        assert_eq!(row.earlier_attempts, Some(vec![cut.clone()]));
        assert_eq!(row.known_earlier_attempts(), Some(&[cut][..]));
        assert_eq!(
            request_cost(
                &row.provider,
                &row.model,
                row.tokens,
                row.known_earlier_attempts().unwrap(),
                row.time,
                &book()
            ),
            Ok(645_000)
        );
        // A cut attempt on a model without a price makes the row unpriced, never cheaper.
        e.route.as_mut().unwrap().attempts[0].model = "mystery".into();
        let row = price_event(e.clone(), now(), &book()).unwrap();
        assert_eq!(row.cost_usd_nanos, None);
        assert_eq!(
            row.earlier_attempts.as_ref().map(|a| a[0].model.as_str()),
            Some("mystery")
        );
        // A fallback after an attempt that consumed nothing: an empty list, known.
        e.route.as_mut().unwrap().attempts[0].usage = None;
        let row = price_event(e, now(), &book()).unwrap();
        assert_eq!(row.cost_usd_nanos, Some(435_000));
        assert_eq!(row.earlier_attempts, Some(vec![]));
    }

    #[test]
    fn earlier_attempts_are_unknown_only_for_several_attempts_without_a_list() {
        let row = price_event(event(ID, "gpt-4o-mini"), now(), &book()).unwrap();
        assert_eq!(row.earlier_attempts, None);
        assert_eq!(row.known_earlier_attempts(), Some(&[][..]));
        // A row recorded before the list was kept.
        let legacy = UsageRow { attempts: 2, ..row };
        assert_eq!(legacy.known_earlier_attempts(), None);
    }

    #[test]
    fn unknown_model_is_unpriced_not_free() {
        let row = price_event(event(ID, "mystery"), now(), &book()).unwrap();
        assert_eq!(row.cost_usd_nanos, None);
    }

    #[test]
    fn cache_hit_costs_nothing_and_records_the_saving() {
        let mut e = event(ID, "gpt-4o-mini");
        e.cache = CacheOutcome::Hit as i32;
        e.saved_usage = e.usage.take();
        let row = price_event(e, now(), &book()).unwrap();
        assert_eq!(row.cost_usd_nanos, Some(0));
        assert_eq!(row.saved_usd_nanos, 435_000);
        assert_eq!(row.tokens, Tokens::default());
    }

    #[test]
    fn bad_request_id_is_rejected() {
        assert_eq!(
            price_event(event("req-1", "gpt-4o-mini"), now(), &book()),
            Err(Rejected::RequestId)
        );
    }

    #[test]
    fn missing_time_uses_the_fallback_and_nul_is_dropped() {
        // A UUIDv4 request id carries no time: the fallback.
        let mut e = event("3f0e8a52-8a8e-4c5e-9a59-1d2b8f4c1e77", "gpt-4o-mini");
        e.time = None;
        e.app = "a\0b".into();
        let row = price_event(e, now(), &book()).unwrap();
        assert_eq!(row.time, now());
        assert_eq!(row.app, "ab");
    }

    #[test]
    fn missing_time_of_a_uuid_v7_is_the_ids_time_whatever_the_fallback() {
        let id = Uuid::now_v7();
        let mut e = event(&id.to_string(), "gpt-4o-mini");
        e.time = None;
        let first = price_event(e.clone(), now(), &book()).unwrap();
        let redelivered = price_event(e, now() + time::Duration::days(3), &book()).unwrap();
        assert_eq!(first.time, redelivered.time);
        let (seconds, _) = id.get_timestamp().unwrap().to_unix();
        assert_eq!(first.time.unix_timestamp(), i64::try_from(seconds).unwrap());
    }
}
