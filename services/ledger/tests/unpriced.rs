//! ListUnpriced names the model without a price: an earlier attempt's (a stream cut short after
//! its provider reported usage, then a fallback served the request on a priced model), not the
//! serving one; the serving model when it is the one without a price; the serving model as before
//! when no model can be named (a row recorded before earlier attempts were kept).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_bus::UsageEvent;
use switchboard_ledger::{
    App, Config, PriceConfig, StartupError,
    internals::{Repository, price_event},
};
use switchboard_proto::{
    Timestamp,
    chat::v1::{Attempt, RouteInfo, Usage},
    ledger::v1::{
        ListUnpricedRequest, RequestStatus, UnpricedModel,
        ledger_service_client::LedgerServiceClient,
    },
};
use switchboard_testkit::{TestNats, TestPg};
use time::{OffsetDateTime, macros::datetime};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use uuid::Uuid;

const T0: OffsetDateTime = datetime!(2025-03-01 12:00 UTC);

struct Ledger {
    pg: TestPg,
    nats: TestNats,
    repo: Repository,
    client: LedgerServiceClient<Channel>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), StartupError>>,
}

fn price(model: &str, effective_from: &str) -> PriceConfig {
    PriceConfig {
        model: model.into(),
        provider: "*".into(),
        input: "0.15".into(),
        cached_input: None,
        cache_write: None,
        output: "0.60".into(),
        reasoning: None,
        effective_from: Some(effective_from.into()),
    }
}

impl Ledger {
    /// A ledger with prices for `gpt-4o-mini` (from 2024) and `later` (from the day after T0).
    async fn start() -> Ledger {
        let pg = TestPg::create().await.expect("postgres");
        let nats = TestNats::create().await.expect("nats");
        let config = Config {
            grpc_addr: "127.0.0.1:0".into(),
            database_url: pg.url.clone(),
            max_connections: 4,
            prices: vec![
                price("gpt-4o-mini", "2024-01-01"),
                price("later", "2025-03-02"),
            ],
            ..Config::default()
        };
        let app = App::build(config, nats.config()).await.expect("ledger");
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        let client = LedgerServiceClient::connect(switchboard_grpc::url_of(addr))
            .await
            .expect("client");
        let repo = Repository::connect(&pg.url, 2).await.expect("repo");
        Ledger {
            pg,
            nats,
            repo,
            client,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("join").expect("clean shutdown");
        self.repo.pool().close().await;
        self.nats.cleanup().await;
        self.pg.drop_db().await;
    }

    /// Prices the events as the ledger records them, and inserts them.
    async fn record(&self, events: Vec<UsageEvent>) -> Vec<Option<i64>> {
        let book = self.repo.load_prices().await.unwrap();
        let rows: Vec<_> = events
            .into_iter()
            .map(|e| price_event(e, T0, &book).unwrap())
            .collect();
        assert_eq!(
            self.repo.insert_batch(&rows).await.unwrap(),
            rows.len() as u64
        );
        rows.iter().map(|r| r.cost_usd_nanos).collect()
    }

    async fn unpriced(&mut self, app: &str) -> Vec<UnpricedModel> {
        self.client
            .list_unpriced(ListUnpricedRequest {
                start: ts(T0 - Duration::from_secs(3_600)),
                end: ts(T0 + Duration::from_secs(3_600)),
                app: app.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .models
    }
}

fn ts(t: OffsetDateTime) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: t.unix_timestamp(),
        nanos: 0,
    })
}

fn usage(prompt: u32, completion: u32) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        ..Default::default()
    }
}

