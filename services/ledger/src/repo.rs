//! Postgres: database creation, migrations, the price history and the usage rows.
//!
//! Queries are runtime-checked (`sqlx::query`), so building needs no database.

use std::{collections::BTreeMap, str::FromStr, time::Duration};

use sqlx::{
    Connection, PgConnection, PgPool, Row,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use crate::{
    money::{Rate, Rates, Tier, Tokens},
    pricing::{Price, PriceBook, PriceSource},
    record::{AttemptUsage, UsageRow, cache_from_str, cache_str, status_from_str, status_str},
};

/// The columns of a usage row, in [`usage_row_of`]'s names.
macro_rules! usage_columns {
    () => {
        "request_id, time, app, team, key_id, requested_model, provider, model, attempts, \
         prompt_tokens, completion_tokens, cached_prompt_tokens, cache_write_tokens, reasoning_tokens, \
         cost_usd_nanos, saved_usd_nanos, cache, status, error_code, streamed, latency_ms, trace_id, \
         tags::text AS tags, earlier_attempts::text AS earlier_attempts"
    };
}

/// `usage_records.earlier_attempts`: one JSON object per earlier attempt that consumed tokens.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAttempt {
    provider: String,
    model: String,
    prompt_tokens: u32,
    cached_prompt_tokens: u32,
    cache_write_tokens: u32,
    completion_tokens: u32,
    reasoning_tokens: u32,
}

/// The JSON text of `usage_records.earlier_attempts` (`None`: NULL).
pub(crate) fn encode_earlier_attempts(attempts: Option<&[AttemptUsage]>) -> Option<String> {
    let stored: Vec<StoredAttempt> = attempts?
        .iter()
        .map(|a| StoredAttempt {
            provider: a.provider.clone(),
            model: a.model.clone(),
            prompt_tokens: a.tokens.prompt,
            cached_prompt_tokens: a.tokens.cached_prompt,
            cache_write_tokens: a.tokens.cache_write,
            completion_tokens: a.tokens.completion,
            reasoning_tokens: a.tokens.reasoning,
        })
        .collect();
    // Strings and integers only: serialising cannot fail (were it to, NULL: unknown, never re-priced).
    serde_json::to_string(&stored).ok()
}

/// Decodes `usage_records.earlier_attempts` as text (`None`: NULL).
pub(crate) fn decode_earlier_attempts(
    text: Option<&str>,
) -> Result<Option<Vec<AttemptUsage>>, serde_json::Error> {
    let Some(text) = text else { return Ok(None) };
    let stored: Vec<StoredAttempt> = serde_json::from_str(text)?;
    Ok(Some(
        stored
            .into_iter()
            .map(|a| AttemptUsage {
                provider: a.provider,
                model: a.model,
                tokens: Tokens {
                    prompt: a.prompt_tokens,
                    cached_prompt: a.cached_prompt_tokens,
                    cache_write: a.cache_write_tokens,
                    completion: a.completion_tokens,
                    reasoning: a.reasoning_tokens,
                },
            })
            .collect(),
    ))
}

/// Repository errors.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A query or the connection failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A configured price contradicts the stored history.
    #[error(
        "price for provider {provider:?} model {model:?} effective {effective_from} is already recorded with \
         different rates (stored input/cached_input/output {stored}, configured {configured}); \
         prices are never rewritten: add a new effective_from instead"
    )]
    PriceHistory {
        provider: String,
        model: String,
        effective_from: Date,
        stored: String,
        configured: String,
    },
}

/// Spend of one app on one served model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    /// Application id.
    pub app: String,
    /// `provider/model`.
    pub model: String,
    /// Rows.
    pub requests: i64,
    /// Input tokens.
    pub prompt_tokens: i64,
    /// Output tokens.
    pub completion_tokens: i64,
    /// Sum of the priced rows' cost.
    pub cost_usd_nanos: i64,
    /// Sum saved by cache hits.
    pub saved_usd_nanos: i64,
    /// Cache hits.
    pub cache_hits: i64,
    /// Rows without a price.
    pub unpriced_requests: i64,
}

/// Unpriced usage of one (provider, model) pair without a price: the unpriced rows that consumed
/// tokens on it, in the serving attempt or an earlier one (see [`crate::unpriced`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpriced {
    /// The provider of the model without a price (the serving provider of a row where no such
    /// model can be named).
    pub provider: String,
    /// The model without a price (the serving model of a row where none can be named).
    pub model: String,
    /// Unpriced rows that used it.
    pub requests: i64,
    /// Their input tokens on it (the serving attempt's, or the earlier attempt's).
    pub prompt_tokens: i64,
    /// Their output tokens on it.
    pub completion_tokens: i64,
    /// The first one's time.
    pub first_seen: OffsetDateTime,
    /// The last one's time.
    pub last_seen: OffsetDateTime,
}

/// Creates the database named in `url` when it does not exist (through the server's `postgres` db).
pub async fn ensure_database(url: &str) -> Result<(), sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?;
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    if name == "postgres" {
        return Ok(());
    }
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Someone else created it in the meantime: fine.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
            Err(e) => return Err(e),
        }
    }
    admin.close().await?;
    Ok(())
}

/// The ledger's tables.
#[derive(Debug, Clone)]
pub struct Repository {
    pool: PgPool,
}

