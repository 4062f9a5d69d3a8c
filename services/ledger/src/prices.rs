//! Operator commands on prices (`switchboard prices …`): import LiteLLM's price map as new price
//! versions, and re-price a period with an audit trail. Both run in one Postgres transaction.

use std::collections::HashMap;

use sqlx::{PgConnection, Row};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use crate::{
    litellm::{self, FileError, Note},
    money::Tokens,
    pricing::{Price, PriceBook, PriceSource},
    record::{known_earlier_attempts, request_cost},
    repo::{Repository, decode_earlier_attempts, insert_price, price_columns, price_of_row},
};

/// Why an import or a re-pricing failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The file is not a price map.
    #[error(transparent)]
    File(#[from] FileError),
    /// Postgres failed (nothing was written).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A request argument is invalid.
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// What `import` did (or, on a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct ImportReport {
    /// Entries in the file.
    pub entries: usize,
    /// Keys whose price is new or changed: a version effective from the import date was added.
    pub inserted: Vec<String>,
    /// Keys whose price in effect at the import date is the same.
    pub unchanged: usize,
    /// Entries without a per-token price.
    pub skipped: Vec<Note>,
    /// Invalid entries and conflicts with the recorded history, with their JSON paths.
    pub invalid: Vec<Note>,
    /// Values rounded to 1e-15 USD per token (imported).
    pub rounded: Vec<Note>,
    /// The `price_imports` row; `None` on a dry run.
    pub import_id: Option<i64>,
}

/// Who runs an operator command, for the audit rows.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

impl Actor {
    /// `explicit`, else `$USER`, else `unknown`.
    pub fn resolve(explicit: Option<String>) -> Actor {
        Actor(
            explicit
                .filter(|a| !a.trim().is_empty())
                .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
                .unwrap_or_else(|| "unknown".to_owned()),
        )
    }
}

/// Imports LiteLLM's price map `text` (read from `file`) as versions effective from
/// `effective_from`: a version is added only where the price in effect at that date differs (or
/// there is none). History is never rewritten: an entry whose key already has a different version
/// at that date, or any version after it, is reported as invalid and left alone. A dry run reports
/// the same and writes nothing.
pub async fn import_litellm(
    repo: &Repository,
    file: &str,
    text: &str,
    effective_from: Date,
    actor: &Actor,
    dry_run: bool,
) -> Result<ImportReport, AdminError> {
    let parsed = litellm::parse(text, effective_from)?;
    let mut report = ImportReport {
        entries: parsed.entries,
        skipped: parsed.skipped,
        invalid: parsed.invalid,
        rounded: parsed.rounded,
        ..ImportReport::default()
    };
    let mut tx = repo.pool().begin().await?;
    // One import at a time; readers (the ledger's reload) are not blocked.
    sqlx::query("LOCK TABLE prices IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let mut history: HashMap<(String, String), Vec<Price>> = HashMap::new();
    for price in versions(&mut tx, PriceSource::Litellm).await? {
        history
            .entry((price.provider.clone(), price.model.clone()))
            .or_default()
            .push(price);
    }
    let mut to_insert = Vec::new();
    for imported in parsed.prices {
        let key = (
            imported.price.provider.clone(),
            imported.price.model.clone(),
        );
        let versions = history.get(&key).map(Vec::as_slice).unwrap_or_default();
        let conflict = |message: String| Note {
            key: imported.key.clone(),
            path: format!(
                "$[{}]",
                serde_json::to_string(&imported.key).unwrap_or_default()
            ),
            message,
        };
        if let Some(later) = versions
            .iter()
            .filter(|v| v.effective_from > effective_from)
            .map(|v| v.effective_from)
            .max()
        {
            report.invalid.push(conflict(format!(
                "a version effective from {later} is already recorded; prices are never rewritten \
                 (import with --effective-from {later} or later)"
            )));
            continue;
        }
        let current = versions
            .iter()
            .filter(|v| v.effective_from <= effective_from)
            .max_by_key(|v| v.effective_from);
        match current {
            Some(current) if current.pricing() == imported.price.pricing() => {
                report.unchanged += 1;
            }
            Some(current) if current.effective_from == effective_from => {
                report.invalid.push(conflict(format!(
                    "already imported with other rates effective from {effective_from}; prices are \
                     never rewritten (import with a later --effective-from)"
                )));
            }
            _ => {
                report.inserted.push(imported.key.clone());
                to_insert.push(imported);
            }
        }
    }
    if dry_run {
        tx.rollback().await?;
        return Ok(report);
    }
    let details = serde_json::json!({
        "invalid": report.invalid,
        "rounded": report.rounded,
        "skipped": report.skipped,
    });
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let import_id: i64 = sqlx::query_scalar(
        "INSERT INTO price_imports (source, file, file_sha256, effective_from, imported_by, entries, \
         inserted, unchanged, skipped, invalid, report) \
         VALUES ('litellm', $1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb) RETURNING id",
    )
    .bind(file)
    .bind(sha256_hex(text))
    .bind(effective_from)
    .bind(&actor.0)
    .bind(count(report.entries))
    .bind(count(report.inserted.len()))
    .bind(count(report.unchanged))
    .bind(count(report.skipped.len()))
    .bind(count(report.invalid.len()))
    .bind(details.to_string())
    .fetch_one(&mut *tx)
    .await?;
    for mut imported in to_insert {
        imported.meta.import_id = Some(import_id);
        insert_price(&mut tx, &imported.price, &imported.meta).await?;
    }
    tx.commit().await?;
    report.import_id = Some(import_id);
    tracing::info!(
        import.id = import_id,
        inserted = report.inserted.len(),
        unchanged = report.unchanged,
        invalid = report.invalid.len(),
        "prices imported"
    );
    Ok(report)
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

async fn versions(conn: &mut PgConnection, source: PriceSource) -> Result<Vec<Price>, sqlx::Error> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        price_columns!(),
        " FROM prices WHERE source = $1"
    ))
    .bind(source.as_str())
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(price_of_row).collect()
}

