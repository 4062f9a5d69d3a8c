//! `/metrics` on `cache.metrics_addr`: two real replicas sharing one cache through the machine's
//! NATS (a namespace of their own). Replica A answers a miss, an exact hit, a stored and a refused
//! store and a purge; replica B applies A's entries from the stream. Their scrapes show the
//! lookups by outcome, the stores by outcome and reason, the entries held and the replication
//! applied. Nothing is timed: replication is polled for with a deadline.
#![allow(clippy::unwrap_used)]

use std::{net::SocketAddr, time::Duration};

use switchboard_bus::NatsConfig;
use switchboard_cache::{App, Config, StartupError};
use switchboard_grpc::metrics::{sample, scrape};
use switchboard_proto::{
    cache::v1::{
        LookupRequest, PurgeRequest, Scope, StoreRequest, StoreResponse,
        cache_service_client::CacheServiceClient,
    },
    chat::v1::{ChatRequest, ChatResponse, Choice, FinishReason, Message, Role, Usage},
};
use switchboard_testkit::TestNats;
use tokio::sync::oneshot;
use tonic::transport::Channel;

const APP: &str = "metrics-app";

struct Replica {
    client: CacheServiceClient<Channel>,
    metrics: SocketAddr,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), StartupError>>,
}

async fn replica(nats: &NatsConfig) -> Replica {
    let config = Config {
        grpc_addr: "127.0.0.1:0".into(),
        metrics_addr: Some("127.0.0.1:0".into()),
        shared: true,
        sync_timeout_secs: 20,
        ..Config::default()
    };
    let app = App::build(config, nats.clone()).await.unwrap();
    let metrics = app.metrics_addr().unwrap();
    let url = switchboard_grpc::url_of(app.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let client = CacheServiceClient::connect(url).await.unwrap();
    Replica {
        client,
        metrics,
        stop,
        server,
    }
}

fn scope() -> Option<Scope> {
    Some(Scope {
        app: APP.into(),
        ..Default::default()
    })
}

fn request(question: &str) -> ChatRequest {
    ChatRequest {
        model: "fast".into(),
        messages: vec![Message::text(Role::User, question)],
        ..Default::default()
    }
}

fn response(usage: bool) -> ChatResponse {
    ChatResponse {
        id: "r".into(),
        model: "m".into(),
        choices: vec![Choice {
            index: 0,
            message: Some(Message::text(Role::Assistant, "an answer")),
            finish_reason: FinishReason::Stop as i32,
        }],
        usage: usage.then(|| Usage {
            prompt_tokens: 3,
            completion_tokens: 3,
            total_tokens: 6,
            ..Default::default()
        }),
        created: 1,
    }
}

impl Replica {
    async fn hit(&mut self, question: &str) -> bool {
        self.client
            .lookup(LookupRequest {
                scope: scope(),
                request: Some(request(question)),
            })
            .await
            .unwrap()
            .into_inner()
            .hit
    }

    async fn store(&mut self, question: &str, usage: bool) -> StoreResponse {
        self.client
            .store(StoreRequest {
                scope: scope(),
                request: Some(request(question)),
                response: Some(response(usage)),
                route: None,
                ttl_seconds: 0,
                guard_policy: "p/d".into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }
}

/// Scrapes `addr` until `series` reaches `at_least`, or fails after a deadline.
async fn wait_for(addr: SocketAddr, series: &str, at_least: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = scrape(addr).await.unwrap();
        if sample(&text, series) >= at_least {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached {at_least}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_count_lookups_stores_entries_and_replication() {
    let nats = TestNats::create().await.unwrap();
    let mut a = replica(&nats.config()).await;
    let b = replica(&nats.config()).await;
    let a_before = scrape(a.metrics).await.unwrap();
    // Fresh replicas of an empty namespace: nothing held, nothing applied.
    assert_eq!(sample(&a_before, "switchboard_cache_entries"), 0.0);
    assert!(
        a_before.contains("# TYPE switchboard_cache_replication_applied_total counter"),
        "{a_before}"
    );

    assert!(!a.hit("q1").await);
    assert!(a.store("q1", true).await.stored);
    let refused = a.store("q2", false).await;
    assert!(!refused.stored);
    assert!(a.hit("q1").await);
    // The invalid lookup (no scope) is an error, counted too.
    let invalid = a
        .client
        .lookup(LookupRequest {
            scope: None,
            request: Some(request("q1")),
        })
        .await;
    assert!(invalid.is_err());

    let a_after = wait_for(
        a.metrics,
        "switchboard_cache_replication_applied_total{kind=\"entry\"}",
        1.0,
    )
    .await;
    for (series, by) in [
        ("switchboard_cache_lookups_total{outcome=\"miss\"}", 1.0),
        (
            "switchboard_cache_lookups_total{outcome=\"exact_hit\"}",
            1.0,
        ),
        (
            "switchboard_cache_lookups_total{outcome=\"semantic_hit\"}",
            0.0,
        ),
        ("switchboard_cache_lookups_total{outcome=\"error\"}", 1.0),
        (
            "switchboard_cache_stores_total{outcome=\"stored\",reason=\"none\"}",
            1.0,
        ),
        (
            "switchboard_cache_stores_total{outcome=\"refused\",reason=\"missing_usage\"}",
            1.0,
        ),
        ("switchboard_cache_entries", 1.0),
    ] {
        assert_eq!(
            sample(&a_after, series) - sample(&a_before, series),
            by,
            "{series}:\n{a_after}"
        );
    }
    // The other replica holds the entry it applied from the stream.
    let b_after = wait_for(
        b.metrics,
        "switchboard_cache_replication_applied_total{kind=\"entry\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(&b_after, "switchboard_cache_entries"),
        1.0,
        "{b_after}"
    );
    assert_eq!(
        sample(&b_after, "switchboard_cache_replication_pending"),
        0.0
    );
    assert_eq!(
        sample(
            &b_after,
            "switchboard_cache_lookups_total{outcome=\"miss\"}"
        ),
        0.0
    );

    let removed = a
        .client
        .purge(PurgeRequest { scope: scope() })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 1);
    let a_purged = scrape(a.metrics).await.unwrap();
    assert_eq!(sample(&a_purged, "switchboard_cache_purges_total"), 1.0);
    assert_eq!(
        sample(&a_purged, "switchboard_cache_purged_entries_total"),
        1.0
    );
    wait_for(
        b.metrics,
        "switchboard_cache_replication_applied_total{kind=\"purge\"}",
        1.0,
    )
    .await;
    // Bounded labels: no app, key or model.
    for word in [APP, "fast", "q1"] {
        assert!(!a_after.contains(word), "{word} in:\n{a_after}");
    }

    a.stop().await;
    b.stop().await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let name = switchboard_cache::replication::stream_name(&Config::default(), &nats.config());
    let _ = js.delete_stream(&name).await;
    nats.cleanup().await;
}