impl Repository {
    /// Creates the database if needed, connects a pool and runs the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, RepoError> {
        ensure_database(url).await?;
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Repository { pool })
    }

    /// Records configured prices. A version already stored with the same rates is a no-op; with
    /// different rates it is an error (history is never rewritten).
    pub async fn sync_prices(&self, prices: &[Price]) -> Result<(), RepoError> {
        let mut tx = self.pool.begin().await?;
        sync_prices_in(&mut tx, prices).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every stored price version (configured now or in the past, and imported).
    pub async fn load_prices(&self) -> Result<PriceBook, RepoError> {
        Ok(PriceBook::new(self.price_versions().await?))
    }

    /// Every stored price version.
    pub async fn price_versions(&self) -> Result<Vec<Price>, RepoError> {
        let rows = sqlx::query(concat!("SELECT ", price_columns!(), " FROM prices"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| price_of_row(row).map_err(RepoError::from))
            .collect()
    }

    /// A cheap fingerprint of the price table: rows are only ever inserted, so (count, latest
    /// insertion) changes exactly when a version is added.
    pub async fn prices_fingerprint(&self) -> Result<(i64, Option<OffsetDateTime>), sqlx::Error> {
        let row = sqlx::query("SELECT COUNT(*)::BIGINT, MAX(created_at) FROM prices")
            .fetch_one(&self.pool)
            .await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    /// Inserts rows in one transaction that also updates the hourly and daily rollups with exactly
    /// the rows inserted; rows whose request id is already recorded are skipped. Returns how many
    /// rows were new.
    pub async fn insert_batch(&self, rows: &[UsageRow]) -> Result<u64, sqlx::Error> {
        let inserted = self.record_batch(rows).await?;
        Ok(u64::try_from(inserted.len()).unwrap_or(u64::MAX))
    }

    /// [`Repository::insert_batch`], returning the request ids actually inserted.
    pub async fn record_batch(&self, rows: &[UsageRow]) -> Result<Vec<Uuid>, sqlx::Error> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let inserted = insert_rows(&mut tx, rows).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    /// One row by request id (one primary-key probe per partition).
    pub async fn get(&self, request_id: Uuid) -> Result<Option<UsageRow>, sqlx::Error> {
        let row = sqlx::query(concat!(
            "SELECT ",
            usage_columns!(),
            " FROM usage_records WHERE request_id = $1 ORDER BY time LIMIT 1"
        ))
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(usage_row_of).transpose()
    }

    /// Every row of a trace (a trace may hold several requests), by time then request id.
    pub async fn by_trace(&self, trace_id: &str) -> Result<Vec<UsageRow>, sqlx::Error> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            usage_columns!(),
            " FROM usage_records WHERE trace_id = $1 AND trace_id <> '' ORDER BY time, request_id LIMIT 10000"
        ))
        .bind(trace_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(usage_row_of).collect()
    }

    /// One export page: rows of `[start, end)` matching `filter`, after the keyset `after`
    /// ((time, request_id) of the previous page's last row), ordered by (time, request_id).
    pub async fn export_page(
        &self,
        start: OffsetDateTime,
        end: OffsetDateTime,
        filter: &crate::spend::Filter,
        after: Option<(OffsetDateTime, Uuid)>,
        limit: i64,
    ) -> Result<Vec<UsageRow>, sqlx::Error> {
        let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new(concat!(
            "SELECT ",
            usage_columns!(),
            " FROM usage_records WHERE "
        ));
        match after {
            // Row comparison: one range scan of the (time, request_id) index.
            Some((time, id)) => {
                // The plain bound lets Postgres prune partitions before `after`.
                query
                    .push("(time, request_id) > (")
                    .push_bind(time)
                    .push(", ")
                    .push_bind(id)
                    .push(") AND time >= ")
                    .push_bind(time);
            }
            None => {
                query.push("time >= ").push_bind(start);
            }
        }
        query.push(" AND time < ").push_bind(end);
        filter.push_conditions(&mut query, "requested_model", true);
        query
            .push(" ORDER BY time, request_id LIMIT ")
            .push_bind(limit);
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter().map(usage_row_of).collect()
    }

    /// Spend in `[start, end)` grouped by (app, provider/model), ordered by app then model
    /// (`GetSpend`; read from the rollups like every spend query, see [`crate::spend`]).
    pub async fn spend(
        &self,
        start: OffsetDateTime,
        end: OffsetDateTime,
        app: Option<&str>,
    ) -> Result<Vec<Spend>, sqlx::Error> {
        use crate::spend::{Dimension, Filter, SpendQuery};
        let answer = crate::spend::query(
            &self.pool,
            &SpendQuery {
                start,
                end,
                group_by: vec![Dimension::App, Dimension::Provider, Dimension::Model],
                tag_key: None,
                filter: Filter {
                    apps: app.map(|a| vec![a.to_owned()]).unwrap_or_default(),
                    ..Filter::default()
                },
            },
        )
        .await?;
        let mut spend: Vec<Spend> = answer
            .groups
            .into_iter()
            .map(|g| Spend {
                app: g.app.unwrap_or_default(),
                model: format!(
                    "{}/{}",
                    g.provider.unwrap_or_default(),
                    g.model.unwrap_or_default()
                ),
                requests: g.measures.requests,
                prompt_tokens: g.measures.prompt_tokens,
                completion_tokens: g.measures.completion_tokens,
                cost_usd_nanos: g.measures.cost_usd_nanos,
                saved_usd_nanos: g.measures.saved_usd_nanos,
                cache_hits: g.measures.cache_hits,
                unpriced_requests: g.measures.unpriced_requests,
            })
            .collect();
        spend.sort_by(|a, b| (&a.app, &a.model).cmp(&(&b.app, &b.model)));
        Ok(spend)
    }

    /// The (provider, model) pairs without a price among the unpriced rows of `[start, end)` (of
    /// `app` when set), at the prices of `prices`: most requests first, then by provider and model.
    /// An unpriced row counts under each of its pairs that consumed tokens and has no price at the
    /// row's time (its serving pair, an earlier attempt's), or under its serving pair when none
    /// can be named (see [`crate::unpriced`]).
    pub async fn unpriced(
        &self,
        start: OffsetDateTime,
        end: OffsetDateTime,
        app: Option<&str>,
        prices: &PriceBook,
    ) -> Result<Vec<Unpriced>, sqlx::Error> {
        crate::unpriced::list(&self.pool, start, end, app, prices).await
    }

    /// The pool (health checks, tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Decodes `usage_columns!()`.
fn usage_row_of(row: &sqlx::postgres::PgRow) -> Result<UsageRow, sqlx::Error> {
    let u32_of = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    let tags: String = row.try_get("tags")?;
    let earlier_attempts = decode_earlier_attempts(
        row.try_get::<Option<&str>, _>("earlier_attempts")?,
    )
    .map_err(|e| sqlx::Error::ColumnDecode {
        index: "earlier_attempts".to_owned(),
        source: Box::new(e),
    })?;
    Ok(UsageRow {
        request_id: row.try_get("request_id")?,
        time: row.try_get("time")?,
        app: row.try_get("app")?,
        team: row.try_get("team")?,
        key_id: row.try_get("key_id")?,
        requested_model: row.try_get("requested_model")?,
        provider: row.try_get("provider")?,
        model: row.try_get("model")?,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
        tokens: Tokens {
            prompt: u32_of(row.try_get("prompt_tokens")?),
            cached_prompt: u32_of(row.try_get("cached_prompt_tokens")?),
            cache_write: u32_of(row.try_get("cache_write_tokens")?),
            completion: u32_of(row.try_get("completion_tokens")?),
            reasoning: u32_of(row.try_get("reasoning_tokens")?),
        },
        earlier_attempts,
        cost_usd_nanos: row.try_get("cost_usd_nanos")?,
        saved_usd_nanos: row.try_get("saved_usd_nanos")?,
        cache: cache_from_str(row.try_get::<&str, _>("cache")?),
        status: status_from_str(row.try_get::<&str, _>("status")?),
        error_code: row.try_get("error_code")?,
        streamed: row.try_get("streamed")?,
        latency_ms: u64::try_from(row.try_get::<i64, _>("latency_ms")?).unwrap_or(0),
        trace_id: row.try_get("trace_id")?,
        tags: serde_json::from_str::<BTreeMap<String, String>>(&tags).unwrap_or_default(),
    })
}

/// Inserts the rows that are new and adds them to the rollups; returns the inserted request ids.
/// A request id repeated within `rows` is inserted once (its first row).
///
/// Two statements on the caller's transaction: the insert returns the request ids it actually
/// inserted, and only those rows are folded (in Rust, one rollup row per distinct key) and added
/// to the hourly and daily rollups. Both commit together or not at all, so a redelivered row
/// never counts twice.
async fn insert_rows(conn: &mut PgConnection, rows: &[UsageRow]) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    let mut rows: Vec<&UsageRow> = rows
        .iter()
        .filter(|row| seen.insert(row.request_id))
        .collect();
    // In request id order: two batches committing at once that share request ids (a redelivery)
    // wait on each other's rows in the same order instead of deadlocking.
    rows.sort_unstable_by_key(|row| row.request_id);
    let inserted = insert_new_rows(conn, &rows).await?;
    if inserted.is_empty() {
        return Ok(inserted);
    }
    let new: std::collections::HashSet<&Uuid> = inserted.iter().collect();
    let new_rows = rows
        .iter()
        .copied()
        .filter(|row| new.contains(&row.request_id));
    let (hourly, daily) = fold_rollups(new_rows)?;
    upsert_rollups(conn, &hourly, &daily).await?;
    Ok(inserted)
}

