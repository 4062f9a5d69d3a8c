//! Ledger ingest rate: usage events published to JetStream → rows (and rollups) committed in
//! Postgres. Not a criterion bench: one timed run against the local Postgres and NATS.
//!
//! `cargo bench -p switchboard-ledger --bench ingest` (release). Environment:
//! `LEDGER_BENCH_EVENTS` (default 100000), `LEDGER_BENCH_BATCH` (ledger batch size, default 1000),
//! `LEDGER_BENCH_PER_MESSAGE` (events per JetStream message, default 20 as the gateway sends at
//! 1,000 rps with its 20 ms linger, ADR 009; 1 publishes single-event messages).
//! The stream is filled first, then the ledger starts; the rate is rows committed per second of
//! draining (from the ledger's start to the last row). Needs an idle machine to mean anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use switchboard_bus::{UsageEvent, publish_usage, publish_usage_batch};
use switchboard_ledger::{App, Config, PriceConfig};
use switchboard_proto::{
    Timestamp,
    chat::v1::{RouteInfo, Usage},
    ledger::v1::{CacheOutcome, RequestStatus},
};
use switchboard_testkit::{TestNats, TestPg};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn event(i: usize, now: i64) -> UsageEvent {
    let apps = ["billing", "search", "chat", "support"];
    let models = ["gpt-4o-mini", "gpt-4o", "claude-sonnet", "mystery"];
    UsageEvent {
        request_id: uuid::Uuid::now_v7().to_string(),
        time: Some(Timestamp {
            seconds: now - i64::try_from(i % 86_400).unwrap(),
            nanos: 0,
        }),
        app: apps[i % apps.len()].into(),
        team: format!("team-{}", i % 7),
        key_id: format!("key-{}", i % 50),
        requested_model: "fast".into(),
        route: Some(RouteInfo {
            route: "fast".into(),
            provider: "openai".into(),
            model: models[i % models.len()].into(),
            attempt_count: 1,
            ..Default::default()
        }),
        usage: Some(Usage {
            prompt_tokens: 1_000 + u32::try_from(i % 500).unwrap(),
            completion_tokens: 200,
            total_tokens: 1_200,
            cached_prompt_tokens: 100,
            ..Default::default()
        }),
        cache: CacheOutcome::Miss as i32,
        status: RequestStatus::Ok as i32,
        latency_ms: 120,
        trace_id: format!("{:032x}", i),
        tags: [("env".to_owned(), "bench".to_owned())].into(),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() {
    let events = env_or("LEDGER_BENCH_EVENTS", 100_000);
    let batch = env_or("LEDGER_BENCH_BATCH", 1_000);
    let per_message = env_or("LEDGER_BENCH_PER_MESSAGE", 20).max(1);
    let pg = TestPg::create().await.expect("postgres");
    let nats = TestNats::create().await.expect("nats");
    let nats_config = nats.config();
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.expect("nats"));
    nats_config.ensure_usage_stream(&js).await.expect("stream");

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let published = Instant::now();
    let mut acks = Vec::with_capacity(4_096);
    let none = opentelemetry::Context::new();
    for first in (0..events).step_by(per_message) {
        let group: Vec<UsageEvent> = (first..(first + per_message).min(events))
            .map(|i| event(i, now))
            .collect();
        let ack = if per_message == 1 {
            publish_usage(&js, &nats_config, &group[0]).await
        } else {
            let refs: Vec<_> = group.iter().map(|e| (e, &none)).collect();
            publish_usage_batch(&js, &nats_config, &refs).await
        };
        acks.push(ack.expect("publish"));
        if acks.len() == 4_096 {
            for ack in acks.drain(..) {
                ack.await.expect("stored");
            }
        }
    }
    for ack in acks.drain(..) {
        ack.await.expect("stored");
    }
    let publish_secs = published.elapsed().as_secs_f64();

    let config = Config {
        grpc_addr: "127.0.0.1:0".into(),
        database_url: pg.url.clone(),
        max_connections: 8,
        batch_size: batch,
        price_reload_secs: 0,
        prices: vec![PriceConfig {
            model: "gpt-4o-mini".into(),
            provider: "*".into(),
            input: "0.15".into(),
            cached_input: Some("0.075".into()),
            cache_write: None,
            output: "0.60".into(),
            reasoning: None,
            effective_from: None,
        }],
        ..Config::default()
    };
    let app = App::build(config, nats_config).await.expect("ledger");
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("pool");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let running = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let expected = i64::try_from(events).unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records")
            .fetch_one(&pool)
            .await
            .expect("count");
        if rows >= expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {rows} of {events} rows after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingest_secs = started.elapsed().as_secs_f64();
    let rollup: i64 =
        sqlx::query_scalar("SELECT COALESCE(SUM(requests), 0)::BIGINT FROM usage_rollup_daily")
            .fetch_one(&pool)
            .await
            .expect("rollup");
    assert_eq!(rollup, expected, "the daily rollup counts every row once");
    println!(
        "ledger ingest: {events} events, {per_message} per message, batch {batch}: published in {publish_secs:.2} s ({:.0}/s); \
         committed (rows + rollups) in {ingest_secs:.2} s = {:.0} events/s",
        events as f64 / publish_secs,
        events as f64 / ingest_secs
    );
    let _ = stop.send(());
    running.await.expect("join").expect("clean stop");
    pool.close().await;
    nats.cleanup().await;
    pg.drop_db().await;
}
