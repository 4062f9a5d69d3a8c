//! Budgets (ADR 007): definitions, calendar periods in a time zone, and the lease ledger that makes a
//! hard budget impossible to overspend.
//!
//! Invariant, per budget and period, kept under the budget row's lock (`SELECT … FOR UPDATE`):
//! `max(settled, recorded) + Σ open max(granted − spent, 0) ≤ limit`, where `settled` is what
//! gateways reported spent on their leases, `recorded` what `usage_records` holds for the scope
//! (the source of truth, trailing by the usage stream's delay; read mostly from the rollups, which
//! outlive retention) and an open lease counts its whole unspent grant (never less than nothing). A lease that is not extended before `expires_at` is closed by the next operation on its
//! budget: from then on only its reported spend counts, so a crashed gateway's slice comes back.

use std::collections::HashMap;

use jiff::{Timestamp, ToSpan, Zoned, civil::Date, tz::TimeZone};
use sha2::{Digest as _, Sha256};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder, Row, Transaction};
use switchboard_status::{ErrorCode, ServiceError};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::spend;

/// Request-path errors of `BudgetService`.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// A field is missing or invalid.
    #[error("invalid `{field}`: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    /// No such budget or lease.
    #[error("no {what} `{id}`")]
    NotFound { what: &'static str, id: String },
    /// The budget id is taken.
    #[error("budget `{id}` already exists")]
    AlreadyExists { id: String },
    /// Postgres failed.
    #[error("the ledger database is unavailable")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for BudgetError {
    fn from(error: sqlx::Error) -> Self {
        BudgetError::Database(error)
    }
}

impl ServiceError for BudgetError {
    fn code(&self) -> ErrorCode {
        match self {
            BudgetError::InvalidArgument { .. } | BudgetError::AlreadyExists { .. } => {
                ErrorCode::InvalidArgument
            }
            BudgetError::NotFound { .. } => ErrorCode::NotFound,
            BudgetError::Database(_) => ErrorCode::Unavailable,
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        match self {
            BudgetError::InvalidArgument { field, .. } => {
                HashMap::from([("field".to_owned(), (*field).to_owned())])
            }
            BudgetError::NotFound { id, .. } | BudgetError::AlreadyExists { id } => {
                HashMap::from([("id".to_owned(), id.clone())])
            }
            BudgetError::Database(_) => HashMap::new(),
        }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> BudgetError {
    BudgetError::InvalidArgument {
        field,
        message: message.into(),
    }
}

/// What a budget applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeKind {
    /// A key id.
    Key,
    /// An app.
    App,
    /// A team.
    Team,
    /// The organisation.
    Org,
}

impl ScopeKind {
    /// Database text.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Key => "key",
            ScopeKind::App => "app",
            ScopeKind::Team => "team",
            ScopeKind::Org => "org",
        }
    }

    /// Parses the database (and configuration) text: `key`, `app`, `team` or `org`.
    pub fn parse(text: &str) -> Option<ScopeKind> {
        Some(match text {
            "key" => ScopeKind::Key,
            "app" => ScopeKind::App,
            "team" => ScopeKind::Team,
            "org" => ScopeKind::Org,
            _ => return None,
        })
    }
}

/// When a budget resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// Calendar day.
    Day,
    /// Calendar week, Monday first.
    Week,
    /// Calendar month.
    Month,
    /// Never.
    Lifetime,
}

impl Period {
    /// Database text.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Lifetime => "lifetime",
        }
    }

    /// Parses the database (and configuration) text: `day`, `week`, `month` or `lifetime`.
    pub fn parse(text: &str) -> Option<Period> {
        Some(match text {
            "day" => Period::Day,
            "week" => Period::Week,
            "month" => Period::Month,
            "lifetime" => Period::Lifetime,
            _ => return None,
        })
    }
}

/// A budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Id.
    pub id: String,
    /// Scope kind.
    pub kind: ScopeKind,
    /// Key id, app or team; empty for the organisation.
    pub scope_id: String,
    /// Period.
    pub period: Period,
    /// IANA time zone (validated).
    pub time_zone: String,
    /// Limit per period, nano-USD.
    pub limit: i64,
    /// Hard (blocks) or soft (alerts only).
    pub hard: bool,
    /// Alert thresholds, percent, ascending, unique.
    pub thresholds: Vec<u32>,
    /// Created.
    pub created_at: OffsetDateTime,
    /// Last changed.
    pub updated_at: OffsetDateTime,
}

impl Budget {
    /// Checks a budget given by a caller; normalises the time zone (empty: UTC) and thresholds.
    pub fn validate(&mut self) -> Result<(), BudgetError> {
        if self.id.is_empty()
            || self.id.len() > 128
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                "budget.id",
                "must be 1-128 letters, digits, `-`, `_` or `.`",
            ));
        }
        match self.kind {
            ScopeKind::Org if !self.scope_id.is_empty() => {
                return Err(invalid(
                    "budget.scope.id",
                    "must be empty for the organisation",
                ));
            }
            ScopeKind::Key | ScopeKind::App | ScopeKind::Team if self.scope_id.is_empty() => {
                return Err(invalid("budget.scope.id", "must not be empty"));
            }
            _ => {}
        }
        if self.time_zone.is_empty() {
            "UTC".clone_into(&mut self.time_zone);
        }
        if TimeZone::get(&self.time_zone).is_err() {
            return Err(invalid(
                "budget.time_zone",
                format!("unknown time zone `{}`", self.time_zone),
            ));
        }
        if self.limit < 0 {
            return Err(invalid("budget.limit_usd_nanos", "must not be negative"));
        }
        if self.thresholds.iter().any(|t| *t == 0 || *t > 1000) {
            return Err(invalid(
                "budget.alert_thresholds_pct",
                "each must be between 1 and 1000",
            ));
        }
        self.thresholds.sort_unstable();
        self.thresholds.dedup();
        Ok(())
    }

    /// Whether `other` applies to the same scope (kind and id).
    pub fn same_scope(&self, other: &Budget) -> bool {
        self.kind == other.kind && self.scope_id == other.scope_id
    }

    /// Whether `other` has the same limit, period, time zone, enforcement and alert thresholds:
    /// everything `update` can change. Compare validated (normalised) budgets.
    pub fn same_settings(&self, other: &Budget) -> bool {
        self.period == other.period
            && self.time_zone == other.time_zone
            && self.limit == other.limit
            && self.hard == other.hard
            && self.thresholds == other.thresholds
    }

    fn zone(&self) -> TimeZone {
        TimeZone::get(&self.time_zone).unwrap_or(TimeZone::UTC)
    }

    /// The period containing `now`.
    pub fn period_at(&self, now: Timestamp) -> PeriodBounds {
        period_bounds(self.period, &self.zone(), now)
    }
}

/// Prefix of the ids of the budgets declared in `[[ledger.budgets]]`, which mark them as owned by
/// the configuration. Reserved: `CreateBudget` refuses such an id.
pub const DECLARED_ID_PREFIX: &str = "config.";

/// Longest scope id that is kept readable in a declared budget's id (longer ones are hashed).
const DECLARED_READABLE_MAX: usize = 64;

/// The id of the budget declared in configuration for a scope (one per scope):
/// - `config.org` for the organisation (empty scope id);
/// - `config.<kind>.<scope id>` when the scope id is 1–64 letters, digits, `-` or `_`;
/// - otherwise `config.<kind>.sha256.<the first 32 hex digits of the scope id's SHA-256>`, since
///   a budget id is at most 128 letters, digits, `-`, `_` or `.`.
///
/// The readable form has two dots and the hashed form three, so two scopes never share an id.
pub fn declared_id(kind: ScopeKind, scope_id: &str) -> String {
    let kind = kind.as_str();
    if scope_id.is_empty() {
        return format!("{DECLARED_ID_PREFIX}{kind}");
    }
    let readable = scope_id.len() <= DECLARED_READABLE_MAX
        && scope_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if readable {
        format!("{DECLARED_ID_PREFIX}{kind}.{scope_id}")
    } else {
        let digest = Sha256::digest(scope_id.as_bytes());
        let short: String = hex::encode(digest).chars().take(32).collect();
        format!("{DECLARED_ID_PREFIX}{kind}.sha256.{short}")
    }
}

/// What [`BudgetStore::apply_declared_in`] did, by budget id (each list in id order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Declared budgets that did not exist.
    pub created: Vec<String>,
    /// Declared budgets whose stored settings differed: replaced by the declared ones.
    pub updated: Vec<String>,
    /// Declared budgets stored exactly as declared: not written.
    pub unchanged: Vec<String>,
    /// Budgets with a declared id ([`DECLARED_ID_PREFIX`]) that are no longer declared: left as
    /// they are (still enforced).
    pub undeclared: Vec<String>,
}