/// A re-pricing request.
#[derive(Debug, Clone)]
pub struct Reprice {
    /// Inclusive start (request time).
    pub since: OffsetDateTime,
    /// Exclusive end.
    pub until: OffsetDateTime,
    /// Only rows that used this model (`model` or `provider/model`): served it, or spent tokens
    /// on it in an earlier attempt.
    pub model: Option<String>,
    /// Why (recorded in the audit row).
    pub reason: String,
    /// Report without writing.
    pub dry_run: bool,
}

/// What a re-pricing changed (or would change).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepriceReport {
    /// Rows in the period (cache hits included; they keep their cost of 0).
    pub rows_examined: i64,
    /// Rows whose cost changed.
    pub rows_changed: i64,
    /// Rows left as recorded because they cannot be re-priced: more than one attempt, recorded
    /// before the earlier attempts' usage was kept on the row (their cost includes those attempts,
    /// whose tokens are unknown). Counted in the totals below with their recorded cost.
    pub rows_skipped: i64,
    /// Sum of the priced rows' cost before, nano-USD.
    pub old_total_usd_nanos: i128,
    /// After.
    pub new_total_usd_nanos: i128,
    /// Unpriced rows before.
    pub old_unpriced: i64,
    /// After.
    pub new_unpriced: i64,
    /// The `reprice_audits` row; `None` on a dry run.
    pub audit_id: Option<i64>,
}

const PAGE: i64 = 5_000;

