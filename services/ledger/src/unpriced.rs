//! `ListUnpriced`: the (provider, model) pairs that lack a price, read from the unpriced rows.
//!
//! A row is unpriced when any attempt that consumed tokens has no price ([`request_cost`]): the
//! serving one, or an earlier one (a stream cut short after its provider reported usage, then a
//! retry or fallback served the request; `usage_records.earlier_attempts`). Listing the serving
//! pair alone named a model that has a price when an earlier attempt's model was the one without.
//! So each unpriced row counts under every pair of it that consumed tokens and has no price at
//! the row's time, by the price book's own lookup ([`PriceBook::lookup`], as pricing does). A row
//! where no such pair can be named (recorded before `earlier_attempts` was kept, an unreadable
//! `earlier_attempts`, a cost overflow, or a price added since it was recorded and not yet
//! re-priced) counts under its serving pair, as it always did.
//!
//! [`request_cost`]: crate::record::request_cost

use std::collections::{BTreeMap, HashMap};

use futures::TryStreamExt as _;
use sqlx::{PgPool, Row};
use time::OffsetDateTime;

use crate::{pricing::PriceBook, record::AttemptUsage, repo::Unpriced};

/// The unpriced rows of `[$1, $2)` (of app `$3` when set) through the partial index on unpriced
/// rows, pre-grouped so that every row of a group has the same answer:
///
/// - Rows without an earlier attempt that consumed tokens (`earlier_attempts` NULL or `[]`) always
///   count under their serving pair (whether or not it has a price: it is the only pair they
///   have), so they group by (provider, model) alone, as before: one group per served pair.
/// - Rows with such attempts group by (provider, model, whether the serving attempt consumed
///   tokens, `earlier_attempts`, UTC day): prices are looked up by UTC day, so every row of a group
///   lacks the same prices, and its earlier attempts' tokens are the same (they are part of the
///   key). Such rows are few (failed attempts that consumed tokens), and rarely share their
///   attempts' exact tokens, so these groups are about one per row.
///
/// The groups are streamed (`fetch`) and folded into one tally per pair, so memory holds the
/// listed pairs only, however many rows the period has.
const UNPRICED_GROUPS: &str = "\
    SELECT provider, model, earlier::text AS earlier_attempts, serving_used, \
        COUNT(*)::BIGINT AS requests, \
        COALESCE(SUM(prompt_tokens), 0)::BIGINT AS prompt_tokens, \
        COALESCE(SUM(completion_tokens), 0)::BIGINT AS completion_tokens, \
        MIN(time) AS first_seen, MAX(time) AS last_seen \
    FROM (SELECT provider, model, prompt_tokens, completion_tokens, time, earlier, \
            CASE WHEN earlier IS NOT NULL THEN date_trunc('day', time, 'UTC') END AS day, \
            CASE WHEN earlier IS NOT NULL THEN prompt_tokens > 0 OR cached_prompt_tokens > 0 \
              OR cache_write_tokens > 0 OR completion_tokens > 0 OR reasoning_tokens > 0 \
            END AS serving_used \
          FROM (SELECT provider, model, prompt_tokens, cached_prompt_tokens, cache_write_tokens, \
                completion_tokens, reasoning_tokens, time, \
                NULLIF(earlier_attempts, '[]'::jsonb) AS earlier FROM usage_records \
                WHERE cost_usd_nanos IS NULL AND time >= $1 AND time < $2 \
                  AND ($3::text IS NULL OR app = $3)) u) r \
    GROUP BY provider, model, earlier, day, serving_used";