/// The bounds of one period: `[start, end)`; `end` is `None` for lifetime budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodBounds {
    /// First instant (the Unix epoch for lifetime budgets).
    pub start: Timestamp,
    /// First instant of the next period (the reset time).
    pub end: Option<Timestamp>,
}

/// The calendar period of `period` in `zone` that contains `now`: it starts at local midnight of
/// its first day (or the first valid instant after it, when a DST gap swallows midnight).
pub fn period_bounds(period: Period, zone: &TimeZone, now: Timestamp) -> PeriodBounds {
    let today = now.to_zoned(zone.clone()).date();
    let (first, next) = match period {
        Period::Lifetime => {
            return PeriodBounds {
                start: Timestamp::UNIX_EPOCH,
                end: None,
            };
        }
        Period::Day => (today, today.checked_add(1.day())),
        Period::Week => {
            let monday = today
                .checked_sub(i64::from(today.weekday().to_monday_zero_offset()).days())
                .unwrap_or(today);
            (monday, monday.checked_add(1.week()))
        }
        Period::Month => {
            let first = today.first_of_month();
            (first, first.checked_add(1.month()))
        }
    };
    PeriodBounds {
        start: midnight(first, zone).unwrap_or(now),
        end: next.ok().and_then(|d| midnight(d, zone)),
    }
}

fn midnight(date: Date, zone: &TimeZone) -> Option<Timestamp> {
    date.to_zoned(zone.clone())
        .ok()
        .and_then(|z: Zoned| z.start_of_day().ok())
        .map(|z| z.timestamp())
}

/// jiff → the `time` type sqlx binds.
pub fn to_odt(ts: Timestamp) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ts.as_nanosecond())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The `time` type sqlx returns → jiff.
pub fn from_odt(odt: OffsetDateTime) -> Timestamp {
    Timestamp::from_nanosecond(odt.unix_timestamp_nanos()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// A budget's current-period numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeriodState {
    /// Reported spend on every lease of the period (and, for the current period, on every lease
    /// still open: see `BudgetStore::state`).
    pub settled: i64,
    /// `usage_records` spend of the scope in the period (rollups for whole UTC hours and days).
    pub recorded: i64,
    /// Σ open max(granted − spent, 0): a lease spent beyond its grant (its settled spend counts
    /// in `settled`) does not cancel another lease's unspent grant.
    pub leased: i64,
    /// Open leases.
    pub open_leases: i64,
}

impl PeriodState {
    /// What counts against the limit now.
    pub fn committed(&self) -> i64 {
        self.settled
            .max(self.recorded)
            .saturating_add(self.leased.max(0))
    }

    /// What is known spent.
    pub fn spent(&self) -> i64 {
        self.settled.max(self.recorded)
    }

    /// What can still be leased under `limit`.
    pub fn remaining(&self, limit: i64) -> i64 {
        limit.saturating_sub(self.committed()).max(0)
    }
}

/// A granted (or refused: `granted == 0`, no id) lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Lease id (nil when refused).
    pub id: Uuid,
    /// Budget.
    pub budget: Budget,
    /// Total granted on the lease.
    pub granted: i64,
    /// Expiry.
    pub expires_at: Timestamp,
    /// The period.
    pub bounds: PeriodBounds,
    /// Leasable after this grant.
    pub remaining: i64,
}

/// A threshold crossed for the first time in a period: to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// The budget.
    pub budget: Budget,
    /// Threshold, percent.
    pub threshold: u32,
    /// Known spend.
    pub spent: i64,
    /// The period.
    pub bounds: PeriodBounds,
}

/// A lease operation's outcome: the lease and the alerts to publish after commit.
#[derive(Debug)]
pub struct Outcome {
    /// The lease.
    pub lease: LeaseGrant,
    /// New alerts.
    pub alerts: Vec<Alert>,
}

/// Budgets, leases and rate windows in Postgres.
#[derive(Debug, Clone)]
pub struct BudgetStore {
    pool: PgPool,
    /// Longest lease lifetime granted.
    pub max_ttl_ms: u32,
}

const BUDGET_COLUMNS: &str = "id, scope_kind, scope_id, period, time_zone, limit_usd_nanos, hard, \
                              alert_thresholds_pct, created_at, updated_at";

