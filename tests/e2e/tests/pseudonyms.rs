//! End-to-end: reversible pseudonymisation. App `app-c`'s policy pseudonymises: the provider and the
//! cache see `<EMAIL_ADDRESS_1>`, the caller gets its own email back — unary, streamed (with the
//! placeholder split across the fake's chunks) and from the cache — over OpenAI HTTP, Anthropic
//! HTTP and gRPC.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use switchboard_e2e::{KEY_C, MODEL, Sandbox};
use switchboard_proto::{
    cache::v1::{LookupRequest, Scope, cache_service_client::CacheServiceClient},
    chat::v1::{ChatRequest, Message, Role},
    gateway::v1::{
        CacheStatus, CreateChatCompletionRequest, StreamChatCompletionRequest,
        stream_chat_completion_response::Event,
    },
};

const EMAIL: &str = "jane.doe@example.com";

fn authed<T>(message: T) -> tonic::Request<T> {
    switchboard_e2e::authed(message, KEY_C)
}

fn chat(text: &str) -> ChatRequest {
    ChatRequest {
        model: MODEL.into(),
        messages: vec![
            Message::text(Role::System, "be brief"),
            Message::text(Role::User, text),
        ],
        ..Default::default()
    }
}

/// What the provider received last, as JSON text.
fn last_sent(sandbox: &Sandbox) -> String {
    let sent = sandbox.primary.requests();
    serde_json::to_string(&sent.last().unwrap().body).unwrap()
}

fn assert_pseudonymised(sent: &str) {
    assert!(!sent.contains(EMAIL), "the provider must not see the email");
    assert!(sent.contains("<EMAIL_ADDRESS_1>"), "{sent}");
}

#[tokio::test]
async fn http_answers_are_restored_and_the_provider_sees_placeholders() {
    let sandbox = Sandbox::start().await.unwrap();
    let client = reqwest::Client::new();
    let prompt = format!("write to {EMAIL} today");

    let response = client
        .post(format!("{}/v1/chat/completions", sandbox.http_url))
        .bearer_auth(KEY_C)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        format!("echo: {prompt}")
    );
    assert_pseudonymised(&last_sent(&sandbox));

    // Anthropic's front end runs the same pipeline.
    let response = client
        .post(format!("{}/v1/messages", sandbox.http_url))
        .header("x-api-key", KEY_C)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": MODEL, "max_tokens": 100,
            "messages": [{"role": "user", "content": format!("anthropic: {prompt}")}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["content"][0]["text"],
        format!("echo: anthropic: {prompt}")
    );
    assert_pseudonymised(&last_sent(&sandbox));
    sandbox.stop().await.unwrap();
}

/// The non-empty content pieces of a gRPC stream of `prompt`.
async fn stream(sandbox: &Sandbox, prompt: &str) -> Vec<String> {
    let mut gateway = sandbox.gateway().await.unwrap();
    let request = StreamChatCompletionRequest {
        request: Some(chat(prompt)),
        cache: None,
    };
    let mut stream = gateway
        .stream_chat_completion(authed(request))
        .await
        .unwrap()
        .into_inner();
    let mut pieces = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        if let Event::Chunk(chunk) = message.event.unwrap() {
            for choice in chunk.choices {
                if !choice.content.is_empty() {
                    pieces.push(choice.content);
                }
            }
        }
    }
    pieces
}

#[tokio::test]
async fn a_stream_with_a_split_placeholder_is_restored_and_cached_with_placeholders() {
    let sandbox = Sandbox::start().await.unwrap();
    let mut gateway = sandbox.gateway().await.unwrap();
    // The fake answers "echo: mail <EMAIL_ADDRESS_1> now" (32 characters) in 5 pieces of 7, so the
    // placeholder (characters 11..28) is cut at 14 and 21.
    let prompt = format!("mail {EMAIL} now");
    let placeholder_answer = "echo: mail <EMAIL_ADDRESS_1> now";
    assert_eq!(placeholder_answer.len(), 32);

    let pieces = stream(&sandbox, &prompt).await;
    assert_eq!(pieces.concat(), format!("echo: {prompt}"));
    assert!(pieces.len() > 1);
    assert!(
        pieces.iter().all(|p| !p.contains('<') && !p.contains('>')),
        "no placeholder fragment reaches the caller: {pieces:?}"
    );
    assert_pseudonymised(&last_sent(&sandbox));

    // The cache holds what the provider answered, placeholders and all (stored in the background).
    let cache_url = sandbox
        .grpc_urls
        .iter()
        .find(|(name, _)| *name == "switchboard.cache.v1.CacheService")
        .unwrap()
        .1
        .clone();
    let mut cache = CacheServiceClient::connect(cache_url).await.unwrap();
    let mut cached = None;
    for _ in 0..200 {
        let found = cache
            .lookup(LookupRequest {
                // The gateway's cache scope: key-c's app and team.
                scope: Some(Scope {
                    app: "app-c".into(),
                    team: "team-3".into(),
                }),
                request: Some(chat("mail <EMAIL_ADDRESS_1> now")),
            })
            .await
            .unwrap()
            .into_inner();
        if found.hit {
            cached = found.response;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let cached = cached.expect("the stream's answer is cached");
    assert_eq!(
        cached.choices[0].message.as_ref().unwrap().joined_text(),
        placeholder_answer
    );

    // The same request again: a cache hit, restored with this request's mapping — unary and stream.
    let calls = sandbox.primary.requests().len();
    let unary = gateway
        .create_chat_completion(authed(CreateChatCompletionRequest {
            request: Some(chat(&prompt)),
            cache: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unary.cache, CacheStatus::Hit as i32);
    let response = unary.response.unwrap();
    assert_eq!(
        response.choices[0].message.as_ref().unwrap().joined_text(),
        format!("echo: {prompt}")
    );
    assert_eq!(
        stream(&sandbox, &prompt).await.concat(),
        format!("echo: {prompt}")
    );
    assert_eq!(
        sandbox.primary.requests().len(),
        calls,
        "served from the cache"
    );
    sandbox.stop().await.unwrap();
}
