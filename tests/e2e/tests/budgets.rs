//! Budgets and shared rate limits across gateway replicas (ADR 007): several gateway `App`s in one
//! process with one ledger, router and guard (no cache: every request reaches the budget), real
//! Postgres and NATS, fake providers.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use prost::Message as _;
use switchboard_config::Source;
use switchboard_e2e::{KEY_A, MODEL, mesh_toml};
use switchboard_fake_provider::{FakeConfig, FakeProvider};
use switchboard_gateway::{BudgetsConfig, RateLimitConfig};
use switchboard_proto::ledger::v1::{
    AcquireLeaseRequest, Budget, BudgetAlert, BudgetEnforcement, BudgetPeriod, BudgetScope,
    BudgetScopeKind, BudgetStatus, CreateBudgetRequest, GetBudgetStatusRequest,
    budget_service_client::BudgetServiceClient,
};
use switchboard_testkit::{TestNats, TestPg};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A mesh with `gateways` gateway replicas sharing one ledger, router and guard.
struct Mesh {
    primary: FakeProvider,
    backup: FakeProvider,
    gateways: Vec<String>,
    gateway_grpc: Vec<String>,
    ledger_url: String,
    nats: TestNats,
    pg: TestPg,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

struct Options {
    gateways: usize,
    budgets: BudgetsConfig,
    rate_limits: Vec<RateLimitConfig>,
    /// TOML appended to the mesh configuration (more `[[ledger.prices]]`).
    extra_toml: String,
    /// Point the gateways at this ledger URL instead of the real one.
    ledger_url_override: Option<String>,
    /// Budgets created before the gateways start (so their first catalog has them).
    create: Vec<Budget>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gateways: 1,
            budgets: BudgetsConfig {
                enabled: true,
                refresh_ms: 500,
                lease_ttl_ms: 1_500,
                lease_pct: 10,
                denied_backoff_ms: 100,
                ..BudgetsConfig::default()
            },
            rate_limits: Vec::new(),
            extra_toml: String::new(),
            ledger_url_override: None,
            create: Vec::new(),
        }
    }
}

fn spawn<F, Fut>(cancel: &CancellationToken, run: F) -> JoinHandle<anyhow::Result<()>>
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let cancel = cancel.clone();
    let stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(async move { cancel.cancelled_owned().await });
    tokio::spawn(run(stop))
}

impl Mesh {
    async fn start(options: Options) -> anyhow::Result<Mesh> {
        let fake = || FakeConfig {
            addr: "127.0.0.1:0".into(),
            ..Default::default()
        };
        let primary = FakeProvider::start(fake()).await?;
        let backup = FakeProvider::start(fake()).await?;
        let nats = TestNats::create().await?;
        let pg = TestPg::create().await?;
        let toml = mesh_toml(&primary.base_url(), &backup.base_url(), &pg.url, &nats)
            + &options.extra_toml;
        let source = Source::from_toml(&toml)?;
        let nats_config: switchboard_bus::NatsConfig = source.section("nats")?;
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();

        let ledger = switchboard_ledger::App::build(source.section("ledger")?, nats_config.clone())
            .await
            .context("ledger")?;
        let ledger_url = format!("http://{}", ledger.local_addr());
        tasks.push(spawn(&cancel, |stop| async move {
            Ok(ledger.run_until(stop).await?)
        }));
        let mut budgets = BudgetServiceClient::connect(ledger_url.clone()).await?;
        for budget in options.create {
            budgets
                .create_budget(CreateBudgetRequest {
                    budget: Some(budget),
                })
                .await?;
        }
        let router = switchboard_router::App::build(source.section("router")?)
            .await
            .context("router")?;
        let router_url = format!("http://{}", router.local_addr());
        tasks.push(spawn(&cancel, |stop| async move {
            Ok(router.run_until(stop).await?)
        }));
        let guard = switchboard_guard::App::build(source.section("guard")?)
            .await
            .context("guard")?;
        let guard_url = format!("http://{}", guard.local_addr());
        tasks.push(spawn(&cancel, |stop| async move {
            Ok(guard.run_until(stop).await?)
        }));

        let mut gateways = Vec::new();
        let mut gateway_grpc = Vec::new();
        for replica in 0..options.gateways {
            let mut config: switchboard_gateway::Config = source.section("gateway")?;
            config.guard_url.clone_from(&guard_url);
            // No cache: every request reaches the router (and the budget).
            config.cache_enabled = false;
            config.router_url.clone_from(&router_url);
            config.ledger_url = options
                .ledger_url_override
                .clone()
                .unwrap_or_else(|| ledger_url.clone());
            config.budgets = options.budgets.clone();
            config.budgets.holder = format!("gateway-{replica}");
            config.rate_limits = options.rate_limits.clone();
            // Each replica its own outbox.
            config.outbox_dir = std::env::temp_dir()
                .join(format!("sb-budgets-{}", uuid::Uuid::now_v7()))
                .to_string_lossy()
                .into_owned();
            let gateway = switchboard_gateway::App::build(config, nats_config.clone())
                .await
                .context("gateway")?;
            gateways.push(format!("http://{}", gateway.http_addr()));
            gateway_grpc.push(format!("http://{}", gateway.grpc_addr()));
            tasks.push(spawn(&cancel, |stop| async move {
                Ok(gateway.run_until(stop).await?)
            }));
        }
        Ok(Mesh {
            primary,
            backup,
            gateways,
            gateway_grpc,
            ledger_url,
            nats,
            pg,
            cancel,
            tasks,
        })
    }