/// Inserts the rows (distinct request ids) that are new; returns their request ids.
async fn insert_new_rows(
    conn: &mut PgConnection,
    rows: &[&UsageRow],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let n = rows.len();
    let mut request_id = Vec::with_capacity(n);
    let mut time = Vec::with_capacity(n);
    let mut app = Vec::with_capacity(n);
    let mut team = Vec::with_capacity(n);
    let mut key_id = Vec::with_capacity(n);
    let mut requested_model = Vec::with_capacity(n);
    let mut provider = Vec::with_capacity(n);
    let mut model = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut prompt = Vec::with_capacity(n);
    let mut completion = Vec::with_capacity(n);
    let mut cached = Vec::with_capacity(n);
    let mut cache_write = Vec::with_capacity(n);
    let mut reasoning = Vec::with_capacity(n);
    let mut cost: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut saved = Vec::with_capacity(n);
    let mut cache = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut error_code = Vec::with_capacity(n);
    let mut streamed = Vec::with_capacity(n);
    let mut latency = Vec::with_capacity(n);
    let mut trace_id = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    let mut earlier_attempts = Vec::with_capacity(n);
    for row in rows {
        request_id.push(row.request_id);
        time.push(row.time);
        app.push(row.app.as_str());
        team.push(row.team.as_str());
        key_id.push(row.key_id.as_str());
        requested_model.push(row.requested_model.as_str());
        provider.push(row.provider.as_str());
        model.push(row.model.as_str());
        attempts.push(i32::try_from(row.attempts).unwrap_or(i32::MAX));
        prompt.push(i64::from(row.tokens.prompt));
        completion.push(i64::from(row.tokens.completion));
        cached.push(i64::from(row.tokens.cached_prompt));
        cache_write.push(i64::from(row.tokens.cache_write));
        reasoning.push(i64::from(row.tokens.reasoning));
        cost.push(row.cost_usd_nanos);
        saved.push(row.saved_usd_nanos);
        cache.push(cache_str(row.cache));
        status.push(status_str(row.status));
        error_code.push(row.error_code.as_str());
        streamed.push(row.streamed);
        latency.push(i64::try_from(row.latency_ms).unwrap_or(i64::MAX));
        trace_id.push(row.trace_id.as_str());
        tags.push(serde_json::to_string(&row.tags).unwrap_or_else(|_| "{}".to_owned()));
        earlier_attempts.push(encode_earlier_attempts(row.earlier_attempts.as_deref()));
    }
    sqlx::query_scalar(INSERT_NEW_ROWS)
        .bind(request_id)
        .bind(time)
        .bind(app)
        .bind(team)
        .bind(key_id)
        .bind(requested_model)
        .bind(provider)
        .bind(model)
        .bind(attempts)
        .bind(prompt)
        .bind(completion)
        .bind(cached)
        .bind(cost)
        .bind(saved)
        .bind(cache)
        .bind(status)
        .bind(error_code)
        .bind(streamed)
        .bind(latency)
        .bind(trace_id)
        .bind(tags)
        .bind(cache_write)
        .bind(reasoning)
        .bind(earlier_attempts)
        .fetch_all(conn)
        .await
}

