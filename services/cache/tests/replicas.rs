//! Replicas sharing one cache through NATS JetStream: real `App`s on 127.0.0.1:0 and the machine's
//! NATS, one namespace (subject prefix, stream) per test. No latency is asserted: state changes are
//! polled for with a deadline.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_bus::NatsConfig;
use switchboard_cache::{App, Config, StartupError};
use switchboard_proto::{
    cache::v1::{
        LookupRequest, PurgeRequest, Scope, StoreRequest, cache_service_client::CacheServiceClient,
    },
    chat::v1::{ChatRequest, ChatResponse, Choice, FinishReason, Message, Role, Usage},
};
use switchboard_testkit::TestNats;
use tokio::sync::oneshot;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(15);
/// The model (route) of every request; the semantic test opts it in.
const MODEL: &str = "fast";

struct Namespace {
    nats: TestNats,
    config: NatsConfig,
}

impl Namespace {
    async fn create() -> Self {
        let nats = TestNats::create().await.unwrap();
        let config = nats.config();
        Namespace { nats, config }
    }

    async fn replica(&self) -> Replica {
        self.replica_with(Config::default()).await
    }

    async fn replica_with(&self, base: Config) -> Replica {
        let config = Config {
            grpc_addr: "127.0.0.1:0".into(),
            shared: true,
            sync_timeout_secs: 20,
            ..base
        };
        let app = App::build(config.clone(), self.config.clone())
            .await
            .unwrap();
        let url = switchboard_grpc::url_of(app.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let client = CacheServiceClient::connect(url).await.unwrap();
        Replica {
            client,
            stop: Some(stop),
            server,
        }
    }

    /// Deletes the test's cache stream.
    async fn cleanup(self) {
        let client = async_nats::connect(&self.nats.url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let name = switchboard_cache::replication::stream_name(&Config::default(), &self.config);
        js.delete_stream(&name).await.unwrap();
        self.nats.cleanup().await;
    }
}

struct Replica {
    client: CacheServiceClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), StartupError>>,
}

impl Replica {
    async fn hit(&mut self, app: &str, question: &str) -> bool {
        let found = self
            .client
            .lookup(LookupRequest {
                scope: Some(Scope {
                    app: app.into(),
                    ..Default::default()
                }),
                request: Some(request(question)),
            })
            .await
            .unwrap()
            .into_inner();
        if found.hit {
            let text = found.response.unwrap().choices[0]
                .message
                .as_ref()
                .unwrap()
                .joined_text();
            assert_eq!(text, answer_to(question), "a hit serves the stored answer");
            // The guard policy travels with the entry to every replica.
            assert_eq!(found.guard_policy, policy_of(question));
        }
        found.hit
    }