    async fn budgets(&self) -> anyhow::Result<BudgetServiceClient<Channel>> {
        Ok(BudgetServiceClient::connect(self.ledger_url.clone()).await?)
    }

    async fn status(&self, id: &str) -> anyhow::Result<BudgetStatus> {
        self.budgets()
            .await?
            .get_budget_status(GetBudgetStatusRequest { id: id.to_owned() })
            .await?
            .into_inner()
            .status
            .context("no status")
    }

    /// `(rows, Σ cost)` of app `app` in usage_records, once `rows` reaches `expected` (bounded).
    async fn recorded(&self, app: &str, expected: i64) -> anyhow::Result<(i64, i64)> {
        let pool = sqlx::PgPool::connect(&self.pg.url).await?;
        let mut last = (0, 0);
        for _ in 0..300 {
            let row: (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*), COALESCE(SUM(cost_usd_nanos), 0)::BIGINT FROM usage_records \
                 WHERE app = $1",
            )
            .bind(app)
            .fetch_one(&pool)
            .await?;
            last = row;
            if row.0 >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pool.close().await;
        Ok(last)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .context("service did not stop")???;
        }
        self.nats.cleanup().await;
        self.pg.drop_db().await;
        Ok(())
    }
}

fn budget(
    id: &str,
    kind: BudgetScopeKind,
    scope_id: &str,
    limit: i64,
    enforcement: BudgetEnforcement,
    thresholds: Vec<u32>,
) -> Budget {
    Budget {
        id: id.to_owned(),
        scope: Some(BudgetScope {
            kind: kind as i32,
            id: scope_id.to_owned(),
        }),
        period: BudgetPeriod::Day as i32,
        time_zone: "Europe/Berlin".to_owned(),
        limit_usd_nanos: limit,
        enforcement: enforcement as i32,
        alert_thresholds_pct: thresholds,
        ..Default::default()
    }
}

/// One chat completion over HTTP: (status, Retry-After, JSON body).
async fn chat(
    client: &reqwest::Client,
    gateway: &str,
    text: &str,
    max_tokens: u32,
) -> anyhow::Result<(u16, Option<String>, serde_json::Value)> {
    let response = client
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
        }))
        .send()
        .await?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: serde_json::Value = response.json().await?;
    Ok((status, retry_after, body))
}

fn assert_budget_error(body: &serde_json::Value, scope: &str, limit_usd: &str) {
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(scope), "{message}");
    assert!(message.contains(limit_usd), "{message}");
    assert!(message.contains("resets at 20"), "{message}");
}

