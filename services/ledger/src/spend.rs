//! Spend queries for finance, answered from the rollups.
//!
//! A time range `[start, end)` is split into tiers: whole UTC days read `usage_rollup_daily`, the
//! whole hours around them read `usage_rollup_hourly`, and only the partial hours at the two
//! edges (less than an hour each) read raw `usage_records` through the `(time, request_id)`
//! index. Grouping by hour skips the daily tier. Grouping by a tag, or filtering by tags, reads
//! raw rows for the whole range (tags are JSON on the row, not a rollup dimension).

use std::collections::BTreeMap;

use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use time::{Duration, OffsetDateTime, Time};

/// A dimension to group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    /// Application id.
    App,
    /// Team id.
    Team,
    /// Virtual key id.
    Key,
    /// Served model.
    Model,
    /// Served provider.
    Provider,
    /// Requested model.
    Route,
    /// A tag's value.
    Tag,
    /// UTC hour.
    Hour,
    /// UTC day.
    Day,
    /// UTC month.
    Month,
}

impl Dimension {
    /// The column (or expression over the tiers' common columns) of the dimension.
    fn expression(self) -> &'static str {
        match self {
            Dimension::App => "app",
            Dimension::Team => "team",
            Dimension::Key => "key_id",
            Dimension::Model => "model",
            Dimension::Provider => "provider",
            Dimension::Route => "route",
            Dimension::Tag => "COALESCE(tag_value, '')",
            Dimension::Hour => "date_trunc('hour', bucket, 'UTC')",
            Dimension::Day => "date_trunc('day', bucket, 'UTC')",
            Dimension::Month => "date_trunc('month', bucket, 'UTC')",
        }
    }

    fn is_period(self) -> bool {
        matches!(self, Dimension::Hour | Dimension::Day | Dimension::Month)
    }
}

/// Filters: within a list any value matches; lists and tags combine with AND.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Application ids.
    pub apps: Vec<String>,
    /// Team ids.
    pub teams: Vec<String>,
    /// Key ids.
    pub key_ids: Vec<String>,
    /// Served models.
    pub models: Vec<String>,
    /// Served providers.
    pub providers: Vec<String>,
    /// Requested models.
    pub routes: Vec<String>,
    /// Tags that must be present with these values.
    pub tags: BTreeMap<String, String>,
}

impl Filter {
    /// Appends ` AND …` conditions; `route` names the route column; tags only on raw rows.
    pub(crate) fn push_conditions(
        &self,
        query: &mut QueryBuilder<Postgres>,
        route: &'static str,
        raw: bool,
    ) {
        let lists: [(&'static str, &Vec<String>); 6] = [
            ("app", &self.apps),
            ("team", &self.teams),
            ("key_id", &self.key_ids),
            ("model", &self.models),
            ("provider", &self.providers),
            (route, &self.routes),
        ];
        for (column, values) in lists {
            if !values.is_empty() {
                query
                    .push(" AND ")
                    .push(column)
                    .push(" = ANY(")
                    .push_bind(values.clone())
                    .push(")");
            }
        }
        if raw && !self.tags.is_empty() {
            let json = serde_json::to_string(&self.tags).unwrap_or_else(|_| "{}".to_owned());
            query.push(" AND tags @> ").push_bind(json).push("::jsonb");
        }
    }
}

/// A spend query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendQuery {
    /// Inclusive start.
    pub start: OffsetDateTime,
    /// Exclusive end.
    pub end: OffsetDateTime,
    /// Group by, in output order (no duplicates).
    pub group_by: Vec<Dimension>,
    /// The tag grouped by ([`Dimension::Tag`]).
    pub tag_key: Option<String>,
    /// Filters.
    pub filter: Filter,
}

/// Summed measures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measures {
    /// Requests.
    pub requests: i64,
    /// Input tokens.
    pub prompt_tokens: i64,
    /// Output tokens.
    pub completion_tokens: i64,
    /// Cache-read input tokens.
    pub cached_prompt_tokens: i64,
    /// Cache-write input tokens.
    pub cache_write_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// Cost of priced requests, nano-USD.
    pub cost_usd_nanos: i64,
    /// Requests without a price.
    pub unpriced_requests: i64,
    /// Saved by cache hits, nano-USD.
    pub saved_usd_nanos: i64,
    /// Requests with status error.
    pub error_requests: i64,
    /// Cache hits.
    pub cache_hits: i64,
}

