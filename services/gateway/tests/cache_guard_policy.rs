//! A cached answer is served only under the guard policy it was checked under: the real gateway
//! (`App`, over HTTP) in front of stand-ins for the guard (whose policy version the test changes,
//! as an operator's policy reload would), the cache (a map that keeps what it is given, the guard
//! policy included, as the cache service does) and the router (which numbers its answers).
//! Usage events are read from the test's NATS namespace.

#![allow(clippy::unwrap_used)]

mod support;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use switchboard_gateway::Config;
use switchboard_proto::{
    cache::v1::{
        LookupRequest, LookupResponse, MatchKind, PurgeRequest, PurgeResponse, StoreRequest,
        StoreResponse,
        cache_service_server::{CacheService, CacheServiceServer},
    },
    chat::v1::{
        ChatChunk, ChatRequest, ChatResponse, Choice, ChoiceDelta, FinishReason, Message, Role,
        RouteInfo, Usage,
    },
    guard::v1::{
        CheckAnswerRequest, CheckAnswerResponse, CheckPromptRequest, CheckPromptResponse, Decision,
        guard_service_server::{GuardService, GuardServiceServer},
    },
    ledger::v1::CacheOutcome,
    router::v1::{
        EmbedRequest, EmbedResponse, ListModelsRequest, ListModelsResponse, RouteRequest,
        RouteResponse, RouteStreamRequest, RouteStreamResponse, route_stream_response,
        router_service_server::{RouterService, RouterServiceServer},
    },
};
use switchboard_testkit::TestNats;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const KEY: &str = "sk-policy";
const APP: &str = "app-policy";
const DETECTORS: &str = "d3-h1-test";

/// A guard that allows every prompt under the policy version the test sets.
struct Guard {
    policy: Arc<Mutex<String>>,
    /// `CheckPromptResponse.prompt_passthrough`: the gateway overlaps the check (ADR 011).
    passthrough: bool,
}

#[tonic::async_trait]
impl GuardService for Guard {
    async fn check_prompt(
        &self,
        _request: Request<CheckPromptRequest>,
    ) -> Result<Response<CheckPromptResponse>, Status> {
        Ok(Response::new(CheckPromptResponse {
            decision: Decision::Allow as i32,
            policy_version: self.policy.lock().unwrap().clone(),
            detector_version: DETECTORS.into(),
            check_answer: false,
            prompt_passthrough: self.passthrough,
            ..Default::default()
        }))
    }

    async fn check_answer(
        &self,
        _request: Request<CheckAnswerRequest>,
    ) -> Result<Response<CheckAnswerResponse>, Status> {
        Ok(Response::new(CheckAnswerResponse {
            decision: Decision::Allow as i32,
            ..Default::default()
        }))
    }
}

/// A cache keyed by app, model and conversation text: a store replaces the entry, a lookup
/// returns it with the guard policy it was stored with.
#[derive(Clone, Default)]
struct Cache {
    entries: Arc<Mutex<HashMap<String, StoreRequest>>>,
    stores: Arc<AtomicUsize>,
}

fn cache_key(scope_app: &str, request: &ChatRequest) -> String {
    let text: Vec<String> = request.messages.iter().map(Message::joined_text).collect();
    format!("{scope_app}\0{}\0{}", request.model, text.join("\0"))
}

#[tonic::async_trait]
impl CacheService for Cache {
    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        let request = request.into_inner();
        let key = cache_key(
            &request.scope.unwrap_or_default().app,
            &request.request.unwrap_or_default(),
        );
        let found = self.entries.lock().unwrap().get(&key).cloned();
        Ok(Response::new(match found {
            Some(entry) => LookupResponse {
                hit: true,
                response: entry.response,
                route: entry.route,
                r#match: MatchKind::Exact as i32,
                similarity: 1.0,
                guard_policy: entry.guard_policy,
                ..Default::default()
            },
            None => LookupResponse::default(),
        }))
    }

    async fn store(
        &self,
        request: Request<StoreRequest>,
    ) -> Result<Response<StoreResponse>, Status> {
        let request = request.into_inner();
        let key = cache_key(
            &request.scope.clone().unwrap_or_default().app,
            request.request.as_ref().unwrap(),
        );
        self.entries.lock().unwrap().insert(key, request);
        self.stores.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(StoreResponse {
            stored: true,
            reason: String::new(),
        }))
    }

    async fn purge(
        &self,
        _request: Request<PurgeRequest>,
    ) -> Result<Response<PurgeResponse>, Status> {
        Err(Status::unimplemented("purge"))
    }
}