/// The headline: three replicas, 200 concurrent requests, a small hard budget. The spend the ledger
/// recorded never exceeds it, and every refused request got the typed budget error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_never_overspend_a_hard_budget() -> anyhow::Result<()> {
    // About 27 requests' worth of true cost, 10 of their upper-bound estimates.
    const LIMIT: i64 = 60_000;
    let mesh = Mesh::start(Options {
        gateways: 3,
        create: vec![budget(
            "app-a-daily",
            BudgetScopeKind::App,
            "app-a",
            LIMIT,
            BudgetEnforcement::Hard,
            Vec::new(),
        )],
        ..Options::default()
    })
    .await?;
    let client = reqwest::Client::new();
    let results: Vec<anyhow::Result<(u16, Option<String>, serde_json::Value)>> =
        futures::stream::iter(0..200)
            .map(|i| {
                let client = client.clone();
                let gateway = mesh.gateways[i % 3].clone();
                async move { chat(&client, &gateway, &format!("hello budget {i}"), 5).await }
            })
            .buffer_unordered(200)
            .collect()
            .await;
    let mut served = 0i64;
    let mut refused = 0i64;
    for result in results {
        let (status, _, body) = result?;
        match status {
            200 => served += 1,
            429 => {
                assert_budget_error(&body, "app:app-a", "0.000060000 USD");
                refused += 1;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(
        served > 0 && refused > 0,
        "served {served}, refused {refused}"
    );
    let (rows, recorded) = mesh.recorded("app-a", served).await?;
    assert_eq!(rows, served, "one ledger row per served request");
    assert!(recorded > 0);
    assert!(
        recorded <= LIMIT,
        "recorded spend {recorded} exceeds the limit {LIMIT}"
    );
    let status = mesh.status("app-a-daily").await?;
    eprintln!(
        "served {served}, refused {refused}; recorded {recorded} / settled {} of {LIMIT} nano-USD",
        status.settled_usd_nanos
    );
    assert!(status.settled_usd_nanos <= LIMIT, "{status:?}");
    assert_eq!(status.recorded_usd_nanos, recorded);
    // What the leases have reported plus what they may still spend never exceeds the limit. (Adding
    // `recorded` instead would count twice a request whose usage row arrived before its replica
    // reported the spend on the lease: the ledger's grant rule does that on purpose, to be
    // conservative, but a snapshot of it can exceed the limit without any overspend.)
    assert!(
        status.settled_usd_nanos + status.leased_usd_nanos <= LIMIT,
        "{status:?}"
    );
    mesh.stop().await
}

/// A replica that took a lease and died: its slice is refused to others until the lease expires,
/// then the whole budget is usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_lease_expires_and_the_budget_is_usable_again() -> anyhow::Result<()> {
    const LIMIT: i64 = 50_000;
    let mesh = Mesh::start(Options {
        create: vec![budget(
            "app-a-crash",
            BudgetScopeKind::App,
            "app-a",
            LIMIT,
            BudgetEnforcement::Hard,
            Vec::new(),
        )],
        ..Options::default()
    })
    .await?;
    // The "crashed" replica: takes everything, never extends or releases.
    let crashed = mesh
        .budgets()
        .await?
        .acquire_lease(AcquireLeaseRequest {
            budget_id: "app-a-crash".into(),
            holder: "crashed".into(),
            requested_usd_nanos: LIMIT,
            minimum_usd_nanos: 1,
            ttl_ms: 5_000,
        })
        .await?
        .into_inner()
        .lease
        .context("lease")?;
    assert_eq!(crashed.granted_usd_nanos, LIMIT);
    let client = reqwest::Client::new();
    let (status, _, body) = chat(&client, &mesh.gateways[0], "hello crash", 5).await?;
    assert_eq!(status, 429, "{body}");
    assert_budget_error(&body, "app:app-a", "0.000050000 USD");
    // Served again once the lease has expired (bounded wait, no timing assertion).
    let mut served = false;
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, _, _) = chat(&client, &mesh.gateways[0], "hello again", 5).await?;
        if status == 200 {
            served = true;
            break;
        }
    }
    assert!(served, "the budget never became usable again");
    // The crashed lease is reclaimed: only the live replica's lease is open, and everything else
    // can be leased again.
    let status = mesh.status("app-a-crash").await?;
    assert_eq!(status.open_leases, 1, "{status:?}");
    assert_eq!(
        status.remaining_usd_nanos,
        LIMIT - status.settled_usd_nanos.max(status.recorded_usd_nanos) - status.leased_usd_nanos,
        "{status:?}"
    );
    let probe = mesh
        .budgets()
        .await?
        .acquire_lease(AcquireLeaseRequest {
            budget_id: "app-a-crash".into(),
            holder: "probe".into(),
            requested_usd_nanos: status.remaining_usd_nanos,
            minimum_usd_nanos: status.remaining_usd_nanos,
            ttl_ms: 1_000,
        })
        .await?
        .into_inner()
        .lease
        .context("lease")?;
    assert_eq!(probe.granted_usd_nanos, status.remaining_usd_nanos);
    assert!(probe.granted_usd_nanos > LIMIT / 2, "{probe:?}");
    mesh.stop().await
}