/// Re-prices the rows of `[since, until)` with the prices recorded now (configured prices
/// first, then imported), in one transaction: every changed row's cost is updated, and an audit
/// row (who, when, the period, the model filter, the reason, rows examined, changed and skipped,
/// old and new totals and unpriced counts) plus one `reprice_changes` row per changed row (old
/// and new cost) are written. A row is priced as recording prices it ([`request_cost`]): the
/// serving attempt and every earlier attempt that consumed tokens, each at its own price. Cache
/// hits keep their cost of 0. A row with more than one attempt whose earlier attempts' usage is
/// unknown (recorded before it was kept) keeps its recorded cost and is counted in `rows_skipped`.
pub async fn reprice(
    repo: &Repository,
    request: &Reprice,
    actor: &Actor,
) -> Result<RepriceReport, AdminError> {
    if request.since >= request.until {
        return Err(AdminError::Invalid {
            field: "until",
            message: "must be after --since".to_owned(),
        });
    }
    let mut tx = repo.pool().begin().await?;
    // Prices cannot change under us while we re-price.
    sqlx::query("LOCK TABLE prices IN SHARE MODE")
        .execute(&mut *tx)
        .await?;
    let mut all = versions(&mut tx, PriceSource::Config).await?;
    all.extend(versions(&mut tx, PriceSource::Litellm).await?);
    let book = PriceBook::new(all);
    let model = request.model.as_deref().filter(|m| !m.is_empty());

    let mut report = RepriceReport::default();
    let mut changes: Vec<(Uuid, OffsetDateTime, Option<i64>, Option<i64>)> = Vec::new();
    let mut after: Option<(OffsetDateTime, Uuid)> = None;
    loop {
        let rows = sqlx::query(
            "SELECT request_id, time, provider, model, prompt_tokens, cached_prompt_tokens, \
             cache_write_tokens, completion_tokens, reasoning_tokens, cost_usd_nanos, cache, attempts, \
             earlier_attempts::text AS earlier_attempts \
             FROM usage_records \
             WHERE time >= $1 AND time < $2 \
               AND ($3::text IS NULL OR model = $3 OR provider || '/' || model = $3 \
                 OR EXISTS (SELECT 1 FROM jsonb_array_elements(earlier_attempts) a \
                   WHERE a->>'model' = $3 OR (a->>'provider') || '/' || (a->>'model') = $3)) \
               AND ($4::timestamptz IS NULL OR (time, request_id) > ($4, $5)) \
             ORDER BY time, request_id LIMIT $6 FOR UPDATE",
        )
        .bind(request.since)
        .bind(request.until)
        .bind(model)
        .bind(after.map(|(t, _)| t))
        .bind(after.map(|(_, id)| id))
        .bind(PAGE)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else { break };
        after = Some((last.try_get("time")?, last.try_get("request_id")?));
        for row in &rows {
            report.rows_examined += 1;
            let u32_of = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
            let tokens = Tokens {
                prompt: u32_of(row.try_get("prompt_tokens")?),
                cached_prompt: u32_of(row.try_get("cached_prompt_tokens")?),
                cache_write: u32_of(row.try_get("cache_write_tokens")?),
                completion: u32_of(row.try_get("completion_tokens")?),
                reasoning: u32_of(row.try_get("reasoning_tokens")?),
            };
            let old: Option<i64> = row.try_get("cost_usd_nanos")?;
            let cache: String = row.try_get("cache")?;
            let time: OffsetDateTime = row.try_get("time")?;
            let new = if cache == "hit" {
                old
            } else {
                let attempts = u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0);
                let stored =
                    decode_earlier_attempts(row.try_get::<Option<&str>, _>("earlier_attempts")?);
                // An unreadable value is as unknown as a missing one: left as recorded, never guessed.
                let earlier = match &stored {
                    Ok(stored) => known_earlier_attempts(attempts, stored.as_deref()),
                    Err(_) => None,
                };
                match earlier {
                    None => {
                        report.rows_skipped += 1;
                        old
                    }
                    Some(earlier) => {
                        let provider: String = row.try_get("provider")?;
                        let served: String = row.try_get("model")?;
                        request_cost(&provider, &served, tokens, earlier, time, &book).ok()
                    }
                }
            };
            match old {
                Some(cost) => report.old_total_usd_nanos += i128::from(cost),
                None => report.old_unpriced += 1,
            }
            match new {
                Some(cost) => report.new_total_usd_nanos += i128::from(cost),
                None => report.new_unpriced += 1,
            }
            if old != new {
                changes.push((row.try_get("request_id")?, time, old, new));
            }
        }
        if i64::try_from(rows.len()).unwrap_or(i64::MAX) < PAGE {
            break;
        }
    }
    report.rows_changed = i64::try_from(changes.len()).unwrap_or(i64::MAX);
    if request.dry_run {
        tx.rollback().await?;
        return Ok(report);
    }
    let audit_id: i64 = sqlx::query_scalar(
        "INSERT INTO reprice_audits (requested_by, since, until, model, reason, rows_examined, rows_changed, \
         old_total_usd_nanos, new_total_usd_nanos, old_unpriced, new_unpriced, rows_skipped) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8::numeric, $9::numeric, $10, $11, $12) RETURNING id",
    )
    .bind(&actor.0)
    .bind(request.since)
    .bind(request.until)
    .bind(model)
    .bind(&request.reason)
    .bind(report.rows_examined)
    .bind(report.rows_changed)
    .bind(report.old_total_usd_nanos.to_string())
    .bind(report.new_total_usd_nanos.to_string())
    .bind(report.old_unpriced)
    .bind(report.new_unpriced)
    .bind(report.rows_skipped)
    .fetch_one(&mut *tx)
    .await?;
    for chunk in changes.chunks(PAGE as usize) {
        let ids: Vec<Uuid> = chunk.iter().map(|c| c.0).collect();
        let times: Vec<OffsetDateTime> = chunk.iter().map(|c| c.1).collect();
        let old: Vec<Option<i64>> = chunk.iter().map(|c| c.2).collect();
        let new: Vec<Option<i64>> = chunk.iter().map(|c| c.3).collect();
        // The rows, and by the same differences the hourly and daily rollups that counted them.
        // The chunk's time span bounds the partitions the update touches.
        let first = times.iter().min().copied().unwrap_or(request.since);
        let last = times.iter().max().copied().unwrap_or(request.until);
        sqlx::query(REPRICE_ROWS_AND_ROLLUPS)
            .bind(&ids)
            .bind(&times)
            .bind(&old)
            .bind(&new)
            .bind(first)
            .bind(last)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO reprice_changes (audit_id, request_id, old_cost_usd_nanos, new_cost_usd_nanos) \
             SELECT $1, * FROM UNNEST($2::uuid[], $3::int8[], $4::int8[])",
        )
        .bind(audit_id)
        .bind(&ids)
        .bind(&old)
        .bind(&new)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    report.audit_id = Some(audit_id);
    tracing::info!(
        audit.id = audit_id,
        rows.examined = report.rows_examined,
        rows.changed = report.rows_changed,
        rows.skipped = report.rows_skipped,
        "period re-priced"
    );
    Ok(report)
}