/// A request of `app` at `at` served by openai/`model` (1000 in, 500 out), after `earlier`
/// attempts ((provider, model, usage) each, failed).
fn event(
    app: &str,
    at: OffsetDateTime,
    model: &str,
    earlier: &[(&str, &str, Usage)],
) -> UsageEvent {
    let served = usage(1000, 500);
    let mut attempts: Vec<Attempt> = earlier
        .iter()
        .map(|(provider, model, usage)| Attempt {
            target: format!("{provider}/{model}"),
            provider: (*provider).into(),
            model: (*model).into(),
            error_code: "STREAM_INTERRUPTED".into(),
            usage: Some(*usage),
            ..Default::default()
        })
        .collect();
    attempts.push(Attempt {
        target: format!("openai/{model}"),
        provider: "openai".into(),
        model: model.into(),
        usage: Some(served),
        ..Default::default()
    });
    UsageEvent {
        request_id: Uuid::now_v7().to_string(),
        time: ts(at),
        app: app.into(),
        requested_model: "fast".into(),
        route: Some(RouteInfo {
            route: "fast".into(),
            provider: "openai".into(),
            model: model.into(),
            target: format!("openai/{model}"),
            attempt_count: u32::try_from(attempts.len()).unwrap(),
            attempts,
            key_alias: String::new(),
        }),
        usage: Some(served),
        status: RequestStatus::Ok as i32,
        ..Default::default()
    }
}

fn listed(models: &[UnpricedModel]) -> Vec<(&str, &str, u64, u64, u64)> {
    models
        .iter()
        .map(|m| {
            (
                m.provider.as_str(),
                m.model.as_str(),
                m.requests,
                m.prompt_tokens,
                m.completion_tokens,
            )
        })
        .collect()
}

#[tokio::test]
async fn list_unpriced_names_the_model_without_a_price_not_the_serving_one() {
    let mut ledger = Ledger::start().await;
    let minute = Duration::from_secs(60);
    let costs = ledger
        .record(vec![
            // Served by a priced model after a cut attempt that used tokens on `mystery`.
            event(
                "billing",
                T0,
                "gpt-4o-mini",
                &[("primary", "mystery", usage(1200, 100))],
            ),
            // The serving model has no price: listed under it, as before (twice).
            event("billing", T0 + minute, "unknown-serving", &[]),
            event("billing", T0 + 2 * minute, "unknown-serving", &[]),
            // A cut attempt on a model whose price starts the next day: no price at the row's time.
            event(
                "billing",
                T0 + 3 * minute,
                "gpt-4o-mini",
                &[("primary", "later", usage(10, 1))],
            ),
            // A cut attempt on a priced model and a serving one without a price: the serving one.
            event(
                "billing",
                T0 + 4 * minute,
                "unknown-serving",
                &[("primary", "gpt-4o-mini", usage(50, 5))],
            ),
            // Another app.
            event(
                "search",
                T0 + 5 * minute,
                "gpt-4o-mini",
                &[("primary", "mystery", usage(30, 3))],
            ),
        ])
        .await;
    assert!(costs.iter().all(Option::is_none), "{costs:?}");
    // A row recorded before earlier attempts were kept (attempts > 1, earlier_attempts NULL),
    // unpriced: no model can be named, so its serving model, as before.
    let mut legacy = price_event(
        event("billing", T0 + 6 * minute, "gpt-4o-mini", &[]),
        T0,
        &ledger.repo.load_prices().await.unwrap(),
    )
    .unwrap();
    legacy.attempts = 2;
    legacy.earlier_attempts = None;
    legacy.cost_usd_nanos = None;
    assert_eq!(ledger.repo.insert_batch(&[legacy]).await.unwrap(), 1);

    let billing = ledger.unpriced("billing").await;
    assert_eq!(
        listed(&billing),
        [
            ("openai", "unknown-serving", 3, 3000, 1500),
            ("openai", "gpt-4o-mini", 1, 1000, 500),
            ("primary", "later", 1, 10, 1),
            ("primary", "mystery", 1, 1200, 100),
        ]
    );
    let mystery = &billing[3];
    assert_eq!(
        (mystery.first_seen, mystery.last_seen),
        (ts(T0), ts(T0)),
        "{mystery:?}"
    );
    let everyone = ledger.unpriced("").await;
    assert_eq!(
        listed(&everyone),
        [
            ("openai", "unknown-serving", 3, 3000, 1500),
            ("primary", "mystery", 2, 1230, 103),
            ("openai", "gpt-4o-mini", 1, 1000, 500),
            ("primary", "later", 1, 10, 1),
        ]
    );
    assert_eq!(
        everyone[1].last_seen,
        ts(T0 + 5 * minute),
        "{:?}",
        everyone[1]
    );
    ledger.stop().await;
}
