//! Storage for years of traffic: monthly partitions, exactly-once rows, rollups that always equal
//! a GROUP BY over the raw rows (also after a re-pricing), and retention that keeps rollups.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use sqlx::Row as _;
use switchboard_ledger::{
    internals::{
        AttemptUsage, Dimension, Filter, Partitions, Rate, Rates, Repository, Source, SpendQuery,
        Tokens, UsageRow, query_spend,
    },
    prices::{self, Actor, Reprice},
};
use switchboard_proto::ledger::v1::{CacheOutcome, RequestStatus};
use switchboard_testkit::TestPg;
use time::{Duration, OffsetDateTime, macros::datetime};
use uuid::Uuid;

async fn repo() -> (Repository, TestPg) {
    let pg = TestPg::create().await.expect("postgres");
    let repo = Repository::connect(&pg.url, 4).await.expect("connect");
    (repo, pg)
}

fn row(time: OffsetDateTime, app: &str, model: &str, cost: Option<i64>) -> UsageRow {
    UsageRow {
        request_id: Uuid::now_v7(),
        time,
        app: app.into(),
        team: format!("team-{app}"),
        key_id: "key_1".into(),
        requested_model: "fast".into(),
        provider: "openai".into(),
        model: model.into(),
        attempts: 1,
        tokens: Tokens {
            prompt: 100,
            cached_prompt: 10,
            cache_write: 5,
            completion: 50,
            reasoning: 7,
        },
        earlier_attempts: None,
        cost_usd_nanos: cost,
        saved_usd_nanos: 0,
        cache: CacheOutcome::Miss,
        status: RequestStatus::Ok,
        error_code: String::new(),
        streamed: false,
        latency_ms: 12,
        trace_id: String::new(),
        tags: BTreeMap::new(),
    }
}

async fn partition_of(repo: &Repository, id: Uuid) -> String {
    sqlx::query_scalar("SELECT tableoid::regclass::text FROM usage_records WHERE request_id = $1")
        .bind(id)
        .fetch_one(repo.pool())
        .await
        .unwrap()
}

async fn scalar(repo: &Repository, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(repo.pool())
        .await
        .unwrap()
}

