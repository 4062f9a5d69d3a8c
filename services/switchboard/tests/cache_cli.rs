//! `switchboard cache purge` as an operator runs it, against a real cache (in process).

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use switchboard_proto::{
    cache::v1::{LookupRequest, Scope, StoreRequest, cache_service_client::CacheServiceClient},
    chat::v1::{ChatRequest, ChatResponse, Choice, FinishReason, Message, Role, Usage},
};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env_remove("SWITCHBOARD_CONFIG")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn request(question: &str) -> ChatRequest {
    ChatRequest {
        model: "fast".into(),
        messages: vec![Message::text(Role::User, question)],
        ..Default::default()
    }
}

fn response() -> ChatResponse {
    ChatResponse {
        id: "r".into(),
        model: "m".into(),
        choices: vec![Choice {
            index: 0,
            message: Some(Message::text(Role::Assistant, "answer")),
            finish_reason: FinishReason::Stop as i32,
        }],
        usage: Some(Usage {
            prompt_tokens: 1,
            completion_tokens: 1,
            total_tokens: 2,
            ..Default::default()
        }),
        created: 1,
    }
}

#[tokio::test]
async fn cache_purge_removes_one_apps_answers() {
    let config = switchboard_cache::Config {
        grpc_addr: "127.0.0.1:0".into(),
        shared: false,
        ..Default::default()
    };
    let app = switchboard_cache::App::build(config, switchboard_bus::NatsConfig::default())
        .await
        .unwrap();
    let url = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let mut client = CacheServiceClient::connect(url.clone()).await.unwrap();
    for (app, question) in [("billing", "q1"), ("billing", "q2"), ("search", "q1")] {
        let stored = client
            .store(StoreRequest {
                scope: Some(Scope {
                    app: app.into(),
                    ..Default::default()
                }),
                request: Some(request(question)),
                response: Some(response()),
                route: None,
                ttl_seconds: 0,
                guard_policy: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(stored.stored);
    }

    let output = run(vec![
        "cache".into(),
        "purge".into(),
        "--app".into(),
        "billing".into(),
        "--cache".into(),
        url.clone(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), "purged 2 cached answers of app billing");
    let hit = |app: &str, question: &str| {
        let lookup = LookupRequest {
            scope: Some(Scope {
                app: app.into(),
                ..Default::default()
            }),
            request: Some(request(question)),
        };
        let mut client = client.clone();
        async move { client.lookup(lookup).await.unwrap().into_inner().hit }
    };
    assert!(!hit("billing", "q1").await);
    assert!(!hit("billing", "q2").await);
    assert!(hit("search", "q1").await);

    // An empty app is refused before any call; an unreachable cache is exit 69.
    let output = run(vec![
        "cache".into(),
        "purge".into(),
        "--app".into(),
        " ".into(),
        "--cache".into(),
        url,
    ])
    .await;
    assert_eq!(output.status.code(), Some(64));
    let output = run(vec![
        "cache".into(),
        "purge".into(),
        "--app".into(),
        "billing".into(),
        "--cache".into(),
        "http://127.0.0.1:9".into(),
    ])
    .await;
    assert_eq!(output.status.code(), Some(69));

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