/// A router whose provider answers "answer N" to its N-th call (unary or streamed).
#[derive(Clone, Default)]
struct Router {
    calls: Arc<AtomicUsize>,
}

fn usage() -> Usage {
    Usage {
        prompt_tokens: 3,
        completion_tokens: 2,
        total_tokens: 5,
        ..Default::default()
    }
}

fn route_info() -> RouteInfo {
    RouteInfo {
        route: "m".into(),
        provider: "p".into(),
        model: "pm".into(),
        target: "p/pm".into(),
        attempt_count: 1,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl RouterService for Router {
    async fn route(
        &self,
        _request: Request<RouteRequest>,
    ) -> Result<Response<RouteResponse>, Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Response::new(RouteResponse {
            response: Some(ChatResponse {
                model: "pm".into(),
                choices: vec![Choice {
                    index: 0,
                    message: Some(Message::text(Role::Assistant, format!("answer {n}"))),
                    finish_reason: FinishReason::Stop as i32,
                }],
                usage: Some(usage()),
                ..Default::default()
            }),
            route: Some(route_info()),
        }))
    }

    type RouteStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<RouteStreamResponse, Status>> + Send>>;

    async fn route_stream(
        &self,
        _request: Request<RouteStreamRequest>,
    ) -> Result<Response<Self::RouteStreamStream>, Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let chunk = |content: String, finish: FinishReason, usage: Option<Usage>| {
            Ok(RouteStreamResponse {
                event: Some(route_stream_response::Event::Chunk(ChatChunk {
                    model: "pm".into(),
                    choices: vec![ChoiceDelta {
                        index: 0,
                        content,
                        finish_reason: finish as i32,
                        ..Default::default()
                    }],
                    usage,
                    ..Default::default()
                })),
            })
        };
        let events = vec![
            chunk(format!("answer {n}"), FinishReason::Unspecified, None),
            chunk(String::new(), FinishReason::Stop, Some(usage())),
            Ok(RouteStreamResponse {
                event: Some(route_stream_response::Event::Route(route_info())),
            }),
        ];
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Err(Status::unimplemented("list_models"))
    }

    async fn embed(
        &self,
        _request: Request<EmbedRequest>,
    ) -> Result<Response<EmbedResponse>, Status> {
        Err(Status::unimplemented("embed"))
    }
}