/// Rows of the rollup that differ from a GROUP BY over the raw rows (both directions).
async fn rollup_mismatches(repo: &Repository, table: &str, unit: &str) -> i64 {
    let grouped = format!(
        "SELECT date_trunc('{unit}', time, 'UTC') AS bucket, app, team, key_id, requested_model, provider, model, \
           COUNT(*)::BIGINT, SUM(prompt_tokens)::BIGINT, SUM(completion_tokens)::BIGINT, \
           SUM(cached_prompt_tokens)::BIGINT, SUM(cache_write_tokens)::BIGINT, SUM(reasoning_tokens)::BIGINT, \
           COALESCE(SUM(cost_usd_nanos), 0)::BIGINT, COUNT(*) FILTER (WHERE cost_usd_nanos IS NULL)::BIGINT, \
           SUM(saved_usd_nanos)::BIGINT, COUNT(*) FILTER (WHERE status = 'error')::BIGINT, \
           COUNT(*) FILTER (WHERE cache = 'hit')::BIGINT \
         FROM usage_records GROUP BY 1, 2, 3, 4, 5, 6, 7"
    );
    let rollup = format!(
        "SELECT bucket, app, team, key_id, route, provider, model, requests, prompt_tokens, completion_tokens, \
           cached_prompt_tokens, cache_write_tokens, reasoning_tokens, cost_usd_nanos, unpriced_requests, \
           saved_usd_nanos, error_requests, cache_hits FROM {table}"
    );
    let sql = format!(
        "SELECT COUNT(*) FROM (({rollup} EXCEPT {grouped}) UNION ALL ({grouped} EXCEPT {rollup})) AS diff"
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(repo.pool())
        .await
        .unwrap()
}

/// When the partition was last analyzed (by anyone), from the statistics collector.
async fn last_analyze(repo: &Repository, partition: &str) -> Option<OffsetDateTime> {
    sqlx::query_scalar(
        "SELECT GREATEST(last_analyze, last_autoanalyze) FROM pg_stat_user_tables WHERE relname = $1",
    )
    .bind(partition)
    .fetch_optional(repo.pool())
    .await
    .unwrap()
    .flatten()
}

#[tokio::test]
async fn a_partition_is_analyzed_once_it_has_rows_and_again_after_a_tenth_more() {
    use switchboard_ledger::internals::{ANALYZE_FIRST_ROWS, analyze_due};
    assert!(!analyze_due(ANALYZE_FIRST_ROWS - 1, 0));
    assert!(analyze_due(ANALYZE_FIRST_ROWS, 0));
    assert!(!analyze_due(ANALYZE_FIRST_ROWS, 100_000));
    assert!(analyze_due(10_000, 100_000));

    let (repo, _pg) = repo().await;
    let partitions = Partitions::new(repo.pool().clone(), 0);
    let time = datetime!(2026-04-10 08:00 UTC);
    partitions
        .ensure_for([time], OffsetDateTime::now_utc())
        .await
        .unwrap();
    let rows: Vec<UsageRow> = (0..ANALYZE_FIRST_ROWS)
        .map(|i| {
            row(
                time + Duration::seconds(i64::try_from(i).unwrap()),
                "a",
                "m",
                Some(1),
            )
        })
        .collect();
    repo.insert_batch(&rows[..10]).await.unwrap();
    // Ten rows: not due yet.
    assert!(
        partitions
            .note_inserted(rows[..10].iter().map(|r| r.time))
            .await
            .is_empty()
    );
    assert_eq!(last_analyze(&repo, "usage_records_p2026_04").await, None);
    repo.insert_batch(&rows[10..]).await.unwrap();
    let analyzed = partitions
        .note_inserted(rows[10..].iter().map(|r| r.time))
        .await;
    assert_eq!(analyzed, vec![time::macros::date!(2026 - 04 - 01)]);
    // The statistics collector reports it asynchronously: wait for it (bounded).
    let mut seen = None;
    for _ in 0..100 {
        seen = last_analyze(&repo, "usage_records_p2026_04").await;
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(seen.is_some(), "the partition was not analyzed");
    // Right after an analyze, a few more rows are not due again.
    assert!(partitions.note_inserted([time]).await.is_empty());
}

#[tokio::test]
async fn rows_land_in_their_monthly_partition_and_late_months_leave_the_default() {
    let (repo, pg) = repo().await;
    let partitions = Partitions::new(repo.pool().clone(), 0);
    let january = row(datetime!(2026-01-31 23:59:59 UTC), "a", "m", Some(1));
    let february = row(datetime!(2026-02-01 00:00 UTC), "a", "m", Some(1));
    partitions
        .ensure_for([january.time, february.time], OffsetDateTime::now_utc())
        .await
        .unwrap();
    repo.insert_batch(&[january.clone(), february.clone()])
        .await
        .unwrap();
    assert_eq!(
        partition_of(&repo, january.request_id).await,
        "usage_records_p2026_01"
    );
    assert_eq!(
        partition_of(&repo, february.request_id).await,
        "usage_records_p2026_02"
    );

    // A month without a partition goes to the default one; creating the month moves its rows.
    // (With an earlier attempt's usage: the moved row keeps every column.)
    let mut march = row(datetime!(2026-03-10 08:00 UTC), "a", "m", Some(1));
    march.attempts = 2;
    march.earlier_attempts = Some(vec![AttemptUsage {
        provider: "primary".into(),
        model: "m".into(),
        tokens: Tokens {
            prompt: 10,
            completion: 3,
            ..Tokens::default()
        },
    }]);
    repo.insert_batch(std::slice::from_ref(&march))
        .await
        .unwrap();
    assert_eq!(
        partition_of(&repo, march.request_id).await,
        "usage_records_default"
    );
    assert!(
        partitions
            .ensure_month(time::macros::date!(2026 - 03 - 01))
            .await
            .unwrap()
    );
    assert_eq!(
        partition_of(&repo, march.request_id).await,
        "usage_records_p2026_03"
    );
    assert_eq!(repo.get(march.request_id).await.unwrap(), Some(march));
    assert_eq!(
        scalar(&repo, "SELECT COUNT(*) FROM usage_records_default").await,
        0
    );
    pg.drop_db().await;
}

#[tokio::test]
async fn a_redelivered_event_makes_one_row_and_counts_once_in_the_rollups() {
    let (repo, pg) = repo().await;
    let first = row(datetime!(2026-01-10 10:20 UTC), "a", "m", Some(1_000));
    assert_eq!(
        repo.record_batch(std::slice::from_ref(&first))
            .await
            .unwrap(),
        vec![first.request_id]
    );
    // Redelivered (alone, and within a batch with a new row): nothing inserted for it.
    assert!(
        repo.record_batch(std::slice::from_ref(&first))
            .await
            .unwrap()
            .is_empty()
    );
    let other = row(datetime!(2026-01-10 10:40 UTC), "a", "m", Some(500));
    assert_eq!(
        repo.record_batch(&[first.clone(), other.clone()])
            .await
            .unwrap(),
        vec![other.request_id]
    );
    // The same request id with another time (a bug upstream) is refused within 7 days.
    let mut moved = first.clone();
    moved.time += Duration::days(3);
    assert!(
        repo.record_batch(std::slice::from_ref(&moved))
            .await
            .unwrap()
            .is_empty()
    );
    // And twice in one batch: once.
    let twice = row(datetime!(2026-01-10 11:05 UTC), "a", "m", Some(7));
    let mut twice_later = twice.clone();
    twice_later.time += Duration::minutes(1);
    assert_eq!(
        repo.record_batch(&[twice.clone(), twice_later])
            .await
            .unwrap(),
        vec![twice.request_id]
    );

    assert_eq!(scalar(&repo, "SELECT COUNT(*) FROM usage_records").await, 3);
    let (requests, cost): (i64, i64) = sqlx::query_as(
        "SELECT requests, cost_usd_nanos FROM usage_rollup_hourly WHERE bucket = '2026-01-10 10:00Z'",
    )
    .fetch_one(repo.pool())
    .await
    .unwrap();
    assert_eq!((requests, cost), (2, 1_500));
    assert_eq!(
        rollup_mismatches(&repo, "usage_rollup_hourly", "hour").await,
        0
    );
    assert_eq!(
        rollup_mismatches(&repo, "usage_rollup_daily", "day").await,
        0
    );
    pg.drop_db().await;
}

/// A small deterministic generator (xorshift64*), so that failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[usize::try_from(self.below(items.len() as u64)).unwrap()]
    }
}

