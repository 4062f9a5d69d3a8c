//! Price administration against a real Postgres: LiteLLM imports (versions, dry runs, conflicts,
//! configured overrides, the real file), re-pricing with its audit rows, and an App that reloads
//! prices without a restart and lists unpriced usage.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_bus::{UsageEvent, publish_usage};
use switchboard_ledger::{
    App, Config, PriceConfig,
    internals::{Price, Rate, Rates, Repository, Tokens, price_event},
    prices::{self, Actor, Reprice},
};
use switchboard_proto::{
    Timestamp,
    chat::v1::{Attempt, RouteInfo, Usage},
    ledger::v1::{
        CacheOutcome, GetUsageRecordRequest, ListUnpricedRequest, RequestStatus,
        ledger_service_client::LedgerServiceClient,
    },
};
use switchboard_testkit::{TestNats, TestPg};
use time::{
    OffsetDateTime,
    macros::{date, datetime},
};

const EXCERPT: &str = include_str!("fixtures/litellm_excerpt.json");
const REAL_FILE: &str =
    "/work/shared/eval/model_prices/model_prices_and_context_window.litellm-1.110.2.json";

fn actor() -> Actor {
    Actor("test-operator".to_owned())
}

async fn repo() -> (Repository, TestPg) {
    let pg = TestPg::create().await.expect("postgres");
    let repo = Repository::connect(&pg.url, 4).await.expect("connect");
    (repo, pg)
}

async fn count(repo: &Repository, table: &str) -> i64 {
    let sql = match table {
        "prices" => "SELECT COUNT(*) FROM prices",
        "price_imports" => "SELECT COUNT(*) FROM price_imports",
        "reprice_audits" => "SELECT COUNT(*) FROM reprice_audits",
        "reprice_changes" => "SELECT COUNT(*) FROM reprice_changes",
        other => panic!("unknown table {other}"),
    };
    sqlx::query_scalar(sql)
        .fetch_one(repo.pool())
        .await
        .unwrap()
}

fn input_at(
    book: &switchboard_ledger::internals::PriceBook,
    provider: &str,
    model: &str,
    at: OffsetDateTime,
) -> Option<i64> {
    book.lookup(provider, model, at).map(|p| p.base.input.0)
}