    async fn store(&mut self, app: &str, question: &str, ttl_seconds: u32) {
        let stored = self
            .client
            .store(StoreRequest {
                scope: Some(Scope {
                    app: app.into(),
                    ..Default::default()
                }),
                request: Some(request(question)),
                response: Some(response(question)),
                route: None,
                ttl_seconds,
                guard_policy: policy_of(question),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(stored.stored, "{}", stored.reason);
    }

    async fn purge(&mut self, app: &str) -> u64 {
        self.client
            .purge(PurgeRequest {
                scope: Some(Scope {
                    app: app.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .removed
    }

    /// Polls until the lookup answers `hit`, or fails after the deadline.
    async fn wait_for(&mut self, app: &str, question: &str, hit: bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.hit(app, question).await != hit {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{app}/{question}: still {} after {DEADLINE:?}",
                if hit { "a miss" } else { "a hit" }
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.await.unwrap().unwrap();
    }
}

fn request(question: &str) -> ChatRequest {
    ChatRequest {
        model: MODEL.into(),
        messages: vec![Message::text(Role::User, question)],
        ..Default::default()
    }
}

/// The guard policy the answer to `question` was checked under (a distinct value per question).
fn policy_of(question: &str) -> String {
    format!("policy of {question}/d1")
}

fn answer_to(question: &str) -> String {
    format!("answer to {question}")
}

fn response(question: &str) -> ChatResponse {
    ChatResponse {
        id: "r".into(),
        model: "m".into(),
        choices: vec![Choice {
            index: 0,
            message: Some(Message::text(Role::Assistant, answer_to(question))),
            finish_reason: FinishReason::Stop as i32,
        }],
        usage: Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 3,
            total_tokens: 6,
            ..Default::default()
        }),
        created: 1,
    }
}

#[tokio::test]
async fn an_entry_stored_through_one_replica_is_served_by_every_replica() {
    let ns = Namespace::create().await;
    let mut a = ns.replica().await;
    let mut b = ns.replica().await;
    assert!(!b.hit("app1", "q1").await);

    a.store("app1", "q1", 0).await;
    // The storing replica serves it at once; the other one once it has read the stream.
    assert!(a.hit("app1", "q1").await);
    b.wait_for("app1", "q1", true).await;
    // Scopes stay apart across replicas too.
    assert!(!b.hit("app2", "q1").await);

    // A replica started afterwards has loaded the stream before it serves anything: no polling.
    let mut c = ns.replica().await;
    assert!(c.hit("app1", "q1").await);
    assert!(!c.hit("app1", "other question").await);

    // And a store through the late replica reaches the first ones.
    c.store("app1", "q2", 0).await;
    a.wait_for("app1", "q2", true).await;
    b.wait_for("app1", "q2", true).await;

    for replica in [a, b, c] {
        replica.stop().await;
    }
    ns.cleanup().await;
}

#[tokio::test]
async fn a_purge_by_app_removes_its_entries_from_every_replica_and_spares_other_apps() {
    let ns = Namespace::create().await;
    let mut a = ns.replica().await;
    let mut b = ns.replica().await;
    a.store("app1", "q1", 0).await;
    a.store("app1", "q2", 0).await;
    a.store("app2", "q1", 0).await;
    // Another app whose name maps to the same sanitised token would collide with a naive scheme.
    a.store("app.1", "q1", 0).await;
    let mut c = ns.replica().await;
    for replica in [&mut b, &mut c] {
        replica.wait_for("app1", "q1", true).await;
        replica.wait_for("app1", "q2", true).await;
        replica.wait_for("app2", "q1", true).await;
        replica.wait_for("app.1", "q1", true).await;
    }

    assert_eq!(a.purge("app1").await, 2, "both entries of app1 removed");
    assert!(!a.hit("app1", "q1").await);
    assert!(!a.hit("app1", "q2").await);
    for replica in [&mut b, &mut c] {
        replica.wait_for("app1", "q1", false).await;
        replica.wait_for("app1", "q2", false).await;
    }
    for replica in [&mut a, &mut b, &mut c] {
        assert!(replica.hit("app2", "q1").await, "app2 survives");
        assert!(replica.hit("app.1", "q1").await, "app.1 survives");
    }

    // The stream lost them too: a replica started now does not load them.
    let mut d = ns.replica().await;
    assert!(!d.hit("app1", "q1").await);
    assert!(d.hit("app2", "q1").await);

    // The purge notice only removes what was stored before it: a later store of the app is
    // served everywhere, by a replica started after it as well (which replays the notice first).
    b.store("app1", "q3", 0).await;
    a.wait_for("app1", "q3", true).await;
    c.wait_for("app1", "q3", true).await;
    let mut e = ns.replica().await;
    assert!(e.hit("app1", "q3").await);
    assert!(!e.hit("app1", "q1").await);
    // Purging again counts only what is left.
    assert_eq!(e.purge("app1").await, 1);
    assert_eq!(e.purge("app1").await, 0);

    for replica in [a, b, c, d, e] {
        replica.stop().await;
    }
    ns.cleanup().await;
}

/// A purge reaches a reader of the stream that lags behind it. A filtered stream purge moves every
/// consumer of the stream past the stream's last message on NATS before 2.9.15 (nats-server#3838),
/// so a replica that had not read the purge notice yet (or anything after its position) never
/// did; the purge deletes the app's messages one by one instead. The lagging reader here is a raw
/// ordered consumer whose messages are only subscribed to after the purge, so the server has
/// delivered nothing to it by then: it must still get every message, the notice last.
#[tokio::test]
async fn a_purge_reaches_readers_that_lag_behind_the_stream() {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull, push};
    use futures::StreamExt as _;
    use prost::Message as _;
    const BURST: usize = 500;
    let ns = Namespace::create().await;
    let mut a = ns.replica().await;
    a.store("app1", "q1", 0).await;
    a.store("app1", "q2", 0).await;

    let client = async_nats::connect(&ns.nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let name = switchboard_cache::replication::stream_name(&Config::default(), &ns.config);
    let stream = js.get_stream(&name).await.unwrap();
    let subjects = switchboard_cache::replication::Subjects::new(&ns.config.subject_prefix);
    let lagging = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: subjects.all(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();

    // Another app's entries, which the purge must not make the lagging reader skip either.
    let expires_ms = i64::try_from(
        (std::time::SystemTime::now() + Duration::from_secs(3600))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let burst_response = response("burst");
    for i in 0..BURST {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let key = switchboard_cache::key::CacheKey(key);
        let wire = switchboard_cache::replication::WireEntry {
            app: "app3".into(),
            key: key.0.to_vec(),
            response: Some(burst_response.clone()),
            route: None,
            stored_at_unix_ms: expires_ms - 3_600_000,
            expires_at_unix_ms: expires_ms,
            guard_policy: String::new(),
        };
        js.publish(subjects.entry("app3", &key), wire.encode_to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    assert_eq!(a.purge("app1").await, 2, "both entries of app1 removed");

    // The lagging reader gets the whole burst, then the purge notice.
    let mut messages = lagging.messages().await.unwrap();
    let mut burst = 0;
    let purge_subject = subjects.purge("app1");
    let burst_filter = subjects.entries_of("app3");
    let burst_prefix = burst_filter.trim_end_matches('>');
    loop {
        let message = tokio::time::timeout(DEADLINE, messages.next())
            .await
            .unwrap_or_else(|_| {
                panic!("the lagging reader stalled after {burst} messages of the burst")
            })
            .unwrap()
            .unwrap();
        if message.subject.as_str() == purge_subject {
            break;
        }
        if message.subject.as_str().starts_with(burst_prefix) {
            burst += 1;
        }
    }
    assert_eq!(burst, BURST, "every message before the notice delivered");
    a.wait_for("app1", "q1", false).await;

    // The stream holds none of app1's entries, and all of the burst.
    for (filter, expected) in [
        (subjects.entries_of("app1"), 0),
        (subjects.entries_of("app3"), BURST as u64),
    ] {
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: filter.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(consumer.cached_info().num_pending, expected, "{filter}");
    }

    a.stop().await;
    ns.cleanup().await;
}

#[tokio::test]
async fn an_expired_entry_stops_being_served_by_every_replica() {
    let ns = Namespace::create().await;
    let mut a = ns.replica().await;
    let mut b = ns.replica().await;
    a.store("app1", "long", 3600).await;
    a.store("app1", "short", 4).await;
    b.wait_for("app1", "long", true).await;
    b.wait_for("app1", "short", true).await;

    for replica in [&mut a, &mut b] {
        replica.wait_for("app1", "short", false).await;
    }
    // Still in the stream (max_age is the maximum TTL), but skipped on sync: a new replica
    // never serves it.
    let mut c = ns.replica().await;
    assert!(!c.hit("app1", "short").await);
    for replica in [&mut a, &mut b, &mut c] {
        assert!(replica.hit("app1", "long").await);
    }

    for replica in [a, b, c] {
        replica.stop().await;
    }
    ns.cleanup().await;
}

#[tokio::test]
async fn a_replica_that_cannot_reach_nats_does_not_start() {
    let config = Config {
        grpc_addr: "127.0.0.1:0".into(),
        sync_timeout_secs: 1,
        ..Config::default()
    };
    let nats = NatsConfig {
        // Nothing listens on the discard port.
        url: "nats://127.0.0.1:9".into(),
        ..NatsConfig::default()
    };
    let error = App::build(config, nats).await.err().unwrap().to_string();
    assert!(error.contains("shared cache"), "{error}");
}

/// Semantic replicas: the tag (embedding and final user message) computed by the storing replica
/// travels with the entry, so a paraphrase hits on every replica, one started later included; a
/// purge through any replica empties every replica's semantic index for the app. Needs the
/// embedding assets (`scripts/fetch-embed-assets.sh`); fails without them.
#[tokio::test]
async fn a_paraphrase_hits_on_every_replica_and_a_purge_clears_every_semantic_index() {
    let mut routes = std::collections::BTreeMap::new();
    routes.insert(
        MODEL.to_owned(),
        switchboard_cache::semantic::RouteConfig {
            enabled: true,
            threshold: 0.6,
            near_miss_guard: true,
        },
    );
    let config = Config {
        semantic: switchboard_cache::semantic::SemanticConfig {
            enabled: true,
            routes,
            ..Default::default()
        },
        ..Config::default()
    };
    let ns = Namespace::create().await;
    let mut a = ns.replica_with(config.clone()).await;
    let mut b = ns.replica_with(config.clone()).await;
    let stored = "How do I reset my password?";
    let paraphrase = "How can I reset my password?";
    a.store("app1", stored, 0).await;
    a.store("app2", stored, 0).await;

    let semantic_hit = |found: switchboard_proto::cache::v1::LookupResponse| {
        let semantic =
            found.hit && found.r#match == switchboard_proto::cache::v1::MatchKind::Semantic as i32;
        // The entry's guard policy travels with it: a semantic hit on any replica carries it.
        assert!(!semantic || found.guard_policy == policy_of(stored));
        semantic
    };
    let lookup = |app: &str, question: &str| LookupRequest {
        scope: Some(Scope {
            app: app.into(),
            ..Default::default()
        }),
        request: Some(request(question)),
    };
    // The storing replica, then the other one once it has read the entry and its tag.
    let found = a.client.lookup(lookup("app1", paraphrase)).await.unwrap();
    assert!(semantic_hit(found.into_inner()), "storing replica");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let found = b.client.lookup(lookup("app1", paraphrase)).await.unwrap();
        if semantic_hit(found.into_inner()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica b never hit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A replica started afterwards has loaded the tags too.
    let mut c = ns.replica_with(config.clone()).await;
    let found = c.client.lookup(lookup("app1", paraphrase)).await.unwrap();
    assert!(semantic_hit(found.into_inner()), "late replica");

    // Purged through B: no replica serves app1 any more, exactly or semantically; app2 stays.
    assert_eq!(b.purge("app1").await, 1);
    for replica in [&mut a, &mut b, &mut c] {
        replica.wait_for("app1", stored, false).await;
        let found = replica
            .client
            .lookup(lookup("app1", paraphrase))
            .await
            .unwrap();
        assert!(!found.into_inner().hit);
        let found = replica
            .client
            .lookup(lookup("app2", paraphrase))
            .await
            .unwrap();
        assert!(semantic_hit(found.into_inner()), "app2 survives");
    }
    for replica in [a, b, c] {
        replica.stop().await;
    }
    ns.cleanup().await;
}