/// Sets the new costs by (request id, time), and applies the change of each (cost, unpriced
/// count) to the rollup rows of the rows' hours and days.
const REPRICE_ROWS_AND_ROLLUPS: &str = "\
    WITH c AS (SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::int8[], $4::int8[]) \
        AS c(request_id, time, old_cost, new_cost)), \
    u AS (UPDATE usage_records u SET cost_usd_nanos = c.new_cost FROM c \
        WHERE u.request_id = c.request_id AND u.time = c.time AND u.time >= $5 AND u.time <= $6 \
        RETURNING u.time, u.app, u.team, u.key_id, u.requested_model, u.provider, u.model, \
          COALESCE(c.new_cost, 0) - COALESCE(c.old_cost, 0) AS cost_delta, \
          (c.new_cost IS NULL)::INT - (c.old_cost IS NULL)::INT AS unpriced_delta), \
    hourly AS (UPDATE usage_rollup_hourly r SET cost_usd_nanos = r.cost_usd_nanos + d.cost_delta, \
        unpriced_requests = r.unpriced_requests + d.unpriced_delta \
        FROM (SELECT date_trunc('hour', time, 'UTC') AS bucket, app, team, key_id, requested_model AS route, \
                provider, model, SUM(cost_delta)::BIGINT AS cost_delta, SUM(unpriced_delta)::BIGINT AS unpriced_delta \
              FROM u GROUP BY 1, 2, 3, 4, 5, 6, 7) d \
        WHERE r.bucket = d.bucket AND r.app = d.app AND r.team = d.team AND r.key_id = d.key_id \
          AND r.route = d.route AND r.provider = d.provider AND r.model = d.model) \
    UPDATE usage_rollup_daily r SET cost_usd_nanos = r.cost_usd_nanos + d.cost_delta, \
        unpriced_requests = r.unpriced_requests + d.unpriced_delta \
    FROM (SELECT date_trunc('day', time, 'UTC') AS bucket, app, team, key_id, requested_model AS route, \
            provider, model, SUM(cost_delta)::BIGINT AS cost_delta, SUM(unpriced_delta)::BIGINT AS unpriced_delta \
          FROM u GROUP BY 1, 2, 3, 4, 5, 6, 7) d \
    WHERE r.bucket = d.bucket AND r.app = d.app AND r.team = d.team AND r.key_id = d.key_id \
      AND r.route = d.route AND r.provider = d.provider AND r.model = d.model";

const DATE_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

/// Parses `YYYY-MM-DD`.
pub fn parse_date(field: &'static str, text: &str) -> Result<Date, AdminError> {
    Date::parse(text.trim(), DATE_FORMAT).map_err(|e| AdminError::Invalid {
        field,
        message: format!("{text:?} is not a YYYY-MM-DD date: {e}"),
    })
}

/// Parses an RFC 3339 time (`2026-11-01T00:00:00Z`) or a date (its midnight UTC).
pub fn parse_instant(field: &'static str, text: &str) -> Result<OffsetDateTime, AdminError> {
    let text = text.trim();
    if let Ok(at) = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339) {
        return Ok(at);
    }
    parse_date(field, text)
        .map(|date| date.midnight().assume_utc())
        .map_err(|_| AdminError::Invalid {
            field,
            message: format!("{text:?} is neither an RFC 3339 time nor a YYYY-MM-DD date"),
        })
}