fn random_row(rng: &mut Rng) -> UsageRow {
    let start = datetime!(2026-01-20 00:00 UTC);
    let time = start + Duration::seconds(i64::try_from(rng.below(60 * 86_400)).unwrap());
    let cost = match rng.below(5) {
        0 => None,
        _ => Some(i64::try_from(rng.below(5_000_000)).unwrap()),
    };
    let mut row = row(
        time,
        rng.pick(&["billing", "search", "chat"]),
        rng.pick(&["gpt-4o", "gpt-4o-mini", "claude"]),
        cost,
    );
    row.team = rng.pick(&["finance", "platform"]).into();
    row.key_id = rng.pick(&["k1", "k2", "k3", "k4"]).into();
    row.requested_model = rng.pick(&["fast", "smart"]).into();
    row.provider = rng.pick(&["openai", "azure"]).into();
    row.tokens = Tokens {
        prompt: u32::try_from(rng.below(10_000)).unwrap() + 100,
        cached_prompt: u32::try_from(rng.below(100)).unwrap(),
        cache_write: u32::try_from(rng.below(50)).unwrap(),
        completion: u32::try_from(rng.below(2_000)).unwrap() + 10,
        reasoning: u32::try_from(rng.below(10)).unwrap(),
    };
    // Some requests fell back after an attempt that used tokens (priced again by a re-pricing);
    // a few were recorded before that usage was kept (left as recorded by a re-pricing).
    match rng.below(10) {
        0 | 1 => {
            row.attempts = 2;
            row.earlier_attempts = Some(vec![AttemptUsage {
                provider: rng.pick(&["openai", "azure"]).into(),
                model: rng.pick(&["gpt-4o", "claude"]).into(),
                tokens: Tokens {
                    prompt: u32::try_from(rng.below(1_000)).unwrap() + 1,
                    completion: u32::try_from(rng.below(100)).unwrap(),
                    ..Tokens::default()
                },
            }]);
        }
        2 => row.attempts = 3,
        _ => {}
    }
    if rng.below(10) == 0 {
        row.status = RequestStatus::Error;
    }
    if rng.below(8) == 0 {
        row.cache = CacheOutcome::Hit;
        row.cost_usd_nanos = Some(0);
        row.saved_usd_nanos = i64::try_from(rng.below(1_000_000)).unwrap();
    }
    row
}

