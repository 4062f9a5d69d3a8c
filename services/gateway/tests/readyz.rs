//! `GET /readyz` against dependencies whose gRPC health is switched per test: a stand-in server of
//! `grpc.health.v1` for the router, the guard and the cache, and the real NATS.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use switchboard_gateway::{App, Config, GuardConfig};
use switchboard_testkit::TestNats;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

/// A `grpc.health.v1` server whose overall status the test sets.
struct Health {
    url: String,
    reporter: HealthReporter,
    stop: CancellationToken,
}

impl Health {
    async fn start() -> Health {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move { until.cancelled().await },
                ),
        );
        Health {
            url,
            reporter,
            stop,
        }
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
    }
}

struct Gateway {
    http: String,
    grpc: String,
    stop: CancellationToken,
    nats: TestNats,
}

async fn gateway(router: &str, guard: &str, cache: &str, guard_config: GuardConfig) -> Gateway {
    gateway_with(router, guard, cache, guard_config, |_| {}).await
}

async fn gateway_with(
    router: &str,
    guard: &str,
    cache: &str,
    guard_config: GuardConfig,
    adjust: impl FnOnce(&mut Config),
) -> Gateway {
    let nats = TestNats::create().await.unwrap();
    let outbox = tempfile::tempdir().unwrap();
    let mut config = Config {
        http_addr: "127.0.0.1:0".to_owned(),
        grpc_addr: "127.0.0.1:0".to_owned(),
        router_url: router.to_owned(),
        guard_url: guard.to_owned(),
        cache_url: cache.to_owned(),
        outbox_dir: outbox.path().to_string_lossy().into_owned(),
        guard: guard_config,
        ..Config::default()
    };
    adjust(&mut config);
    let app = App::build(config, nats.config()).await.unwrap();
    let http = format!("http://{}", app.http_addr());
    let grpc = format!("http://{}", app.grpc_addr());
    let stop = CancellationToken::new();
    let until = stop.clone();
    tokio::spawn(async move {
        let _outbox = outbox;
        app.run_until(async move { until.cancelled().await }).await
    });
    Gateway {
        http,
        grpc,
        stop,
        nats,
    }
}

impl Gateway {
    async fn readyz(&self) -> (u16, Value) {
        let response = reqwest::get(format!("{}/readyz", self.http)).await.unwrap();
        let status = response.status().as_u16();
        assert_eq!(
            response.headers()["cache-control"],
            "no-store",
            "a readiness answer is never cached"
        );
        (status, response.json().await.unwrap())
    }

    async fn metrics(&self) -> String {
        let response = reqwest::get(format!("{}/metrics", self.http))
            .await
            .unwrap();
        response.text().await.unwrap()
    }

    /// Polls until the report's status is `want` (a report lives one second), bounded.
    async fn until(&self, want: &str) -> (u16, Value) {
        let mut last = None;
        for _ in 0..100 {
            let (code, body) = self.readyz().await;
            if body["status"] == want {
                return (code, body);
            }
            last = Some((code, body));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("/readyz never reported {want}; last: {last:?}");
    }

    /// The gateway's own `grpc.health.v1` answer for `service`.
    async fn grpc_health(&self, service: &str) -> i32 {
        let channel = switchboard_grpc::client(&self.grpc).await.unwrap();
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        client
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    }

    /// Polls until the gateway's gRPC health for the gateway service and for `""` is `want`.
    async fn until_grpc(&self, want: ServingStatus) {
        let mut last = None;
        for _ in 0..100 {
            let named = self
                .grpc_health("switchboard.gateway.v1.GatewayService")
                .await;
            let whole = self.grpc_health("").await;
            if named == want as i32 && whole == want as i32 {
                return;
            }
            last = Some((named, whole));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("gRPC health never reported {want:?}; last: {last:?}");
    }

    async fn stop(self) {
        self.stop.cancel();
        self.nats.cleanup().await;
    }
}

fn state<'a>(body: &'a Value, name: &str) -> &'a Value {
    let dependency = body["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing from {body}"));
    &dependency["state"]
}

/// A port nothing listens on.
fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