/// The key of a rollup row: (bucket, app, team, key id, route, provider, model).
type RollupKey<'a> = (
    OffsetDateTime,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
);

/// The measures of a rollup row (the sums of the rows it counts): the same measures finance reads
/// back (`spend::Measures`).
pub(crate) type RollupMeasures = crate::spend::Measures;

impl RollupMeasures {
    /// Adds one row; `None` when a sum would overflow (the database would refuse it too).
    fn add_row(&mut self, row: &UsageRow) -> Option<()> {
        let flag = |yes: bool| i64::from(yes);
        self.requests = self.requests.checked_add(1)?;
        self.prompt_tokens = self
            .prompt_tokens
            .checked_add(i64::from(row.tokens.prompt))?;
        self.completion_tokens = self
            .completion_tokens
            .checked_add(i64::from(row.tokens.completion))?;
        self.cached_prompt_tokens = self
            .cached_prompt_tokens
            .checked_add(i64::from(row.tokens.cached_prompt))?;
        self.cache_write_tokens = self
            .cache_write_tokens
            .checked_add(i64::from(row.tokens.cache_write))?;
        self.reasoning_tokens = self
            .reasoning_tokens
            .checked_add(i64::from(row.tokens.reasoning))?;
        self.cost_usd_nanos = self
            .cost_usd_nanos
            .checked_add(row.cost_usd_nanos.unwrap_or(0))?;
        self.unpriced_requests += flag(row.cost_usd_nanos.is_none());
        self.saved_usd_nanos = self.saved_usd_nanos.checked_add(row.saved_usd_nanos)?;
        self.error_requests += flag(status_str(row.status) == "error");
        self.cache_hits += flag(cache_str(row.cache) == "hit");
        Some(())
    }
}

/// Rollup rows keyed (and so ordered) by their key.
pub(crate) type Rollups<'a> = BTreeMap<RollupKey<'a>, RollupMeasures>;

/// The start of the UTC hour (`3600`) or day (`86400`) holding `time`.
fn bucket(time: OffsetDateTime, seconds: i64) -> Result<OffsetDateTime, sqlx::Error> {
    let start = time.unix_timestamp().div_euclid(seconds) * seconds;
    OffsetDateTime::from_unix_timestamp(start).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// Folds rows into their hourly and daily rollup rows (one per distinct key).
pub(crate) fn fold_rollups<'a>(
    rows: impl IntoIterator<Item = &'a UsageRow>,
) -> Result<(Rollups<'a>, Rollups<'a>), sqlx::Error> {
    let mut hourly = Rollups::new();
    let mut daily = Rollups::new();
    for row in rows {
        for (rollups, seconds) in [(&mut hourly, 3_600), (&mut daily, 86_400)] {
            let key = (
                bucket(row.time, seconds)?,
                row.app.as_str(),
                row.team.as_str(),
                row.key_id.as_str(),
                row.requested_model.as_str(),
                row.provider.as_str(),
                row.model.as_str(),
            );
            rollups
                .entry(key)
                .or_default()
                .add_row(row)
                .ok_or_else(|| {
                    sqlx::Error::Encode("a rollup sum overflows a 64-bit integer".into())
                })?;
        }
    }
    Ok((hourly, daily))
}