#[tokio::test]
async fn rollups_equal_a_group_by_over_raw_rows_after_random_mixed_batches_and_a_reprice() {
    let (repo, pg) = repo().await;
    let partitions = Partitions::new(repo.pool().clone(), 0);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut sent: Vec<UsageRow> = Vec::new();
    let mut unique = 0;
    for _ in 0..40 {
        let size = rng.below(60) + 1;
        let mut batch = Vec::new();
        for _ in 0..size {
            // A third of the rows are redeliveries of rows sent before.
            if !sent.is_empty() && rng.below(3) == 0 {
                let i = usize::try_from(rng.below(sent.len() as u64)).unwrap();
                batch.push(sent[i].clone());
            } else {
                let row = random_row(&mut rng);
                sent.push(row.clone());
                unique += 1;
                batch.push(row);
            }
        }
        partitions
            .ensure_for(batch.iter().map(|r| r.time), OffsetDateTime::now_utc())
            .await
            .unwrap();
        repo.record_batch(&batch).await.unwrap();
    }
    assert_eq!(
        scalar(&repo, "SELECT COUNT(*) FROM usage_records").await,
        unique
    );
    assert!(scalar(&repo, "SELECT COUNT(*) FROM usage_rollup_hourly").await > 100);
    assert_eq!(
        rollup_mismatches(&repo, "usage_rollup_hourly", "hour").await,
        0
    );
    assert_eq!(
        rollup_mismatches(&repo, "usage_rollup_daily", "day").await,
        0
    );

    // Re-pricing changes costs (and priced/unpriced status) and the rollups follow.
    repo.sync_prices(&[switchboard_ledger::internals::Price::configured(
        "*",
        "gpt-4o",
        time::macros::date!(2024 - 01 - 01),
        Rates::flat(Rate(1_000_000_000), Rate(500_000_000), Rate(2_000_000_000)),
    )])
    .await
    .unwrap();
    let report = prices::reprice(
        &repo,
        &Reprice {
            since: datetime!(2026-01-01 00:00 UTC),
            until: datetime!(2026-04-01 00:00 UTC),
            model: None,
            reason: "test".into(),
            dry_run: false,
        },
        &Actor("test".into()),
    )
    .await
    .unwrap();
    assert!(report.rows_changed > 50, "{report:?}");
    assert!(report.rows_skipped > 5, "{report:?}");
    assert_eq!(
        rollup_mismatches(&repo, "usage_rollup_hourly", "hour").await,
        0
    );
    assert_eq!(
        rollup_mismatches(&repo, "usage_rollup_daily", "day").await,
        0
    );

    // A spend query over an unaligned range (raw edges + hourly + daily) equals the raw sum.
    let (start, end) = (
        datetime!(2026-01-25 13:17 UTC),
        datetime!(2026-03-02 05:41 UTC),
    );
    let answer = query_spend(
        repo.pool(),
        &SpendQuery {
            start,
            end,
            group_by: vec![Dimension::Team, Dimension::Month],
            tag_key: None,
            filter: Filter::default(),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        answer.sources,
        vec![Source::RollupDaily, Source::RollupHourly, Source::Raw]
    );
    let (requests, cost, unpriced): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(cost_usd_nanos), 0)::BIGINT, COUNT(*) FILTER (WHERE cost_usd_nanos IS NULL) \
         FROM usage_records WHERE time >= $1 AND time < $2",
    )
    .bind(start)
    .bind(end)
    .fetch_one(repo.pool())
    .await
    .unwrap();
    assert!(requests > 100);
    assert_eq!(
        (
            answer.total.requests,
            answer.total.cost_usd_nanos,
            answer.total.unpriced_requests
        ),
        (requests, cost, unpriced)
    );
    pg.drop_db().await;
}

