//! API tests: the real `App` against real Postgres and NATS (one database and namespace per test).

#![allow(clippy::unwrap_used)]

use std::{future::Future, net::SocketAddr, time::Duration};

use async_nats::{
    HeaderMap,
    jetstream::{self, consumer::PullConsumer},
};
use futures::StreamExt as _;
use prost::Message as _;
use switchboard_bus::{NatsConfig, UsageEvent, publish_usage};
use switchboard_ledger::{
    App, Config, PriceConfig, StartupError,
    internals::{ConsumerSettings, Price, Rate, Rates, Repository, consumer_config, price_event},
};
use switchboard_proto::{
    Timestamp,
    chat::v1::{RouteInfo, Usage},
    ledger::v1::{
        CacheOutcome, GetSpendRequest, GetUsageRecordRequest, RequestStatus, UsageRecord,
        ledger_service_client::LedgerServiceClient,
    },
};
use switchboard_status::ErrorCode;
use switchboard_testkit::{TestNats, TestPg};
use time::macros::date;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// Bounded polling: no sleeps as assertions.
const WAIT: Duration = Duration::from_secs(20);

/// 2025-03-01T12:00:00Z.
const T0: i64 = 1_740_830_400;

struct Env {
    pg: TestPg,
    nats: TestNats,
    nats_config: NatsConfig,
    js: jetstream::Context,
}

impl Env {
    async fn new() -> Env {
        let pg = TestPg::create().await.expect("postgres");
        let nats = TestNats::create().await.expect("nats");
        let nats_config = nats.config();
        let js = jetstream::new(async_nats::connect(&nats.url).await.expect("nats connect"));
        Env {
            pg,
            nats,
            nats_config,
            js,
        }
    }

    fn config(&self) -> Config {
        Config {
            grpc_addr: "127.0.0.1:0".into(),
            database_url: self.pg.url.clone(),
            max_connections: 4,
            prices: vec![
                price(
                    "*",
                    "gpt-4o-mini",
                    "0.15",
                    Some("0.075"),
                    "0.60",
                    "2024-01-01",
                ),
                // A later, cheaper wildcard version and a provider-specific price.
                price("*", "gpt-4o", "5", None, "15", "2024-01-01"),
                price("*", "gpt-4o", "2.5", Some("1.25"), "10", "2025-01-01"),
                price("azure", "gpt-4o", "3", None, "12", "2025-01-01"),
            ],
            ..Config::default()
        }
    }

    async fn start(&self, config: Config) -> Running {
        let app = App::build(config, self.nats_config.clone())
            .await
            .expect("app builds");
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        let client = LedgerServiceClient::connect(switchboard_grpc::url_of(addr))
            .await
            .expect("client");
        Running {
            addr,
            client,
            stop: Some(stop),
            task,
        }
    }

    async fn publish(&self, event: &UsageEvent) {
        publish_usage(&self.js, &self.nats_config, event)
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    async fn durable(&self) -> PullConsumer {
        self.js
            .get_stream(&self.nats.stream)
            .await
            .expect("stream")
            .get_consumer("ledger")
            .await
            .expect("consumer")
    }

    /// Waits until the durable consumer has nothing pending or unacknowledged and has delivered `sequence`.
    async fn wait_consumer_idle(&self, sequence: u64) {
        let consumer = self.durable().await;
        eventually("consumer idle", || {
            let consumer = consumer.clone();
            async move {
                let info = consumer.get_info().await.ok()?;
                (info.num_pending == 0
                    && info.num_ack_pending == 0
                    && info.ack_floor.stream_sequence >= sequence)
                    .then_some(())
            }
        })
        .await;
    }

    async fn cleanup(self) {
        self.nats.cleanup().await;
        self.pg.drop_db().await;
    }
}

struct Running {
    #[allow(dead_code)]
    addr: SocketAddr,
    client: LedgerServiceClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), StartupError>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("join").expect("clean shutdown");
    }

    async fn record(&mut self, request_id: &str) -> Result<UsageRecord, tonic::Status> {
        self.client
            .get_usage_record(GetUsageRecordRequest {
                request_id: request_id.into(),
            })
            .await
            .map(|r| r.into_inner().record.expect("record"))
    }

    async fn wait_record(&mut self, request_id: &str) -> UsageRecord {
        let client = self.client.clone();
        eventually("usage record", || {
            let mut client = client.clone();
            let request_id = request_id.to_owned();
            async move {
                client
                    .get_usage_record(GetUsageRecordRequest { request_id })
                    .await
                    .ok()?
                    .into_inner()
                    .record
            }
        })
        .await
    }
}