/// Adds folded hourly and daily rollup rows to the stored ones, in one statement (one round
/// trip). Rows go in key order, so concurrent ledgers lock rollup rows in the same order.
async fn upsert_rollups(
    conn: &mut PgConnection,
    hourly: &Rollups<'_>,
    daily: &Rollups<'_>,
) -> Result<(), sqlx::Error> {
    let mut query = sqlx::query(UPSERT_ROLLUPS);
    for rollups in [hourly, daily] {
        let n = rollups.len();
        let mut buckets = Vec::with_capacity(n);
        let mut keys: [Vec<&str>; 6] = std::array::from_fn(|_| Vec::with_capacity(n));
        let mut measures: [Vec<i64>; 11] = std::array::from_fn(|_| Vec::with_capacity(n));
        for (key, m) in rollups {
            buckets.push(key.0);
            let texts = [key.1, key.2, key.3, key.4, key.5, key.6];
            for (column, value) in keys.iter_mut().zip(texts) {
                column.push(value);
            }
            let values = [
                m.requests,
                m.prompt_tokens,
                m.completion_tokens,
                m.cached_prompt_tokens,
                m.cache_write_tokens,
                m.reasoning_tokens,
                m.cost_usd_nanos,
                m.unpriced_requests,
                m.saved_usd_nanos,
                m.error_requests,
                m.cache_hits,
            ];
            for (column, value) in measures.iter_mut().zip(values) {
                column.push(value);
            }
        }
        query = query.bind(buckets);
        for column in keys {
            query = query.bind(column);
        }
        for column in measures {
            query = query.bind(column);
        }
    }
    query.execute(conn).await?;
    Ok(())
}

/// Adds an upsert's measures to the stored rollup row.
macro_rules! rollup_upsert {
    () => {
        " ON CONFLICT (bucket, app, team, key_id, route, provider, model) DO UPDATE SET \
           requests = r.requests + EXCLUDED.requests, \
           prompt_tokens = r.prompt_tokens + EXCLUDED.prompt_tokens, \
           completion_tokens = r.completion_tokens + EXCLUDED.completion_tokens, \
           cached_prompt_tokens = r.cached_prompt_tokens + EXCLUDED.cached_prompt_tokens, \
           cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, \
           reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens, \
           cost_usd_nanos = r.cost_usd_nanos + EXCLUDED.cost_usd_nanos, \
           unpriced_requests = r.unpriced_requests + EXCLUDED.unpriced_requests, \
           saved_usd_nanos = r.saved_usd_nanos + EXCLUDED.saved_usd_nanos, \
           error_requests = r.error_requests + EXCLUDED.error_requests, \
           cache_hits = r.cache_hits + EXCLUDED.cache_hits"
    };
}

/// The upsert of folded rollup rows into `$table` from the arrays `$first`.. (in
/// [`upsert_rollups`]'s order).
macro_rules! upsert_rollups {
    ($table:literal, $a:literal, $b:literal, $c:literal, $d:literal, $e:literal, $f:literal,
     $g:literal, $h:literal, $i:literal, $j:literal, $k:literal, $l:literal, $m:literal, $n:literal,
     $o:literal, $p:literal, $q:literal, $r:literal) => {
        concat!(
            "INSERT INTO ",
            $table,
            " AS r (bucket, app, team, key_id, route, provider, model, requests, prompt_tokens, \
               completion_tokens, cached_prompt_tokens, cache_write_tokens, reasoning_tokens, \
               cost_usd_nanos, unpriced_requests, saved_usd_nanos, error_requests, cache_hits) \
             SELECT * FROM UNNEST($",
            $a,
            "::timestamptz[], $",
            $b,
            "::text[], $",
            $c,
            "::text[], $",
            $d,
            "::text[], $",
            $e,
            "::text[], $",
            $f,
            "::text[], $",
            $g,
            "::text[], $",
            $h,
            "::int8[], $",
            $i,
            "::int8[], $",
            $j,
            "::int8[], $",
            $k,
            "::int8[], $",
            $l,
            "::int8[], $",
            $m,
            "::int8[], $",
            $n,
            "::int8[], $",
            $o,
            "::int8[], $",
            $p,
            "::int8[], $",
            $q,
            "::int8[], $",
            $r,
            "::int8[])",
            rollup_upsert!()
        )
    };
}

/// The hourly upsert (`$1`..`$18`), then the daily one (`$19`..`$36`).
const UPSERT_ROLLUPS: &str = concat!(
    "WITH hourly AS (",
    upsert_rollups!(
        "usage_rollup_hourly",
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        12,
        13,
        14,
        15,
        16,
        17,
        18
    ),
    ") ",
    upsert_rollups!(
        "usage_rollup_daily",
        19,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        29,
        30,
        31,
        32,
        33,
        34,
        35,
        36
    )
);