#[tokio::test]
async fn retention_drops_old_partitions_and_keeps_their_rollups() {
    let (repo, pg) = repo().await;
    let partitions = Partitions::new(repo.pool().clone(), 2);
    let now = datetime!(2026-06-10 12:00 UTC);
    let old = row(datetime!(2026-03-15 09:00 UTC), "a", "m", Some(2_000));
    let kept = row(datetime!(2026-04-01 00:00 UTC), "a", "m", Some(3_000));
    // March's partition was made back in March; April's now.
    partitions
        .ensure_month(time::macros::date!(2026 - 03 - 01))
        .await
        .unwrap();
    partitions.ensure_for([kept.time], now).await.unwrap();
    repo.insert_batch(&[old.clone(), kept.clone()])
        .await
        .unwrap();

    let done = partitions.maintain(now, 2).await.unwrap();
    assert_eq!(done.dropped, vec!["usage_records_p2026_03".to_owned()]);
    assert!(done.created.contains(&time::macros::date!(2026 - 08 - 01)));
    assert_eq!(scalar(&repo, "SELECT COUNT(*) FROM usage_records").await, 1);
    assert!(repo.get(old.request_id).await.unwrap().is_none());
    assert!(repo.get(kept.request_id).await.unwrap().is_some());

    // March is still reported, from the daily rollup.
    let march = query_spend(
        repo.pool(),
        &SpendQuery {
            start: datetime!(2026-03-01 00:00 UTC),
            end: datetime!(2026-04-01 00:00 UTC),
            group_by: vec![Dimension::App],
            tag_key: None,
            filter: Filter::default(),
        },
    )
    .await
    .unwrap();
    assert_eq!(march.sources, vec![Source::RollupDaily]);
    assert_eq!(march.groups.len(), 1);
    assert_eq!(
        (march.total.requests, march.total.cost_usd_nanos),
        (1, 2_000)
    );
    // An event of a month beyond retention gets no partition back (it waits in the default one).
    let late = row(datetime!(2026-02-01 00:00 UTC), "a", "m", Some(1));
    partitions.ensure_for([late.time], now).await.unwrap();
    repo.insert_batch(std::slice::from_ref(&late))
        .await
        .unwrap();
    assert_eq!(
        partition_of(&repo, late.request_id).await,
        "usage_records_default"
    );
    // Maintenance is idempotent and empties old rows from the default partition.
    let again = partitions.maintain(now, 2).await.unwrap();
    assert!(again.dropped.is_empty() && again.created.is_empty());
    assert_eq!(
        scalar(&repo, "SELECT COUNT(*) FROM usage_records_default").await,
        0
    );
    pg.drop_db().await;
}

#[tokio::test]
async fn bi_views_show_exact_usd() {
    let (repo, pg) = repo().await;
    let priced = row(
        datetime!(2026-01-10 10:20 UTC),
        "a",
        "m",
        Some(1_234_567_891),
    );
    let unpriced = row(datetime!(2026-01-10 10:30 UTC), "a", "mystery", None);
    repo.insert_batch(&[priced.clone(), unpriced.clone()])
        .await
        .unwrap();
    let usd: String =
        sqlx::query_scalar("SELECT cost_usd::text FROM v_usage WHERE request_id = $1")
            .bind(priced.request_id)
            .fetch_one(repo.pool())
            .await
            .unwrap();
    assert_eq!(usd, "1.2345678910000000");
    let daily: (bool, i64) = sqlx::query_as(
        "SELECT SUM(cost_usd) = 1.234567891, SUM(unpriced_requests)::BIGINT FROM v_spend_daily \
         WHERE day = '2026-01-10'",
    )
    .fetch_one(repo.pool())
    .await
    .unwrap();
    assert_eq!(daily, (true, 1));
    let hourly: i64 = sqlx::query_scalar(
        "SELECT SUM(requests)::BIGINT FROM v_spend_hourly WHERE hour = '2026-01-10 10:00Z'",
    )
    .fetch_one(repo.pool())
    .await
    .unwrap();
    assert_eq!(hourly, 2);
    let listed: Vec<Uuid> = sqlx::query_scalar("SELECT request_id FROM v_unpriced")
        .fetch_all(repo.pool())
        .await
        .unwrap();
    assert_eq!(listed, vec![unpriced.request_id]);
    pg.drop_db().await;
}