/// The pairs without a price among the unpriced rows of `[start, end)` (of `app` when set), at
/// the prices of `prices`, most requests first, then by provider and model (see the module).
pub(crate) async fn list(
    pool: &PgPool,
    start: OffsetDateTime,
    end: OffsetDateTime,
    app: Option<&str>,
    prices: &PriceBook,
) -> Result<Vec<Unpriced>, sqlx::Error> {
    let mut tally = Tally::default();
    let mut unreadable = 0_u64;
    let mut groups = sqlx::query(UNPRICED_GROUPS)
        .bind(start)
        .bind(end)
        .bind(app)
        .fetch(pool);
    while let Some(row) = groups.try_next().await? {
        let earlier = match crate::repo::decode_earlier_attempts(
            row.try_get::<Option<&str>, _>("earlier_attempts")?,
        ) {
            Ok(earlier) => earlier,
            Err(_) => {
                unreadable += 1;
                None
            }
        };
        tally.add(
            &Group {
                provider: row.try_get("provider")?,
                model: row.try_get("model")?,
                earlier,
                serving_used: row.try_get::<Option<bool>, _>("serving_used")?,
                requests: row.try_get("requests")?,
                prompt_tokens: row.try_get("prompt_tokens")?,
                completion_tokens: row.try_get("completion_tokens")?,
                first_seen: row.try_get("first_seen")?,
                last_seen: row.try_get("last_seen")?,
            },
            prices,
        );
    }
    if unreadable > 0 {
        tracing::warn!(
            groups = unreadable,
            "unreadable earlier_attempts on unpriced rows; listed under their serving model"
        );
    }
    Ok(tally.into_list())
}

/// Unpriced rows that have the same answer (see [`UNPRICED_GROUPS`]).
#[derive(Debug, Clone)]
struct Group {
    provider: String,
    model: String,
    /// The earlier attempts that consumed tokens; `None` when there are none (or they are
    /// unknown): then the rows count under the serving pair.
    earlier: Option<Vec<AttemptUsage>>,
    /// Whether the serving attempt consumed tokens (set when `earlier` is).
    serving_used: Option<bool>,
    requests: i64,
    /// The serving attempts' tokens, summed over the rows.
    prompt_tokens: i64,
    completion_tokens: i64,
    first_seen: OffsetDateTime,
    last_seen: OffsetDateTime,
}

/// The pairs of one unpriced row that consumed tokens and have no price in `prices` at `at`: the
/// serving pair (when `serving_used`), then each earlier attempt's, each once. Empty when none can
/// be named (the caller counts the row under its serving pair). The one rule of `ListUnpriced` and
/// of the `switchboard_ledger_unpriced_rows_total` metric.
pub(crate) fn missing_pairs<'a>(
    serving: (&'a str, &'a str),
    serving_used: bool,
    earlier: &'a [AttemptUsage],
    at: OffsetDateTime,
    prices: &PriceBook,
) -> Vec<(&'a str, &'a str)> {
    let priced = |(provider, model): (&str, &str)| prices.lookup(provider, model, at).is_some();
    let mut missing = Vec::new();
    if serving_used && !priced(serving) {
        missing.push(serving);
    }
    for attempt in earlier {
        let pair = (attempt.provider.as_str(), attempt.model.as_str());
        if !attempt.tokens.is_zero() && !missing.contains(&pair) && !priced(pair) {
            missing.push(pair);
        }
    }
    missing
}

/// The pairs an unpriced `row` is counted under: [`missing_pairs`], or its serving pair when none
/// can be named (the `switchboard_ledger_unpriced_rows_total` metric's labels).
pub(crate) fn pairs_of_unpriced_row<'a>(
    row: &'a crate::record::UsageRow,
    prices: &PriceBook,
) -> Vec<(&'a str, &'a str)> {
    let serving = (row.provider.as_str(), row.model.as_str());
    let earlier = row.earlier_attempts.as_deref().unwrap_or_default();
    let mut pairs = missing_pairs(serving, !row.tokens.is_zero(), earlier, row.time, prices);
    if pairs.is_empty() {
        pairs.push(serving);
    }
    pairs
}

/// The listing being built, one entry per pair.
#[derive(Debug, Default)]
struct Tally(HashMap<(String, String), Unpriced>);