impl Measures {
    fn add(&mut self, other: &Measures) -> Option<()> {
        self.requests = self.requests.checked_add(other.requests)?;
        self.prompt_tokens = self.prompt_tokens.checked_add(other.prompt_tokens)?;
        self.completion_tokens = self
            .completion_tokens
            .checked_add(other.completion_tokens)?;
        self.cached_prompt_tokens = self
            .cached_prompt_tokens
            .checked_add(other.cached_prompt_tokens)?;
        self.cache_write_tokens = self
            .cache_write_tokens
            .checked_add(other.cache_write_tokens)?;
        self.reasoning_tokens = self.reasoning_tokens.checked_add(other.reasoning_tokens)?;
        self.cost_usd_nanos = self.cost_usd_nanos.checked_add(other.cost_usd_nanos)?;
        self.unpriced_requests = self
            .unpriced_requests
            .checked_add(other.unpriced_requests)?;
        self.saved_usd_nanos = self.saved_usd_nanos.checked_add(other.saved_usd_nanos)?;
        self.error_requests = self.error_requests.checked_add(other.error_requests)?;
        self.cache_hits = self.cache_hits.checked_add(other.cache_hits)?;
        Some(())
    }
}

/// One group's key (only the grouped dimensions are set) and measures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    /// Application id.
    pub app: Option<String>,
    /// Team id.
    pub team: Option<String>,
    /// Key id.
    pub key_id: Option<String>,
    /// Served model.
    pub model: Option<String>,
    /// Served provider.
    pub provider: Option<String>,
    /// Requested model.
    pub route: Option<String>,
    /// Tag value.
    pub tag_value: Option<String>,
    /// Start of the hour, day or month.
    pub period_start: Option<OffsetDateTime>,
    /// Sums.
    pub measures: Measures,
}

/// Stored data a query read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// `usage_rollup_daily`.
    RollupDaily,
    /// `usage_rollup_hourly`.
    RollupHourly,
    /// `usage_records`.
    Raw,
}

/// The answer: groups in dimension order, the total and what was read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpendAnswer {
    /// Groups.
    pub groups: Vec<Group>,
    /// Sum over every group.
    pub total: Measures,
    /// Stored data read.
    pub sources: Vec<Source>,
}

/// Which time ranges each tier reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Raw row ranges.
    pub raw: Vec<(OffsetDateTime, OffsetDateTime)>,
    /// Hourly rollup ranges (whole hours).
    pub hourly: Vec<(OffsetDateTime, OffsetDateTime)>,
    /// Daily rollup range (whole days).
    pub daily: Option<(OffsetDateTime, OffsetDateTime)>,
}

fn floor_hour(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(time::UtcOffset::UTC);
    t.replace_time(Time::MIDNIGHT) + Duration::hours(i64::from(t.hour()))
}

fn ceil_hour(t: OffsetDateTime) -> OffsetDateTime {
    let floor = floor_hour(t);
    if floor == t {
        floor
    } else {
        floor + Duration::HOUR
    }
}

fn floor_day(t: OffsetDateTime) -> OffsetDateTime {
    t.to_offset(time::UtcOffset::UTC)
        .replace_time(Time::MIDNIGHT)
}

fn ceil_day(t: OffsetDateTime) -> OffsetDateTime {
    let floor = floor_day(t);
    if floor == t {
        floor
    } else {
        floor + Duration::DAY
    }
}

/// Splits `[start, end)` into tiers (see the module documentation).
pub fn plan(start: OffsetDateTime, end: OffsetDateTime, raw_only: bool, daily: bool) -> Plan {
    let mut plan = Plan::default();
    let hs = ceil_hour(start);
    let he = floor_hour(end);
    if raw_only || hs >= he {
        plan.raw.push((start, end));
        return plan;
    }
    for (a, b) in [(start, hs), (he, end)] {
        if a < b {
            plan.raw.push((a, b));
        }
    }
    let ds = ceil_day(hs);
    let de = floor_day(he);
    if daily && ds < de {
        plan.daily = Some((ds, de));
        for (a, b) in [(hs, ds), (de, he)] {
            if a < b {
                plan.hourly.push((a, b));
            }
        }
    } else {
        plan.hourly.push((hs, he));
    }
    plan
}

const MEASURE_COLUMNS: [&str; 11] = [
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_usd_nanos",
    "unpriced_requests",
    "saved_usd_nanos",
    "error_requests",
    "cache_hits",
];