#[tokio::test]
async fn the_migration_moves_existing_rows_into_partitions_and_rolls_them_up() {
    let pg = TestPg::create().await.expect("postgres");
    // The schema before partitioning: the first two migrations only.
    let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
    let mut before = sqlx::migrate!("./migrations");
    before.migrations = std::borrow::Cow::Owned(
        before
            .migrations
            .iter()
            .filter(|m| m.version < 20261126000001)
            .cloned()
            .collect(),
    );
    assert_eq!(before.migrations.len(), 2);
    before.run(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO usage_records (request_id, time, app, team, key_id, requested_model, provider, model, \
           attempts, prompt_tokens, completion_tokens, cached_prompt_tokens, cost_usd_nanos, cache, status, \
           streamed, latency_ms, trace_id, tags, cache_write_tokens, reasoning_tokens) VALUES \
         ('0195f0e2-7f4c-7000-8000-000000000001', '2025-03-01 12:00Z', 'billing', 'finance', 'k', 'fast', \
           'openai', 'gpt-4o', 1, 100, 10, 5, 700, 'miss', 'ok', false, 3, 'abc', '{\"env\":\"prod\"}', 2, 1), \
         ('0195f0e2-7f4c-7000-8000-000000000002', '2025-03-01 12:30Z', 'billing', 'finance', 'k', 'fast', \
           'openai', 'gpt-4o', 1, 100, 10, 0, NULL, 'miss', 'error', true, 3, '', '{}', 0, 0), \
         ('0195f0e2-7f4c-7000-8000-000000000003', '2025-04-02 00:00Z', 'search', 'platform', 'k', 'smart', \
           'openai', 'gpt-4o', 1, 50, 5, 0, 40, 'hit', 'ok', false, 3, '', '{}', 0, 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    // The ledger's start runs the rest.
    let repo = Repository::connect(&pg.url, 2).await.unwrap();
    let id = Uuid::parse_str("0195f0e2-7f4c-7000-8000-000000000001").unwrap();
    assert_eq!(partition_of(&repo, id).await, "usage_records_p2025_03");
    let moved = repo.get(id).await.unwrap().unwrap();
    assert_eq!(
        (
            moved.cost_usd_nanos,
            moved.tokens.cache_write,
            moved.tokens.reasoning,
            moved.tags.get("env").map(String::as_str)
        ),
        (Some(700), 2, 1, Some("prod"))
    );
    assert_eq!(scalar(&repo, "SELECT COUNT(*) FROM usage_records").await, 3);
    assert_eq!(
        scalar(
            &repo,
            "SELECT COUNT(*) FROM pg_class WHERE relname = 'usage_records_unpartitioned'"
        )
        .await,
        0
    );
    let (requests, cost, unpriced, errors): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT requests, cost_usd_nanos, unpriced_requests, error_requests FROM usage_rollup_hourly \
         WHERE bucket = '2025-03-01 12:00Z'",
    )
    .fetch_one(repo.pool())
    .await
    .unwrap();
    assert_eq!((requests, cost, unpriced, errors), (2, 700, 1, 1));
    assert_eq!(
        rollup_mismatches(&repo, "usage_rollup_hourly", "hour").await,
        0
    );
    assert_eq!(
        rollup_mismatches(&repo, "usage_rollup_daily", "day").await,
        0
    );
    repo.pool().close().await;
    pg.drop_db().await;
}

/// The rollup measures of one bucket of `table` (one key in these tests), in the table's order.
async fn bucket_measures(repo: &Repository, table: &str, bucket: OffsetDateTime) -> Vec<[i64; 11]> {
    let sql = format!(
        "SELECT requests, prompt_tokens, completion_tokens, cached_prompt_tokens, cache_write_tokens, \
           reasoning_tokens, cost_usd_nanos, unpriced_requests, saved_usd_nanos, error_requests, cache_hits \
         FROM {table} WHERE bucket = $1"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(bucket)
        .fetch_all(repo.pool())
        .await
        .unwrap();
    rows.iter()
        .map(|r| std::array::from_fn(|i| r.get::<i64, _>(i)))
        .collect()
}

/// The expected rollup measures of `rows`, summed here one by one.
fn sums(rows: &[UsageRow]) -> [i64; 11] {
    let mut m = [0i64; 11];
    for r in rows {
        m[0] += 1;
        m[1] += i64::from(r.tokens.prompt);
        m[2] += i64::from(r.tokens.completion);
        m[3] += i64::from(r.tokens.cached_prompt);
        m[4] += i64::from(r.tokens.cache_write);
        m[5] += i64::from(r.tokens.reasoning);
        m[6] += r.cost_usd_nanos.unwrap_or(0);
        m[7] += i64::from(r.cost_usd_nanos.is_none());
        m[8] += r.saved_usd_nanos;
        m[9] += i64::from(r.status == RequestStatus::Error);
        m[10] += i64::from(r.cache == CacheOutcome::Hit);
    }
    m
}

/// Every rollup row of both tables, in key order.
async fn all_rollups(repo: &Repository) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT format('%s %s', 'hourly', r::text) FROM usage_rollup_hourly r \
         UNION ALL SELECT format('%s %s', 'daily', r::text) FROM usage_rollup_daily r ORDER BY 1",
    )
    .fetch_all(repo.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn many_rows_folding_into_one_rollup_row_give_exact_sums_and_a_redelivered_batch_changes_nothing()
 {
    let (repo, pg) = repo().await;
    let nine = datetime!(2026-01-12 09:00 UTC);
    let five_pm = datetime!(2026-01-12 17:00 UTC);
    // 500 rows of one key in one hour with different measures (costs above 2^53: exact integer
    // sums, no float on the way), then 3 rows of the same key in another hour of the same day.
    let mut rows: Vec<UsageRow> = (0..500u32)
        .map(|i| {
            let cost = match i % 5 {
                0 => None,
                1 => Some(9_007_199_254_740_993),
                _ => Some(1_000_003 * i64::from(i)),
            };
            let mut r = row(nine + Duration::seconds(i64::from(i) * 7), "a", "m", cost);
            r.tokens = Tokens {
                prompt: 1_000 + i,
                cached_prompt: i % 13,
                cache_write: i % 3,
                completion: 2 * i,
                reasoning: i % 11,
            };
            r.saved_usd_nanos = i64::from(i % 4) * 999;
            if i % 9 == 0 {
                r.status = RequestStatus::Error;
            }
            if i % 6 == 0 {
                r.cache = CacheOutcome::Hit;
            }
            r
        })
        .collect();
    rows.extend((0..3).map(|i| row(five_pm + Duration::minutes(i), "a", "m", Some(5))));
    assert_eq!(repo.insert_batch(&rows).await.unwrap(), 503);

    assert_eq!(
        bucket_measures(&repo, "usage_rollup_hourly", nine).await,
        vec![sums(&rows[..500])]
    );
    assert_eq!(
        bucket_measures(&repo, "usage_rollup_hourly", five_pm).await,
        vec![sums(&rows[500..])]
    );
    assert_eq!(
        bucket_measures(&repo, "usage_rollup_daily", datetime!(2026-01-12 00:00 UTC)).await,
        vec![sums(&rows)]
    );
    assert_eq!(
        scalar(&repo, "SELECT COUNT(*) FROM usage_rollup_hourly").await,
        2
    );
    assert_eq!(
        scalar(&repo, "SELECT COUNT(*) FROM usage_rollup_daily").await,
        1
    );

    // Redelivered: the same batch, whole and in reverse order, inserts nothing and adds nothing.
    let before = all_rollups(&repo).await;
    assert_eq!(repo.insert_batch(&rows).await.unwrap(), 0);
    let reversed: Vec<UsageRow> = rows.iter().rev().cloned().collect();
    assert_eq!(repo.insert_batch(&reversed).await.unwrap(), 0);
    assert_eq!(all_rollups(&repo).await, before);

    // Half of it redelivered with 4 new rows of the same rollup row: only the new rows count.
    let fresh: Vec<UsageRow> = (0..4)
        .map(|i| row(nine + Duration::minutes(59), "a", "m", Some(1_000 + i)))
        .collect();
    let mut mixed = rows[..250].to_vec();
    mixed.extend(fresh.iter().cloned());
    assert_eq!(repo.insert_batch(&mixed).await.unwrap(), 4);
    let mut expected: Vec<UsageRow> = rows[..500].to_vec();
    expected.extend(fresh);
    assert_eq!(
        bucket_measures(&repo, "usage_rollup_hourly", nine).await,
        vec![sums(&expected)]
    );
    assert_eq!(
        rollup_mismatches(&repo, "usage_rollup_hourly", "hour").await,
        0
    );
    assert_eq!(
        rollup_mismatches(&repo, "usage_rollup_daily", "day").await,
        0
    );
    pg.drop_db().await;
}
