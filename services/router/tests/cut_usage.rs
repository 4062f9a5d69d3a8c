//! What a cut stream consumed: the prompt-side usage a provider reports before its answer
//! (Anthropic's `message_start`, Gemini's `usageMetadata` on every event) is not lost when the
//! stream breaks. A stream cut after its first chunk ends with the router's `interrupted` route
//! info (the cut attempt last, with that usage) before its error status; an attempt that failed
//! before its first chunk, after such a report, carries it in the attempts of the route that
//! served. Providers are scripted: a small HTTP server answers every request with one fixed
//! event stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Mesh, chat};
use futures::StreamExt;
use switchboard_proto::{
    chat::v1::{ChatChunk, RouteInfo, Usage},
    router::v1::{RouteStreamRequest, route_stream_response::Event},
};
use switchboard_router::{ProviderConfig, ProviderKind, RouteConfig, TargetConfig};
use tonic::Status;

/// Serves `body` as an event stream to every request; returns its base URL.
async fn scripted(body: &'static str) -> String {
    let app = axum::Router::new().fallback(move || async move {
        (
            [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
            body,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Anthropic: `message_start` reporting a 50,000-token cache write, a text delta, then the body
/// ends without `message_stop`.
const ANTHROPIC_CUT: &str = concat!(
    "event: message_start\n",
    r#"data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":50000,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
    "\n\n",
    "event: content_block_start\n",
    r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}"#,
    "\n\n",
);

/// Anthropic: the same `message_start`, then an `overloaded_error` before any content.
const ANTHROPIC_OVERLOADED: &str = concat!(
    "event: message_start\n",
    r#"data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":50000,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
    "\n\n",
    "event: error\n",
    r#"data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    "\n\n",
);

/// Anthropic: a whole answer.
const ANTHROPIC_WHOLE: &str = concat!(
    "event: message_start\n",
    r#"data: {"type":"message_start","message":{"id":"msg_2","type":"message","role":"assistant","model":"claude-y","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":7,"output_tokens":1}}}"#,
    "\n\n",
    "event: content_block_start\n",
    r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
    "\n\n",
    "event: content_block_stop\n",
    r#"data: {"type":"content_block_stop","index":0}"#,
    "\n\n",
    "event: message_delta\n",
    r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":2}}"#,
    "\n\n",
    "event: message_stop\n",
    r#"data: {"type":"message_stop"}"#,
    "\n\n",
);

/// Gemini: one event with text and `usageMetadata` (a 50,000-token cached prefix), then the body
/// ends before any candidate finished.
const GEMINI_CUT: &str = concat!(
    r#"data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Hel"}]},"index":0}],"usageMetadata":{"promptTokenCount":50012,"cachedContentTokenCount":50000,"candidatesTokenCount":1,"totalTokenCount":50013},"modelVersion":"gemini-x","responseId":"r1"}"#,
    "\n\n",
);

/// A router with route `chat` over `targets` (provider, kind, base URL), no retries.
async fn mesh(targets: &[(&str, ProviderKind, String)]) -> Mesh {
    let targets = targets.to_vec();
    Mesh::start(&[], move |config| {
        config.max_retries = 0;
        let mut route = Vec::new();
        for (name, kind, base_url) in targets {
            config.providers.insert(
                name.to_owned(),
                ProviderConfig::of_kind(kind, base_url, Some("k")),
            );
            route.push(TargetConfig::new(name, "model"));
        }
        config.routes = vec![RouteConfig::new("chat", route)];
    })
    .await
}

/// Route `chat` over Anthropic `claude`, which fails with `overloaded_error` after its
/// `message_start`, then Anthropic `backup`, which answers whole.
async fn fallback_mesh() -> Mesh {
    mesh(&[
        (
            "claude",
            ProviderKind::Anthropic,
            scripted(ANTHROPIC_OVERLOADED).await,
        ),
        (
            "backup",
            ProviderKind::Anthropic,
            scripted(ANTHROPIC_WHOLE).await,
        ),
    ])
    .await
}

/// A stream of route `chat`.
fn say_hello() -> RouteStreamRequest {
    RouteStreamRequest {
        request: Some(chat("chat", "say hello")),
        caller: None,
        allowance: None,
    }
}

/// What a stream delivered: its chunks, its route info (a clean finish), the route info of a cut,
/// and the status that ended it.
#[derive(Default)]
struct Streamed {
    chunks: Vec<ChatChunk>,
    route: Option<RouteInfo>,
    interrupted: Option<RouteInfo>,
    error: Option<Status>,
}

async fn stream(mesh: &Mesh) -> Streamed {
    let mut out = Streamed::default();
    let mut stream = mesh
        .client
        .clone()
        .route_stream(say_hello())
        .await
        .unwrap()
        .into_inner();
    while let Some(item) = stream.next().await {
        match item {
            Ok(message) => match message.event.unwrap() {
                Event::Chunk(chunk) => out.chunks.push(chunk),
                Event::Route(route) => out.route = Some(route),
                Event::Interrupted(route) => out.interrupted = Some(route),
            },
            Err(status) => {
                out.error = Some(status);
                break;
            }
        }
    }
    out
}

fn text(chunks: &[ChatChunk]) -> String {
    chunks
        .iter()
        .flat_map(|c| c.choices.iter().map(|d| d.content.as_str()))
        .collect()
}

/// Anthropic's `message_start` counts, normalised: input + cache write (+ read) is the prompt.
const ANTHROPIC_REPORTED: Usage = Usage {
    prompt_tokens: 50_012,
    completion_tokens: 1,
    total_tokens: 50_013,
    cached_prompt_tokens: 0,
    reasoning_tokens: 0,
    cache_write_tokens: 50_000,
};

#[tokio::test]
async fn an_anthropic_stream_cut_after_its_first_chunk_carries_the_prompt_usage_of_message_start() {
    let mesh = mesh(&[(
        "claude",
        ProviderKind::Anthropic,
        scripted(ANTHROPIC_CUT).await,
    )])
    .await;
    let out = stream(&mesh).await;
    assert_eq!(text(&out.chunks), "Hel");
    assert!(out.route.is_none(), "never a clean finish");
    let error = out.error.expect("the cut ends with an error");
    assert_eq!(
        error.message(),
        "stream interrupted after 2 chunks",
        "{error:?}"
    );
    let info = out.interrupted.expect("the cut's route info");
    assert_eq!(
        (
            info.provider.as_str(),
            info.model.as_str(),
            info.attempt_count
        ),
        ("claude", "model", 1)
    );
    assert_eq!(info.attempts.len(), 1);
    let cut = &info.attempts[0];
    assert_eq!(cut.target, "claude/model");
    assert_eq!(cut.error_code, "STREAM_INTERRUPTED");
    assert_eq!(cut.usage, Some(ANTHROPIC_REPORTED));
    mesh.shutdown().await;
}

#[tokio::test]
async fn a_gemini_stream_cut_after_its_first_chunk_carries_its_last_usage_metadata() {
    let mesh = mesh(&[("gem", ProviderKind::Gemini, scripted(GEMINI_CUT).await)]).await;
    let out = stream(&mesh).await;
    assert_eq!(text(&out.chunks), "Hel");
    assert!(out.route.is_none() && out.error.is_some());
    let info = out.interrupted.expect("the cut's route info");
    assert_eq!(info.attempts.len(), 1);
    assert_eq!(info.attempts[0].error_code, "STREAM_INTERRUPTED");
    assert_eq!(
        info.attempts[0].usage,
        Some(Usage {
            prompt_tokens: 50_012,
            completion_tokens: 1,
            total_tokens: 50_013,
            cached_prompt_tokens: 50_000,
            reasoning_tokens: 0,
            cache_write_tokens: 0,
        })
    );
    mesh.shutdown().await;
}

#[tokio::test]
async fn an_attempt_that_failed_after_message_start_is_billed_with_its_prompt_usage() {
    let mesh = fallback_mesh().await;
    let out = stream(&mesh).await;
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(text(&out.chunks), "Hello");
    let info = out.route.expect("served by the fallback");
    assert_eq!(info.target, "backup/model");
    assert_eq!(info.attempts.len(), 2);
    let failed = &info.attempts[0];
    assert_eq!(
        (failed.target.as_str(), failed.error_code.as_str()),
        ("claude/model", "OVERLOADED")
    );
    assert_eq!(failed.usage, Some(ANTHROPIC_REPORTED));
    assert_eq!(
        info.attempts[1]
            .usage
            .map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((7, 2))
    );
    mesh.shutdown().await;
}

/// OpenAI: a whole answer, its usage only in the last chunk.
const OPENAI_WHOLE: &str = concat!(
    r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-x","choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},"finish_reason":null}]}"#,
    "\n\n",
    r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#,
    "\n\n",
    "data: [DONE]\n\n",
);