/// Inserts the rows that are new and returns their request ids. A row is new when neither its
/// (request id, time) nor its request id within 7 days of its time (the usage stream's retention:
/// no redelivery comes later) is recorded; the second check is one probe of the primary-key index
/// of the one or two partitions of that window (a scalar subquery, so that it runs per row with
/// run-time partition pruning: `NOT EXISTS` would be planned as an anti-join over every
/// partition). The caller adds exactly the returned rows to the rollups in the same transaction.
const INSERT_NEW_ROWS: &str = "WITH input AS ( \
       SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::text[], $9::int4[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int8[], \
         $15::text[], $16::text[], $17::text[], $18::bool[], $19::int8[], $20::text[], $21::text[], $22::int8[], \
         $23::int8[], $24::text[]) \
         AS t(request_id, time, app, team, key_id, requested_model, provider, model, attempts, prompt_tokens, \
         completion_tokens, cached_prompt_tokens, cost_usd_nanos, saved_usd_nanos, cache, status, error_code, \
         streamed, latency_ms, trace_id, tags, cache_write_tokens, reasoning_tokens, earlier_attempts)) \
     INSERT INTO usage_records (request_id, time, app, team, key_id, requested_model, provider, model, \
       attempts, prompt_tokens, completion_tokens, cached_prompt_tokens, cost_usd_nanos, saved_usd_nanos, \
       cache, status, error_code, streamed, latency_ms, trace_id, tags, cache_write_tokens, reasoning_tokens, \
       earlier_attempts) \
     SELECT request_id, time, app, team, key_id, requested_model, provider, model, attempts, prompt_tokens, \
       completion_tokens, cached_prompt_tokens, cost_usd_nanos, saved_usd_nanos, cache, status, error_code, \
       streamed, latency_ms, trace_id, tags::jsonb, cache_write_tokens, reasoning_tokens, earlier_attempts::jsonb \
     FROM input t \
     WHERE (SELECT 1 FROM usage_records u WHERE u.request_id = t.request_id \
       AND u.time >= t.time - INTERVAL '7 days' AND u.time <= t.time + INTERVAL '7 days' LIMIT 1) IS NULL \
     ON CONFLICT (request_id, time) DO NOTHING \
     RETURNING request_id";

/// The columns of a price version, in [`price_of_row`]'s order (a macro, so that queries stay
/// `'static` strings).
macro_rules! price_columns {
    () => {
        "source, provider, model, effective_from, input_nanos_per_mtok, \
         cached_input_nanos_per_mtok, cache_write_nanos_per_mtok, output_nanos_per_mtok, reasoning_nanos_per_mtok, \
         tier_above_prompt_tokens, tier_input_nanos_per_mtok, tier_cached_input_nanos_per_mtok, \
         tier_cache_write_nanos_per_mtok, tier_output_nanos_per_mtok, tier_reasoning_nanos_per_mtok"
    };
}
pub(crate) use price_columns;

/// Decodes `price_columns!()`: a NULL cache-write rate is the input rate, a NULL reasoning rate the
/// output rate, a NULL tier rate that class's base rate.
pub(crate) fn price_of_row(row: &sqlx::postgres::PgRow) -> Result<Price, sqlx::Error> {
    let source: String = row.try_get(0)?;
    let source = PriceSource::from_db(&source).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: "source".to_owned(),
        source: format!("unknown price source {source:?}").into(),
    })?;
    let rate = |i: usize| row.try_get::<i64, _>(i).map(Rate);
    let maybe = |i: usize| row.try_get::<Option<i64>, _>(i).map(|r| r.map(Rate));
    let input = rate(4)?;
    let output = rate(7)?;
    let rates = Rates {
        input,
        cached_input: rate(5)?,
        cache_write: maybe(6)?.unwrap_or(input),
        output,
        reasoning: maybe(8)?.unwrap_or(output),
    };
    let tier = match row.try_get::<Option<i64>, _>(9)? {
        None => None,
        Some(above) => {
            let tier_input = maybe(10)?.unwrap_or(rates.input);
            let tier_output = maybe(13)?.unwrap_or(rates.output);
            Some(Tier {
                above_prompt_tokens: u32::try_from(above).unwrap_or(u32::MAX),
                rates: Rates {
                    input: tier_input,
                    cached_input: maybe(11)?.unwrap_or(rates.cached_input),
                    cache_write: maybe(12)?.unwrap_or(rates.cache_write),
                    output: tier_output,
                    reasoning: maybe(14)?.unwrap_or(rates.reasoning),
                },
            })
        }
    };
    Ok(Price {
        source,
        provider: row.try_get(1)?,
        model: row.try_get(2)?,
        effective_from: row.try_get(3)?,
        rates,
        tier,
    })
}

/// LiteLLM's metadata of an imported price version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportMeta {
    /// The entry's key in the file.
    pub litellm_key: Option<String>,
    /// `litellm_provider`.
    pub litellm_provider: Option<String>,
    /// `mode`.
    pub mode: Option<String>,
    /// `max_input_tokens`.
    pub max_input_tokens: Option<i64>,
    /// The `price_imports` row that added the version.
    pub import_id: Option<i64>,
}