#[tokio::test]
async fn import_adds_versions_only_where_a_price_changed() {
    let (repo, pg) = repo().await;
    let from = date!(2025 - 11 - 01);

    // A dry run reports and writes nothing.
    let dry = prices::import_litellm(&repo, "excerpt.json", EXCERPT, from, &actor(), true)
        .await
        .unwrap();
    assert_eq!(
        (
            dry.entries,
            dry.inserted.len(),
            dry.unchanged,
            dry.skipped.len(),
            dry.invalid.len(),
            dry.rounded.len()
        ),
        (14, 6, 0, 2, 6, 2)
    );
    assert_eq!(dry.import_id, None);
    assert_eq!(count(&repo, "prices").await, 0);
    assert_eq!(count(&repo, "price_imports").await, 0);

    let first = prices::import_litellm(&repo, "excerpt.json", EXCERPT, from, &actor(), false)
        .await
        .unwrap();
    assert_eq!(first.inserted.len(), 6);
    assert!(first.import_id.is_some());
    assert_eq!(count(&repo, "prices").await, 6);
    let (who, invalid, report): (String, i32, String) =
        sqlx::query_as("SELECT imported_by, invalid, report::text FROM price_imports")
            .fetch_one(repo.pool())
            .await
            .unwrap();
    assert_eq!((who.as_str(), invalid), ("test-operator", 6));
    assert!(
        report.contains(r#"$[\"bad/negative\"].input_cost_per_token"#),
        "{report}"
    );

    // The same file again, same or later date: nothing changed, nothing added.
    for again in [from, date!(2025 - 12 - 01)] {
        let report = prices::import_litellm(&repo, "excerpt.json", EXCERPT, again, &actor(), false)
            .await
            .unwrap();
        assert_eq!((report.inserted.len(), report.unchanged), (0, 6), "{again}");
    }
    assert_eq!(count(&repo, "prices").await, 6);

    // A price change later: one new version; the old one still prices the past.
    let cheaper = EXCERPT.replace(
        "\"input_cost_per_token\": 1.5e-07",
        "\"input_cost_per_token\": 1e-07",
    );
    let changed = prices::import_litellm(
        &repo,
        "new.json",
        &cheaper,
        date!(2026 - 01 - 01),
        &actor(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(changed.inserted, ["gpt-4o-mini"]);
    assert_eq!(count(&repo, "prices").await, 7);
    let book = repo.load_prices().await.unwrap();
    assert_eq!(
        input_at(
            &book,
            "openai",
            "gpt-4o-mini",
            datetime!(2025-12-31 23:59 UTC)
        ),
        Some(150_000_000)
    );
    assert_eq!(
        input_at(
            &book,
            "openai",
            "gpt-4o-mini",
            datetime!(2026-01-01 00:00 UTC)
        ),
        Some(100_000_000)
    );
    assert_eq!(
        input_at(
            &book,
            "openai",
            "gpt-4o-mini",
            datetime!(2025-10-31 00:00 UTC)
        ),
        None
    );
    // Prefixed keys match the provider of that name only.
    assert_eq!(
        input_at(
            &book,
            "vertex_ai",
            "gemini-2.5-pro",
            datetime!(2025-12-01 00:00 UTC)
        ),
        Some(1_250_000_000)
    );
    assert_eq!(
        input_at(
            &book,
            "openai",
            "gemini-2.5-pro",
            datetime!(2025-12-01 00:00 UTC)
        ),
        None
    );

    // History is never rewritten: an earlier date or the same date with other rates is refused
    // for that model (reported with its path), the rest is unaffected.
    let refused = prices::import_litellm(
        &repo,
        "old.json",
        &cheaper,
        date!(2025 - 12 - 15),
        &actor(),
        false,
    )
    .await
    .unwrap();
    let conflict = refused
        .invalid
        .iter()
        .find(|n| n.key == "gpt-4o-mini")
        .unwrap();
    assert!(
        conflict.message.contains("2026-01-01"),
        "{}",
        conflict.message
    );
    assert_eq!(conflict.path, r#"$["gpt-4o-mini"]"#);
    let pricier = EXCERPT.replace(
        "\"input_cost_per_token\": 1.5e-07",
        "\"input_cost_per_token\": 2e-07",
    );
    let same_day = prices::import_litellm(
        &repo,
        "x.json",
        &pricier,
        date!(2026 - 01 - 01),
        &actor(),
        false,
    )
    .await
    .unwrap();
    assert!(
        same_day
            .invalid
            .iter()
            .any(|n| n.key == "gpt-4o-mini" && n.message.contains("never rewritten"))
    );
    assert_eq!(count(&repo, "prices").await, 7);

    // Configured prices override imported ones.
    repo.sync_prices(&[Price::configured(
        "*",
        "gpt-4o-mini",
        date!(2024 - 01 - 01),
        Rates::flat(Rate(1), Rate(1), Rate(1)),
    )])
    .await
    .unwrap();
    let book = repo.load_prices().await.unwrap();
    assert_eq!(
        input_at(
            &book,
            "openai",
            "gpt-4o-mini",
            datetime!(2026-02-01 00:00 UTC)
        ),
        Some(1)
    );
    pg.drop_db().await;
}

/// The real LiteLLM file from ../shared: every entry either imported, skipped or reported.
#[tokio::test]
async fn imports_the_real_litellm_file() {
    let Ok(text) = std::fs::read_to_string(REAL_FILE) else {
        eprintln!(
            "SKIPPED: {REAL_FILE} is absent (the shared evaluation data is not on this machine)"
        );
        return;
    };
    let (repo, pg) = repo().await;
    let report = prices::import_litellm(
        &repo,
        REAL_FILE,
        &text,
        date!(2025 - 11 - 01),
        &actor(),
        false,
    )
    .await
    .unwrap();
    eprintln!(
        "real file: {} entries, {} imported, {} skipped, {} invalid, {} rounded",
        report.entries,
        report.inserted.len(),
        report.skipped.len(),
        report.invalid.len(),
        report.rounded.len()
    );
    for note in report.invalid.iter().take(10) {
        eprintln!("  invalid {}: {}", note.path, note.message);
    }
    assert_eq!(
        report.inserted.len() + report.unchanged + report.skipped.len() + report.invalid.len(),
        report.entries
    );
    assert!(report.inserted.len() > 3_000, "{}", report.inserted.len());
    assert!(
        !report.invalid.is_empty() && report.invalid.iter().all(|n| n.path.starts_with("$[\""))
    );
    assert!(!report.rounded.is_empty());
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM prices WHERE source = 'litellm'")
        .fetch_one(repo.pool())
        .await
        .unwrap();
    assert_eq!(stored, i64::try_from(report.inserted.len()).unwrap());

    let book = repo.load_prices().await.unwrap();
    let at = datetime!(2025-11-02 00:00 UTC);
    let mini = book.lookup("openai", "gpt-4o-mini", at).unwrap();
    assert_eq!(
        mini.base,
        Rates::flat(Rate(150_000_000), Rate(75_000_000), Rate(600_000_000))
    );
    let sonnet = book.lookup("anthropic", "claude-sonnet-4-5", at).unwrap();
    assert_eq!(sonnet.base.cache_write, Rate(3_750_000_000));
    assert_eq!(sonnet.base.cached_input, Rate(300_000_000));
    // Anthropic usage: 100 input + 2000 cache reads + 1000 cache writes, 400 output:
    // 100*3 + 2000*0.30 + 1000*3.75 + 400*15 = 10650 micro-USD.
    let tokens = Tokens {
        prompt: 3100,
        cached_prompt: 2000,
        cache_write: 1000,
        completion: 400,
        reasoning: 0,
    };
    assert_eq!(sonnet.cost(tokens), Ok(10_650_000));
    let gemini = book.lookup("gemini", "gemini-2.5-pro", at).unwrap();
    assert_eq!(gemini.tier.unwrap().above_prompt_tokens, 200_000);

    // Importing the same file again the next day changes nothing.
    let again = prices::import_litellm(
        &repo,
        REAL_FILE,
        &text,
        date!(2025 - 11 - 02),
        &actor(),
        true,
    )
    .await
    .unwrap();
    assert_eq!(again.inserted.len(), 0);
    pg.drop_db().await;
}

fn usage_event(
    request_id: &str,
    provider: &str,
    model: &str,
    usage: Usage,
    at: OffsetDateTime,
) -> UsageEvent {
    UsageEvent {
        request_id: request_id.into(),
        time: Some(Timestamp {
            seconds: at.unix_timestamp(),
            nanos: 0,
        }),
        app: "billing".into(),
        team: "finance".into(),
        key_id: "key_1".into(),
        requested_model: model.into(),
        route: Some(RouteInfo {
            route: model.into(),
            provider: provider.into(),
            model: model.into(),
            target: format!("{provider}/{model}"),
            attempt_count: 1,
            ..Default::default()
        }),
        usage: Some(usage),
        cache: CacheOutcome::Miss as i32,
        status: RequestStatus::Ok as i32,
        ..Default::default()
    }
}

fn anthropic_usage() -> Usage {
    // Anthropic input_tokens 100, cache reads 2000, cache writes 1000, output 400, as the router maps it.
    Usage {
        prompt_tokens: 3100,
        completion_tokens: 400,
        total_tokens: 3500,
        cached_prompt_tokens: 2000,
        cache_write_tokens: 1000,
        ..Default::default()
    }
}

#[tokio::test]
async fn reprice_is_explicit_and_audited() {
    let (repo, pg) = repo().await;
    let at = datetime!(2025-11-10 12:00 UTC);
    let ids = [
        "0195f0e2-7f4c-7000-8000-0000000000c1",
        "0195f0e2-7f4c-7000-8000-0000000000c2",
        "0195f0e2-7f4c-7000-8000-0000000000c3",
    ];
    // Recorded before any price was known: unpriced (NULL), never $0.
    let empty = repo.load_prices().await.unwrap();
    let rows = [
        usage_event(
            ids[0],
            "anthropic",
            "claude-sonnet-4-5",
            anthropic_usage(),
            at,
        ),
        usage_event(
            ids[1],
            "anthropic",
            "claude-sonnet-4-5",
            anthropic_usage(),
            at + Duration::from_secs(60),
        ),
        usage_event(
            ids[2],
            "openai",
            "gpt-4o-mini",
            anthropic_usage(),
            at + Duration::from_secs(3 * 86_400),
        ),
    ]
    .map(|e| price_event(e, at, &empty).unwrap());
    assert!(rows.iter().all(|r| r.cost_usd_nanos.is_none()));
    repo.insert_batch(&rows).await.unwrap();
    let unpriced = repo
        .unpriced(at, at + Duration::from_secs(10 * 86_400), None, &empty)
        .await
        .unwrap();
    assert_eq!(
        unpriced
            .iter()
            .map(|u| (u.model.as_str(), u.requests))
            .collect::<Vec<_>>(),
        [("claude-sonnet-4-5", 2), ("gpt-4o-mini", 1)]
    );

    prices::import_litellm(
        &repo,
        "excerpt.json",
        EXCERPT,
        date!(2025 - 11 - 01),
        &actor(),
        false,
    )
    .await
    .unwrap();
    let request = Reprice {
        since: datetime!(2025-11-10 00:00 UTC),
        until: datetime!(2025-11-11 00:00 UTC),
        model: Some("anthropic/claude-sonnet-4-5".into()),
        reason: "prices imported after the fact".into(),
        dry_run: true,
    };
    let dry = prices::reprice(&repo, &request, &actor()).await.unwrap();
    assert_eq!(
        (
            dry.rows_examined,
            dry.rows_changed,
            dry.old_total_usd_nanos,
            dry.new_total_usd_nanos,
            dry.old_unpriced,
            dry.new_unpriced,
            dry.audit_id
        ),
        (2, 2, 0, 21_300_000, 2, 0, None)
    );
    assert_eq!(count(&repo, "reprice_audits").await, 0);
    let cost = |id: &str| {
        let id = uuid::Uuid::parse_str(id).unwrap();
        let repo = repo.clone();
        async move { repo.get(id).await.unwrap().unwrap().cost_usd_nanos }
    };
    assert_eq!(cost(ids[0]).await, None);

    let done = prices::reprice(
        &repo,
        &Reprice {
            dry_run: false,
            ..request.clone()
        },
        &actor(),
    )
    .await
    .unwrap();
    assert_eq!(done.rows_changed, 2);
    assert_eq!(cost(ids[0]).await, Some(10_650_000));
    assert_eq!(cost(ids[1]).await, Some(10_650_000));
    // Outside the period: untouched.
    assert_eq!(cost(ids[2]).await, None);
    let audit: (String, Option<String>, String, i64, String, String, i64, i64) = sqlx::query_as(
        "SELECT requested_by, model, reason, rows_changed, old_total_usd_nanos::text, new_total_usd_nanos::text, \
         old_unpriced, new_unpriced FROM reprice_audits WHERE id = $1",
    )
    .bind(done.audit_id.unwrap())
    .fetch_one(repo.pool())
    .await
    .unwrap();
    assert_eq!(
        audit,
        (
            "test-operator".into(),
            Some("anthropic/claude-sonnet-4-5".into()),
            "prices imported after the fact".into(),
            2,
            "0".into(),
            "21300000".into(),
            2,
            0
        )
    );
    let changes: Vec<(Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT old_cost_usd_nanos, new_cost_usd_nanos FROM reprice_changes ORDER BY request_id",
    )
    .fetch_all(repo.pool())
    .await
    .unwrap();
    assert_eq!(
        changes,
        [(None, Some(10_650_000)), (None, Some(10_650_000))]
    );

    // Re-pricing again changes nothing (and says so in its own audit row).
    let again = prices::reprice(
        &repo,
        &Reprice {
            dry_run: false,
            ..request.clone()
        },
        &actor(),
    )
    .await
    .unwrap();
    assert_eq!((again.rows_examined, again.rows_changed), (2, 0));
    assert_eq!(count(&repo, "reprice_audits").await, 2);
    assert_eq!(count(&repo, "reprice_changes").await, 2);

    // A backwards period is refused.
    let backwards = Reprice {
        since: request.until,
        until: request.since,
        ..request
    };
    assert!(prices::reprice(&repo, &backwards, &actor()).await.is_err());
    pg.drop_db().await;
}

/// gpt-4o-mini at 0.15 / 0.075 (cached) / 0.60 USD per million tokens, for every provider.
fn gpt_4o_mini() -> Price {
    Price::configured(
        "*",
        "gpt-4o-mini",
        date!(2024 - 01 - 01),
        Rates::flat(Rate(150_000_000), Rate(75_000_000), Rate(600_000_000)),
    )
}

/// A stream on `primary/<cut_model>` cut after 1000 prompt and 100 completion tokens
/// (STREAM_INTERRUPTED), then `openai/gpt-4o-mini` served 1000 in (200 cached) / 500 out: the
/// event of `record::tests::a_failed_attempt_that_consumed_tokens_is_billed_with_the_serving_one`.
fn cut_then_served(request_id: &str, cut_model: &str, at: OffsetDateTime) -> UsageEvent {
    let served = Usage {
        prompt_tokens: 1000,
        completion_tokens: 500,
        total_tokens: 1500,
        cached_prompt_tokens: 200,
        ..Default::default()
    };
    let mut event = usage_event(request_id, "openai", "gpt-4o-mini", served, at);
    let route = event.route.as_mut().unwrap();
    route.attempt_count = 2;
    route.attempts = vec![
        Attempt {
            target: format!("primary/{cut_model}"),
            provider: "primary".into(),
            model: cut_model.into(),
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
            usage: Some(served),
            ..Default::default()
        },
    ];
    event
}

/// (Σ cost, Σ unpriced) of the hourly and of the daily rollups.
async fn rollup_totals(repo: &Repository) -> [(i64, i64); 2] {
    let mut totals = [(0, 0); 2];
    for (total, sql) in totals.iter_mut().zip([
        "SELECT COALESCE(SUM(cost_usd_nanos), 0)::BIGINT, COALESCE(SUM(unpriced_requests), 0)::BIGINT \
         FROM usage_rollup_hourly",
        "SELECT COALESCE(SUM(cost_usd_nanos), 0)::BIGINT, COALESCE(SUM(unpriced_requests), 0)::BIGINT \
         FROM usage_rollup_daily",
    ]) {
        *total = sqlx::query_as(sql).fetch_one(repo.pool()).await.unwrap();
    }
    totals
}

fn whole_day(at: OffsetDateTime) -> Reprice {
    Reprice {
        since: at - Duration::from_secs(3_600),
        until: at + Duration::from_secs(86_400),
        model: None,
        reason: "test".into(),
        dry_run: false,
    }
}

const CUT_PRICED: &str = "0195f0e2-7f4c-7000-8000-0000000000d1";
const CUT_UNPRICED: &str = "0195f0e2-7f4c-7000-8000-0000000000d2";

/// Records the two requests whose first attempt was cut after using tokens: one on a priced
/// model (645_000 = 435_000 served + 210_000 cut), one on a model without a price (unpriced).
async fn record_cut_attempts(repo: &Repository, at: OffsetDateTime) {
    repo.sync_prices(&[gpt_4o_mini()]).await.unwrap();
    let book = repo.load_prices().await.unwrap();
    let rows = [
        cut_then_served(CUT_PRICED, "gpt-4o-mini", at),
        cut_then_served(CUT_UNPRICED, "mystery", at),
    ]
    .map(|e| price_event(e, at, &book).unwrap());
    assert_eq!(rows[0].cost_usd_nanos, Some(645_000));
    assert_eq!(rows[1].cost_usd_nanos, None);
    assert_eq!(repo.insert_batch(&rows).await.unwrap(), 2);
    assert_eq!(rollup_totals(repo).await, [(645_000, 1); 2]);
}

async fn cost_of_row(repo: &Repository, id: &str) -> Option<i64> {
    let id = uuid::Uuid::parse_str(id).unwrap();
    repo.get(id).await.unwrap().unwrap().cost_usd_nanos
}

/// Re-pricing without a price change changes nothing: the cost of an earlier attempt that used
/// tokens stays in the row (and its rollups), and an earlier attempt without a price keeps the
/// row unpriced (never $0 for those tokens).
#[tokio::test]
async fn reprice_without_a_price_change_keeps_the_cost_of_earlier_attempts() {
    let (repo, pg) = repo().await;
    let at = datetime!(2025-11-10 12:00 UTC);
    record_cut_attempts(&repo, at).await;

    let dry = prices::reprice(
        &repo,
        &Reprice {
            dry_run: true,
            ..whole_day(at)
        },
        &actor(),
    )
    .await
    .unwrap();
    let done = prices::reprice(&repo, &whole_day(at), &actor())
        .await
        .unwrap();
    for report in [&dry, &done] {
        assert_eq!(
            (
                report.rows_examined,
                report.rows_changed,
                report.old_total_usd_nanos,
                report.new_total_usd_nanos,
                report.old_unpriced,
                report.new_unpriced,
            ),
            (2, 0, 645_000, 645_000, 1, 1),
            "{report:?}"
        );
    }
    assert_eq!(cost_of_row(&repo, CUT_PRICED).await, Some(645_000));
    assert_eq!(cost_of_row(&repo, CUT_UNPRICED).await, None);
    assert_eq!(rollup_totals(&repo).await, [(645_000, 1); 2]);
    assert_eq!(count(&repo, "reprice_changes").await, 0);
    pg.drop_db().await;
}

/// A new price for the earlier attempt's provider and model re-prices that attempt too, by the
/// same rule as recording; a price for the model that made a row unpriced prices it.
#[tokio::test]
async fn a_price_change_reprices_the_earlier_attempts_too() {
    let (repo, pg) = repo().await;
    let at = datetime!(2025-11-10 12:00 UTC);
    record_cut_attempts(&repo, at).await;

    // `primary` gets its own, doubled price for gpt-4o-mini; `mystery` gets 1 USD/M for everything.
    repo.sync_prices(&[
        Price::configured(
            "primary",
            "gpt-4o-mini",
            date!(2024 - 01 - 01),
            Rates::flat(Rate(300_000_000), Rate(150_000_000), Rate(1_200_000_000)),
        ),
        Price::configured(
            "*",
            "mystery",
            date!(2024 - 01 - 01),
            Rates::flat(
                Rate(1_000_000_000),
                Rate(1_000_000_000),
                Rate(1_000_000_000),
            ),
        ),
    ])
    .await
    .unwrap();
    // What recording the same events now would store: reprice must agree with it.
    let book = repo.load_prices().await.unwrap();
    let recorded_now = [
        cut_then_served(CUT_PRICED, "gpt-4o-mini", at),
        cut_then_served(CUT_UNPRICED, "mystery", at),
    ]
    .map(|e| price_event(e, at, &book).unwrap().cost_usd_nanos);
    // 435_000 served + 1000 x 300 + 100 x 1200; 435_000 served + 1100 x 1000.
    assert_eq!(recorded_now, [Some(855_000), Some(1_535_000)]);

    // `--model` selects the rows that used the model, in an earlier attempt too (both rows
    // serve openai/gpt-4o-mini).
    let only = |model: &str| Reprice {
        model: Some(model.to_owned()),
        ..whole_day(at)
    };
    let mystery = prices::reprice(&repo, &only("mystery"), &actor())
        .await
        .unwrap();
    assert_eq!(
        (
            mystery.rows_examined,
            mystery.rows_changed,
            mystery.old_unpriced,
            mystery.new_unpriced,
            mystery.new_total_usd_nanos,
        ),
        (1, 1, 1, 0, 1_535_000),
        "{mystery:?}"
    );
    assert_eq!(cost_of_row(&repo, CUT_UNPRICED).await, Some(1_535_000));
    assert_eq!(cost_of_row(&repo, CUT_PRICED).await, Some(645_000));
    let primary = prices::reprice(&repo, &only("primary/gpt-4o-mini"), &actor())
        .await
        .unwrap();
    assert_eq!(
        (
            primary.rows_examined,
            primary.rows_changed,
            primary.old_total_usd_nanos,
            primary.new_total_usd_nanos,
        ),
        (1, 1, 645_000, 855_000),
        "{primary:?}"
    );
    assert_eq!(cost_of_row(&repo, CUT_PRICED).await, Some(855_000));
    assert_eq!(rollup_totals(&repo).await, [(855_000 + 1_535_000, 0); 2]);
    let changes: Vec<(Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT old_cost_usd_nanos, new_cost_usd_nanos FROM reprice_changes ORDER BY audit_id",
    )
    .fetch_all(repo.pool())
    .await
    .unwrap();
    assert_eq!(
        changes,
        [(None, Some(1_535_000)), (Some(645_000), Some(855_000))]
    );
    // The whole period now: nothing left to change.
    let again = prices::reprice(&repo, &whole_day(at), &actor())
        .await
        .unwrap();
    assert_eq!(
        (
            again.rows_examined,
            again.rows_changed,
            again.rows_skipped,
            again.new_total_usd_nanos,
            again.new_unpriced
        ),
        (2, 0, 0, 855_000 + 1_535_000, 0)
    );
    pg.drop_db().await;
}

/// A row with several attempts recorded before the earlier attempts' usage was kept (the column
/// is NULL) cannot be re-priced: its cost includes attempts whose tokens are unknown. It keeps its
/// recorded cost (or stays unpriced), and the re-pricing counts it as skipped, in its report and
/// its audit row. Rows with a single attempt are re-priced as always.
#[tokio::test]
async fn rows_with_unknown_earlier_attempts_are_left_as_recorded_and_counted() {
    let (repo, pg) = repo().await;
    let at = datetime!(2025-11-10 12:00 UTC);
    repo.sync_prices(&[gpt_4o_mini()]).await.unwrap();
    let book = repo.load_prices().await.unwrap();
    let ids = [
        "0195f0e2-7f4c-7000-8000-0000000000e1",
        "0195f0e2-7f4c-7000-8000-0000000000e2",
        "0195f0e2-7f4c-7000-8000-0000000000e3",
    ];
    let mut rows = [
        cut_then_served(ids[0], "gpt-4o-mini", at),
        cut_then_served(ids[1], "mystery", at),
        usage_event(
            ids[2],
            "openai",
            "gpt-4o-mini",
            Usage {
                prompt_tokens: 1000,
                completion_tokens: 500,
                total_tokens: 1500,
                cached_prompt_tokens: 200,
                ..Default::default()
            },
            at,
        ),
    ]
    .map(|e| price_event(e, at, &book).unwrap());
    // As recorded before the column existed.
    for row in &mut rows[..2] {
        row.earlier_attempts = None;
    }
    repo.insert_batch(&rows).await.unwrap();
    assert_eq!(
        rows.each_ref().map(|r| r.cost_usd_nanos),
        [Some(645_000), None, Some(435_000)]
    );

    // gpt-4o-mini doubles from 2025-11-01.
    repo.sync_prices(&[Price::configured(
        "*",
        "gpt-4o-mini",
        date!(2025 - 11 - 01),
        Rates::flat(Rate(300_000_000), Rate(150_000_000), Rate(1_200_000_000)),
    )])
    .await
    .unwrap();
    let dry = prices::reprice(
        &repo,
        &Reprice {
            dry_run: true,
            ..whole_day(at)
        },
        &actor(),
    )
    .await
    .unwrap();
    let done = prices::reprice(&repo, &whole_day(at), &actor())
        .await
        .unwrap();
    for report in [&dry, &done] {
        assert_eq!(
            (
                report.rows_examined,
                report.rows_changed,
                report.rows_skipped,
                report.old_total_usd_nanos,
                report.new_total_usd_nanos,
                report.old_unpriced,
                report.new_unpriced,
            ),
            (3, 1, 2, 645_000 + 435_000, 645_000 + 870_000, 1, 1),
            "{report:?}"
        );
    }
    assert_eq!(cost_of_row(&repo, ids[0]).await, Some(645_000));
    assert_eq!(cost_of_row(&repo, ids[1]).await, None);
    assert_eq!(cost_of_row(&repo, ids[2]).await, Some(870_000));
    assert_eq!(rollup_totals(&repo).await, [(645_000 + 870_000, 1); 2]);
    let audit: (i64, i64, i64) = sqlx::query_as(
        "SELECT rows_examined, rows_changed, rows_skipped FROM reprice_audits WHERE id = $1",
    )
    .bind(done.audit_id.unwrap())
    .fetch_one(repo.pool())
    .await
    .unwrap();
    assert_eq!(audit, (3, 1, 2));
    pg.drop_db().await;
}

/// The running ledger records unknown models as unpriced (NULL, counted in /metrics, listed by
/// ListUnpriced), then picks an import up without a restart.
#[tokio::test]
async fn prices_reload_without_restart_and_unpriced_usage_is_visible() {
    let pg = TestPg::create().await.expect("postgres");
    let nats = TestNats::create().await.expect("nats");
    let nats_config = nats.config();
    let config = Config {
        grpc_addr: "127.0.0.1:0".into(),
        database_url: pg.url.clone(),
        max_connections: 4,
        price_reload_secs: 1,
        metrics_addr: Some("127.0.0.1:0".into()),
        prices: vec![PriceConfig {
            model: "gpt-4o-mini".into(),
            provider: "*".into(),
            input: "0.15".into(),
            cached_input: Some("0.075".into()),
            cache_write: None,
            output: "0.60".into(),
            reasoning: None,
            effective_from: Some("2024-01-01".into()),
        }],
        ..Config::default()
    };
    let app = App::build(config, nats_config.clone())
        .await
        .expect("build");
    let addr = app.local_addr();
    let metrics_addr = app.metrics_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let mut client = LedgerServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let client_nats = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client_nats);

    let now = OffsetDateTime::now_utc();
    let unknown = usage_event(
        &uuid::Uuid::now_v7().to_string(),
        "anthropic",
        "claude-sonnet-4-5",
        anthropic_usage(),
        now,
    );
    publish_usage(&js, &nats_config, &unknown).await.unwrap();
    let record = eventually(|| {
        let mut client = client.clone();
        let id = unknown.request_id.clone();
        async move {
            client
                .get_usage_record(GetUsageRecordRequest { request_id: id })
                .await
                .ok()
        }
    })
    .await
    .into_inner()
    .record
    .unwrap();
    assert_eq!(record.cost_usd_nanos, None, "unpriced is NULL, never $0");

    let range = ListUnpricedRequest {
        start: Some(Timestamp {
            seconds: now.unix_timestamp() - 3600,
            nanos: 0,
        }),
        end: Some(Timestamp {
            seconds: now.unix_timestamp() + 3600,
            nanos: 0,
        }),
        app: String::new(),
    };
    let listed = client
        .list_unpriced(range.clone())
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].provider.as_str(),
            listed[0].model.as_str(),
            listed[0].requests,
            listed[0].prompt_tokens
        ),
        ("anthropic", "claude-sonnet-4-5", 1, 3100)
    );
    let bad = ListUnpricedRequest {
        start: None,
        ..range.clone()
    };
    assert_eq!(
        client.list_unpriced(bad).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    let metrics = reqwest_get(metrics_addr).await;
    assert!(
        metrics.contains("switchboard_ledger_unpriced_rows_total{provider=\"anthropic\",model=\"claude-sonnet-4-5\"} 1"),
        "{metrics}"
    );

    // Import prices effective from yesterday; the running ledger prices the next event.
    let repo = Repository::connect(&pg.url, 2).await.unwrap();
    let yesterday = (now - Duration::from_secs(86_400)).date();
    prices::import_litellm(&repo, "excerpt.json", EXCERPT, yesterday, &actor(), false)
        .await
        .unwrap();
    let record = eventually(|| {
        let client = client.clone();
        let js = js.clone();
        let nats_config = nats_config.clone();
        async move {
            let event = usage_event(
                &uuid::Uuid::now_v7().to_string(),
                "anthropic",
                "claude-sonnet-4-5",
                anthropic_usage(),
                OffsetDateTime::now_utc(),
            );
            publish_usage(&js, &nats_config, &event).await.ok()?;
            let record = eventually(|| {
                let mut client = client.clone();
                let id = event.request_id.clone();
                async move {
                    client
                        .get_usage_record(GetUsageRecordRequest { request_id: id })
                        .await
                        .ok()
                }
            })
            .await
            .into_inner()
            .record?;
            record.cost_usd_nanos.map(|_| record)
        }
    })
    .await;
    assert_eq!(record.cost_usd_nanos, Some(10_650_000));
    let metrics = reqwest_get(metrics_addr).await;
    assert!(
        metrics.contains("switchboard_ledger_price_reloads_total 2"),
        "{metrics}"
    );

    repo.pool().close().await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let _ = nats.cleanup().await;
    pg.drop_db().await;
}

async fn eventually<T, F, Fut>(mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET /metrics with a bare HTTP/1.0 request (no HTTP client dependency).
async fn reqwest_get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: ledger\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}