/// The account of what the attempts consumed by the first chunk, from a stream's response head
/// (`switchboard_status::serving::CONSUMED`), if it has one.
async fn consumed_at_head(mesh: &Mesh) -> Option<RouteInfo> {
    let response = mesh.client.clone().route_stream(say_hello()).await.unwrap();
    let value = response
        .metadata()
        .get_bin(switchboard_status::serving::CONSUMED)?;
    let bytes = value.to_bytes().expect("binary metadata");
    Some(prost::Message::decode(bytes).expect("a RouteInfo"))
}

/// A caller that stops reading before the end (the client gone, an answer refused) has no
/// `interrupted` account: the response head already says what the providers reported.
#[tokio::test]
async fn the_response_head_carries_what_the_providers_reported_by_the_first_chunk() {
    // A fallback after an attempt that failed once its provider had reported the prompt.
    let mesh = fallback_mesh().await;
    let consumed = consumed_at_head(&mesh)
        .await
        .expect("an account in the head");
    assert_eq!(consumed.target, "backup/model");
    assert_eq!(consumed.attempt_count, 2);
    let attempts: Vec<_> = consumed
        .attempts
        .iter()
        .map(|a| (a.target.as_str(), a.error_code.as_str()))
        .collect();
    assert_eq!(
        attempts,
        vec![("claude/model", "OVERLOADED"), ("backup/model", "")]
    );
    assert_eq!(consumed.attempts[0].usage, Some(ANTHROPIC_REPORTED));
    // The serving attempt: its `message_start` prompt, and the output as far as the provider
    // had counted it when the first chunk was read (this script's whole body comes in one read,
    // so its final `message_delta` count may be in).
    let serving = consumed.attempts[1]
        .usage
        .expect("the serving attempt's report");
    assert_eq!(
        (
            serving.prompt_tokens,
            serving.cached_prompt_tokens,
            serving.cache_write_tokens
        ),
        (7, 0, 0)
    );
    assert!((1..=2).contains(&serving.completion_tokens), "{serving:?}");
    mesh.shutdown().await;

    // A format that reports at its end only: no account, nothing added to the head.
    let mesh = mesh_of_openai().await;
    assert_eq!(consumed_at_head(&mesh).await, None);
    mesh.shutdown().await;
}