impl Tally {
    /// Counts `group` under each pair of it without a price (in `prices`, at its rows' UTC day),
    /// or under its serving pair when none can be named.
    fn add(&mut self, group: &Group, prices: &PriceBook) {
        // Pair -> its (prompt, completion) tokens in the group's rows.
        let mut missing: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
        if let Some(earlier) = &group.earlier {
            // Every row of the group is on the same UTC day: any of their times looks up the same price.
            let serving = (group.provider.as_str(), group.model.as_str());
            let pairs = missing_pairs(
                serving,
                group.serving_used == Some(true),
                earlier,
                group.first_seen,
                prices,
            );
            let times = |tokens: u32| i64::from(tokens).saturating_mul(group.requests);
            for pair in pairs {
                let tokens = missing.entry(pair).or_default();
                if pair == serving && group.serving_used == Some(true) {
                    tokens.0 = tokens.0.saturating_add(group.prompt_tokens);
                    tokens.1 = tokens.1.saturating_add(group.completion_tokens);
                }
                for attempt in earlier
                    .iter()
                    .filter(|a| (a.provider.as_str(), a.model.as_str()) == pair)
                {
                    tokens.0 = tokens.0.saturating_add(times(attempt.tokens.prompt));
                    tokens.1 = tokens.1.saturating_add(times(attempt.tokens.completion));
                }
            }
        }
        if missing.is_empty() {
            missing.insert(
                (&group.provider, &group.model),
                (group.prompt_tokens, group.completion_tokens),
            );
        }
        for ((provider, model), (prompt, completion)) in missing {
            let entry = self
                .0
                .entry((provider.to_owned(), model.to_owned()))
                .or_insert_with(|| Unpriced {
                    provider: provider.to_owned(),
                    model: model.to_owned(),
                    requests: 0,
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    first_seen: group.first_seen,
                    last_seen: group.last_seen,
                });
            entry.requests = entry.requests.saturating_add(group.requests);
            entry.prompt_tokens = entry.prompt_tokens.saturating_add(prompt);
            entry.completion_tokens = entry.completion_tokens.saturating_add(completion);
            entry.first_seen = entry.first_seen.min(group.first_seen);
            entry.last_seen = entry.last_seen.max(group.last_seen);
        }
    }