/// The primary fails; the backup is so expensive that its estimate does not fit what is left of
/// the budget: it is never sent. The request failed because the primary was down (the budget had
/// room for the primary), so the caller gets the outage, whose summary names the skipped backup,
/// not a budget error that would say the budget is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_whose_estimate_does_not_fit_is_not_sent() -> anyhow::Result<()> {
    // Primary estimate: (14 + 8) prompt tokens × 150 + 5 × 600 = 6,300 nano-USD; backup's is
    // about 670 times that.
    const LIMIT: i64 = 20_000;
    let mesh = Mesh::start(Options {
        budgets: BudgetsConfig {
            lease_pct: 100,
            ..Options::default().budgets
        },
        extra_toml: format!(
            "[[ledger.prices]]\nprovider = \"backup\"\nmodel = \"{MODEL}\"\ninput = \"100\"\n\
             output = \"400\"\neffective_from = \"2024-01-01\"\n"
        ),
        create: vec![budget(
            "app-a-fallback",
            BudgetScopeKind::App,
            "app-a",
            LIMIT,
            BudgetEnforcement::Hard,
            Vec::new(),
        )],
        ..Options::default()
    })
    .await?;
    mesh.primary.fail_next(MODEL, 500, 1);
    let client = reqwest::Client::new();
    let (status, _, body) = chat(&client, &mesh.gateways[0], "hello fallback", 5).await?;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "UPSTREAM_UNAVAILABLE", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("backup/gpt-4o-mini BUDGET_EXCEEDED"),
        "the skipped fallback is named: {message}"
    );
    assert_eq!(
        mesh.primary.request_count(MODEL),
        1,
        "the primary was tried"
    );
    assert_eq!(
        mesh.backup.request_count(MODEL),
        0,
        "the backup was not sent"
    );
    // With the primary healthy the same request is served within the budget.
    let (status, _, body) = chat(&client, &mesh.gateways[0], "hello fallback", 5).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(mesh.backup.request_count(MODEL), 0);
    mesh.stop().await
}

/// A soft budget never blocks; its alerts are published once per threshold per period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_budget_alerts_once_at_each_threshold() -> anyhow::Result<()> {
    // Each request costs 3 × 150 + 4 × 600 = 2,850 nano-USD ("hello soft N": 3 prompt words,
    // "echo: hello soft N": 4 completion words).
    const LIMIT: i64 = 10_000;
    let mesh = Mesh::start(Options {
        budgets: BudgetsConfig {
            lease_ttl_ms: 600,
            ..Options::default().budgets
        },
        create: vec![budget(
            "team-1-soft",
            BudgetScopeKind::Team,
            "team-1",
            LIMIT,
            BudgetEnforcement::Soft,
            vec![50, 80, 100],
        )],
        ..Options::default()
    })
    .await?;
    let client = async_nats::connect(&mesh.nats.url).await?;
    let mut alerts = client
        .subscribe(format!("{}.budget.alert.team.team-1", mesh.nats.prefix))
        .await?;
    client.flush().await?;
    let http = reqwest::Client::new();
    for i in 0..6 {
        let (status, _, body) =
            chat(&http, &mesh.gateways[0], &format!("hello soft {i}"), 50).await?;
        assert_eq!(status, 200, "a soft budget never blocks: {body}");
        // Let the replica report its spend (every third of the lease lifetime).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // 6 × 2,850 = 171 %: every threshold crossed; keep listening through more reports.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, alerts.next()).await {
        let alert = BudgetAlert::decode(message.payload)?;
        assert_eq!(alert.budget_id, "team-1-soft");
        assert_eq!(alert.limit_usd_nanos, LIMIT);
        assert!(alert.resets_at.is_some());
        assert!(
            i128::from(alert.spent_usd_nanos) * 100
                >= i128::from(alert.threshold_pct) * i128::from(LIMIT),
            "{alert:?}"
        );
        seen.push(alert.threshold_pct);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![50, 80, 100], "each threshold exactly once");
    mesh.stop().await
}

