//! End-to-end: a key limited to some models (`gateway.keys[].models`) is refused every other
//! model with a typed 403 / `PERMISSION_DENIED` on every front door (chat, streams, Anthropic
//! Messages, embeddings, HTTP and gRPC), before anything reaches a provider, and sees only its
//! models in the model list; an expired key (`expires_at`) gets 401 / `UNAUTHENTICATED`; a key's
//! tags are on every usage row of its requests, whatever the caller sends.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use switchboard_e2e::{EMBEDDING_MODEL, KEY_A, KEY_EXPIRED, KEY_MINI, MODEL, Sandbox, authed};
use switchboard_proto::{
    chat::v1::{ChatRequest, Message, Role},
    gateway::v1::{
        CreateChatCompletionRequest, CreateEmbeddingsRequest, ListModelsRequest,
        StreamChatCompletionRequest,
    },
};
use tonic_types::StatusExt;

/// A route the limited key may not call (the sandbox's embeddings route, asked for a chat).
const OTHER: &str = EMBEDDING_MODEL;

fn chat_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}]})
}

async fn post(sandbox: &Sandbox, path: &str, key: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", sandbox.http_url))
        .bearer_auth(key)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn model_ids(sandbox: &Sandbox, key: &str) -> Vec<String> {
    let response = reqwest::Client::new()
        .get(format!("{}/v1/models", sandbox.http_url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let list: Value = response.json().await.unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

fn chat(model: &str) -> ChatRequest {
    ChatRequest {
        model: model.into(),
        messages: vec![Message::text(Role::User, "hello")],
        ..Default::default()
    }
}

fn assert_refused(status: &tonic::Status, what: &str) {
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "{what}: {status:?}"
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "PERMISSION_DENIED", "{what}");
    assert_eq!(info.metadata["reason"], "model_not_allowed", "{what}");
    assert_eq!(info.metadata["model"], OTHER, "{what}");
    assert_eq!(info.metadata["key_id"], "key-mini", "{what}");
}

#[tokio::test]
async fn a_key_limited_to_some_models_is_refused_the_others_everywhere() {
    let sandbox = Sandbox::start().await.unwrap();

    // Its own models work.
    let allowed = post(
        &sandbox,
        "/v1/chat/completions",
        KEY_MINI,
        &chat_body(MODEL, false),
    )
    .await;
    assert_eq!(allowed.status(), 200);
    let served = sandbox.primary.requests().len();
    assert_eq!(served, 1);

    // Chat, a stream and Anthropic Messages for another model: a typed 403, nothing sent.
    for (path, body) in [
        ("/v1/chat/completions", chat_body(OTHER, false)),
        ("/v1/chat/completions", chat_body(OTHER, true)),
        (
            "/v1/messages",
            json!({"model": OTHER, "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}),
        ),
    ] {
        let refused = post(&sandbox, path, KEY_MINI, &body).await;
        assert_eq!(refused.status(), 403, "{path} {body}");
        let error: Value = refused.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("key-mini"), "{message}");
        assert!(message.contains(OTHER), "{message}");
        assert!(message.contains("gpt-4o-*"), "{message}");
        assert!(
            !message.contains(KEY_MINI),
            "the key itself is never echoed: {message}"
        );
        if path == "/v1/messages" {
            assert_eq!(error["type"], "error");
            assert_eq!(error["error"]["type"], "permission_error");
        } else {
            assert_eq!(error["error"]["type"], "permission_error");
            assert_eq!(error["error"]["code"], "model_not_allowed");
            assert_eq!(error["error"]["param"], "model");
        }
    }
    let refused = post(
        &sandbox,
        "/v1/embeddings",
        KEY_MINI,
        &json!({"model": OTHER, "input": ["hello"]}),
    )
    .await;
    assert_eq!(refused.status(), 403);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_allowed");

    // The same over gRPC.
    let mut gateway = sandbox.gateway().await.unwrap();
    let status = gateway
        .create_chat_completion(authed(
            CreateChatCompletionRequest {
                request: Some(chat(OTHER)),
                ..Default::default()
            },
            KEY_MINI,
        ))
        .await
        .unwrap_err();
    assert_refused(&status, "CreateChatCompletion");
    let status = gateway
        .stream_chat_completion(authed(
            StreamChatCompletionRequest {
                request: Some(chat(OTHER)),
                ..Default::default()
            },
            KEY_MINI,
        ))
        .await
        .unwrap_err();
    assert_refused(&status, "StreamChatCompletion");
    let status = gateway
        .create_embeddings(authed(
            CreateEmbeddingsRequest {
                model: OTHER.into(),
                inputs: vec!["hello".into()],
                ..Default::default()
            },
            KEY_MINI,
        ))
        .await
        .unwrap_err();
    assert_refused(&status, "CreateEmbeddings");

    // No refused request reached a provider.
    assert_eq!(sandbox.primary.requests().len(), served);
    assert!(sandbox.backup.requests().is_empty());

    // The model list shows each key what it may call.
    assert_eq!(model_ids(&sandbox, KEY_MINI).await, vec![MODEL.to_owned()]);
    let all = model_ids(&sandbox, KEY_A).await;
    assert!(
        all.contains(&MODEL.to_owned()) && all.contains(&OTHER.to_owned()),
        "{all:?}"
    );
    let listed = gateway
        .list_models(authed(ListModelsRequest {}, KEY_MINI))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = listed.models.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec![MODEL]);

    // So does retrieving one model: its own, and a typed 403 for another.
    let get_model = |model: &str| {
        reqwest::Client::new()
            .get(format!("{}/v1/models/{model}", sandbox.http_url))
            .bearer_auth(KEY_MINI)
            .send()
    };
    let own = get_model(MODEL).await.unwrap();
    assert_eq!(own.status(), 200);
    assert_eq!(own.json::<Value>().await.unwrap()["id"], MODEL);
    let refused = get_model(OTHER).await.unwrap();
    assert_eq!(refused.status(), 403);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_allowed");

    // An unrestricted key of the same app still calls the other model.
    let other = post(
        &sandbox,
        "/v1/embeddings",
        KEY_A,
        &json!({"model": OTHER, "input": ["hello"]}),
    )
    .await;
    assert_eq!(other.status(), 200);
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn an_expired_key_is_refused_with_a_typed_401_and_nothing_is_sent() {
    let sandbox = Sandbox::start().await.unwrap();
    let refused = post(
        &sandbox,
        "/v1/chat/completions",
        KEY_EXPIRED,
        &chat_body(MODEL, false),
    )
    .await;
    assert_eq!(refused.status(), 401);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["type"], "authentication_error");
    assert_eq!(error["error"]["code"], "key_expired");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("key-expired") && message.contains("2000-01-01T00:00:00Z"),
        "{message}"
    );
    let listed = reqwest::Client::new()
        .get(format!("{}/v1/models", sandbox.http_url))
        .bearer_auth(KEY_EXPIRED)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 401);

    let mut gateway = sandbox.gateway().await.unwrap();
    let status = gateway
        .create_chat_completion(authed(
            CreateChatCompletionRequest {
                request: Some(chat(MODEL)),
                ..Default::default()
            },
            KEY_EXPIRED,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["reason"], "key_expired");
    assert_eq!(info.metadata["key_id"], "key-expired");
    assert!(sandbox.primary.requests().is_empty());
    // The same app's unexpired key works.
    let served = post(
        &sandbox,
        "/v1/chat/completions",
        KEY_A,
        &chat_body(MODEL, false),
    )
    .await;
    assert_eq!(served.status(), 200);
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn a_keys_tags_are_on_its_usage_rows_and_callers_cannot_override_them() {
    let sandbox = Sandbox::start().await.unwrap();
    // The caller tries to book its spend on another cost center, and adds a tag of its own.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hello"}],
        "metadata": {"cost_center": "someone-else", "feature": "search"}});
    let response = post(&sandbox, "/v1/chat/completions", KEY_MINI, &body).await;
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-switchboard-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let row = sandbox.wait_for_record(&id).await.unwrap();
    assert_eq!(row.tags["cost_center"], "cc-42");
    assert_eq!(row.tags["feature"], "search");
    // A key without tags leaves the caller's. (Another prompt, so that the answer is not the
    // first one's from the exact cache: both keys are app-a's.)
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hello again"}],
        "metadata": {"cost_center": "someone-else", "feature": "search"}});
    let response = post(&sandbox, "/v1/chat/completions", KEY_A, &body).await;
    let id = response.headers()["x-switchboard-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let row = sandbox.wait_for_record(&id).await.unwrap();
    assert_eq!(row.tags["cost_center"], "someone-else");

    // The gateway's own tag names are refused from callers, on chat and embeddings.
    let spoofed = json!({"model": MODEL, "messages": [{"role": "user", "content": "hello"}],
        "metadata": {"switchboard.guard": "checked"}});
    let refused = post(&sandbox, "/v1/chat/completions", KEY_A, &spoofed).await;
    assert_eq!(refused.status(), 400);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["param"], "tags.switchboard.guard");
    let refused = post(
        &sandbox,
        "/v1/embeddings",
        KEY_A,
        &json!({"model": OTHER, "input": ["hello"], "metadata": {"switchboard.x": "y"}}),
    )
    .await;
    assert_eq!(refused.status(), 400);
    // Only the two served requests reached the provider.
    assert_eq!(sandbox.primary.requests().len(), 2);
    sandbox.stop().await.unwrap();
}