/// [`Repository::sync_prices`] within the caller's transaction: returns the versions that were not
/// stored yet (inserted now). On error the caller rolls back, so that nothing of it stays.
pub(crate) async fn sync_prices_in(
    tx: &mut PgConnection,
    prices: &[Price],
) -> Result<Vec<Price>, RepoError> {
    let mut added = Vec::new();
    for price in prices {
        if insert_price(&mut *tx, price, &ImportMeta::default()).await? > 0 {
            added.push(price.clone());
        }
        let row = sqlx::query(concat!(
            "SELECT ",
            price_columns!(),
            " FROM prices WHERE source = $1 AND provider = $2 AND model = $3 AND effective_from = $4"
        ))
        .bind(price.source.as_str())
        .bind(&price.provider)
        .bind(&price.model)
        .bind(price.effective_from)
        .fetch_one(&mut *tx)
        .await?;
        let stored = price_of_row(&row)?;
        if stored.rates != price.rates || stored.tier != price.tier {
            let show = |r: &Rates| {
                format!(
                    "{}/{}/{}/{}/{}",
                    r.input, r.cached_input, r.cache_write, r.output, r.reasoning
                )
            };
            return Err(RepoError::PriceHistory {
                provider: price.provider.clone(),
                model: price.model.clone(),
                effective_from: price.effective_from,
                stored: show(&stored.rates),
                configured: show(&price.rates),
            });
        }
    }
    Ok(added)
}