/// A requests-per-minute limit is shared by two replicas: the fifth request of a limit of four
/// is refused by whichever replica gets it, with Retry-After (HTTP) and RetryInfo (gRPC).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_is_shared_across_two_replicas() -> anyhow::Result<()> {
    let mesh = Mesh::start(Options {
        gateways: 2,
        budgets: BudgetsConfig::default(),
        rate_limits: vec![RateLimitConfig {
            key: Some("key-a".into()),
            app: None,
            requests_per_minute: 4,
            tokens_per_minute: 0,
        }],
        ..Options::default()
    })
    .await?;
    // Start well inside a minute window so that the five requests share one.
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        % 60;
    if second > 45 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    let client = reqwest::Client::new();
    for i in 0..4 {
        let (status, _, body) = chat(&client, &mesh.gateways[i % 2], &format!("rl {i}"), 5).await?;
        assert_eq!(status, 200, "request {i}: {body}");
    }
    let (status, retry_after, body) = chat(&client, &mesh.gateways[0], "rl 4", 5).await?;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("key:key-a"),
        "{body}"
    );
    let retry_after: u64 = retry_after.context("no Retry-After")?.parse()?;
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // The other replica, over gRPC: RESOURCE_EXHAUSTED with RetryInfo.
    let mut grpc =
        switchboard_proto::gateway::v1::gateway_service_client::GatewayServiceClient::connect(
            mesh.gateway_grpc[1].clone(),
        )
        .await?;
    let mut request = tonic::Request::new(
        switchboard_proto::gateway::v1::CreateChatCompletionRequest {
            request: Some(switchboard_proto::chat::v1::ChatRequest {
                model: MODEL.into(),
                messages: vec![switchboard_proto::chat::v1::Message::text(
                    switchboard_proto::chat::v1::Role::User,
                    "rl 5",
                )],
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY_A}").parse()?);
    let error = grpc.create_chat_completion(request).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::ResourceExhausted);
    use tonic_types::StatusExt as _;
    let retry = error.get_details_retry_info().context("no RetryInfo")?;
    assert!(retry.retry_delay.is_some_and(|d| d.as_secs() >= 1));
    mesh.stop().await
}

/// Budgets disabled: the gateway never talks to the ledger on the request path (here it cannot:
/// its ledger URL points at nothing, and requests are served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_disabled_add_no_ledger_call() -> anyhow::Result<()> {
    let mesh = Mesh::start(Options {
        budgets: BudgetsConfig::default(),
        ledger_url_override: Some("http://127.0.0.1:9".into()),
        // A zero budget that would refuse everything, were budgets enabled.
        create: vec![budget(
            "app-a-ignored",
            BudgetScopeKind::App,
            "app-a",
            0,
            BudgetEnforcement::Hard,
            Vec::new(),
        )],
        ..Options::default()
    })
    .await?;
    let client = reqwest::Client::new();
    for i in 0..3 {
        let (status, _, body) = chat(&client, &mesh.gateways[0], &format!("free {i}"), 5).await?;
        assert_eq!(status, 200, "{body}");
    }
    mesh.stop().await
}