async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn price(
    provider: &str,
    model: &str,
    input: &str,
    cached: Option<&str>,
    output: &str,
    from: &str,
) -> PriceConfig {
    PriceConfig {
        model: model.into(),
        provider: provider.into(),
        input: input.into(),
        cached_input: cached.map(Into::into),
        cache_write: None,
        output: output.into(),
        reasoning: None,
        effective_from: Some(from.into()),
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn usage(prompt: u32, cached: u32, completion: u32) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cached_prompt_tokens: cached,
        ..Default::default()
    }
}

fn event(app: &str, provider: &str, model: &str, usage: Usage) -> UsageEvent {
    UsageEvent {
        request_id: new_id(),
        time: Some(Timestamp {
            seconds: T0,
            nanos: 0,
        }),
        app: app.into(),
        team: "team-a".into(),
        key_id: "key_1".into(),
        requested_model: "fast".into(),
        route: Some(RouteInfo {
            route: "fast".into(),
            provider: provider.into(),
            model: model.into(),
            target: format!("{provider}/{model}"),
            attempt_count: 2,
            attempts: vec![],
            key_alias: String::new(),
        }),
        usage: Some(usage),
        cache: CacheOutcome::Miss as i32,
        saved_usage: None,
        status: RequestStatus::Ok as i32,
        error_code: String::new(),
        streamed: true,
        latency_ms: 1234,
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        tags: [("env".to_owned(), "test".to_owned())].into(),
    }
}

fn spend_request(app: &str) -> GetSpendRequest {
    GetSpendRequest {
        start: Some(Timestamp {
            seconds: T0 - 3600,
            nanos: 0,
        }),
        end: Some(Timestamp {
            seconds: T0 + 3600,
            nanos: 0,
        }),
        app: app.into(),
    }
}

