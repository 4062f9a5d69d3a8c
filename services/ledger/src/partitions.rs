//! Monthly partitions of `usage_records`: created ahead of time and on demand, dropped after the
//! retention period (rollups are kept).
//!
//! The SQL lives in the migration (`ledger_ensure_usage_partition`,
//! `ledger_drop_usage_partitions_before`): creating a month moves its rows out of the default
//! partition, and both take one advisory lock so that several ledgers can run maintenance.

use std::{collections::BTreeSet, sync::Mutex, time::Duration};

use sqlx::PgPool;
use time::{Date, Month, OffsetDateTime};
use tokio_util::sync::CancellationToken;

/// The first day of `date`'s month shifted by `months` (negative: back).
pub fn month_start(date: Date, months: i32) -> Date {
    let index = date.year() * 12 + i32::from(u8::from(date.month())) - 1 + months;
    let year = index.div_euclid(12);
    let month = u8::try_from(index.rem_euclid(12) + 1).unwrap_or(1);
    Month::try_from(month)
        .ok()
        .and_then(|month| Date::from_calendar_date(year, month, 1).ok())
        .unwrap_or(date)
}

/// What a maintenance run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// Months whose partition was created.
    pub created: Vec<Date>,
    /// Partitions dropped by retention.
    pub dropped: Vec<String>,
}

/// Partition maintenance and the months known to exist.
#[derive(Debug)]
pub struct Partitions {
    pool: PgPool,
    retention_months: u32,
    ensured: Mutex<BTreeSet<Date>>,
    /// Per month: rows this process inserted since it last analyzed the partition, and the rows it
    /// knew of then.
    analyzed: Mutex<std::collections::BTreeMap<Date, (u64, u64)>>,
}

/// Rows inserted into a month's partition before this process first analyzes it.
pub const ANALYZE_FIRST_ROWS: u64 = 1_000;

/// Whether a partition with `since` rows inserted since its last analyze, which then had `then`
/// rows, is due for another: the first time after [`ANALYZE_FIRST_ROWS`], then whenever the new
/// rows reach a tenth of the old (autovacuum's own rule, scale factor 0.1).
pub fn analyze_due(since: u64, then: u64) -> bool {
    since >= ANALYZE_FIRST_ROWS.max(then / 10)
}

impl Partitions {
    /// `retention_months` 0 keeps raw rows forever.
    pub fn new(pool: PgPool, retention_months: u32) -> Self {
        Partitions {
            pool,
            retention_months,
            ensured: Mutex::new(BTreeSet::new()),
            analyzed: Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// Counts rows just inserted and analyzes a month's partition when it is due
    /// ([`analyze_due`]). Autovacuum would do it too, but it may be off, and until a new month's
    /// partition has statistics the planner cannot tell that `request_id` is nearly unique: the
    /// insert's same-id probe was then planned (and the plan cached for the connection) on the
    /// `(time, request_id)` index, reading every row of its 14-day window per inserted row, so
    /// Postgres CPU per row grew with the table (220 -> 900 us per row over a 15-minute
    /// benchmark). An analyze invalidates the cached plans, and the next one uses the primary key.
    /// Returns the months analyzed; a failed analyze is logged and tried again at the next threshold.
    pub async fn note_inserted(
        &self,
        times: impl IntoIterator<Item = OffsetDateTime>,
    ) -> Vec<Date> {
        // Due months are claimed under the lock (their count restarts at once), so two batches
        // committing together never analyze the same partition twice.
        let due: Vec<Date> = {
            let mut analyzed = self
                .analyzed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for time in times {
                let month = month_start(time.to_offset(time::UtcOffset::UTC).date(), 0);
                analyzed.entry(month).or_insert((0, 0)).0 += 1;
            }
            analyzed
                .iter_mut()
                .filter(|(_, (since, then))| analyze_due(*since, *then))
                .map(|(month, entry)| {
                    *entry = (0, entry.1 + entry.0);
                    *month
                })
                .collect()
        };
        let mut done = Vec::new();
        for month in due {
            let name = format!(
                "usage_records_p{:04}_{:02}",
                month.year(),
                u8::from(month.month())
            );
            let sql = format!("ANALYZE {name}");
            match sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&self.pool)
                .await
            {
                Ok(_) => {
                    tracing::debug!(partition = %name, "usage partition analyzed");
                    done.push(month);
                }
                // Tried again when a tenth more rows have come (a month without its partition,
                // for one, has its rows in the default partition).
                Err(error) => {
                    tracing::warn!(%error, partition = %name, "cannot analyze a usage partition");
                }
            }
        }
        done
    }

    /// The first month whose raw rows are kept at `now` (`None`: every month).
    pub fn cutoff(&self, now: OffsetDateTime) -> Option<Date> {
        (self.retention_months > 0).then(|| {
            month_start(
                now.to_offset(time::UtcOffset::UTC).date(),
                -i32::try_from(self.retention_months).unwrap_or(i32::MAX),
            )
        })
    }

    /// Makes sure the month of `date` has its partition; true when it was created now.
    pub async fn ensure_month(&self, date: Date) -> Result<bool, sqlx::Error> {
        let month = month_start(date, 0);
        if self.known(month) {
            return Ok(false);
        }
        let created: bool = sqlx::query_scalar("SELECT ledger_ensure_usage_partition($1)")
            .bind(month)
            .fetch_one(&self.pool)
            .await?;
        if created {
            tracing::info!(partition.month = %month, "usage partition created");
        }
        self.ensured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(month);
        Ok(created)
    }

    fn known(&self, month: Date) -> bool {
        self.ensured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&month)
    }

