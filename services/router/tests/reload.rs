//! Configuration reload while serving: a new route works at once, a bad configuration is rejected
//! and the old one keeps serving, a stream in flight finishes on the table it started on, and
//! breaker state of a deployment that still exists survives the reload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use switchboard_config::Source;
use switchboard_fake_provider::{FakeConfig, FakeProvider};
use switchboard_proto::{
    chat::v1::{ChatRequest, Message, Role, RouteInfo},
    router::v1::{
        RouteRequest, RouteStreamRequest, route_stream_response::Event,
        router_service_client::RouterServiceClient,
    },
};
use switchboard_router::{App, Config, Reloader};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, transport::Channel};

struct Running {
    client: RouterServiceClient<Channel>,
    reloader: Reloader,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

async fn start(config: Config) -> Running {
    let app = App::build(config).await.unwrap();
    let reloader = app.reloader();
    let url = switchboard_grpc::url_of(app.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run_until(async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let client = RouterServiceClient::connect(url).await.unwrap();
    Running {
        client,
        reloader,
        stop,
        task,
    }
}

impl Running {
    async fn route(&self, model: &str) -> Result<RouteInfo, tonic::Status> {
        self.client
            .clone()
            .route(RouteRequest {
                request: Some(chat(model)),
                caller: None,
                allowance: None,
            })
            .await
            .map(|r| r.into_inner().route.unwrap())
    }

    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

fn chat(model: &str) -> ChatRequest {
    ChatRequest {
        model: model.to_owned(),
        messages: vec![Message::text(Role::User, "hello there")],
        ..Default::default()
    }
}

async fn start_fake() -> FakeProvider {
    FakeProvider::start(FakeConfig {
        addr: "127.0.0.1:0".to_owned(),
        ..FakeConfig::default()
    })
    .await
    .unwrap()
}

/// A `[router]` section with provider `fake` and `routes` (TOML `[[router.routes]]` tables).
fn source(base_url: &str, extra: &str) -> Source {
    Source::from_toml(&format!(
        r#"
[router]
grpc_addr = "127.0.0.1:0"
retry_backoff_ms = 1
max_retries = 0
[router.breaker]
failure_threshold = 1
open_ms = 600000
[router.providers.fake]
base_url = "{base_url}"
{extra}
"#
    ))
    .unwrap()
}

fn config(source: &Source) -> Config {
    source.section("router").unwrap()
}

const ROUTE_A: &str = r#"
[[router.routes]]
name = "a"
targets = [ { provider = "fake", model = "ma" } ]
"#;

const ROUTE_B: &str = r#"
[[router.routes]]
name = "b"
targets = [ { provider = "fake", model = "mb" } ]
"#;

#[tokio::test]
async fn a_reloaded_route_serves_and_a_bad_configuration_is_rejected() {
    let fake = start_fake().await;
    let first = source(&fake.base_url(), ROUTE_A);
    let router = start(config(&first)).await;
    assert_eq!(router.route("a").await.unwrap().target, "fake/ma");
    assert_eq!(router.route("b").await.unwrap_err().code(), Code::NotFound);

    // A new route works at once; the removed one is gone.
    router
        .reloader
        .reload(&source(&fake.base_url(), ROUTE_B))
        .unwrap();
    assert_eq!(router.route("b").await.unwrap().target, "fake/mb");
    assert_eq!(router.route("a").await.unwrap_err().code(), Code::NotFound);

    // A route naming an unknown provider: rejected, naming the field; the old table serves.
    let bad = source(
        &fake.base_url(),
        r#"
[[router.routes]]
name = "c"
targets = [ { provider = "nope", model = "mc" } ]
"#,
    );
    let error = router.reloader.reload(&bad).unwrap_err().to_string();
    assert!(
        error.contains("router.routes[0].targets[0].provider"),
        "{error}"
    );
    // An unknown field: rejected at parsing, naming it.
    let typo = source(&fake.base_url(), "max_retriez = 3\n");
    let error = router.reloader.reload(&typo).unwrap_err().to_string();
    assert!(error.contains("router"), "{error}");
    assert_eq!(router.route("b").await.unwrap().target, "fake/mb");
    assert_eq!(router.route("c").await.unwrap_err().code(), Code::NotFound);
    router.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn a_stream_in_flight_finishes_on_the_table_it_started_on() {
    let fake = start_fake().await;
    let first = source(&fake.base_url(), ROUTE_A);
    let router = start(config(&first)).await;
    fake.set_latency("ma", 300);
    let mut client = router.client.clone();
    let stream = tokio::spawn(async move {
        let mut stream = client
            .route_stream(RouteStreamRequest {
                request: Some(chat("a")),
                caller: None,
                allowance: None,
            })
            .await
            .unwrap()
            .into_inner();
        let (mut text, mut info) = (String::new(), None);
        while let Some(message) = stream.next().await {
            match message.unwrap().event.unwrap() {
                Event::Chunk(chunk) => {
                    for choice in chunk.choices {
                        text.push_str(&choice.content);
                    }
                }
                Event::Route(route) => info = Some(route),
                Event::Interrupted(_) => {}
            }
        }
        (text, info)
    });
    // Once the provider has the request, route `a` goes away.
    for _ in 0..500 {
        if fake.request_count("ma") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(fake.request_count("ma"), 1);
    router
        .reloader
        .reload(&source(&fake.base_url(), ROUTE_B))
        .unwrap();
    assert_eq!(router.route("a").await.unwrap_err().code(), Code::NotFound);
    let (text, info) = stream.await.unwrap();
    assert_eq!(text, "echo: hello there");
    assert_eq!(info.expect("a clean finish").target, "fake/ma");
    router.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn breaker_state_survives_a_reload_of_a_deployment_that_still_exists() {
    let fake = start_fake().await;
    let both = format!("{ROUTE_A}{ROUTE_B}");
    let first = source(&fake.base_url(), &both);
    let router = start(config(&first)).await;
    // One failure opens the breaker of fake/ma (threshold 1, open for ten minutes).
    fake.fail_next("ma", 500, 1);
    assert_eq!(
        router.route("a").await.unwrap_err().code(),
        Code::Unavailable
    );
    let skipped = router.route("a").await.unwrap_err();
    assert!(skipped.message().contains("CIRCUIT_OPEN"), "{skipped:?}");

    // Reload with a changed breaker setting and route `b` gone: `fake/ma` still exists, so its
    // breaker stays open.
    let mut config = config(&source(&fake.base_url(), ROUTE_A));
    config.breaker.failure_threshold = 2;
    router.reloader.apply(config).unwrap();
    let skipped = router.route("a").await.unwrap_err();
    assert!(skipped.message().contains("CIRCUIT_OPEN"), "{skipped:?}");
    assert_eq!(fake.request_count("ma"), 1);

    // A deployment whose endpoint changed is a new one: closed breaker.
    let other = start_fake().await;
    let moved = source(&other.base_url(), ROUTE_A);
    router.reloader.reload(&moved).unwrap();
    assert_eq!(router.route("a").await.unwrap().target, "fake/ma");
    assert_eq!(other.request_count("ma"), 1);
    router.shutdown().await;
    other.shutdown().await;
    fake.shutdown().await;
}