#[tokio::test]
async fn records_published_events_and_reports_spend() {
    let env = Env::new().await;
    let mut app = env.start(env.config()).await;

    // 1000 prompt (200 cached) + 500 completion at 0.15/0.075/0.60: 435_000 nanos.
    let mini = event("billing", "openai", "gpt-4o-mini", usage(1000, 200, 500));
    // gpt-4o on 2025-03-01: the 2025 wildcard version, 2.5/1.25/10:
    // (2000-1000)*2.5e9 + 1000*1.25e9 + 100*10e9 = 2.5e12 + 1.25e12 + 1e12 = 4.75e12 / 1e6 = 4_750_000.
    let four_o = event("billing", "openai", "gpt-4o", usage(2000, 1000, 100));
    // Provider-specific azure price (3/3/12): 1_000_000 * 3e9 / 1e6 = 3_000_000_000.
    let azure = event("search", "azure", "gpt-4o", usage(1_000_000, 0, 0));
    // No price: recorded, cost unset, counted as unpriced.
    let mystery = event("search", "openai", "mystery-1", usage(10, 0, 10));
    for e in [&mini, &four_o, &azure, &mystery] {
        env.publish(e).await;
    }

    let record = app.wait_record(&mini.request_id).await;
    assert_eq!(record.request_id, mini.request_id);
    assert_eq!(
        record.time,
        Some(Timestamp {
            seconds: T0,
            nanos: 0
        })
    );
    assert_eq!(
        (
            record.app.as_str(),
            record.team.as_str(),
            record.key_id.as_str()
        ),
        ("billing", "team-a", "key_1")
    );
    assert_eq!(record.requested_model, "fast");
    assert_eq!(
        (record.provider.as_str(), record.model.as_str()),
        ("openai", "gpt-4o-mini")
    );
    assert_eq!(record.attempts, 2);
    assert_eq!(
        (
            record.prompt_tokens,
            record.cached_prompt_tokens,
            record.completion_tokens
        ),
        (1000, 200, 500)
    );
    assert_eq!(record.cost_usd_nanos, Some(435_000));
    assert_eq!(record.saved_usd_nanos, 0);
    assert_eq!(record.cache, CacheOutcome::Miss as i32);
    assert_eq!(record.status, RequestStatus::Ok as i32);
    assert!(record.streamed);
    assert_eq!(record.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    // Finance's stubs may compress their requests (gzip): served the same.
    let compressed = app
        .client
        .clone()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .get_usage_record(GetUsageRecordRequest {
            request_id: mini.request_id.clone(),
        })
        .await
        .expect("a gzip-compressed request is served")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(compressed, record);

    assert_eq!(
        app.wait_record(&four_o.request_id).await.cost_usd_nanos,
        Some(4_750_000)
    );
    assert_eq!(
        app.wait_record(&azure.request_id).await.cost_usd_nanos,
        Some(3_000_000_000)
    );
    assert_eq!(
        app.wait_record(&mystery.request_id).await.cost_usd_nanos,
        None
    );

    let spend = app
        .client
        .get_spend(spend_request(""))
        .await
        .expect("spend")
        .into_inner();
    let rows: Vec<_> = spend
        .rows
        .iter()
        .map(|r| {
            (
                r.app.as_str(),
                r.model.as_str(),
                r.requests,
                r.cost_usd_nanos,
                r.unpriced_requests,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("billing", "openai/gpt-4o", 1, 4_750_000, 0),
            ("billing", "openai/gpt-4o-mini", 1, 435_000, 0),
            ("search", "azure/gpt-4o", 1, 3_000_000_000, 0),
            ("search", "openai/mystery-1", 1, 0, 1),
        ]
    );
    assert_eq!(
        spend.total_cost_usd_nanos,
        4_750_000 + 435_000 + 3_000_000_000
    );
    let billing_mini = &spend.rows[1];
    assert_eq!(
        (billing_mini.prompt_tokens, billing_mini.completion_tokens),
        (1000, 500)
    );

    let search = app
        .client
        .get_spend(spend_request("search"))
        .await
        .expect("spend")
        .into_inner();
    assert_eq!(search.rows.len(), 2);
    assert!(search.rows.iter().all(|r| r.app == "search"));
    assert_eq!(search.total_cost_usd_nanos, 3_000_000_000);

    // Outside the range: nothing.
    let later = GetSpendRequest {
        start: Some(Timestamp {
            seconds: T0 + 1,
            nanos: 0,
        }),
        end: Some(Timestamp {
            seconds: T0 + 10,
            nanos: 0,
        }),
        app: String::new(),
    };
    let empty = app
        .client
        .get_spend(later)
        .await
        .expect("spend")
        .into_inner();
    assert!(empty.rows.is_empty());
    assert_eq!(empty.total_cost_usd_nanos, 0);

    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_same_event_twice_makes_one_row() {
    let env = Env::new().await;
    let mut app = env.start(env.config()).await;
    let e = event("billing", "openai", "gpt-4o-mini", usage(1000, 200, 500));
    // Twice through publish_usage (JetStream's duplicate window drops the second) …
    env.publish(&e).await;
    env.publish(&e).await;
    // … and once more with a different Nats-Msg-Id, which bypasses the window: the ledger must dedupe.
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "another-message-id");
    env.js
        .publish_with_headers(
            env.nats_config.usage_subject(&e.app),
            headers,
            e.encode_to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    let stream_messages = env
        .js
        .get_stream(&env.nats.stream)
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info");
    assert_eq!(
        stream_messages.state.messages, 2,
        "the duplicate window dropped the exact re-publish"
    );

    app.wait_record(&e.request_id).await;
    env.wait_consumer_idle(2).await;
    let spend = app
        .client
        .get_spend(spend_request(""))
        .await
        .expect("spend")
        .into_inner();
    assert_eq!(spend.rows.len(), 1);
    assert_eq!(spend.rows[0].requests, 1);
    assert_eq!(spend.total_cost_usd_nanos, 435_000);

    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_cache_hit_costs_nothing_and_records_the_saving() {
    let env = Env::new().await;
    let mut app = env.start(env.config()).await;
    let mut hit = event("billing", "openai", "gpt-4o-mini", usage(0, 0, 0));
    hit.cache = CacheOutcome::Hit as i32;
    hit.saved_usage = Some(usage(1000, 200, 500));
    env.publish(&hit).await;

    let record = app.wait_record(&hit.request_id).await;
    assert_eq!(record.cache, CacheOutcome::Hit as i32);
    assert_eq!(record.cost_usd_nanos, Some(0));
    assert_eq!(record.saved_usd_nanos, 435_000);
    assert_eq!((record.prompt_tokens, record.completion_tokens), (0, 0));

    let spend = app
        .client
        .get_spend(spend_request("billing"))
        .await
        .expect("spend")
        .into_inner();
    assert_eq!(spend.rows.len(), 1);
    let row = &spend.rows[0];
    assert_eq!(
        (
            row.requests,
            row.cache_hits,
            row.cost_usd_nanos,
            row.saved_usd_nanos
        ),
        (1, 1, 0, 435_000)
    );
    assert_eq!(row.unpriced_requests, 0);
    assert_eq!(spend.total_cost_usd_nanos, 0);

    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn redelivered_messages_still_make_exactly_one_row() {
    let env = Env::new().await;
    let config = Config {
        ack_wait_secs: 1,
        ..env.config()
    };
    // A previous ledger process: created the consumer, fetched two events and died without acking.
    // It had committed the first one's row; the second one it had not.
    let settings = ConsumerSettings {
        name: "ledger".into(),
        batch_size: config.batch_size,
        linger: Duration::from_millis(config.linger_ms),
        ack_wait: Duration::from_secs(1),
    };
    let stream = env
        .nats_config
        .ensure_usage_stream(&env.js)
        .await
        .expect("stream");
    let crashed = stream
        .create_consumer(consumer_config(&settings, &env.nats_config))
        .await
        .expect("consumer");
    let committed = event("billing", "openai", "gpt-4o-mini", usage(1000, 200, 500));
    let uncommitted = event("billing", "openai", "gpt-4o-mini", usage(10, 0, 10));
    env.publish(&committed).await;
    env.publish(&uncommitted).await;
    let mut fetched = crashed
        .fetch()
        .max_messages(10)
        .messages()
        .await
        .expect("fetch");
    let mut delivered = 0;
    while let Some(message) = fetched.next().await {
        message.expect("message");
        delivered += 1;
    }
    assert_eq!(delivered, 2);
    let repo = Repository::connect(&config.database_url, 2)
        .await
        .expect("repo");
    // The crashed process had the same gpt-4o-mini price recorded.
    let rates = Rates::flat(Rate(150_000_000), Rate(75_000_000), Rate(600_000_000));
    let mini = Price::configured("*", "gpt-4o-mini", date!(2024 - 01 - 01), rates);
    repo.sync_prices(&[mini]).await.expect("prices");
    let book = repo.load_prices().await.expect("prices");
    let row = price_event(committed.clone(), time::OffsetDateTime::now_utc(), &book).expect("row");
    assert_eq!(repo.insert_batch(&[row]).await.expect("insert"), 1);

    // The restarted ledger gets both again after ack_wait.
    let mut app = env.start(config).await;
    app.wait_record(&uncommitted.request_id).await;
    env.wait_consumer_idle(2).await;
    let info = env.durable().await.get_info().await.expect("info");
    assert!(info.delivered.stream_sequence >= 2);
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records")
        .fetch_one(repo.pool())
        .await
        .expect("count");
    assert_eq!(rows, 2);
    let first = app.record(&committed.request_id).await.expect("record");
    assert_eq!(first.cost_usd_nanos, Some(435_000));

    repo.pool().close().await;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn poison_messages_are_terminated_and_do_not_block() {
    let env = Env::new().await;
    let mut app = env.start(env.config()).await;
    let subject = env.nats_config.usage_subject("billing");
    env.js
        .publish(subject.clone(), "not protobuf \u{1}\u{2}\u{3}".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let mut bad_id = event("billing", "openai", "gpt-4o-mini", usage(1, 0, 1));
    bad_id.request_id = "req-not-a-uuid".into();
    env.publish(&bad_id).await;
    let good = event("billing", "openai", "gpt-4o-mini", usage(1000, 200, 500));
    env.publish(&good).await;

    app.wait_record(&good.request_id).await;
    env.wait_consumer_idle(3).await;
    let spend = app
        .client
        .get_spend(spend_request(""))
        .await
        .expect("spend")
        .into_inner();
    assert_eq!(spend.rows.iter().map(|r| r.requests).sum::<u64>(), 1);

    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_message_records_each_event_once_and_drops_only_the_bad_one() {
    let env = Env::new().await;
    let mut app = env.start(env.config()).await;
    let first = event("billing", "openai", "gpt-4o-mini", usage(1000, 200, 500));
    let second = event("search", "openai", "gpt-4o-mini", usage(1000, 200, 500));
    let mut bad_id = event("billing", "openai", "gpt-4o-mini", usage(1, 0, 1));
    bad_id.request_id = "req-not-a-uuid".into();
    let none = opentelemetry::Context::new();
    let batch = [(&first, &none), (&bad_id, &none), (&second, &none)];
    switchboard_bus::publish_usage_batch(&env.js, &env.nats_config, &batch)
        .await
        .expect("publish")
        .await
        .expect("stored");
    // The first event again, alone and inside another batch: still one row.
    env.publish(&first).await;
    let again = [(&second, &none), (&first, &none)];
    switchboard_bus::publish_usage_batch(&env.js, &env.nats_config, &again)
        .await
        .expect("publish")
        .await
        .expect("stored");

    app.wait_record(&first.request_id).await;
    app.wait_record(&second.request_id).await;
    // Every message acknowledged (none terminated, none left for redelivery).
    env.wait_consumer_idle(3).await;
    let spend = app
        .client
        .get_spend(spend_request(""))
        .await
        .expect("spend")
        .into_inner();
    assert_eq!(spend.rows.iter().map(|r| r.requests).sum::<u64>(), 2);
    assert_eq!(spend.total_cost_usd_nanos, 2 * 435_000);
    let by_app: std::collections::BTreeMap<_, _> = spend
        .rows
        .iter()
        .map(|r| (r.app.clone(), r.requests))
        .collect();
    assert_eq!(
        by_app,
        [("billing".to_owned(), 1), ("search".to_owned(), 1)].into()
    );
    assert!(app.record("req-not-a-uuid").await.is_err());

    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn argument_errors() {
    let env = Env::new().await;
    let mut app = env.start(env.config()).await;
    let code_of = |status: tonic::Status| (status.code(), ErrorCode::from_status(&status));
    let invalid = (tonic::Code::InvalidArgument, ErrorCode::InvalidArgument);

    let missing_start = GetSpendRequest {
        start: None,
        ..spend_request("")
    };
    assert_eq!(
        code_of(app.client.get_spend(missing_start).await.unwrap_err()),
        invalid
    );
    let missing_end = GetSpendRequest {
        end: None,
        ..spend_request("")
    };
    assert_eq!(
        code_of(app.client.get_spend(missing_end).await.unwrap_err()),
        invalid
    );
    let equal = GetSpendRequest {
        start: Some(Timestamp {
            seconds: T0,
            nanos: 0,
        }),
        end: Some(Timestamp {
            seconds: T0,
            nanos: 0,
        }),
        app: String::new(),
    };
    assert_eq!(
        code_of(app.client.get_spend(equal).await.unwrap_err()),
        invalid
    );
    let reversed = GetSpendRequest {
        start: Some(Timestamp {
            seconds: T0,
            nanos: 0,
        }),
        end: Some(Timestamp {
            seconds: T0 - 1,
            nanos: 0,
        }),
        app: String::new(),
    };
    let status = app.client.get_spend(reversed).await.unwrap_err();
    assert_eq!(
        switchboard_status::status_metadata(&status)
            .get("field")
            .map(String::as_str),
        Some("end")
    );
    assert_eq!(code_of(status), invalid);

    assert_eq!(
        code_of(app.record("not-a-uuid").await.unwrap_err()),
        invalid
    );
    assert_eq!(
        code_of(app.record(&new_id()).await.unwrap_err()),
        (tonic::Code::NotFound, ErrorCode::NotFound)
    );

    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn rewriting_price_history_is_a_startup_configuration_error() {
    let env = Env::new().await;
    let app = env.start(env.config()).await;
    app.stop().await;

    // Same prices again: fine (idempotent start).
    let again = App::build(env.config(), env.nats_config.clone())
        .await
        .expect("restart with the same prices");
    drop(again);

    let mut changed = env.config();
    changed.prices[0].output = "0.61".into();
    let error = App::build(changed, env.nats_config.clone())
        .await
        .err()
        .expect("history conflict");
    assert!(error.is_config(), "{error}");
    assert!(error.to_string().contains("gpt-4o-mini"), "{error}");

    // Invalid configuration is refused before touching anything.
    let bad = Config {
        prices: vec![price("*", "m", "-1", None, "1", "2024-01-01")],
        ..env.config()
    };
    let error = App::build(bad, env.nats_config.clone())
        .await
        .err()
        .expect("invalid price");
    assert!(
        error.is_config() && error.to_string().contains("ledger.prices[0].input"),
        "{error}"
    );

    env.cleanup().await;
}

#[tokio::test]
async fn a_database_outage_delays_but_never_loses_or_acks_early() {
    let env = Env::new().await;
    let mut app = env.start(env.config()).await;
    let admin = sqlx::PgPool::connect(&env.pg.url)
        .await
        .expect("admin pool");
    // Make every insert fail (undefined table: not a data error, so the consumer retries).
    sqlx::query("ALTER TABLE usage_records RENAME TO usage_records_away")
        .execute(&admin)
        .await
        .expect("rename");
    let e = event("billing", "openai", "gpt-4o-mini", usage(1000, 200, 500));
    env.publish(&e).await;
    let consumer = env.durable().await;
    // Delivered to the ledger, but not acknowledged while it cannot commit.
    let info = eventually("delivery", || {
        let consumer = consumer.clone();
        async move {
            consumer
                .get_info()
                .await
                .ok()
                .filter(|i| i.delivered.stream_sequence >= 1)
        }
    })
    .await;
    assert_eq!(info.ack_floor.stream_sequence, 0);
    assert_eq!(info.num_ack_pending, 1);

    sqlx::query("ALTER TABLE usage_records_away RENAME TO usage_records")
        .execute(&admin)
        .await
        .expect("rename back");
    assert_eq!(
        app.wait_record(&e.request_id).await.cost_usd_nanos,
        Some(435_000)
    );
    env.wait_consumer_idle(1).await;

    admin.close().await;
    app.stop().await;
    env.cleanup().await;
}