async fn mesh_of_openai() -> Mesh {
    mesh(&[("gpt", ProviderKind::Openai, scripted(OPENAI_WHOLE).await)]).await
}

/// A stream that no attempt served, after a provider reported what it consumed: the status that
/// refuses it carries the account, so that the caller bills it; a failure no provider reported
/// anything for carries none.
#[tokio::test]
async fn a_stream_no_attempt_served_carries_what_its_attempts_reported_in_its_status() {
    let mesh = mesh(&[
        (
            "claude",
            ProviderKind::Anthropic,
            scripted(ANTHROPIC_OVERLOADED).await,
        ),
        (
            "again",
            ProviderKind::Anthropic,
            scripted(ANTHROPIC_OVERLOADED).await,
        ),
    ])
    .await;
    let status = mesh
        .client
        .clone()
        .route_stream(say_hello())
        .await
        .expect_err("every attempt failed");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let account = status
        .metadata()
        .get_bin(switchboard_status::serving::CONSUMED)
        .expect("the attempts' account in the status");
    let consumed: RouteInfo = prost::Message::decode(account.to_bytes().unwrap()).unwrap();
    assert_eq!(
        (consumed.target.as_str(), consumed.attempt_count),
        ("again/model", 2)
    );
    let attempts: Vec<_> = consumed
        .attempts
        .iter()
        .map(|a| (a.target.as_str(), a.error_code.as_str(), a.usage))
        .collect();
    assert_eq!(
        attempts,
        vec![
            ("claude/model", "OVERLOADED", Some(ANTHROPIC_REPORTED)),
            ("again/model", "OVERLOADED", Some(ANTHROPIC_REPORTED)),
        ]
    );
    mesh.shutdown().await;

    // Nothing reported (a provider that refused before any event): no account.
    let mesh = mesh_of_openai().await;
    let status = mesh
        .client
        .clone()
        .route_stream(RouteStreamRequest {
            request: Some(chat("no-such-route", "say hello")),
            caller: None,
            allowance: None,
        })
        .await
        .expect_err("no such route");
    assert!(
        status
            .metadata()
            .get_bin(switchboard_status::serving::CONSUMED)
            .is_none()
    );
    mesh.shutdown().await;
}
