//! Semantic cache API tests: the real App (real embedding model, loaded from the assets of
//! `scripts/fetch-embed-assets.sh`; these tests fail when they are missing) called over gRPC.
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, sync::Arc};

use switchboard_cache::{
    App, Config, StartupError,
    semantic::{RouteConfig, SemanticConfig},
    store::MemoryStore,
};
use switchboard_proto::{
    cache::v1::{
        LookupRequest, LookupResponse, MatchKind, Scope, StoreRequest,
        cache_service_client::CacheServiceClient,
    },
    chat::v1::{
        ChatRequest, ChatResponse, Choice, FinishReason, Message, ResponseFormat,
        ResponseFormatType, Role, SamplingParams, Tool, Usage,
    },
};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// The test routes: "semantic" opts in with the guard, "unguarded" without it, "exact" does not
/// opt in. The thresholds are the test's own (low, so that the guard is what decides: every near-miss pair below is above it).
fn config() -> Config {
    let mut routes = BTreeMap::new();
    routes.insert(
        "semantic".to_owned(),
        RouteConfig {
            enabled: true,
            threshold: 0.6,
            near_miss_guard: true,
        },
    );
    routes.insert(
        "unguarded".to_owned(),
        RouteConfig {
            enabled: true,
            threshold: 0.6,
            near_miss_guard: false,
        },
    );
    routes.insert(
        "off".to_owned(),
        RouteConfig {
            enabled: false,
            ..RouteConfig::default()
        },
    );
    Config {
        grpc_addr: "127.0.0.1:0".into(),
        semantic: SemanticConfig {
            enabled: true,
            routes,
            ..SemanticConfig::default()
        },
        ..Config::default()
    }
}

struct Running {
    client: CacheServiceClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), StartupError>>,
}

