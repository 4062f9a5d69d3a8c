//! Budgets declared in `[[ledger.budgets]]`: upserted at every start of the real `App` (real
//! Postgres and NATS), next to budgets managed through `BudgetService`, which they never touch.
//! (They are upserted at every configuration reload too: `reload.rs`.)

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use switchboard_bus::NatsConfig;
use switchboard_ledger::{App, BudgetConfig, Config, StartupError};
use switchboard_proto::ledger::v1::{
    Budget, BudgetEnforcement, BudgetPeriod, BudgetScope, BudgetScopeKind, CreateBudgetRequest,
    ListBudgetsRequest, UpdateBudgetRequest, budget_service_client::BudgetServiceClient,
};
use switchboard_testkit::{TestNats, TestPg};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, transport::Channel};

struct Env {
    pg: TestPg,
    nats: TestNats,
    nats_config: NatsConfig,
}

impl Env {
    async fn new() -> Env {
        let pg = TestPg::create().await.expect("postgres");
        let nats = TestNats::create().await.expect("nats");
        let nats_config = nats.config();
        Env {
            pg,
            nats,
            nats_config,
        }
    }

    fn config(&self, budgets: Vec<BudgetConfig>) -> Config {
        Config {
            grpc_addr: "127.0.0.1:0".into(),
            database_url: self.pg.url.clone(),
            max_connections: 4,
            budgets,
            ..Config::default()
        }
    }

    async fn start(&self, budgets: Vec<BudgetConfig>) -> Running {
        let app = App::build(self.config(budgets), self.nats_config.clone())
            .await
            .expect("app builds");
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        let client = BudgetServiceClient::connect(switchboard_grpc::url_of(addr))
            .await
            .expect("client");
        Running {
            client,
            stop: Some(stop),
            task,
        }
    }

    async fn cleanup(self) {
        self.nats.cleanup().await;
        self.pg.drop_db().await;
    }
}

struct Running {
    client: BudgetServiceClient<Channel>,
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

    /// Every budget, by id.
    async fn budgets(&mut self) -> BTreeMap<String, Budget> {
        self.client
            .list_budgets(ListBudgetsRequest {})
            .await
            .unwrap()
            .into_inner()
            .budgets
            .into_iter()
            .map(|b| (b.id.clone(), b))
            .collect()
    }
}

fn team_budget() -> BudgetConfig {
    BudgetConfig {
        scope: "team".into(),
        id: "team-1".into(),
        limit_usd: Some("250.50".into()),
        limit_usd_nanos: None,
        period: "month".into(),
        time_zone: "Europe/Berlin".into(),
        enforcement: "hard".into(),
        alert_thresholds_pct: vec![100, 50, 80],
    }
}

fn org_budget() -> BudgetConfig {
    BudgetConfig {
        scope: "org".into(),
        id: String::new(),
        limit_usd: None,
        limit_usd_nanos: Some(5_000_000_000_000_000),
        period: "lifetime".into(),
        time_zone: String::new(),
        enforcement: "soft".into(),
        alert_thresholds_pct: Vec::new(),
    }
}

fn api_budget(id: &str, limit_usd_nanos: i64) -> Budget {
    Budget {
        id: id.into(),
        scope: Some(BudgetScope {
            kind: BudgetScopeKind::Team as i32,
            id: "team-1".into(),
        }),
        period: BudgetPeriod::Day as i32,
        time_zone: "Asia/Tokyo".into(),
        limit_usd_nanos,
        enforcement: BudgetEnforcement::Hard as i32,
        alert_thresholds_pct: vec![90],
        created_at: None,
        updated_at: None,
    }
}

/// Everything but the timestamps.
fn settings(budget: &Budget) -> (Option<BudgetScope>, i32, &str, i64, i32, &[u32]) {
    (
        budget.scope.clone(),
        budget.period,
        budget.time_zone.as_str(),
        budget.limit_usd_nanos,
        budget.enforcement,
        budget.alert_thresholds_pct.as_slice(),
    )
}

const TEAM_ID: &str = "config.team.team-1";
const ORG_ID: &str = "config.org";