    /// Most requests first, then by provider and model.
    fn into_list(self) -> Vec<Unpriced> {
        let mut list: Vec<Unpriced> = self.0.into_values().collect();
        list.sort_by(|a, b| {
            b.requests
                .cmp(&a.requests)
                .then_with(|| (&a.provider, &a.model).cmp(&(&b.provider, &b.model)))
        });
        list
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{
        money::{Rate, Rates, Tokens},
        pricing::Price,
    };
    use time::macros::{date, datetime};

    fn book() -> PriceBook {
        let rates = Rates::flat(Rate(1), Rate(1), Rate(1));
        PriceBook::new([
            Price::configured("*", "priced", date!(2024 - 01 - 01), rates),
            Price::configured("*", "later", date!(2025 - 03 - 02), rates),
        ])
    }

    fn attempt(provider: &str, model: &str, prompt: u32, completion: u32) -> AttemptUsage {
        AttemptUsage {
            provider: provider.into(),
            model: model.into(),
            tokens: Tokens {
                prompt,
                completion,
                ..Tokens::default()
            },
        }
    }

    fn group(model: &str, earlier: Option<Vec<AttemptUsage>>, requests: i64) -> Group {
        Group {
            provider: "openai".into(),
            model: model.into(),
            serving_used: earlier.as_ref().map(|_| true),
            earlier,
            requests,
            prompt_tokens: 1000 * requests,
            completion_tokens: 500 * requests,
            first_seen: datetime!(2025-03-01 10:00 UTC),
            last_seen: datetime!(2025-03-01 11:00 UTC),
        }
    }

    /// The metric's labels: an unpriced row counts under the model without a price (here an
    /// earlier attempt's), not under its priced serving model; a row whose serving model has no
    /// price counts under it.
    #[test]
    fn an_unpriced_row_is_counted_under_the_model_without_a_price() {
        use switchboard_proto::chat::v1::{Attempt, RouteInfo, Usage};
        let usage = |prompt: u32| Usage {
            prompt_tokens: prompt,
            completion_tokens: 5,
            total_tokens: prompt + 5,
            ..Usage::default()
        };
        let event = |serving: &str, earlier: &str| switchboard_bus::UsageEvent {
            request_id: uuid::Uuid::now_v7().to_string(),
            route: Some(RouteInfo {
                provider: "openai".into(),
                model: serving.into(),
                attempt_count: 2,
                attempts: vec![
                    Attempt {
                        provider: "openai".into(),
                        model: earlier.into(),
                        usage: Some(usage(40)),
                        ..Attempt::default()
                    },
                    Attempt {
                        provider: "openai".into(),
                        model: serving.into(),
                        ..Attempt::default()
                    },
                ],
                ..RouteInfo::default()
            }),
            usage: Some(usage(100)),
            ..switchboard_bus::UsageEvent::default()
        };
        let at = datetime!(2025-03-01 10:00 UTC);
        let book = book();
        let row = crate::record::price_event(event("priced", "mystery"), at, &book).unwrap();
        assert_eq!(row.cost_usd_nanos, None);
        assert_eq!(
            pairs_of_unpriced_row(&row, &book),
            vec![("openai", "mystery")]
        );
        let row = crate::record::price_event(event("mystery", "priced"), at, &book).unwrap();
        assert_eq!(
            pairs_of_unpriced_row(&row, &book),
            vec![("openai", "mystery")]
        );
        // Both without a price: counted under each.
        let row = crate::record::price_event(event("mystery", "other"), at, &book).unwrap();
        assert_eq!(
            pairs_of_unpriced_row(&row, &book),
            vec![("openai", "mystery"), ("openai", "other")]
        );
    }

    fn listed(tally: Tally) -> Vec<(String, String, i64, i64, i64)> {
        tally
            .into_list()
            .into_iter()
            .map(|u| {
                (
                    u.provider,
                    u.model,
                    u.requests,
                    u.prompt_tokens,
                    u.completion_tokens,
                )
            })
            .collect()
    }

    fn row(
        provider: &str,
        model: &str,
        requests: i64,
        prompt: i64,
        completion: i64,
    ) -> (String, String, i64, i64, i64) {
        (provider.into(), model.into(), requests, prompt, completion)
    }

    #[test]
    fn an_earlier_attempt_without_a_price_is_listed_instead_of_the_priced_serving_model() {
        let mut tally = Tally::default();
        let cut = vec![
            attempt("primary", "mystery", 300, 20),
            attempt("primary", "priced", 7, 7),
        ];
        tally.add(&group("priced", Some(cut), 2), &book());
        assert_eq!(listed(tally), [row("primary", "mystery", 2, 600, 40)]);
    }

    #[test]
    fn every_pair_without_a_price_counts_the_row_once() {
        let mut tally = Tally::default();
        let earlier = vec![
            attempt("primary", "mystery", 300, 20),
            attempt("primary", "mystery", 100, 0),
            attempt("backup", "odd", 0, 0),
        ];
        tally.add(&group("unknown", Some(earlier), 1), &book());
        tally.add(&group("unknown", None, 3), &book());
        assert_eq!(
            listed(tally),
            [
                row("openai", "unknown", 4, 4000, 2000),
                row("primary", "mystery", 1, 400, 20),
            ]
        );
    }

    #[test]
    fn a_price_is_looked_up_at_the_rows_day() {
        let mut tally = Tally::default();
        // `later` has a price from 2025-03-02 only: missing on 2025-03-01 ...
        tally.add(
            &group("priced", Some(vec![attempt("p", "later", 10, 1)]), 1),
            &book(),
        );
        // ... and priced on 2025-03-02: nothing can be named, so the serving pair.
        let mut next_day = group("priced", Some(vec![attempt("p", "later", 10, 1)]), 1);
        next_day.first_seen = datetime!(2025-03-02 00:00 UTC);
        next_day.last_seen = datetime!(2025-03-02 00:30 UTC);
        tally.add(&next_day, &book());
        assert_eq!(
            listed(tally),
            [
                row("openai", "priced", 1, 1000, 500),
                row("p", "later", 1, 10, 1)
            ]
        );
    }

    #[test]
    fn a_serving_attempt_without_tokens_is_not_named_when_an_earlier_one_is() {
        let mut tally = Tally::default();
        let mut g = group("unknown", Some(vec![attempt("p", "mystery", 10, 1)]), 1);
        g.serving_used = Some(false);
        g.prompt_tokens = 0;
        g.completion_tokens = 0;
        tally.add(&g, &book());
        assert_eq!(listed(tally), [row("p", "mystery", 1, 10, 1)]);
    }

    #[test]
    fn first_and_last_seen_span_the_groups() {
        let mut tally = Tally::default();
        let mut late = group("unknown", None, 1);
        late.first_seen = datetime!(2025-03-05 00:00 UTC);
        late.last_seen = datetime!(2025-03-06 00:00 UTC);
        tally.add(&late, &book());
        tally.add(&group("unknown", None, 1), &book());
        let list = tally.into_list();
        assert_eq!(
            (list[0].first_seen, list[0].last_seen),
            (
                datetime!(2025-03-01 10:00 UTC),
                datetime!(2025-03-06 00:00 UTC)
            )
        );
    }
}