/// Inserts a price version unless one is stored under the same key (then nothing happens).
pub(crate) async fn insert_price(
    conn: &mut PgConnection,
    price: &Price,
    meta: &ImportMeta,
) -> Result<u64, sqlx::Error> {
    let tier = price.tier.as_ref();
    let tier_rate = |f: fn(&Rates) -> Rate| tier.map(|t| f(&t.rates).0);
    let done = sqlx::query(
        "INSERT INTO prices (source, provider, model, effective_from, input_nanos_per_mtok, \
         cached_input_nanos_per_mtok, cache_write_nanos_per_mtok, output_nanos_per_mtok, reasoning_nanos_per_mtok, \
         tier_above_prompt_tokens, tier_input_nanos_per_mtok, tier_cached_input_nanos_per_mtok, \
         tier_cache_write_nanos_per_mtok, tier_output_nanos_per_mtok, tier_reasoning_nanos_per_mtok, \
         litellm_key, litellm_provider, mode, max_input_tokens, import_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
         ON CONFLICT (source, provider, model, effective_from) DO NOTHING",
    )
    .bind(price.source.as_str())
    .bind(&price.provider)
    .bind(&price.model)
    .bind(price.effective_from)
    .bind(price.rates.input.0)
    .bind(price.rates.cached_input.0)
    .bind(price.rates.cache_write.0)
    .bind(price.rates.output.0)
    .bind(price.rates.reasoning.0)
    .bind(tier.map(|t| i64::from(t.above_prompt_tokens)))
    .bind(tier_rate(|r| r.input))
    .bind(tier_rate(|r| r.cached_input))
    .bind(tier_rate(|r| r.cache_write))
    .bind(tier_rate(|r| r.output))
    .bind(tier_rate(|r| r.reasoning))
    .bind(&meta.litellm_key)
    .bind(&meta.litellm_provider)
    .bind(&meta.mode)
    .bind(meta.max_input_tokens)
    .bind(meta.import_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Whether an error is about the data (retrying the same rows cannot help) rather than the connection.
pub fn is_data_error(error: &sqlx::Error) -> bool {
    match error {
        // SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation).
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => true,
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::record::{price_event, tests::event};
    use switchboard_testkit::TestPg;
    use time::macros::{date, datetime};

    async fn repo() -> (Repository, TestPg) {
        let pg = TestPg::create().await.expect("postgres");
        let repo = Repository::connect(&pg.url, 4).await.expect("connect");
        (repo, pg)
    }

    fn price(provider: &str, model: &str, from: Date, input: &str) -> Price {
        let rate = Rate::parse(input).unwrap();
        Price::configured(provider, model, from, Rates::flat(rate, rate, rate))
    }

    const ID: &str = "0195f0e2-7f4c-7000-8000-0000000000aa";

    async fn count(repo: &Repository) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM usage_records")
            .fetch_one(repo.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn creates_a_missing_database_and_migrates_twice() {
        let pg = TestPg::create().await.unwrap();
        let url = format!("{}_new", pg.url);
        let first = Repository::connect(&url, 2).await.unwrap();
        first.pool().close().await;
        let again = Repository::connect(&url, 2).await.unwrap();
        assert_eq!(count(&again).await, 0);
        again.pool().close().await;
        TestPg {
            url: url.clone(),
            name: format!("{}_new", pg.name),
        }
        .drop_db()
        .await;
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn insert_is_idempotent_on_request_id() {
        let (repo, pg) = repo().await;
        let book = repo.load_prices().await.unwrap();
        let row = price_event(event(ID, "gpt-4o-mini"), OffsetDateTime::now_utc(), &book).unwrap();
        assert_eq!(
            repo.insert_batch(std::slice::from_ref(&row)).await.unwrap(),
            1
        );
        assert_eq!(
            repo.insert_batch(std::slice::from_ref(&row)).await.unwrap(),
            0
        );
        // The same id twice in one batch, and a changed copy: still the first row, once.
        let mut changed = row.clone();
        changed.app = "other".into();
        assert_eq!(
            repo.insert_batch(&[changed.clone(), changed])
                .await
                .unwrap(),
            0
        );
        assert_eq!(count(&repo).await, 1);
        let stored = repo.get(row.request_id).await.unwrap().unwrap();
        assert_eq!(stored, row);
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn unpriced_rows_are_null_and_counted() {
        let (repo, pg) = repo().await;
        repo.sync_prices(&[price("*", "gpt-4o-mini", date!(2024 - 01 - 01), "1")])
            .await
            .unwrap();
        let book = repo.load_prices().await.unwrap();
        let priced =
            price_event(event(ID, "gpt-4o-mini"), OffsetDateTime::now_utc(), &book).unwrap();
        let unpriced = price_event(
            event("0195f0e2-7f4c-7000-8000-0000000000ab", "mystery"),
            OffsetDateTime::now_utc(),
            &book,
        )
        .unwrap();
        assert_eq!(
            repo.insert_batch(&[priced.clone(), unpriced.clone()])
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            repo.get(unpriced.request_id)
                .await
                .unwrap()
                .unwrap()
                .cost_usd_nanos,
            None
        );
        let null: Option<i64> =
            sqlx::query_scalar("SELECT cost_usd_nanos FROM usage_records WHERE request_id = $1")
                .bind(unpriced.request_id)
                .fetch_one(repo.pool())
                .await
                .unwrap();
        assert_eq!(null, None);
        let spend = repo
            .spend(
                datetime!(2025-01-01 0:00 UTC),
                datetime!(2026-01-01 0:00 UTC),
                None,
            )
            .await
            .unwrap();
        assert_eq!(spend.len(), 2);
        let mystery = spend.iter().find(|s| s.model == "openai/mystery").unwrap();
        assert_eq!(
            (
                mystery.requests,
                mystery.unpriced_requests,
                mystery.cost_usd_nanos
            ),
            (1, 1, 0)
        );
        // 1 USD/M for every token: 1500 tokens → 1500 * 1e9 / 1e6 = 1_500_000 nanos.
        let known = spend
            .iter()
            .find(|s| s.model == "openai/gpt-4o-mini")
            .unwrap();
        assert_eq!(
            (
                known.requests,
                known.unpriced_requests,
                known.cost_usd_nanos
            ),
            (1, 0, 1_500_000)
        );
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn price_selection_by_effective_date_and_provider() {
        let (repo, pg) = repo().await;
        let prices = [
            price("*", "m", date!(2024 - 01 - 01), "1"),
            price("*", "m", date!(2025 - 01 - 01), "2"),
            price("azure", "m", date!(2024 - 06 - 01), "5"),
        ];
        repo.sync_prices(&prices).await.unwrap();
        // Re-syncing the same history is a no-op; later config may drop old versions without losing them.
        repo.sync_prices(&prices[1..]).await.unwrap();
        let book = repo.load_prices().await.unwrap();
        assert_eq!(book.len(), 3);
        let input = |provider: &str, at| book.lookup(provider, "m", at).map(|p| p.base.input.0);
        assert_eq!(input("openai", datetime!(2023-06-01 0:00 UTC)), None);
        assert_eq!(
            input("openai", datetime!(2024-07-01 0:00 UTC)),
            Some(1_000_000_000)
        );
        assert_eq!(
            input("openai", datetime!(2025-07-01 0:00 UTC)),
            Some(2_000_000_000)
        );
        assert_eq!(
            input("azure", datetime!(2024-05-31 23:59 UTC)),
            Some(1_000_000_000)
        );
        assert_eq!(
            input("azure", datetime!(2025-07-01 0:00 UTC)),
            Some(5_000_000_000)
        );

        // Rewriting a stored version is refused.
        let error = repo
            .sync_prices(&[price("*", "m", date!(2024 - 01 - 01), "1.5")])
            .await
            .unwrap_err();
        assert!(matches!(error, RepoError::PriceHistory { .. }), "{error}");
        assert!(error.to_string().contains("2024-01-01"), "{error}");
        pg.drop_db().await;
    }

    #[tokio::test]
    async fn spend_filters_by_app_and_half_open_range() {
        let (repo, pg) = repo().await;
        repo.sync_prices(&[price("*", "gpt-4o-mini", date!(2024 - 01 - 01), "1")])
            .await
            .unwrap();
        let book = repo.load_prices().await.unwrap();
        let mut a = event("0195f0e2-7f4c-7000-8000-0000000000b1", "gpt-4o-mini");
        a.time = Some(crate::record::time_to_timestamp(
            datetime!(2025-03-01 0:00 UTC),
        ));
        let mut b = event("0195f0e2-7f4c-7000-8000-0000000000b2", "gpt-4o-mini");
        b.app = "search".into();
        b.time = a.time;
        let rows = [a, b].map(|e| price_event(e, OffsetDateTime::now_utc(), &book).unwrap());
        repo.insert_batch(&rows).await.unwrap();
        let at = datetime!(2025-03-01 0:00 UTC);
        assert_eq!(
            repo.spend(at, at + Duration::from_secs(1), None)
                .await
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            repo.spend(at - Duration::from_secs(1), at, None)
                .await
                .unwrap()
                .len(),
            0
        );
        let only = repo
            .spend(at, at + Duration::from_secs(1), Some("search"))
            .await
            .unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].app, "search");
        pg.drop_db().await;
    }
}