#[tokio::test]
async fn declared_budgets_are_upserted_at_every_start_and_api_budgets_are_left_alone() {
    let env = Env::new().await;

    // First start: both declared budgets are created with the declared values.
    let mut app = env.start(vec![team_budget(), org_budget()]).await;
    let first = app.budgets().await;
    assert_eq!(
        first.keys().collect::<Vec<_>>(),
        vec![ORG_ID, TEAM_ID],
        "{first:?}"
    );
    let team_scope = Some(BudgetScope {
        kind: BudgetScopeKind::Team as i32,
        id: "team-1".into(),
    });
    assert_eq!(
        settings(&first[TEAM_ID]),
        (
            team_scope.clone(),
            BudgetPeriod::Month as i32,
            "Europe/Berlin",
            250_500_000_000,
            BudgetEnforcement::Hard as i32,
            &[50, 80, 100][..],
        )
    );
    assert_eq!(
        settings(&first[ORG_ID]),
        (
            Some(BudgetScope {
                kind: BudgetScopeKind::Org as i32,
                id: String::new(),
            }),
            BudgetPeriod::Lifetime as i32,
            "UTC",
            5_000_000_000_000_000,
            BudgetEnforcement::Soft as i32,
            &[][..],
        )
    );

    // A budget created through the API on the same scope is a budget of its own.
    let api = app
        .client
        .create_budget(CreateBudgetRequest {
            budget: Some(api_budget("team-1-daily", 10_000_000_000)),
        })
        .await
        .unwrap()
        .into_inner()
        .budget
        .unwrap();
    // Declared ids are reserved.
    let refused = app
        .client
        .create_budget(CreateBudgetRequest {
            budget: Some(api_budget("config.team.team-2", 1)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("reserved"), "{refused:?}");
    let before_restart = app.budgets().await;
    app.stop().await;

    // Same configuration again: nothing is written (not even `updated_at`).
    let mut app = env.start(vec![org_budget(), team_budget()]).await;
    assert_eq!(app.budgets().await, before_restart);
    app.stop().await;

    // One declared budget changed: it is updated, the other and the API budget are not.
    let changed = BudgetConfig {
        limit_usd: Some("300".into()),
        time_zone: "UTC".into(),
        enforcement: "soft".into(),
        alert_thresholds_pct: vec![90],
        ..team_budget()
    };
    let mut app = env.start(vec![changed.clone(), org_budget()]).await;
    let after = app.budgets().await;
    assert_eq!(after.len(), 3);
    assert_eq!(
        settings(&after[TEAM_ID]),
        (
            team_scope.clone(),
            BudgetPeriod::Month as i32,
            "UTC",
            300_000_000_000,
            BudgetEnforcement::Soft as i32,
            &[90][..],
        )
    );
    assert_eq!(after[TEAM_ID].created_at, first[TEAM_ID].created_at);
    assert_ne!(after[TEAM_ID].updated_at, first[TEAM_ID].updated_at);
    assert_eq!(after[ORG_ID], first[ORG_ID]);
    assert_eq!(after["team-1-daily"], api);

    // An API update of a declared budget lasts until the next start: the configuration owns it.
    let mut overridden = after[TEAM_ID].clone();
    overridden.limit_usd_nanos = 1;
    app.client
        .update_budget(UpdateBudgetRequest {
            budget: Some(overridden),
        })
        .await
        .unwrap();
    app.stop().await;

    // Restart without the organisation's budget: the team's declared values are back, the
    // undeclared budget is kept as it was, the API budget is still untouched.
    let mut app = env.start(vec![changed]).await;
    let last = app.budgets().await;
    assert_eq!(last.len(), 3);
    assert_eq!(settings(&last[TEAM_ID]), settings(&after[TEAM_ID]));
    assert_eq!(last[ORG_ID], first[ORG_ID]);
    assert_eq!(last["team-1-daily"], api);
    app.stop().await;

    env.cleanup().await;
}

#[tokio::test]
async fn an_invalid_declared_budget_stops_the_start_naming_its_field() {
    let env = Env::new().await;
    let bad = BudgetConfig {
        time_zone: "Mars/Olympus".into(),
        ..team_budget()
    };
    let error = App::build(env.config(vec![org_budget(), bad]), env.nats_config.clone())
        .await
        .err()
        .expect("invalid time zone");
    assert!(error.is_config(), "{error}");
    assert!(
        error.to_string().contains("ledger.budgets[1].time_zone"),
        "{error}"
    );
    let twice = App::build(
        env.config(vec![team_budget(), org_budget(), team_budget()]),
        env.nats_config.clone(),
    )
    .await
    .err()
    .expect("the same scope twice");
    assert!(
        twice.is_config() && twice.to_string().contains("ledger.budgets[2].id"),
        "{twice}"
    );
    env.cleanup().await;
}