#[tokio::test]
async fn readiness_follows_each_dependency_and_names_the_degraded_mode() {
    let (router, guard, cache) = (
        Health::start().await,
        Health::start().await,
        Health::start().await,
    );
    let gw = gateway(&router.url, &guard.url, &cache.url, GuardConfig::default()).await;

    let (code, body) = gw.until("ready").await;
    assert_eq!(code, 200);
    for name in ["router", "guard", "cache", "nats"] {
        assert_eq!(state(&body, name), "up", "{name} in {body}");
    }
    // Budgets and rate limits are off: the ledger is no dependency.
    assert!(
        body["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["name"] != "ledger"),
        "{body}"
    );

    // The cache drains: still serving, in bypass.
    cache.set(ServingStatus::NotServing).await;
    let (code, body) = gw.until("degraded").await;
    assert_eq!(code, 200);
    assert_eq!(state(&body, "cache"), "not_serving");
    let cache_entry = body["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "cache")
        .unwrap();
    assert_eq!(cache_entry["required"], false);
    assert!(
        cache_entry["when_down"]
            .as_str()
            .unwrap()
            .contains("bypass"),
        "{cache_entry}"
    );

    // The same view in the metrics, for alerts.
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("switchboard_dependency_up{dependency=\"cache\",required=\"false\"} 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchboard_dependency_up{dependency=\"router\",required=\"true\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("switchboard_ready 1\n"), "{metrics}");

    // The guard drains with every route failing closed: nothing can be served.
    cache.set(ServingStatus::Serving).await;
    guard.set(ServingStatus::NotServing).await;
    let (code, body) = gw.until("unavailable").await;
    assert_eq!(code, 503);
    assert_eq!(state(&body, "guard"), "not_serving");
    assert_eq!(state(&body, "cache"), "up");

    // Back: ready again.
    guard.set(ServingStatus::Serving).await;
    let (code, _) = gw.until("ready").await;
    assert_eq!(code, 200);
    gw.stop().await;
    for health in [router, guard, cache] {
        health.stop.cancel();
    }
}

#[tokio::test]
async fn a_router_that_cannot_be_reached_makes_the_gateway_unavailable() {
    let (guard, cache) = (Health::start().await, Health::start().await);
    let gw = gateway(
        &closed_url(),
        &guard.url,
        &cache.url,
        GuardConfig::default(),
    )
    .await;
    let (code, body) = gw.until("unavailable").await;
    assert_eq!(code, 503);
    assert_eq!(state(&body, "router"), "unreachable");
    assert_eq!(state(&body, "guard"), "up");
    let metrics = gw.metrics().await;
    assert!(metrics.contains("switchboard_ready 0\n"), "{metrics}");
    gw.stop().await;
}

/// A starting gateway answers NOT_SERVING until its first readiness report: here the router
/// accepts connections and never answers, so that report waits a whole probe timeout, and a load
/// balancer asking meanwhile must not be told the gateway can serve.
#[tokio::test]
async fn grpc_health_is_not_serving_until_the_first_readiness_report() {
    let (guard, cache) = (Health::start().await, Health::start().await);
    // Accepts TCP connections (the kernel's backlog) and never speaks HTTP/2.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_url = format!("http://{}", hanging.local_addr().unwrap());
    let gw = gateway(&hanging_url, &guard.url, &cache.url, GuardConfig::default()).await;
    // Asked at once, within the router probe's 800 ms timeout: no report exists yet. (Were the
    // machine so slow that the report came first, it too says NOT_SERVING: never a false failure.)
    let named = gw
        .grpc_health("switchboard.gateway.v1.GatewayService")
        .await;
    let whole = gw.grpc_health("").await;
    assert_eq!(named, ServingStatus::NotServing as i32);
    assert_eq!(whole, ServingStatus::NotServing as i32);
    // The report, when it comes, says why.
    let (code, body) = gw.until("unavailable").await;
    assert_eq!(code, 503);
    assert_eq!(state(&body, "router"), "unreachable");
    gw.until_grpc(ServingStatus::NotServing).await;
    drop(hanging);
    gw.stop().await;
}

#[tokio::test]
async fn with_fail_open_routes_a_missing_guard_only_degrades() {
    let (router, cache) = (Health::start().await, Health::start().await);
    let guard_config = GuardConfig {
        fail_open_routes: vec!["internal-summaries".to_owned()],
        ..GuardConfig::default()
    };
    let gw = gateway(&router.url, &closed_url(), &cache.url, guard_config).await;
    let (code, body) = gw.until("degraded").await;
    assert_eq!(code, 200);
    assert_eq!(state(&body, "guard"), "unreachable");
    assert_eq!(state(&body, "router"), "up");
    gw.stop().await;
}

#[tokio::test]
async fn grpc_health_follows_readiness_and_a_ledger_down_only_degrades() {
    let (router, guard, cache, ledger) = (
        Health::start().await,
        Health::start().await,
        Health::start().await,
        Health::start().await,
    );
    let ledger_url = ledger.url.clone();
    let gw = gateway_with(
        &router.url,
        &guard.url,
        &cache.url,
        GuardConfig::default(),
        |config| {
            config.ledger_url = ledger_url;
            config.budgets.enabled = true;
        },
    )
    .await;
    gw.until("ready").await;
    gw.until_grpc(ServingStatus::Serving).await;

    // The router drains: /readyz says unavailable, and so does the gateway's gRPC health.
    router.set(ServingStatus::NotServing).await;
    let (code, _) = gw.until("unavailable").await;
    assert_eq!(code, 503);
    gw.until_grpc(ServingStatus::NotServing).await;

    router.set(ServingStatus::Serving).await;
    gw.until("ready").await;
    gw.until_grpc(ServingStatus::Serving).await;

    // The ledger is down: only budgets need it, so the gateway is degraded and still serving.
    ledger.set(ServingStatus::NotServing).await;
    let (code, body) = gw.until("degraded").await;
    assert_eq!(code, 200);
    assert_eq!(state(&body, "ledger"), "not_serving");
    gw.until_grpc(ServingStatus::Serving).await;

    gw.stop().await;
    for health in [router, guard, cache, ledger] {
        health.stop.cancel();
    }
}