fn budget_from_row(row: &sqlx::postgres::PgRow) -> Result<Budget, BudgetError> {
    let kind: String = row.try_get("scope_kind")?;
    let period: String = row.try_get("period")?;
    let thresholds: Vec<i32> = row.try_get("alert_thresholds_pct")?;
    Ok(Budget {
        id: row.try_get("id")?,
        kind: ScopeKind::parse(&kind).unwrap_or(ScopeKind::Org),
        scope_id: row.try_get("scope_id")?,
        period: Period::parse(&period).unwrap_or(Period::Lifetime),
        time_zone: row.try_get("time_zone")?,
        limit: row.try_get("limit_usd_nanos")?,
        hard: row.try_get("hard")?,
        thresholds: thresholds
            .into_iter()
            .filter_map(|t| u32::try_from(t).ok())
            .collect(),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn thresholds_db(budget: &Budget) -> Vec<i32> {
    budget
        .thresholds
        .iter()
        .filter_map(|t| i32::try_from(*t).ok())
        .collect()
}

impl BudgetStore {
    /// Over the ledger's pool.
    pub fn new(pool: PgPool) -> Self {
        BudgetStore {
            pool,
            max_ttl_ms: 10 * 60 * 1000,
        }
    }

    /// Creates a budget.
    pub async fn create(&self, mut budget: Budget) -> Result<Budget, BudgetError> {
        budget.validate()?;
        let mut conn = self.pool.acquire().await?;
        match Self::insert(&mut conn, &budget).await? {
            Some(stored) => Ok(stored),
            None => Err(BudgetError::AlreadyExists { id: budget.id }),
        }
    }

    /// Replaces a budget's mutable fields (its scope stays).
    pub async fn update(&self, mut budget: Budget) -> Result<Budget, BudgetError> {
        budget.validate()?;
        let current = self.get(&budget.id).await?;
        if !current.same_scope(&budget) {
            return Err(invalid(
                "budget.scope",
                "cannot change; create another budget",
            ));
        }
        let mut conn = self.pool.acquire().await?;
        match Self::rewrite(&mut conn, &budget).await? {
            Some(stored) => Ok(stored),
            None => Err(BudgetError::NotFound {
                what: "budget",
                id: budget.id,
            }),
        }
    }

    /// [`BudgetStore::apply_declared_in`] in a transaction of its own.
    #[cfg(test)]
    pub async fn apply_declared(&self, declared: &[Budget]) -> Result<Applied, BudgetError> {
        let mut tx = self.pool.begin().await?;
        let applied = Self::apply_declared_in(&mut tx, declared).await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// Upserts the budgets declared in the configuration (`[[ledger.budgets]]`, ids from
    /// [`declared_id`]) in one transaction: a missing one is created, one whose stored settings
    /// differ is updated (as `update` does), an equal one is not written (its `updated_at` stays).
    /// No other budget is written; declared-id budgets that are no longer declared are reported in
    /// [`Applied::undeclared`] and left as they are.
    ///
    /// Safe when several ledgers start at once: rows are taken in id order, each with the insert's
    /// `ON CONFLICT DO NOTHING` (which waits for a concurrent insert of the same id) and then
    /// `SELECT … FOR UPDATE`, so concurrent applies serialise per budget and the later one sees
    /// the earlier one's result.
    ///
    /// Runs in the caller's transaction (which it does not commit; on error the caller rolls back):
    /// at start and on every configuration reload, with the configured prices
    /// (`config_reload::apply_configured`).
    pub(crate) async fn apply_declared_in(
        tx: &mut Transaction<'_, Postgres>,
        declared: &[Budget],
    ) -> Result<Applied, BudgetError> {
        let mut budgets = declared.to_vec();
        for budget in &mut budgets {
            budget.validate()?;
        }
        budgets.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(pair) = budgets.windows(2).find(|pair| pair[0].id == pair[1].id) {
            return Err(invalid(
                "budget.id",
                format!("budget `{}` is declared twice", pair[0].id),
            ));
        }
        let mut applied = Applied::default();
        for budget in &budgets {
            if Self::insert(tx, budget).await?.is_some() {
                applied.created.push(budget.id.clone());
                continue;
            }
            let current = Self::lock(tx, &budget.id).await?;
            if !current.same_scope(budget) {
                return Err(invalid(
                    "budget.scope",
                    format!(
                        "budget `{}` exists with scope {}:{}, not {}:{}",
                        budget.id,
                        current.kind.as_str(),
                        current.scope_id,
                        budget.kind.as_str(),
                        budget.scope_id
                    ),
                ));
            }
            if current.same_settings(budget) {
                applied.unchanged.push(budget.id.clone());
            } else {
                Self::rewrite(tx, budget).await?;
                applied.updated.push(budget.id.clone());
            }
        }
        let stored: Vec<String> =
            sqlx::query_scalar("SELECT id FROM budgets WHERE id LIKE $1 ORDER BY id")
                .bind(format!("{DECLARED_ID_PREFIX}%"))
                .fetch_all(&mut **tx)
                .await?;
        applied.undeclared = stored
            .into_iter()
            .filter(|id| {
                budgets
                    .binary_search_by(|b| b.id.as_str().cmp(id.as_str()))
                    .is_err()
            })
            .collect();
        Ok(applied)
    }

    /// Inserts a validated budget; `None` when its id exists (after waiting for a concurrent
    /// insert of the same id to commit).
    async fn insert(
        conn: &mut PgConnection,
        budget: &Budget,
    ) -> Result<Option<Budget>, BudgetError> {
        let sql = format!(
            "INSERT INTO budgets (id, scope_kind, scope_id, period, time_zone, limit_usd_nanos, \
             hard, alert_thresholds_pct) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (id) DO NOTHING RETURNING {BUDGET_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&budget.id)
            .bind(budget.kind.as_str())
            .bind(&budget.scope_id)
            .bind(budget.period.as_str())
            .bind(&budget.time_zone)
            .bind(budget.limit)
            .bind(budget.hard)
            .bind(thresholds_db(budget))
            .fetch_optional(conn)
            .await?;
        row.as_ref().map(budget_from_row).transpose()
    }

    /// Writes a validated budget's mutable fields (not its scope); `None` when it does not exist.
    async fn rewrite(
        conn: &mut PgConnection,
        budget: &Budget,
    ) -> Result<Option<Budget>, BudgetError> {
        let sql = format!(
            "UPDATE budgets SET period = $2, time_zone = $3, limit_usd_nanos = $4, hard = $5, \
             alert_thresholds_pct = $6, updated_at = now() WHERE id = $1 RETURNING {BUDGET_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&budget.id)
            .bind(budget.period.as_str())
            .bind(&budget.time_zone)
            .bind(budget.limit)
            .bind(budget.hard)
            .bind(thresholds_db(budget))
            .fetch_optional(conn)
            .await?;
        row.as_ref().map(budget_from_row).transpose()
    }

    /// One budget.
    pub async fn get(&self, id: &str) -> Result<Budget, BudgetError> {
        let sql = format!("SELECT {BUDGET_COLUMNS} FROM budgets WHERE id = $1");
        match sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        {
            Some(row) => budget_from_row(&row),
            None => Err(BudgetError::NotFound {
                what: "budget",
                id: id.to_owned(),
            }),
        }
    }

    /// Every budget, by id.
    pub async fn list(&self) -> Result<Vec<Budget>, BudgetError> {
        let sql = format!("SELECT {BUDGET_COLUMNS} FROM budgets ORDER BY id");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(budget_from_row)
            .collect()
    }

    async fn lock(tx: &mut Transaction<'_, Postgres>, id: &str) -> Result<Budget, BudgetError> {
        let sql = format!("SELECT {BUDGET_COLUMNS} FROM budgets WHERE id = $1 FOR UPDATE");
        match sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
        {
            Some(row) => budget_from_row(&row),
            None => Err(BudgetError::NotFound {
                what: "budget",
                id: id.to_owned(),
            }),
        }
    }

    /// Closes the budget's expired open leases (their reported spend stays counted).
    async fn reclaim(
        tx: &mut Transaction<'_, Postgres>,
        id: &str,
        now: OffsetDateTime,
    ) -> Result<(), BudgetError> {
        let reclaimed = sqlx::query(
            "UPDATE budget_leases SET closed_at = $2 \
             WHERE budget_id = $1 AND closed_at IS NULL AND expires_at <= $2",
        )
        .bind(id)
        .bind(now)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if reclaimed > 0 {
            tracing::info!(
                budget.id = id,
                leases = reclaimed,
                "expired budget leases reclaimed"
            );
        }
        Ok(())
    }

    /// The numbers of `budget` in the period `bounds`.
    ///
    /// `settled` sums the spend reported on every lease whose period starts within the period
    /// (leases are created within their period, so all of their spend falls in it). With
    /// `current` (the period containing `now`), every lease still open counts as well, whatever
    /// its period start: its unspent grant in `leased` and its spend in `settled`. Only a change
    /// of the budget's period or time zone leaves such a lease (a lease's expiry is capped at the
    /// end of its own period, so at a reset it is closed), and its holder may spend the whole
    /// grant in the new period: counting it can only under-grant, until the lease is closed (its
    /// next extend, its release or its expiry).
    async fn state(
        executor: &mut sqlx::PgConnection,
        budget: &Budget,
        bounds: PeriodBounds,
        now: OffsetDateTime,
        current: bool,
    ) -> Result<PeriodState, BudgetError> {
        let start = to_odt(bounds.start);
        let end = bounds.end.map(to_odt);
        let row = sqlx::query(
            "SELECT COALESCE(SUM(spent_usd_nanos), 0)::BIGINT AS settled, \
                    COALESCE(SUM(GREATEST(granted_usd_nanos - spent_usd_nanos, 0)) \
                             FILTER (WHERE closed_at IS NULL AND expires_at > $3), 0)::BIGINT AS leased, \
                    COUNT(*) FILTER (WHERE closed_at IS NULL AND expires_at > $3) AS open_leases \
             FROM budget_leases WHERE budget_id = $1 \
             AND ((period_start >= $2 AND ($4::TIMESTAMPTZ IS NULL OR period_start < $4)) \
                  OR ($5 AND closed_at IS NULL AND expires_at > $3))",
        )
        .bind(&budget.id)
        .bind(start)
        .bind(now)
        .bind(end)
        .bind(current)
        .fetch_one(&mut *executor)
        .await?;
        let recorded = Self::recorded(
            executor,
            budget,
            start,
            end.unwrap_or(now + time::Duration::days(1)),
        )
        .await?;
        Ok(PeriodState {
            settled: row.try_get("settled")?,
            recorded,
            leased: row.try_get("leased")?,
            open_leases: row.try_get("open_leases")?,
        })
    }

    /// The recorded spend (`usage_records`) of the budget's scope in `[start, end)`, read as the
    /// finance queries read it ([`spend::plan`]): whole UTC days from `usage_rollup_daily`, the
    /// whole UTC hours around them from `usage_rollup_hourly`, raw rows only for the partial hours
    /// at the two edges (a period starting at local midnight in a zone whose offset is not whole
    /// hours). The rollups are updated in the transaction that inserts the rows, so they add up to
    /// the same sum; and they are kept forever, while retention drops old months of raw rows: a
    /// lifetime budget must not find its old spend gone. Nor does a long period scan its raw rows.
    async fn recorded(
        executor: &mut sqlx::PgConnection,
        budget: &Budget,
        start: OffsetDateTime,
        end: OffsetDateTime,
    ) -> Result<i64, BudgetError> {
        let scope = vec![budget.scope_id.clone()];
        let filter = match budget.kind {
            ScopeKind::Key => spend::Filter {
                key_ids: scope,
                ..spend::Filter::default()
            },
            ScopeKind::App => spend::Filter {
                apps: scope,
                ..spend::Filter::default()
            },
            ScopeKind::Team => spend::Filter {
                teams: scope,
                ..spend::Filter::default()
            },
            ScopeKind::Org => spend::Filter::default(),
        };
        let plan = spend::plan(start, end, false, true);
        let mut query = QueryBuilder::<Postgres>::new(
            "SELECT COALESCE(SUM(cost), 0)::BIGINT AS recorded FROM (SELECT 0::BIGINT AS cost",
        );
        let rollups = plan
            .daily
            .iter()
            .map(|range| ("usage_rollup_daily", range))
            .chain(
                plan.hourly
                    .iter()
                    .map(|range| ("usage_rollup_hourly", range)),
            );
        for (table, &(a, b)) in rollups {
            query
                .push(" UNION ALL SELECT SUM(cost_usd_nanos) FROM ")
                .push(table)
                .push(" WHERE bucket >= ")
                .push_bind(a)
                .push(" AND bucket < ")
                .push_bind(b);
            filter.push_conditions(&mut query, "route", false);
        }
        for &(a, b) in &plan.raw {
            query
                .push(" UNION ALL SELECT SUM(cost_usd_nanos) FROM usage_records WHERE time >= ")
                .push_bind(a)
                .push(" AND time < ")
                .push_bind(b);
            filter.push_conditions(&mut query, "requested_model", true);
        }
        query.push(") AS tiers");
        Ok(query
            .build()
            .fetch_one(&mut *executor)
            .await?
            .try_get("recorded")?)
    }

    /// The live status of a budget's current period.
    pub async fn status(
        &self,
        id: &str,
        now: Timestamp,
    ) -> Result<(Budget, PeriodBounds, PeriodState), BudgetError> {
        let budget = self.get(id).await?;
        let bounds = budget.period_at(now);
        let mut conn = self.pool.acquire().await?;
        let state = Self::state(&mut conn, &budget, bounds, to_odt(now), true).await?;
        Ok((budget, bounds, state))
    }

    /// Thresholds reached and not yet recorded as sent in this period: recorded now (to publish
    /// after commit).
    async fn alerts(
        tx: &mut Transaction<'_, Postgres>,
        budget: &Budget,
        bounds: PeriodBounds,
        state: &PeriodState,
    ) -> Result<Vec<Alert>, BudgetError> {
        let spent = state.spent();
        let mut alerts = Vec::new();
        for &threshold in &budget.thresholds {
            // spent ≥ threshold % of limit, in integers.
            if i128::from(spent) * 100 < i128::from(threshold) * i128::from(budget.limit) {
                break;
            }
            let inserted = sqlx::query(
                "INSERT INTO budget_alerts_sent (budget_id, period_start, threshold_pct, \
                 spent_usd_nanos) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(&budget.id)
            .bind(to_odt(bounds.start))
            .bind(i32::try_from(threshold).unwrap_or(i32::MAX))
            .bind(spent)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            if inserted == 1 {
                alerts.push(Alert {
                    budget: budget.clone(),
                    threshold,
                    spent,
                    bounds,
                });
            }
        }
        Ok(alerts)
    }

    /// A lease's expiry: `ttl_ms` from now (clamped), but never after the end of its period. A
    /// lease belongs to one period: what its holder reserves after the reset would be spent in the
    /// next period, whose leases do not count it. Capped, it is closed at the reset like any
    /// expired lease (its holder's late reports still raise its spend, in its own period).
    fn expiry(&self, now: Timestamp, ttl_ms: u32, bounds: PeriodBounds) -> Timestamp {
        let ttl = ttl_ms.clamp(100, self.max_ttl_ms.max(100));
        let expiry = now
            .checked_add(i64::from(ttl).milliseconds())
            .unwrap_or(now);
        match bounds.end {
            Some(end) if end < expiry => end,
            _ => expiry,
        }
    }

    /// Grants a new lease of at most `requested` (nothing below `minimum`) for the current period.
    pub async fn acquire(
        &self,
        budget_id: &str,
        holder: &str,
        requested: i64,
        minimum: i64,
        ttl_ms: u32,
        now: Timestamp,
    ) -> Result<Outcome, BudgetError> {
        if requested < 0 || minimum < 0 {
            return Err(invalid("requested_usd_nanos", "must not be negative"));
        }
        let mut tx = self.pool.begin().await?;
        let budget = Self::lock(&mut tx, budget_id).await?;
        let outcome = self
            .grant_new(&mut tx, budget, holder, requested, minimum, ttl_ms, now)
            .await?;
        tx.commit().await?;
        Ok(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    async fn grant_new(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        budget: Budget,
        holder: &str,
        requested: i64,
        minimum: i64,
        ttl_ms: u32,
        now: Timestamp,
    ) -> Result<Outcome, BudgetError> {
        let now_odt = to_odt(now);
        Self::reclaim(tx, &budget.id, now_odt).await?;
        let bounds = budget.period_at(now);
        let state = Self::state(tx, &budget, bounds, now_odt, true).await?;
        let available = state.remaining(budget.limit);
        let granted = match budget.hard {
            true if available < minimum.max(1) => 0,
            true => requested.min(available),
            false => requested,
        };
        let expires_at = self.expiry(now, ttl_ms, bounds);
        let id = if granted > 0 {
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO budget_leases (id, budget_id, period_start, holder, \
                 granted_usd_nanos, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(&budget.id)
            .bind(to_odt(bounds.start))
            .bind(holder)
            .bind(granted)
            .bind(to_odt(expires_at))
            .execute(&mut **tx)
            .await?;
            id
        } else {
            Uuid::nil()
        };
        let alerts = Self::alerts(tx, &budget, bounds, &state).await?;
        let remaining = if budget.hard {
            available - granted
        } else {
            available
        };
        Ok(Outcome {
            lease: LeaseGrant {
                id,
                budget,
                granted,
                expires_at,
                bounds,
                remaining,
            },
            alerts,
        })
    }

    async fn lease_budget(&self, lease_id: Uuid) -> Result<String, BudgetError> {
        sqlx::query_scalar("SELECT budget_id FROM budget_leases WHERE id = $1")
            .bind(lease_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| BudgetError::NotFound {
                what: "lease",
                id: lease_id.to_string(),
            })
    }

    /// Records `spent` (monotonic) on a lease, and closes it when `close`.
    async fn report(
        tx: &mut Transaction<'_, Postgres>,
        lease_id: Uuid,
        spent: i64,
        close: Option<OffsetDateTime>,
    ) -> Result<(OffsetDateTime, bool, i64), BudgetError> {
        let row = sqlx::query(
            "UPDATE budget_leases SET spent_usd_nanos = GREATEST(spent_usd_nanos, $2), \
             closed_at = COALESCE(closed_at, $3) WHERE id = $1 \
             RETURNING period_start, closed_at IS NOT NULL AS closed, granted_usd_nanos",
        )
        .bind(lease_id)
        .bind(spent.max(0))
        .bind(close)
        .fetch_one(&mut **tx)
        .await?;
        Ok((
            row.try_get("period_start")?,
            row.try_get("closed")?,
            row.try_get("granted_usd_nanos")?,
        ))
    }

    /// Reports a lease's spend, pushes its expiry and grants up to `requested` more (nothing below
    /// `minimum`). A lease that was closed (expired) or belongs to a past period is closed and a
    /// new one is granted instead (`requested` of it; none when 0).
    #[allow(clippy::too_many_arguments)]
    pub async fn extend(
        &self,
        lease_id: Uuid,
        holder: &str,
        spent: i64,
        requested: i64,
        minimum: i64,
        ttl_ms: u32,
        now: Timestamp,
    ) -> Result<Outcome, BudgetError> {
        if requested < 0 || minimum < 0 || spent < 0 {
            return Err(invalid("requested_usd_nanos", "must not be negative"));
        }
        let budget_id = self.lease_budget(lease_id).await?;
        let now_odt = to_odt(now);
        let mut tx = self.pool.begin().await?;
        let budget = Self::lock(&mut tx, &budget_id).await?;
        Self::reclaim(&mut tx, &budget.id, now_odt).await?;
        let bounds = budget.period_at(now);
        let (period_start, closed, granted) = Self::report(&mut tx, lease_id, spent, None).await?;
        if closed || period_start != to_odt(bounds.start) {
            Self::report(&mut tx, lease_id, spent, Some(now_odt)).await?;
            let mut alerts =
                Self::lease_period_alerts(&mut tx, &budget, period_start, bounds, now_odt).await?;
            let mut outcome = self
                .grant_new(&mut tx, budget, holder, requested, minimum, ttl_ms, now)
                .await?;
            tx.commit().await?;
            alerts.append(&mut outcome.alerts);
            outcome.alerts = alerts;
            return Ok(outcome);
        }
        let state = Self::state(&mut tx, &budget, bounds, now_odt, true).await?;
        let available = state.remaining(budget.limit);
        let extra = match budget.hard {
            true if requested == 0 || available < minimum.max(1) => 0,
            true => requested.min(available),
            false => requested,
        };
        let expires_at = self.expiry(now, ttl_ms, bounds);
        sqlx::query(
            "UPDATE budget_leases SET granted_usd_nanos = granted_usd_nanos + $2, expires_at = $3 \
             WHERE id = $1",
        )
        .bind(lease_id)
        .bind(extra)
        .bind(to_odt(expires_at))
        .execute(&mut *tx)
        .await?;
        let alerts = Self::alerts(&mut tx, &budget, bounds, &state).await?;
        tx.commit().await?;
        let remaining = if budget.hard {
            available - extra
        } else {
            available
        };
        Ok(Outcome {
            lease: LeaseGrant {
                id: lease_id,
                budget,
                granted: granted + extra,
                expires_at,
                bounds,
                remaining,
            },
            alerts,
        })
    }

    /// Closes a lease with its final spend; alerts the spend may have crossed, in the current
    /// period and in the lease's own period when that one has ended (the gateway releases a lease
    /// of the past period after the reset, with what the requests reserved before it settled).
    pub async fn release(
        &self,
        lease_id: Uuid,
        spent: i64,
        now: Timestamp,
    ) -> Result<Vec<Alert>, BudgetError> {
        let budget_id = self.lease_budget(lease_id).await?;
        let now_odt = to_odt(now);
        let mut tx = self.pool.begin().await?;
        let budget = Self::lock(&mut tx, &budget_id).await?;
        let (period_start, _, _) = Self::report(&mut tx, lease_id, spent, Some(now_odt)).await?;
        let bounds = budget.period_at(now);
        let mut alerts =
            Self::lease_period_alerts(&mut tx, &budget, period_start, bounds, now_odt).await?;
        let state = Self::state(&mut tx, &budget, bounds, now_odt, true).await?;
        alerts.extend(Self::alerts(&mut tx, &budget, bounds, &state).await?);
        tx.commit().await?;
        Ok(alerts)
    }

    /// The alerts of the period a lease belongs to, when it is not the `current` one: spend
    /// reported on it after the reset counts in that period, whose thresholds nothing else checks
    /// again (once each per period, as in the current one). None when the budget's period or time
    /// zone changed since the lease was granted: its period start is then none of the budget's
    /// periods (and the current period counts the lease while it is open, see `state`).
    async fn lease_period_alerts(
        tx: &mut Transaction<'_, Postgres>,
        budget: &Budget,
        period_start: OffsetDateTime,
        current: PeriodBounds,
        now: OffsetDateTime,
    ) -> Result<Vec<Alert>, BudgetError> {
        let start = from_odt(period_start);
        if start == current.start {
            return Ok(Vec::new());
        }
        let bounds = budget.period_at(start);
        if bounds.start != start {
            return Ok(Vec::new());
        }
        let state = Self::state(tx, budget, bounds, now, false).await?;
        Self::alerts(tx, budget, bounds, &state).await
    }

    /// Grants up to the wanted requests and tokens of `scope`'s current minute window, within its
    /// per-minute limits (0: unlimited). Returns (requests, tokens, window start).
    pub async fn rate_slice(
        &self,
        scope: &str,
        limits: (u64, u64),
        want: (u64, u64),
        now: Timestamp,
    ) -> Result<(u64, u64, Timestamp), BudgetError> {
        if scope.is_empty() {
            return Err(invalid("scope", "must not be empty"));
        }
        let window = Timestamp::from_second(now.as_second().div_euclid(60) * 60)
            .unwrap_or(Timestamp::UNIX_EPOCH);
        let start = to_odt(window);
        let mut tx = self.pool.begin().await?;
        let created = sqlx::query(
            "INSERT INTO rate_windows (scope, window_start) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(scope)
        .bind(start)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if created == 1 {
            sqlx::query("DELETE FROM rate_windows WHERE scope = $1 AND window_start < $2")
                .bind(scope)
                .bind(start - time::Duration::minutes(10))
                .execute(&mut *tx)
                .await?;
        }
        let row = sqlx::query(
            "SELECT granted_requests, granted_tokens FROM rate_windows \
             WHERE scope = $1 AND window_start = $2 FOR UPDATE",
        )
        .bind(scope)
        .bind(start)
        .fetch_one(&mut *tx)
        .await?;
        let used_requests = u64::try_from(row.try_get::<i64, _>("granted_requests")?).unwrap_or(0);
        let used_tokens = u64::try_from(row.try_get::<i64, _>("granted_tokens")?).unwrap_or(0);
        let (requests, tokens) = grant_rate(limits, (used_requests, used_tokens), want);
        if requests > 0 || tokens > 0 {
            sqlx::query(
                "UPDATE rate_windows SET granted_requests = granted_requests + $3, \
                 granted_tokens = granted_tokens + $4 WHERE scope = $1 AND window_start = $2",
            )
            .bind(scope)
            .bind(start)
            .bind(i64::try_from(requests).unwrap_or(i64::MAX))
            .bind(i64::try_from(tokens).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok((requests, tokens, window))
    }
}

/// What a rate window can still grant: each dimension up to its limit (0: unlimited); nothing at
/// all once the request limit is reached, so that a token slice never outlives its requests.
pub fn grant_rate(limits: (u64, u64), used: (u64, u64), want: (u64, u64)) -> (u64, u64) {
    let left = |limit: u64, used: u64, want: u64| {
        if limit == 0 {
            want
        } else {
            want.min(limit.saturating_sub(used))
        }
    };
    let requests = left(limits.0, used.0, want.0);
    if want.0 > 0 && requests == 0 {
        return (0, 0);
    }
    (requests, left(limits.1, used.1, want.1))
}

/// The NATS subject of a budget's alerts: `<prefix>.budget.alert.<kind>[.<id>]`, the id made a
/// single subject token.
pub fn alert_subject(prefix: &str, budget: &Budget) -> String {
    let id: String = budget
        .scope_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if id.is_empty() {
        format!("{prefix}.budget.alert.{}", budget.kind.as_str())
    } else {
        format!("{prefix}.budget.alert.{}.{id}", budget.kind.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn a_day_resets_at_local_midnight_of_the_configured_zone() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 23:30 UTC on 14 March is 00:30 on 15 March in Berlin (UTC+1).
        let bounds = period_bounds(Period::Day, &berlin, ts("2026-03-14T23:30:00Z"));
        assert_eq!(bounds.start, ts("2026-03-14T23:00:00Z"));
        assert_eq!(bounds.end, Some(ts("2026-03-15T23:00:00Z")));
        // The same instant in UTC is still 14 March.
        let utc = period_bounds(Period::Day, &TimeZone::UTC, ts("2026-03-14T23:30:00Z"));
        assert_eq!(utc.start, ts("2026-03-14T00:00:00Z"));
        assert_eq!(utc.end, Some(ts("2026-03-15T00:00:00Z")));
    }

    #[test]
    fn a_day_across_a_dst_change_is_23_hours_long() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 29 March 2026: clocks go from 02:00 CET to 03:00 CEST.
        let bounds = period_bounds(Period::Day, &berlin, ts("2026-03-29T12:00:00Z"));
        assert_eq!(bounds.start, ts("2026-03-28T23:00:00Z"));
        assert_eq!(bounds.end, Some(ts("2026-03-29T22:00:00Z")));
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first_in_the_zone() {
        let tokyo = TimeZone::get("Asia/Tokyo").unwrap();
        // Sunday 2026-11-29 20:00 UTC is Monday 30 November 05:00 in Tokyo (UTC+9).
        let week = period_bounds(Period::Week, &tokyo, ts("2026-11-29T20:00:00Z"));
        assert_eq!(week.start, ts("2026-11-29T15:00:00Z"));
        assert_eq!(week.end, Some(ts("2026-12-06T15:00:00Z")));
        // 30 November 16:00 UTC is already 1 December in Tokyo: a new month.
        let month = period_bounds(Period::Month, &tokyo, ts("2026-11-30T16:00:00Z"));
        assert_eq!(month.start, ts("2026-11-30T15:00:00Z"));
        assert_eq!(month.end, Some(ts("2026-12-31T15:00:00Z")));
        let before = period_bounds(Period::Month, &tokyo, ts("2026-11-30T14:59:59Z"));
        assert_eq!(before.start, ts("2026-10-31T15:00:00Z"));
        assert_eq!(before.end, Some(month.start));
        let lifetime = period_bounds(Period::Lifetime, &tokyo, ts("2026-11-30T14:59:59Z"));
        assert_eq!(lifetime.end, None);
    }

    #[test]
    fn committed_spend_takes_the_larger_of_settled_and_recorded_plus_open_leases() {
        let state = PeriodState {
            settled: 30,
            recorded: 45,
            leased: 20,
            open_leases: 1,
        };
        assert_eq!(state.committed(), 65);
        assert_eq!(state.remaining(100), 35);
        assert_eq!(state.remaining(50), 0);
    }

    #[test]
    fn rate_windows_grant_within_both_limits() {
        assert_eq!(grant_rate((10, 0), (8, 0), (5, 100)), (2, 100));
        assert_eq!(grant_rate((10, 1000), (10, 0), (1, 10)), (0, 0));
        assert_eq!(grant_rate((0, 1000), (0, 990), (1, 50)), (1, 10));
    }

    #[test]
    fn validation_names_fields_and_normalises() {
        let mut budget = Budget {
            id: "b1".into(),
            kind: ScopeKind::App,
            scope_id: "a".into(),
            period: Period::Day,
            time_zone: String::new(),
            limit: 10,
            hard: true,
            thresholds: vec![80, 50, 80],
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        };
        budget.validate().unwrap();
        assert_eq!(budget.time_zone, "UTC");
        assert_eq!(budget.thresholds, vec![50, 80]);
        budget.time_zone = "Mars/Olympus".into();
        let error = budget.validate().unwrap_err().to_string();
        assert!(error.contains("budget.time_zone"), "{error}");
        let org = Budget {
            kind: ScopeKind::Org,
            scope_id: "x".into(),
            ..budget.clone()
        };
        assert!(
            org.clone()
                .validate()
                .unwrap_err()
                .to_string()
                .contains("scope.id")
        );
        assert_eq!(
            alert_subject(
                "sb",
                &Budget {
                    scope_id: "my app".into(),
                    ..budget
                }
            ),
            "sb.budget.alert.app.my_app"
        );
    }

    async fn store() -> (BudgetStore, switchboard_testkit::TestPg) {
        let pg = switchboard_testkit::TestPg::create().await.unwrap();
        let repo = crate::repo::Repository::connect(&pg.url, 8).await.unwrap();
        (BudgetStore::new(repo.pool().clone()), pg)
    }

    fn hard(id: &str, period: Period, zone: &str, limit: i64) -> Budget {
        Budget {
            id: id.into(),
            kind: ScopeKind::App,
            scope_id: "a".into(),
            period,
            time_zone: zone.into(),
            limit,
            hard: true,
            thresholds: Vec::new(),
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_leases_never_exceed_a_hard_limit_and_releases_return_the_rest() {
        let (store, pg) = store().await;
        store
            .create(hard("b", Period::Month, "UTC", 1_000))
            .await
            .unwrap();
        let now = Timestamp::now();
        let grants = futures::future::join_all((0..40).map(|i| {
            let store = store.clone();
            async move {
                store
                    .acquire("b", &format!("h{i}"), 70, 1, 60_000, now)
                    .await
                    .unwrap()
                    .lease
            }
        }))
        .await;
        let granted: i64 = grants.iter().map(|l| l.granted).sum();
        // 40 × 70 asked for, exactly the limit granted, never more.
        assert_eq!(granted, 1_000);
        let leases: Vec<_> = grants.iter().filter(|l| l.granted > 0).collect();
        for lease in &leases {
            store.release(lease.id, 10, now).await.unwrap();
        }
        let (_, _, state) = store.status("b", now).await.unwrap();
        let spent = 10 * leases.len() as i64;
        assert_eq!(state.settled, spent);
        assert_eq!((state.leased, state.open_leases), (0, 0));
        assert_eq!(state.remaining(1_000), 1_000 - spent);
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn a_new_period_starts_at_midnight_of_the_budgets_zone() {
        let (store, pg) = store().await;
        store
            .create(hard("berlin", Period::Day, "Europe/Berlin", 100))
            .await
            .unwrap();
        // 23:30 in Berlin on 26 November: everything leased and spent.
        let late = ts("2026-11-26T22:30:00Z");
        let lease = store
            .acquire("berlin", "h", 100, 1, 60_000, late)
            .await
            .unwrap()
            .lease;
        assert_eq!(lease.granted, 100);
        assert_eq!(lease.bounds.end, Some(ts("2026-11-26T23:00:00Z")));
        store.release(lease.id, 100, late).await.unwrap();
        let refused = store
            .acquire("berlin", "h", 100, 1, 60_000, late)
            .await
            .unwrap()
            .lease;
        assert_eq!(refused.granted, 0);
        // 00:30 on the 27th in Berlin (still the 26th in UTC): a new period, the full limit.
        let next = ts("2026-11-26T23:30:00Z");
        let lease = store
            .acquire("berlin", "h", 100, 1, 60_000, next)
            .await
            .unwrap()
            .lease;
        assert_eq!(lease.granted, 100);
        assert_eq!(lease.bounds.start, ts("2026-11-26T23:00:00Z"));
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn a_lease_expires_at_the_end_of_its_period_and_its_late_spend_stays_there() {
        let (store, pg) = store().await;
        store
            .create(hard("d", Period::Day, "UTC", 100))
            .await
            .unwrap();
        let midnight = ts("2026-11-27T00:00:00Z");
        // Ten seconds before midnight, a lease asked for a minute: it ends at midnight.
        let before = ts("2026-11-26T23:59:50Z");
        let a = store
            .acquire("d", "a", 60, 1, 60_000, before)
            .await
            .unwrap()
            .lease;
        assert_eq!(a.granted, 60);
        assert_eq!(a.expires_at, midnight);
        // An extend before midnight does not push it past midnight either.
        let extended = store
            .extend(a.id, "a", 10, 20, 1, 60_000, ts("2026-11-26T23:59:55Z"))
            .await
            .unwrap()
            .lease;
        assert_eq!((extended.id, extended.granted), (a.id, 80));
        assert_eq!(extended.expires_at, midnight);
        // After midnight A is closed: the new period owes it nothing, B gets the whole limit.
        let after = ts("2026-11-27T00:00:05Z");
        let (_, bounds, state) = store.status("d", after).await.unwrap();
        assert_eq!(bounds.start, midnight);
        assert_eq!((state.open_leases, state.leased, state.settled), (0, 0, 0));
        let b = store
            .acquire("d", "b", 100, 1, 60_000, after)
            .await
            .unwrap()
            .lease;
        assert_eq!(b.granted, 100);
        // A's holder settles what it reserved before midnight on A: it counts in A's day only.
        store.release(a.id, 75, after).await.unwrap();
        let (_, _, old_day) = store.status("d", before).await.unwrap();
        assert_eq!(old_day.settled, 75);
        let (_, _, new_day) = store.status("d", after).await.unwrap();
        assert_eq!((new_day.settled, new_day.leased), (0, 100));
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn an_overspent_lease_does_not_cancel_another_leases_open_grant() {
        let (store, pg) = store().await;
        store
            .create(hard("o", Period::Lifetime, "UTC", 100))
            .await
            .unwrap();
        let now = ts("2026-11-26T10:00:00Z");
        let a = store
            .acquire("o", "a", 30, 1, 60_000, now)
            .await
            .unwrap()
            .lease;
        let b = store
            .acquire("o", "b", 40, 1, 60_000, now)
            .await
            .unwrap()
            .lease;
        assert_eq!((a.granted, b.granted), (30, 40));
        // A's holder spent 50 on its 30 (e.g. spend carried over from a replaced lease).
        store
            .extend(a.id, "a", 50, 0, 0, 60_000, now)
            .await
            .unwrap();
        let (_, _, state) = store.status("o", now).await.unwrap();
        // B may still spend its whole 40: 50 known + 40 outstanding.
        assert_eq!((state.settled, state.leased), (50, 40));
        assert_eq!(state.remaining(100), 10);
        let c = store
            .acquire("o", "c", 100, 1, 60_000, now)
            .await
            .unwrap()
            .lease;
        assert_eq!(c.granted, 10);
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn an_expired_lease_gives_back_what_it_did_not_spend() {
        let (store, pg) = store().await;
        store
            .create(hard("x", Period::Lifetime, "UTC", 100))
            .await
            .unwrap();
        let t0 = ts("2026-11-26T10:00:00Z");
        let lease = store
            .acquire("x", "crashed", 100, 1, 1_000, t0)
            .await
            .unwrap()
            .lease;
        assert_eq!(lease.granted, 100);
        // It reported 30 spent, then went silent.
        let extended = store
            .extend(lease.id, "", 30, 0, 0, 1_000, t0)
            .await
            .unwrap();
        assert_eq!(extended.lease.id, lease.id);
        let during = ts("2026-11-26T10:00:00.500Z");
        let refused = store
            .acquire("x", "other", 100, 1, 1_000, during)
            .await
            .unwrap()
            .lease;
        assert_eq!(refused.granted, 0);
        let after = ts("2026-11-26T10:00:02Z");
        let other = store
            .acquire("x", "other", 100, 1, 1_000, after)
            .await
            .unwrap()
            .lease;
        assert_eq!(
            other.granted, 70,
            "the unspent 70 came back, the 30 spent did not"
        );
        // The silent holder's late extend gets a new lease (nothing left), never its old slice.
        let late = store
            .extend(lease.id, "", 30, 50, 1, 1_000, after)
            .await
            .unwrap();
        assert_ne!(late.lease.id, lease.id);
        assert_eq!(late.lease.granted, 0);
        pg.drop_db().await;
    }

    /// A usage row of app `a` at `time` costing `cost`, recorded as the consumer records it (raw
    /// row and rollups in one transaction).
    async fn record_usage(repo: &crate::repo::Repository, time: &str, cost: i64) {
        let time = to_odt(ts(time));
        let event = switchboard_proto::ledger::v1::UsageEvent {
            request_id: Uuid::now_v7().to_string(),
            time: Some(crate::record::time_to_timestamp(time)),
            app: "a".into(),
            team: "t".into(),
            key_id: "k".into(),
            requested_model: "fast".into(),
            ..Default::default()
        };
        let no_prices = crate::pricing::PriceBook::new(Vec::new());
        let mut row = crate::record::price_event(event, time, &no_prices).unwrap();
        row.cost_usd_nanos = Some(cost);
        assert_eq!(repo.insert_batch(&[row]).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_lifetime_budget_still_counts_spend_whose_raw_rows_retention_dropped() {
        let (store, pg) = store().await;
        let repo = crate::repo::Repository::connect(&pg.url, 2).await.unwrap();
        store
            .create(hard("life", Period::Lifetime, "UTC", 100))
            .await
            .unwrap();
        // Spent before any lease (or by a replica that never reported it): known only from usage.
        let partitions = crate::partitions::Partitions::new(repo.pool().clone(), 12);
        partitions
            .ensure_month(time::macros::date!(2025 - 01 - 15))
            .await
            .unwrap();
        record_usage(&repo, "2025-01-15T10:30:00Z", 100).await;
        let now = ts("2026-11-26T10:00:00Z");
        let refused = store
            .acquire("life", "h", 50, 1, 60_000, now)
            .await
            .unwrap()
            .lease;
        assert_eq!(refused.granted, 0);
        // Retention (12 months) drops January 2025's raw rows; its rollups stay.
        let done = partitions.maintain(to_odt(now), 0).await.unwrap();
        assert!(
            done.dropped.contains(&"usage_records_p2025_01".to_owned()),
            "{done:?}"
        );
        let (_, _, state) = store.status("life", now).await.unwrap();
        assert_eq!(state.recorded, 100);
        let again = store
            .acquire("life", "h", 50, 1, 60_000, now)
            .await
            .unwrap()
            .lease;
        assert_eq!(again.granted, 0, "the dropped spend still counts");
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn recorded_spend_reads_rollups_and_raw_edges_in_the_budgets_zone() {
        let (store, pg) = store().await;
        let repo = crate::repo::Repository::connect(&pg.url, 2).await.unwrap();
        // Kolkata is UTC+05:30: its days start at 18:30 UTC, inside a UTC hour.
        store
            .create(hard("in", Period::Day, "Asia/Kolkata", 1_000))
            .await
            .unwrap();
        // The Kolkata day of 26 November is [25th 18:30Z, 26th 18:30Z).
        for (time, cost) in [
            ("2026-11-25T18:29:59Z", 1),       // the day before, same UTC hour
            ("2026-11-25T18:30:00Z", 10),      // first instant
            ("2026-11-25T23:10:00Z", 100),     // whole hours of the 25th (UTC)
            ("2026-11-26T12:00:00Z", 1_000),   // the whole UTC hours of the 26th
            ("2026-11-26T18:29:59Z", 10_000),  // last instant
            ("2026-11-26T18:30:00Z", 100_000), // the next day
        ] {
            record_usage(&repo, time, cost).await;
        }
        let (_, bounds, state) = store
            .status("in", ts("2026-11-26T10:00:00Z"))
            .await
            .unwrap();
        assert_eq!(bounds.start, ts("2026-11-25T18:30:00Z"));
        assert_eq!(state.recorded, 11_110);
        // Its week, [22nd 18:30Z, 29th 18:30Z), also reads whole UTC days (the daily rollup).
        store
            .create(hard("in-week", Period::Week, "Asia/Kolkata", 1_000))
            .await
            .unwrap();
        record_usage(&repo, "2026-11-22T18:29:59Z", 1_000_000).await;
        record_usage(&repo, "2026-11-29T18:29:59Z", 2_000_000).await;
        record_usage(&repo, "2026-11-29T18:30:00Z", 4_000_000).await;
        let (_, bounds, state) = store
            .status("in-week", ts("2026-11-26T10:00:00Z"))
            .await
            .unwrap();
        assert_eq!(bounds.start, ts("2026-11-22T18:30:00Z"));
        assert_eq!(state.recorded, 2_111_111);
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn changing_the_period_or_time_zone_keeps_the_open_leases_counted() {
        let (store, pg) = store().await;
        let now = ts("2026-11-26T10:00:00Z");
        type Change = fn(Budget) -> Budget;
        let changes: [(&str, Change); 3] = [
            ("tokyo", |b| Budget {
                time_zone: "Asia/Tokyo".into(),
                ..b
            }),
            // New York's day started at 05:00 UTC: after the lease's period start.
            ("new-york", |b| Budget {
                time_zone: "America/New_York".into(),
                ..b
            }),
            ("week", |b| Budget {
                period: Period::Week,
                ..b
            }),
        ];
        for (id, change) in changes {
            let budget = store
                .create(hard(id, Period::Day, "UTC", 100))
                .await
                .unwrap();
            let a = store
                .acquire(id, "a", 100, 1, 60_000, now)
                .await
                .unwrap()
                .lease;
            assert_eq!(a.granted, 100);
            store
                .extend(a.id, "a", 40, 0, 0, 60_000, now)
                .await
                .unwrap();
            store.update(change(budget)).await.unwrap();
            let (_, _, state) = store.status(id, now).await.unwrap();
            assert_eq!(
                (state.settled, state.leased, state.open_leases),
                (40, 60, 1),
                "{id}"
            );
            let b = store
                .acquire(id, "b", 100, 1, 60_000, now)
                .await
                .unwrap()
                .lease;
            assert_eq!(b.granted, 0, "{id}: A's slice is still out");
        }
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn a_spend_released_after_the_reset_alerts_on_its_own_period() {
        let (store, pg) = store().await;
        let mut soft = hard("s", Period::Day, "UTC", 1_000);
        soft.hard = false;
        soft.thresholds = vec![100];
        store.create(soft).await.unwrap();
        let before = ts("2026-11-26T23:59:50Z");
        let after = ts("2026-11-27T00:00:05Z");
        let old_day = ts("2026-11-26T00:00:00Z");
        let lease = store
            .acquire("s", "h", 2_000, 1, 60_000, before)
            .await
            .unwrap()
            .lease;
        let alerts = store.release(lease.id, 1_500, after).await.unwrap();
        let crossed: Vec<(u32, i64, Timestamp)> = alerts
            .iter()
            .map(|a| (a.threshold, a.spent, a.bounds.start))
            .collect();
        assert_eq!(crossed, vec![(100, 1_500, old_day)]);
        assert_eq!(alerts[0].bounds.end, Some(ts("2026-11-27T00:00:00Z")));
        let sent: Vec<(OffsetDateTime, i32)> =
            sqlx::query_as("SELECT period_start, threshold_pct FROM budget_alerts_sent")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        assert_eq!(sent, vec![(to_odt(old_day), 100)]);
        // Once per period: a later (larger) report of the same period alerts nothing more.
        assert!(
            store
                .release(lease.id, 1_600, after)
                .await
                .unwrap()
                .is_empty()
        );
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn an_extend_after_the_reset_alerts_on_the_leases_own_period() {
        let (store, pg) = store().await;
        let mut soft = hard("s", Period::Day, "UTC", 1_000);
        soft.hard = false;
        soft.thresholds = vec![50, 100];
        store.create(soft).await.unwrap();
        let before = ts("2026-11-26T23:59:50Z");
        let after = ts("2026-11-27T00:00:05Z");
        let lease = store
            .acquire("s", "h", 2_000, 1, 60_000, before)
            .await
            .unwrap()
            .lease;
        let outcome = store
            .extend(lease.id, "h", 1_200, 100, 1, 60_000, after)
            .await
            .unwrap();
        assert_ne!(outcome.lease.id, lease.id, "a lease of the new period");
        assert_eq!(outcome.lease.bounds.start, ts("2026-11-27T00:00:00Z"));
        let crossed: Vec<(u32, Timestamp)> = outcome
            .alerts
            .iter()
            .map(|a| (a.threshold, a.bounds.start))
            .collect();
        let old_day = ts("2026-11-26T00:00:00Z");
        assert_eq!(crossed, vec![(50, old_day), (100, old_day)]);
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn soft_budget_alerts_are_recorded_once_per_threshold() {
        let (store, pg) = store().await;
        let mut soft = hard("s", Period::Week, "Asia/Tokyo", 1_000);
        soft.hard = false;
        soft.thresholds = vec![50, 80, 100];
        store.create(soft).await.unwrap();
        let now = Timestamp::now();
        let lease = store
            .acquire("s", "h", 5_000, 1, 60_000, now)
            .await
            .unwrap();
        assert_eq!(
            lease.lease.granted, 5_000,
            "a soft budget never limits a lease"
        );
        let report = |spent| store.extend(lease.lease.id, "", spent, 0, 0, 60_000, now);
        assert!(report(400).await.unwrap().alerts.is_empty());
        let crossed: Vec<u32> = report(850)
            .await
            .unwrap()
            .alerts
            .iter()
            .map(|a| a.threshold)
            .collect();
        assert_eq!(crossed, vec![50, 80]);
        assert!(report(900).await.unwrap().alerts.is_empty());
        let crossed: Vec<u32> = report(1_200)
            .await
            .unwrap()
            .alerts
            .iter()
            .map(|a| a.threshold)
            .collect();
        assert_eq!(crossed, vec![100]);
        assert!(
            store
                .release(lease.lease.id, 1_300, now)
                .await
                .unwrap()
                .is_empty()
        );
        pg.drop_db().await;
    }

    #[test]
    fn declared_ids_are_readable_valid_and_distinct_per_scope() {
        assert_eq!(declared_id(ScopeKind::Org, ""), "config.org");
        assert_eq!(declared_id(ScopeKind::Team, "team-1"), "config.team.team-1");
        assert_eq!(declared_id(ScopeKind::Key, "k_2"), "config.key.k_2");
        let spaced = declared_id(ScopeKind::App, "my app");
        assert!(spaced.starts_with("config.app.sha256."), "{spaced}");
        assert_eq!(spaced.len(), "config.app.sha256.".len() + 32);
        let long = "x".repeat(300);
        let longest_readable = "x".repeat(64);
        let scopes = [
            (ScopeKind::App, "a.b"),
            (ScopeKind::App, "a"),
            (ScopeKind::Team, "a"),
            (ScopeKind::App, "my app"),
            (ScopeKind::App, "sha256"),
            (ScopeKind::Key, long.as_str()),
            (ScopeKind::Key, longest_readable.as_str()),
            (ScopeKind::Key, "é"),
        ];
        let mut ids = std::collections::HashSet::new();
        for (kind, scope_id) in scopes {
            let mut budget = hard(&declared_id(kind, scope_id), Period::Day, "", 1);
            budget.kind = kind;
            scope_id.clone_into(&mut budget.scope_id);
            budget.validate().unwrap();
            assert!(budget.id.starts_with(DECLARED_ID_PREFIX));
            assert!(ids.insert(budget.id.clone()), "{kind:?} {scope_id}");
        }
    }

    fn declared(kind: ScopeKind, scope_id: &str, period: Period, limit: i64) -> Budget {
        Budget {
            id: declared_id(kind, scope_id),
            kind,
            scope_id: scope_id.into(),
            period,
            time_zone: String::new(),
            limit,
            hard: true,
            thresholds: vec![80, 50],
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|id| (*id).to_owned()).collect()
    }

    #[tokio::test]
    async fn declared_budgets_are_created_updated_or_left_alone() {
        let (store, pg) = store().await;
        let api = store
            .create(Budget {
                kind: ScopeKind::Team,
                scope_id: "team-1".into(),
                ..hard("team-1-daily", Period::Day, "Asia/Tokyo", 7)
            })
            .await
            .unwrap();
        let team = declared(ScopeKind::Team, "team-1", Period::Month, 250);
        let org = declared(ScopeKind::Org, "", Period::Lifetime, 1_000);
        let first = store
            .apply_declared(&[team.clone(), org.clone()])
            .await
            .unwrap();
        assert_eq!(first.created, ids(&["config.org", "config.team.team-1"]));
        let stored = store.get("config.team.team-1").await.unwrap();
        assert_eq!((stored.limit, stored.period), (250, Period::Month));
        assert_eq!(stored.time_zone, "UTC");
        assert_eq!(stored.thresholds, vec![50, 80]);

        let again = store
            .apply_declared(&[org.clone(), team.clone()])
            .await
            .unwrap();
        assert_eq!(again.unchanged, ids(&["config.org", "config.team.team-1"]));
        assert!(again.created.is_empty() && again.updated.is_empty());
        assert_eq!(store.get("config.team.team-1").await.unwrap(), stored);

        let changed = Budget {
            limit: 300,
            hard: false,
            time_zone: "Europe/Berlin".into(),
            ..team.clone()
        };
        let org_before = store.get("config.org").await.unwrap();
        let third = store
            .apply_declared(&[changed.clone(), org.clone()])
            .await
            .unwrap();
        assert_eq!(third.updated, ids(&["config.team.team-1"]));
        assert_eq!(third.unchanged, ids(&["config.org"]));
        let updated = store.get("config.team.team-1").await.unwrap();
        assert_eq!((updated.limit, updated.hard), (300, false));
        assert_eq!(updated.time_zone, "Europe/Berlin");
        assert_eq!(updated.created_at, stored.created_at);
        assert_ne!(updated.updated_at, stored.updated_at);
        assert_eq!(store.get("config.org").await.unwrap(), org_before);
        assert_eq!(store.get("team-1-daily").await.unwrap(), api);

        // No longer declared: reported, kept as it is.
        let fourth = store.apply_declared(&[changed]).await.unwrap();
        assert_eq!(fourth.undeclared, ids(&["config.org"]));
        assert_eq!(store.get("config.org").await.unwrap(), org_before);
        assert_eq!(store.list().await.unwrap().len(), 3);
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn a_declared_id_stored_with_another_scope_is_refused() {
        let (store, pg) = store().await;
        // Created before the id was reserved (CreateBudget now refuses `config.` ids).
        store
            .create(Budget {
                kind: ScopeKind::Team,
                scope_id: "other".into(),
                ..hard("config.team.team-1", Period::Day, "UTC", 5)
            })
            .await
            .unwrap();
        let error = store
            .apply_declared(&[declared(ScopeKind::Team, "team-1", Period::Day, 5)])
            .await
            .unwrap_err();
        assert!(
            matches!(&error, BudgetError::InvalidArgument { field, .. } if *field == "budget.scope"),
            "{error}"
        );
        let error = store
            .apply_declared(&[
                declared(ScopeKind::Org, "", Period::Day, 5),
                declared(ScopeKind::Org, "", Period::Week, 5),
            ])
            .await
            .unwrap_err();
        assert!(error.to_string().contains("declared twice"), "{error}");
        assert_eq!(store.list().await.unwrap().len(), 1);
        pg.drop_db().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn ledgers_starting_at_once_apply_the_declared_budgets_once() {
        let (store, pg) = store().await;
        let declared_budgets: Vec<Budget> = (0..6)
            .map(|i| declared(ScopeKind::App, &format!("app-{i}"), Period::Day, 100 + i))
            .collect();
        let applies = futures::future::join_all((0..8).map(|_| {
            let store = store.clone();
            let budgets = declared_budgets.clone();
            async move { store.apply_declared(&budgets).await.unwrap() }
        }))
        .await;
        let created: usize = applies.iter().map(|a| a.created.len()).sum();
        let updated: usize = applies.iter().map(|a| a.updated.len()).sum();
        assert_eq!((created, updated), (6, 0), "{applies:?}");
        let stored = store.list().await.unwrap();
        assert_eq!(stored.len(), 6);
        // Rolling deploy: replicas with old and new limits start at once; one of them wins.
        let raised: Vec<Budget> = declared_budgets
            .iter()
            .map(|b| Budget {
                limit: b.limit * 2,
                ..b.clone()
            })
            .collect();
        futures::future::join_all((0..8).map(|i| {
            let store = store.clone();
            let budgets = if i % 2 == 0 {
                raised.clone()
            } else {
                declared_budgets.clone()
            };
            async move { store.apply_declared(&budgets).await.unwrap() }
        }))
        .await;
        let stored = store.list().await.unwrap();
        assert_eq!(stored.len(), 6);
        for budget in stored {
            let i = declared_budgets
                .iter()
                .position(|b| b.id == budget.id)
                .unwrap();
            assert!(
                budget.limit == declared_budgets[i].limit || budget.limit == raised[i].limit,
                "{budget:?}"
            );
        }
        pg.drop_db().await;
    }
}