/// The gateway over the stand-ins.
struct Mesh {
    http: String,
    client: reqwest::Client,
    policy: Arc<Mutex<String>>,
    cache: Cache,
    router: Router,
    usage: tokio::sync::mpsc::UnboundedReceiver<switchboard_proto::ledger::v1::UsageEvent>,
    nats: TestNats,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Mesh {
    async fn start(passthrough: bool) -> Mesh {
        let stop = CancellationToken::new();
        let policy = Arc::new(Mutex::new("policy-a".to_owned()));
        let (cache, router) = (Cache::default(), Router::default());
        let routes = tonic::service::Routes::new(GuardServiceServer::new(Guard {
            policy: Arc::clone(&policy),
            passthrough,
        }))
        .add_service(CacheServiceServer::new(cache.clone()))
        .add_service(RouterServiceServer::new(router.clone()));
        let url = support::serve(routes, &stop).await;

        let nats = TestNats::create().await.unwrap();
        let nats_config = nats.config();
        // Usage events as the gateway publishes them (core subscription: no stream needed).
        let client = async_nats::connect(&nats.url).await.unwrap();
        let mut subscription = client
            .subscribe(nats_config.usage_wildcard())
            .await
            .unwrap();
        let (tx, usage) = tokio::sync::mpsc::unbounded_channel();
        let decode_config = nats_config.clone();
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let events = switchboard_bus::decode_usage(
                    &decode_config,
                    message.subject.as_str(),
                    message.headers.as_ref(),
                    &message.payload,
                )
                .unwrap();
                for (event, _) in events {
                    let _ = tx.send(event);
                }
            }
        });

        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            usage_linger_ms: 0,
            ..support::config(&url, &dir.path().join("outbox"), KEY, APP)
        };
        config.guard.overlap_passthrough = true;
        let http = support::start(config, &nats, &stop).await;
        Mesh {
            http,
            client: reqwest::Client::new(),
            policy,
            cache,
            router,
            usage,
            nats,
            stop,
            _dir: dir,
        }
    }

    fn set_policy(&self, policy: &str) {
        *self.policy.lock().unwrap() = policy.to_owned();
    }

    fn router_calls(&self) -> usize {
        self.router.calls.load(Ordering::SeqCst)
    }

    /// One chat completion of the same prompt: the `x-switchboard-cache` header and the answer
    /// text (a stream's deltas joined), or the HTTP status when it is not 200.
    async fn ask(
        &self,
        stream: bool,
        cache_control: Option<&str>,
    ) -> Result<(String, String), u16> {
        let mut request = self
            .client
            .post(format!("{}/v1/chat/completions", self.http))
            .bearer_auth(KEY)
            .json(&serde_json::json!({
                "model": "m",
                "stream": stream,
                "messages": [{"role": "user", "content": "What is the refund policy?"}],
            }));
        if let Some(directive) = cache_control {
            request = request.header("x-switchboard-cache", directive);
        }
        let response = request.send().await.unwrap();
        if response.status() != 200 {
            return Err(response.status().as_u16());
        }
        let cache = response.headers()["x-switchboard-cache"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.text().await.unwrap();
        let text = if stream {
            body.lines()
                .filter_map(|line| line.strip_prefix("data: "))
                .filter(|data| *data != "[DONE]")
                .filter_map(|data| {
                    let chunk: serde_json::Value = serde_json::from_str(data).unwrap();
                    chunk["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect()
        } else {
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        Ok((cache, text))
    }

    /// Waits (bounded) until the cache has received `n` stores; the guard policy of the entry.
    async fn stored(&self, n: usize) -> String {
        for _ in 0..400 {
            if self.cache.stores.load(Ordering::SeqCst) >= n {
                let entries = self.cache.entries.lock().unwrap();
                assert_eq!(entries.len(), 1, "one prompt, one entry");
                return entries.values().next().unwrap().guard_policy.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the cache never received store {n}");
    }

    /// The cache outcome of the next usage event (bounded wait).
    async fn next_usage(&mut self) -> CacheOutcome {
        let event = tokio::time::timeout(Duration::from_secs(15), self.usage.recv())
            .await
            .expect("a usage event")
            .unwrap();
        assert_eq!(event.app, APP);
        CacheOutcome::try_from(event.cache).unwrap()
    }

    /// `switchboard_guard_overlapped_total` from `/metrics`.
    async fn overlapped(&self) -> u64 {
        let metrics = self
            .client
            .get(format!("{}/metrics", self.http))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("switchboard_guard_overlapped_total "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.nats.cleanup().await;
    }
}

fn policy(version: &str) -> String {
    format!("{version}/{DETECTORS}")
}

/// Policy A: miss, stored under A, then a hit. The operator changes the policy to B: the entry
/// checked under A is not served (the provider is called, `miss`), the new answer replaces it
/// under B and is then a hit. `only-if-cached` under a third policy gets nothing.
async fn answers_follow_the_guard_policy(stream: bool, passthrough: bool) {
    let mut mesh = Mesh::start(passthrough).await;

    assert_eq!(
        mesh.ask(stream, None).await.unwrap(),
        ("miss".into(), "answer 1".into())
    );
    assert_eq!(mesh.stored(1).await, policy("policy-a"));
    assert_eq!(mesh.next_usage().await, CacheOutcome::Miss);
    assert_eq!(
        mesh.ask(stream, None).await.unwrap(),
        ("hit".into(), "answer 1".into())
    );
    assert_eq!(mesh.router_calls(), 1, "a hit under the same policy");
    assert_eq!(mesh.next_usage().await, CacheOutcome::Hit);

    mesh.set_policy("policy-b");
    let overlapped = mesh.overlapped().await;
    assert_eq!(
        mesh.ask(stream, None).await.unwrap(),
        ("miss".into(), "answer 2".into()),
        "an answer checked under another policy is not served"
    );
    assert_eq!(mesh.router_calls(), 2);
    if passthrough {
        // The request took the overlapped path (ADR 011): its hit waited for the verdict.
        assert_eq!(mesh.overlapped().await, overlapped + 1);
    } else {
        assert_eq!(mesh.overlapped().await, 0);
    }
    assert_eq!(mesh.next_usage().await, CacheOutcome::Miss);
    assert_eq!(mesh.stored(2).await, policy("policy-b"), "replaced");
    assert_eq!(
        mesh.ask(stream, None).await.unwrap(),
        ("hit".into(), "answer 2".into())
    );
    assert_eq!(mesh.router_calls(), 2);
    assert_eq!(mesh.next_usage().await, CacheOutcome::Hit);

    // Serve-only-from-cache: an entry of another policy is not served, and nothing is routed.
    mesh.set_policy("policy-c");
    assert_eq!(mesh.ask(stream, Some("only-if-cached")).await, Err(504));
    assert_eq!(mesh.router_calls(), 2);
    // While the policy it was checked under is back, it is served again.
    mesh.set_policy("policy-b");
    assert_eq!(
        mesh.ask(stream, Some("only-if-cached")).await.unwrap(),
        ("hit".into(), "answer 2".into())
    );
    mesh.stop().await;
}

#[tokio::test]
async fn a_unary_answer_is_served_from_the_cache_only_under_the_policy_it_was_checked_under() {
    answers_follow_the_guard_policy(false, false).await;
}

#[tokio::test]
async fn a_streamed_answer_is_served_from_the_cache_only_under_the_policy_it_was_checked_under() {
    answers_follow_the_guard_policy(true, false).await;
}

#[tokio::test]
async fn an_overlapped_check_decides_whether_a_cached_unary_answer_is_served() {
    answers_follow_the_guard_policy(false, true).await;
}

#[tokio::test]
async fn an_overlapped_check_decides_whether_a_cached_streamed_answer_is_served() {
    answers_follow_the_guard_policy(true, true).await;
}

/// A stream routed while its check is out (ADR 011) and not looked up first (`refresh`) gets the
/// check's verdict for the rest of its way: its answer is stored under the policy it was checked
/// under (the verdict lived on the opening's copy of the request's context, and the pump, which
/// stores the answer and checks it, did not see it).
#[tokio::test]
async fn an_overlapped_streams_answer_is_stored_under_the_policy_it_was_checked_under() {
    let mut mesh = Mesh::start(true).await;
    // The first check teaches the gateway that this policy passes prompts through.
    assert_eq!(mesh.ask(true, None).await.unwrap().1, "answer 1");
    assert_eq!(mesh.stored(1).await, policy("policy-a"));
    assert_eq!(mesh.next_usage().await, CacheOutcome::Miss);
    mesh.set_policy("policy-b");
    let overlapped = mesh.overlapped().await;
    let (_, text) = mesh.ask(true, Some("refresh")).await.unwrap();
    assert_eq!(text, "answer 2");
    assert_eq!(
        mesh.overlapped().await,
        overlapped + 1,
        "the check was overlapped"
    );
    assert_eq!(mesh.stored(2).await, policy("policy-b"));
    mesh.stop().await;
}