impl Running {
    async fn start() -> Self {
        let app = App::build_with_store(config(), Arc::new(MemoryStore::new(1000)))
            .await
            .unwrap();
        let url = switchboard_grpc::url_of(app.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let client = CacheServiceClient::connect(url).await.unwrap();
        Running {
            client,
            stop: Some(stop),
            server,
        }
    }

    async fn lookup(&mut self, app: &str, request: ChatRequest) -> LookupResponse {
        let lookup = LookupRequest {
            scope: Some(Scope {
                app: app.into(),
                ..Default::default()
            }),
            request: Some(request),
        };
        self.client.lookup(lookup).await.unwrap().into_inner()
    }

    async fn store(&mut self, app: &str, request: ChatRequest, answer: &str) {
        let store = StoreRequest {
            scope: Some(Scope {
                app: app.into(),
                ..Default::default()
            }),
            request: Some(request),
            response: Some(response(answer)),
            route: None,
            ttl_seconds: 0,
            guard_policy: GUARD_POLICY.into(),
        };
        let stored = self.client.store(store).await.unwrap().into_inner();
        assert!(stored.stored, "{}", stored.reason);
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.await.unwrap().unwrap();
    }
}

fn request(route: &str, question: &str) -> ChatRequest {
    ChatRequest {
        model: route.into(),
        messages: vec![
            Message::text(Role::System, "You are a helpful assistant."),
            Message::text(Role::User, question),
        ],
        ..Default::default()
    }
}

fn response(answer: &str) -> ChatResponse {
    ChatResponse {
        id: "r1".into(),
        model: "m".into(),
        choices: vec![Choice {
            index: 0,
            message: Some(Message::text(Role::Assistant, answer)),
            finish_reason: FinishReason::Stop as i32,
        }],
        usage: Some(Usage {
            prompt_tokens: 10,
            completion_tokens: 5,
            total_tokens: 15,
            ..Default::default()
        }),
        created: 1,
    }
}

fn answer_of(found: &LookupResponse) -> String {
    found.response.as_ref().unwrap().choices[0]
        .message
        .as_ref()
        .unwrap()
        .joined_text()
}

const STORED: &str = "How do I reset my password?";
const PARAPHRASE: &str = "How can I reset my password?";
/// The guard policy every stored answer was checked under (opaque to the cache).
const GUARD_POLICY: &str = "9f8e7d6c5b4a/d3-h1-x";

#[tokio::test]
async fn a_paraphrase_hits_within_its_scope_with_its_similarity() {
    let mut cache = Running::start().await;
    cache
        .store(
            "app-a",
            request("semantic", STORED),
            "Click 'Forgot password'.",
        )
        .await;

    let exact = cache.lookup("app-a", request("semantic", STORED)).await;
    assert!(exact.hit);
    assert_eq!(exact.r#match, MatchKind::Exact as i32);
    assert_eq!(exact.similarity, 1.0);

    let found = cache.lookup("app-a", request("semantic", PARAPHRASE)).await;
    assert!(found.hit, "a paraphrase in the same scope must hit");
    assert_eq!(found.r#match, MatchKind::Semantic as i32);
    assert!(
        found.similarity >= 0.6 && found.similarity < 1.0,
        "{}",
        found.similarity
    );
    assert_eq!(answer_of(&found), "Click 'Forgot password'.");
    // A semantic hit carries the guard policy of the entry it serves, as an exact one does.
    assert_eq!(found.guard_policy, GUARD_POLICY);
    assert_eq!(exact.guard_policy, GUARD_POLICY);

    let unrelated = cache
        .lookup(
            "app-a",
            request("semantic", "Best recipe for chocolate chip cookies"),
        )
        .await;
    assert!(!unrelated.hit);
    assert_eq!(unrelated.r#match, MatchKind::Unspecified as i32);
    assert_eq!(unrelated.similarity, 0.0);
    cache.stop().await;
}

#[tokio::test]
async fn nothing_is_matched_across_apps_or_changed_parameters() {
    let mut cache = Running::start().await;
    let stored = ChatRequest {
        tools: vec![Tool {
            name: "lookup_account".into(),
            description: "Finds an account".into(),
            parameters_json: r#"{"type":"object"}"#.into(),
            strict: false,
        }],
        sampling: Some(SamplingParams {
            temperature: Some(0.2),
            ..Default::default()
        }),
        ..request("semantic", STORED)
    };
    cache.store("app-a", stored.clone(), "answer").await;
    let paraphrase = |mut r: ChatRequest| {
        r.messages.last_mut().unwrap().content = Message::text(Role::User, PARAPHRASE).content;
        r
    };
    // The control: the paraphrase with everything else equal hits.
    assert!(cache.lookup("app-a", paraphrase(stored.clone())).await.hit);

    let other_app = cache.lookup("app-b", paraphrase(stored.clone())).await;
    assert!(!other_app.hit, "another app");

    let mut system = paraphrase(stored.clone());
    system.messages[0] = Message::text(Role::System, "You are a pirate.");
    assert!(!cache.lookup("app-a", system).await.hit, "system prompt");

    let mut tools = paraphrase(stored.clone());
    tools.tools[0].description = "Finds an account by email".into();
    assert!(!cache.lookup("app-a", tools).await.hit, "tools");

    let mut temperature = paraphrase(stored.clone());
    temperature.sampling = Some(SamplingParams {
        temperature: Some(0.9),
        ..Default::default()
    });
    assert!(!cache.lookup("app-a", temperature).await.hit, "temperature");

    let mut format = paraphrase(stored.clone());
    format.response_format = Some(ResponseFormat {
        r#type: ResponseFormatType::JsonObject as i32,
        ..Default::default()
    });
    assert!(!cache.lookup("app-a", format).await.hit, "response format");

    let mut history = paraphrase(stored);
    history
        .messages
        .insert(1, Message::text(Role::User, "I use the mobile app."));
    history
        .messages
        .insert(2, Message::text(Role::Assistant, "Noted."));
    assert!(!cache.lookup("app-a", history).await.hit, "earlier turns");
    cache.stop().await;
}

#[tokio::test]
async fn near_misses_are_misses_only_because_of_the_guard() {
    let mut cache = Running::start().await;
    for (stored, asked) in [
        ("How do I enable 2FA?", "How do I disable 2FA?"),
        (
            "What is the capital of France?",
            "What is the capital of Germany?",
        ),
        (
            "Book a table for 2 people tonight",
            "Book a table for 4 people tonight",
        ),
    ] {
        cache.store("app-a", request("semantic", stored), "a").await;
        cache
            .store("app-a", request("unguarded", stored), "a")
            .await;
        let guarded = cache.lookup("app-a", request("semantic", asked)).await;
        assert!(!guarded.hit, "{asked}: served {stored}'s answer");
        // Without the guard the same pair is similar enough to hit: the guard made the difference.
        let unguarded = cache.lookup("app-a", request("unguarded", asked)).await;
        assert!(unguarded.hit, "{asked}: the control did not hit");
        assert!(unguarded.similarity >= 0.6);
    }
    cache.stop().await;
}

#[tokio::test]
async fn a_route_that_does_not_opt_in_misses() {
    let mut cache = Running::start().await;
    for route in ["exact", "off"] {
        cache.store("app-a", request(route, STORED), "answer").await;
        assert!(cache.lookup("app-a", request(route, STORED)).await.hit);
        let found = cache.lookup("app-a", request(route, PARAPHRASE)).await;
        assert!(!found.hit, "{route}");
    }
    cache.stop().await;
}

#[tokio::test]
async fn a_missing_model_fails_startup_with_a_typed_error() {
    let mut config = config();
    config.semantic.model_dir = "/nonexistent/model".into();
    let result = App::build_with_store(config, Arc::new(MemoryStore::new(10))).await;
    match result {
        Err(StartupError::Embed(error)) => {
            assert!(error.to_string().contains("/nonexistent/model"), "{error}");
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("started without a model"),
    }
}
