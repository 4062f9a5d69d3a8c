//! API tests: the real App on 127.0.0.1:0, called with the generated client.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_cache::{App, Config, StartupError};
use switchboard_proto::{
    cache::v1::{
        LookupRequest, LookupResponse, PurgeRequest, Scope, StoreRequest, StoreResponse,
        cache_service_client::CacheServiceClient,
    },
    chat::v1::{
        ChatRequest, ChatResponse, Choice, FinishReason, Message, Role, RouteInfo, SamplingParams,
        Usage,
    },
};
use tokio::sync::oneshot;
use tonic::transport::Channel;

struct Running {
    client: CacheServiceClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), StartupError>>,
}

impl Running {
    async fn start() -> Self {
        let config = Config {
            grpc_addr: "127.0.0.1:0".into(),
            shared: false,
            ..Config::default()
        };
        let app = App::build(config, switchboard_bus::NatsConfig::default())
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

    async fn store(
        &mut self,
        app: &str,
        request: ChatRequest,
        response: ChatResponse,
        ttl: u32,
    ) -> StoreResponse {
        let store = StoreRequest {
            scope: Some(Scope {
                app: app.into(),
                ..Default::default()
            }),
            request: Some(request),
            response: Some(response),
            route: Some(route()),
            ttl_seconds: ttl,
            guard_policy: GUARD_POLICY.into(),
        };
        self.client.store(store).await.unwrap().into_inner()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.await.unwrap().unwrap();
    }
}

/// The guard policy every answer of these tests was checked under (opaque to the cache).
const GUARD_POLICY: &str = "9f8e7d6c5b4a/d3-h1-x";

fn request(temperature: f64) -> ChatRequest {
    ChatRequest {
        model: "fast".into(),
        messages: vec![
            Message::text(Role::System, "Be terse."),
            Message::text(Role::User, "Capital of France?"),
        ],
        sampling: Some(SamplingParams {
            temperature: Some(temperature),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn response(finish: FinishReason) -> ChatResponse {
    ChatResponse {
        id: "resp-1".into(),
        model: "provider-model".into(),
        choices: vec![Choice {
            index: 0,
            message: Some(Message::text(Role::Assistant, "Paris.")),
            finish_reason: finish as i32,
        }],
        usage: Some(Usage {
            prompt_tokens: 12,
            completion_tokens: 2,
            total_tokens: 14,
            ..Default::default()
        }),
        created: 1_700_000_000,
    }
}

fn route() -> RouteInfo {
    RouteInfo {
        route: "fast".into(),
        provider: "openai".into(),
        model: "gpt-x".into(),
        target: "openai/gpt-x".into(),
        attempt_count: 1,
        attempts: vec![],
        key_alias: String::new(),
    }
}

#[tokio::test]
async fn store_then_lookup_hits_and_scope_and_sampling_isolate() {
    let mut cache = Running::start().await;
    let miss = cache.lookup("search", request(0.2)).await;
    assert!(!miss.hit && miss.response.is_none() && miss.route.is_none());
    assert!(miss.guard_policy.is_empty());
    assert_eq!(miss.key.len(), 64);

    let stored = cache
        .store("search", request(0.2), response(FinishReason::Stop), 0)
        .await;
    assert!(stored.stored, "{}", stored.reason);
    assert!(stored.reason.is_empty());

    // The end user does not take part in the key (tags and the team do: see below).
    let mut with_user = request(0.2);
    with_user.user = "end-user-7".into();
    let hit = cache.lookup("search", with_user).await;
    assert!(hit.hit);
    assert_eq!(hit.key, miss.key);
    assert_eq!(hit.response, Some(response(FinishReason::Stop)));
    assert_eq!(hit.route, Some(route()));
    // The guard policy the answer was checked under comes back with it (the gateway compares it).
    assert_eq!(hit.guard_policy, GUARD_POLICY);
    assert!(hit.age_seconds < 3600);

    let other_app = cache.lookup("billing", request(0.2)).await;
    assert!(!other_app.hit);
    assert_ne!(other_app.key, miss.key);

    let other_temperature = cache.lookup("search", request(0.3)).await;
    assert!(!other_temperature.hit);
    cache.stop().await;
}

#[tokio::test]
async fn incomplete_answers_are_refused_with_a_reason() {
    let mut cache = Running::start().await;
    for finish in [
        FinishReason::Length,
        FinishReason::ToolCalls,
        FinishReason::ContentFilter,
        FinishReason::Error,
    ] {
        let outcome = cache
            .store("search", request(0.5), response(finish), 0)
            .await;
        assert!(!outcome.stored);
        assert!(
            outcome.reason.contains(finish.as_str_name()),
            "{}",
            outcome.reason
        );
    }
    let no_usage = ChatResponse {
        usage: None,
        ..response(FinishReason::Stop)
    };
    let outcome = cache.store("search", request(0.5), no_usage, 0).await;
    assert!(
        !outcome.stored && outcome.reason.contains("usage"),
        "{}",
        outcome.reason
    );
    let no_choices = ChatResponse {
        choices: vec![],
        ..response(FinishReason::Stop)
    };
    assert!(
        !cache
            .store("search", request(0.5), no_choices, 0)
            .await
            .stored
    );
    assert!(!cache.lookup("search", request(0.5)).await.hit);
    cache.stop().await;
}

#[tokio::test]
async fn empty_app_or_model_is_invalid_argument() {
    let mut cache = Running::start().await;
    let store = StoreRequest {
        scope: Some(Scope {
            app: String::new(),
            ..Default::default()
        }),
        request: Some(request(0.1)),
        response: Some(response(FinishReason::Stop)),
        ..Default::default()
    };
    let status = cache.client.store(store).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        switchboard_status::status_metadata(&status)
            .get("field")
            .map(String::as_str),
        Some("scope.app")
    );

    let no_model = ChatRequest {
        model: String::new(),
        ..request(0.1)
    };
    let lookup = LookupRequest {
        scope: Some(Scope {
            app: "a".into(),
            ..Default::default()
        }),
        request: Some(no_model),
    };
    let status = cache.client.lookup(lookup).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        switchboard_status::status_metadata(&status)
            .get("field")
            .map(String::as_str),
        Some("request.model")
    );
    cache.stop().await;
}

#[tokio::test]
async fn purge_removes_only_the_apps_entries_and_needs_an_app() {
    let mut cache = Running::start().await;
    for temperature in [0.1, 0.2] {
        let stored = cache
            .store(
                "search",
                request(temperature),
                response(FinishReason::Stop),
                0,
            )
            .await;
        assert!(stored.stored);
    }
    let stored = cache
        .store("billing", request(0.1), response(FinishReason::Stop), 0)
        .await;
    assert!(stored.stored);

    let purged = cache
        .client
        .purge(PurgeRequest {
            scope: Some(Scope {
                app: "search".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.removed, 2);
    assert!(!cache.lookup("search", request(0.1)).await.hit);
    assert!(!cache.lookup("search", request(0.2)).await.hit);
    assert!(cache.lookup("billing", request(0.1)).await.hit);

    let status = cache
        .client
        .purge(PurgeRequest { scope: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(cache.lookup("billing", request(0.1)).await.hit);
    cache.stop().await;
}

#[tokio::test]
async fn entries_expire_after_the_requested_ttl() {
    let mut cache = Running::start().await;
    let stored = cache
        .store("search", request(0.9), response(FinishReason::Stop), 1)
        .await;
    assert!(stored.stored);
    assert!(cache.lookup("search", request(0.9)).await.hit);
    // Bounded polling (the smallest TTL the API allows is one second).
    let mut expired = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !cache.lookup("search", request(0.9)).await.hit {
            expired = true;
            break;
        }
    }
    assert!(
        expired,
        "an entry stored for 1s was still served after the polling bound"
    );
    cache.stop().await;
}

#[tokio::test]
async fn invalid_configuration_is_refused_at_build() {
    let config = Config {
        grpc_addr: "127.0.0.1:0".into(),
        default_ttl_secs: 10,
        max_ttl_secs: 5,
        ..Config::default()
    };
    let error = App::build(config, switchboard_bus::NatsConfig::default())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("cache.default_ttl_secs"), "{error}");
}

#[tokio::test]
async fn another_team_or_other_tags_never_share_an_answer() {
    // The router routes on the team and on tags (a data-residency rule, say): the same prompt of
    // another team, or with other tags, may be answered by another provider.
    let mut cache = Running::start().await;
    let scope = |team: &str| {
        Some(Scope {
            app: "app".into(),
            team: team.into(),
        })
    };
    let tagged = |tags: &[(&str, &str)]| {
        let mut r = request(0.1);
        r.tags = tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        r
    };
    let stored = cache
        .client
        .store(StoreRequest {
            scope: scope("legal"),
            request: Some(tagged(&[("region", "eu"), ("task", "chat")])),
            response: Some(response(FinishReason::Stop)),
            route: Some(route()),
            ttl_seconds: 0,
            guard_policy: GUARD_POLICY.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stored.stored, "{}", stored.reason);
    let hit = |team: &str, request: ChatRequest| {
        let lookup = LookupRequest {
            scope: scope(team),
            request: Some(request),
        };
        let mut client = cache.client.clone();
        async move { client.lookup(lookup).await.unwrap().into_inner().hit }
    };
    // The same team and tags (in any order): a hit.
    assert!(hit("legal", tagged(&[("task", "chat"), ("region", "eu")])).await);
    // Another team: a miss.
    assert!(!hit("ops", tagged(&[("region", "eu"), ("task", "chat")])).await);
    assert!(!hit("", tagged(&[("region", "eu"), ("task", "chat")])).await);
    // Other tags: another value, one tag fewer, one more, none.
    assert!(!hit("legal", tagged(&[("region", "us"), ("task", "chat")])).await);
    assert!(!hit("legal", tagged(&[("region", "eu")])).await);
    assert!(
        !hit(
            "legal",
            tagged(&[("region", "eu"), ("task", "chat"), ("tier", "free")])
        )
        .await
    );
    assert!(!hit("legal", request(0.1)).await);
    cache.stop().await;
}