const ROLLUP_SELECT: &str = "SELECT bucket, app, team, key_id, route, provider, model, \
     NULL::text AS tag_value, requests, prompt_tokens, completion_tokens, cached_prompt_tokens, \
     cache_write_tokens, reasoning_tokens, cost_usd_nanos, unpriced_requests, saved_usd_nanos, \
     error_requests, cache_hits FROM ";

/// Runs a spend query.
pub async fn query(pool: &PgPool, request: &SpendQuery) -> Result<SpendAnswer, sqlx::Error> {
    let raw_only = request.group_by.contains(&Dimension::Tag) || !request.filter.tags.is_empty();
    let daily = !request.group_by.contains(&Dimension::Hour);
    let plan = plan(request.start, request.end, raw_only, daily);

    let mut query = QueryBuilder::<Postgres>::new("SELECT ");
    for (i, dimension) in request.group_by.iter().enumerate() {
        query
            .push(dimension.expression())
            .push(format_args!(" AS d{i}, "));
    }
    for (i, column) in MEASURE_COLUMNS.iter().enumerate() {
        if i > 0 {
            query.push(", ");
        }
        query.push(format_args!(
            "COALESCE(SUM({column}), 0)::BIGINT AS {column}"
        ));
    }
    query.push(" FROM (");
    let mut parts = 0;
    let mut sources = Vec::new();
    let mut union = |query: &mut QueryBuilder<Postgres>| {
        if parts > 0 {
            query.push(" UNION ALL ");
        }
        parts += 1;
    };
    if let Some((a, b)) = plan.daily {
        union(&mut query);
        query
            .push(ROLLUP_SELECT)
            .push("usage_rollup_daily WHERE bucket >= ")
            .push_bind(a)
            .push(" AND bucket < ")
            .push_bind(b);
        request.filter.push_conditions(&mut query, "route", false);
        sources.push(Source::RollupDaily);
    }
    for &(a, b) in &plan.hourly {
        union(&mut query);
        query
            .push(ROLLUP_SELECT)
            .push("usage_rollup_hourly WHERE bucket >= ")
            .push_bind(a)
            .push(" AND bucket < ")
            .push_bind(b);
        request.filter.push_conditions(&mut query, "route", false);
        if !sources.contains(&Source::RollupHourly) {
            sources.push(Source::RollupHourly);
        }
    }
    for &(a, b) in &plan.raw {
        union(&mut query);
        query.push(
            "SELECT time AS bucket, app, team, key_id, requested_model AS route, provider, model, ",
        );
        match &request.tag_key {
            Some(key) => {
                query.push("tags ->> ").push_bind(key.clone());
            }
            None => {
                query.push("NULL::text");
            }
        }
        query.push(
            " AS tag_value, 1::BIGINT AS requests, prompt_tokens, completion_tokens, \
             cached_prompt_tokens, cache_write_tokens, reasoning_tokens, \
             COALESCE(cost_usd_nanos, 0) AS cost_usd_nanos, \
             (cost_usd_nanos IS NULL)::INT::BIGINT AS unpriced_requests, saved_usd_nanos, \
             (status = 'error')::INT::BIGINT AS error_requests, \
             (cache = 'hit')::INT::BIGINT AS cache_hits FROM usage_records WHERE time >= ",
        );
        query.push_bind(a).push(" AND time < ").push_bind(b);
        request
            .filter
            .push_conditions(&mut query, "requested_model", true);
        if !sources.contains(&Source::Raw) {
            sources.push(Source::Raw);
        }
    }
    query.push(") AS tiers");
    if !request.group_by.is_empty() {
        query.push(" GROUP BY ");
        for i in 0..request.group_by.len() {
            if i > 0 {
                query.push(", ");
            }
            query.push(format_args!("d{i}"));
        }
        query.push(" ORDER BY ");
        for i in 0..request.group_by.len() {
            if i > 0 {
                query.push(", ");
            }
            query.push(format_args!("d{i}"));
        }
    }
    let rows = query.build().fetch_all(pool).await?;
    let mut answer = SpendAnswer {
        sources,
        ..SpendAnswer::default()
    };
    for row in rows {
        let mut group = Group::default();
        for (i, dimension) in request.group_by.iter().enumerate() {
            let name = format!("d{i}");
            if dimension.is_period() {
                group.period_start = Some(row.try_get(name.as_str())?);
                continue;
            }
            let value: String = row.try_get(name.as_str())?;
            let slot = match dimension {
                Dimension::App => &mut group.app,
                Dimension::Team => &mut group.team,
                Dimension::Key => &mut group.key_id,
                Dimension::Model => &mut group.model,
                Dimension::Provider => &mut group.provider,
                Dimension::Route => &mut group.route,
                _ => &mut group.tag_value,
            };
            *slot = Some(value);
        }
        let get = |column: &str| row.try_get::<i64, _>(column);
        group.measures = Measures {
            requests: get("requests")?,
            prompt_tokens: get("prompt_tokens")?,
            completion_tokens: get("completion_tokens")?,
            cached_prompt_tokens: get("cached_prompt_tokens")?,
            cache_write_tokens: get("cache_write_tokens")?,
            reasoning_tokens: get("reasoning_tokens")?,
            cost_usd_nanos: get("cost_usd_nanos")?,
            unpriced_requests: get("unpriced_requests")?,
            saved_usd_nanos: get("saved_usd_nanos")?,
            error_requests: get("error_requests")?,
            cache_hits: get("cache_hits")?,
        };
        answer
            .total
            .add(&group.measures)
            .ok_or_else(|| sqlx::Error::Protocol("spend total overflows 64 bits".to_owned()))?;
        // Without grouping an empty range is one row of zeros: report no group instead.
        if request.group_by.is_empty() && group.measures == Measures::default() {
            continue;
        }
        answer.groups.push(group);
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn whole_days_read_the_daily_rollup_and_edges_the_finer_tiers() {
        let plan = plan(
            datetime!(2026-11-01 10:30 UTC),
            datetime!(2026-11-05 02:15 UTC),
            false,
            true,
        );
        assert_eq!(
            plan.raw,
            vec![
                (
                    datetime!(2026-11-01 10:30 UTC),
                    datetime!(2026-11-01 11:00 UTC)
                ),
                (
                    datetime!(2026-11-05 02:00 UTC),
                    datetime!(2026-11-05 02:15 UTC)
                )
            ]
        );
        assert_eq!(
            plan.hourly,
            vec![
                (
                    datetime!(2026-11-01 11:00 UTC),
                    datetime!(2026-11-02 00:00 UTC)
                ),
                (
                    datetime!(2026-11-05 00:00 UTC),
                    datetime!(2026-11-05 02:00 UTC)
                )
            ]
        );
        assert_eq!(
            plan.daily,
            Some((
                datetime!(2026-11-02 00:00 UTC),
                datetime!(2026-11-05 00:00 UTC)
            ))
        );
    }

    #[test]
    fn aligned_ranges_read_no_raw_rows() {
        let plan = plan(
            datetime!(2026-11-01 00:00 UTC),
            datetime!(2026-12-01 00:00 UTC),
            false,
            true,
        );
        assert!(plan.raw.is_empty());
        assert!(plan.hourly.is_empty());
        assert!(plan.daily.is_some());
        // Grouped by hour: hourly only.
        let plan = plan_hourly();
        assert_eq!(plan.hourly.len(), 1);
        assert!(plan.daily.is_none() && plan.raw.is_empty());
    }

    fn plan_hourly() -> Plan {
        plan(
            datetime!(2026-11-01 00:00 UTC),
            datetime!(2026-11-03 00:00 UTC),
            false,
            false,
        )
    }

    #[test]
    fn short_or_tagged_ranges_read_raw_rows() {
        let short = plan(
            datetime!(2026-11-01 10:10 UTC),
            datetime!(2026-11-01 11:50 UTC),
            false,
            true,
        );
        assert_eq!(short.raw.len(), 1);
        assert!(short.hourly.is_empty() && short.daily.is_none());
        let tagged = plan(
            datetime!(2026-11-01 00:00 UTC),
            datetime!(2026-12-01 00:00 UTC),
            true,
            true,
        );
        assert_eq!(tagged.raw.len(), 1);
        assert!(tagged.hourly.is_empty() && tagged.daily.is_none());
    }

    #[test]
    fn non_utc_offsets_are_aligned_in_utc() {
        let start = datetime!(2026-11-01 02:00 +02:00); // 00:00 UTC
        assert_eq!(floor_hour(start), datetime!(2026-11-01 00:00 UTC));
        assert_eq!(ceil_day(start), datetime!(2026-11-01 00:00 UTC));
    }
}