    /// Makes sure the months of `times` have partitions before their rows are inserted (a month
    /// older than the retention cutoff gets none: such rows go to the default partition, which
    /// the next retention run empties). One query per month not seen before.
    pub async fn ensure_for(
        &self,
        times: impl IntoIterator<Item = OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        let cutoff = self.cutoff(now);
        let months: BTreeSet<Date> = times
            .into_iter()
            .map(|t| month_start(t.to_offset(time::UtcOffset::UTC).date(), 0))
            .filter(|month| cutoff.is_none_or(|cutoff| *month >= cutoff))
            .filter(|month| !self.known(*month))
            .collect();
        for month in months {
            self.ensure_month(month).await?;
        }
        Ok(())
    }

    /// Creates the current month's and the next `ahead` months' partitions, and drops the
    /// partitions older than the retention period.
    pub async fn maintain(
        &self,
        now: OffsetDateTime,
        ahead: u32,
    ) -> Result<Maintenance, sqlx::Error> {
        let mut done = Maintenance::default();
        let today = now.to_offset(time::UtcOffset::UTC).date();
        for i in 0..=ahead {
            let month = month_start(today, i32::try_from(i).unwrap_or(0));
            if self.ensure_month(month).await? {
                done.created.push(month);
            }
        }
        if let Some(cutoff) = self.cutoff(now) {
            done.dropped = sqlx::query_scalar("SELECT ledger_drop_usage_partitions_before($1)")
                .bind(cutoff)
                .fetch_all(&self.pool)
                .await?;
            self.ensured
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|month| *month >= cutoff);
            for partition in &done.dropped {
                tracing::info!(%partition, retention.cutoff = %cutoff, "usage partition dropped by retention");
            }
        }
        Ok(done)
    }
}

/// Runs [`Partitions::maintain`] at once and then every `every` until `cancel` fires; a failed run
/// is logged and retried at the next tick.
pub async fn maintenance_loop(
    partitions: std::sync::Arc<Partitions>,
    every: Duration,
    ahead: u32,
    cancel: CancellationToken,
) {
    loop {
        if let Err(error) = partitions.maintain(OffsetDateTime::now_utc(), ahead).await {
            tracing::warn!(%error, "usage partition maintenance failed; retrying later");
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn months_shift_across_years() {
        assert_eq!(month_start(date!(2026 - 11 - 26), 0), date!(2026 - 11 - 01));
        assert_eq!(month_start(date!(2026 - 11 - 26), 2), date!(2027 - 01 - 01));
        assert_eq!(
            month_start(date!(2026 - 01 - 31), -1),
            date!(2025 - 12 - 01)
        );
        assert_eq!(
            month_start(date!(2026 - 03 - 15), -14),
            date!(2025 - 01 - 01)
        );
    }
}
