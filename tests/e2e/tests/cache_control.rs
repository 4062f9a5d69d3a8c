//! End-to-end: per-request cache control through the gateway (HTTP headers and gRPC fields), what
//! is never stored (errors, truncated answers, cut or abandoned streams), and the replay of a
//! cached answer as a stream of the same shape as a live one.
//!
//! Stores happen in the background after the answer: "stored" is observed by polling with
//! `only-if-cached` (bounded), and "not stored" after a later answer has been seen stored.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use switchboard_e2e::{KEY_A, MODEL, Sandbox};
use switchboard_fake_provider::Fault;
use switchboard_proto::{
    chat::v1::{ChatRequest, Message, Role},
    gateway::v1::{
        CacheControl, CacheStatus, CreateChatCompletionRequest, StreamChatCompletionRequest,
        stream_chat_completion_response::Event,
    },
    ledger::v1::RequestStatus,
};
use tonic_types::StatusExt;

const DEADLINE: Duration = Duration::from_secs(15);

fn body(text: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0})
}

fn streamed(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

async fn post(sandbox: &Sandbox, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", sandbox.http_url))
        .bearer_auth(KEY_A)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn provider_calls(sandbox: &Sandbox) -> usize {
    sandbox.primary.request_count(MODEL) + sandbox.backup.request_count(MODEL)
}

/// Whether the gateway can answer `body` from the cache (an `only-if-cached` request: 200 or 504).
async fn cached(sandbox: &Sandbox, body: &Value) -> bool {
    let mut unary = body.clone();
    if let Some(object) = unary.as_object_mut() {
        object.remove("stream");
        object.remove("stream_options");
    }
    let response = post(sandbox, &unary, &[("cache-control", "only-if-cached")]).await;
    match response.status().as_u16() {
        200 => {
            assert_eq!(header(&response, "x-switchboard-cache"), "hit");
            true
        }
        504 => false,
        other => panic!("only-if-cached answered {other}"),
    }
}

/// Polls until `body` is (or is no longer) served from the cache.
async fn wait_cached(sandbox: &Sandbox, body: &Value, want: bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while cached(sandbox, body).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cached = {} after {DEADLINE:?}: {body}",
            !want
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A fresh answer stored after everything before it: once it is served from the cache, the
/// stores issued earlier have been handled too.
async fn barrier(sandbox: &Sandbox, name: &str) {
    let marker = body(&format!("barrier {name}"));
    assert_eq!(post(sandbox, &marker, &[]).await.status(), 200);
    wait_cached(sandbox, &marker, true).await;
}

/// The SSE `data:` payloads of a stream.
async fn sse(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The shape of an OpenAI SSE stream: role, content (runs collapsed), finish, usage, done.
fn shape(events: &[String]) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    for event in events {
        if event == "[DONE]" {
            kinds.push("done");
            continue;
        }
        let chunk: Value = serde_json::from_str(event).unwrap();
        let choice = &chunk["choices"][0];
        let kind = if chunk["choices"] == json!([]) && chunk["usage"].is_object() {
            "usage"
        } else if choice["delta"]["role"] == "assistant" {
            "role"
        } else if choice["finish_reason"].is_string() {
            "finish"
        } else if choice["delta"]["content"].is_string() {
            "content"
        } else {
            "other"
        };
        if kind != "content" || kinds.last() != Some(&"content") {
            kinds.push(kind);
        }
    }
    kinds
}

fn content(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            let chunk: Value = serde_json::from_str(e).unwrap();
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

fn usage(events: &[String]) -> Value {
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    last["usage"].clone()
}

fn authed<T>(message: T) -> tonic::Request<T> {
    switchboard_e2e::authed(message, KEY_A)
}

fn chat(text: &str) -> ChatRequest {
    ChatRequest {
        model: MODEL.into(),
        messages: vec![Message::text(Role::User, text)],
        ..Default::default()
    }
}

#[tokio::test]
async fn refresh_only_if_cached_and_no_store_over_http_and_grpc() {
    let sandbox = Sandbox::start().await.unwrap();
    let question = body("what is the boiling point of water");

    // only-if-cached on a miss: 504 with an OpenAI-style error, and no provider call, unary or
    // streamed.
    let response = post(&sandbox, &question, &[("cache-control", "only-if-cached")]).await;
    assert_eq!(response.status(), 504);
    assert!(!header(&response, "x-switchboard-request-id").is_empty());
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "NOT_CACHED", "{error}");
    assert_eq!(error["error"]["type"], "not_found_error", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("only-if-cached")
    );
    let response = post(
        &sandbox,
        &streamed(question.clone()),
        &[("x-switchboard-cache", "only-if-cached")],
    )
    .await;
    assert_eq!(response.status(), 504);
    assert!(header(&response, "content-type").starts_with("application/json"));
    assert_eq!(provider_calls(&sandbox), 0);

    // no-store: served, not stored.
    let response = post(&sandbox, &question, &[("cache-control", "no-store")]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-switchboard-cache"), "miss");
    assert_eq!(provider_calls(&sandbox), 1);
    barrier(&sandbox, "after no-store").await;
    assert!(!cached(&sandbox, &question).await, "no-store was stored");
    let calls = provider_calls(&sandbox);

    // refresh: no lookup, the new answer is stored.
    let response = post(&sandbox, &question, &[("x-switchboard-cache", "refresh")]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-switchboard-cache"), "bypass");
    assert_eq!(provider_calls(&sandbox), calls + 1);
    wait_cached(&sandbox, &question, true).await;
    // Even with an answer cached, refresh goes to the provider (and max-age=0 means refresh).
    for refresh in [
        ("x-switchboard-cache", "refresh"),
        ("cache-control", "max-age=0"),
    ] {
        let before = provider_calls(&sandbox);
        let response = post(&sandbox, &question, &[refresh]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "x-switchboard-cache"),
            "bypass",
            "{refresh:?}"
        );
        assert_eq!(provider_calls(&sandbox), before + 1, "{refresh:?}");
    }
    // A plain request is a hit, with no provider call.
    let before = provider_calls(&sandbox);
    let response = post(&sandbox, &question, &[]).await;
    assert_eq!(header(&response, "x-switchboard-cache"), "hit");
    assert_eq!(provider_calls(&sandbox), before);

    // gRPC: only_if_cached on a miss is NOT_FOUND with ErrorInfo reason NOT_CACHED.
    let mut gateway = sandbox.gateway().await.unwrap();
    let status = gateway
        .create_chat_completion(authed(CreateChatCompletionRequest {
            request: Some(chat("a question never asked over grpc")),
            cache: Some(CacheControl {
                only_if_cached: true,
                ..Default::default()
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "NOT_CACHED"
    );
    // gRPC refresh stores; only_if_cached then hits.
    let grpc_question = chat("a grpc question to refresh");
    let refreshed = gateway
        .create_chat_completion(authed(CreateChatCompletionRequest {
            request: Some(grpc_question.clone()),
            cache: Some(CacheControl {
                refresh: true,
                ..Default::default()
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refreshed.cache, CacheStatus::Bypass as i32);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let answer = gateway
            .create_chat_completion(authed(CreateChatCompletionRequest {
                request: Some(grpc_question.clone()),
                cache: Some(CacheControl {
                    only_if_cached: true,
                    ..Default::default()
                }),
            }))
            .await;
        match answer {
            Ok(answer) => {
                assert_eq!(answer.into_inner().cache, CacheStatus::Hit as i32);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::NotFound);
                assert!(tokio::time::Instant::now() < deadline, "never stored");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn ttl_headers_set_how_long_an_answer_is_served() {
    let sandbox = Sandbox::start().await.unwrap();
    let explicit = body("short lived by the switchboard header");
    let max_age = body("short lived by max-age");
    let default = body("lives as long as the default ttl");
    for (question, headers) in [
        (&explicit, vec![("x-switchboard-cache-ttl", "3")]),
        (&max_age, vec![("cache-control", "max-age=3")]),
        (&default, vec![]),
    ] {
        let response = post(&sandbox, question, &headers).await;
        assert_eq!(response.status(), 200);
    }
    for question in [&explicit, &max_age, &default] {
        wait_cached(&sandbox, question, true).await;
    }
    // The short ones expire (polled, bounded); the default one (600 s here) is still served.
    wait_cached(&sandbox, &explicit, false).await;
    wait_cached(&sandbox, &max_age, false).await;
    assert!(cached(&sandbox, &default).await);

    // Over gRPC, the ttl_seconds field.
    let mut gateway = sandbox.gateway().await.unwrap();
    let question = chat("short lived over grpc");
    gateway
        .create_chat_completion(authed(CreateChatCompletionRequest {
            request: Some(question.clone()),
            cache: Some(CacheControl {
                ttl_seconds: 3,
                ..Default::default()
            }),
        }))
        .await
        .unwrap();
    let mut seen_hit = false;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let answer = gateway
            .create_chat_completion(authed(CreateChatCompletionRequest {
                request: Some(question.clone()),
                cache: Some(CacheControl {
                    only_if_cached: true,
                    ..Default::default()
                }),
            }))
            .await;
        match answer {
            Ok(_) => seen_hit = true,
            Err(status) if seen_hit => {
                assert_eq!(status.code(), tonic::Code::NotFound);
                break;
            }
            Err(_) => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hit seen: {seen_hit}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn a_cached_answer_is_replayed_as_a_stream_of_the_same_shape() {
    let sandbox = Sandbox::start().await.unwrap();
    let question = streamed(body(
        "tell me a long story about a lighthouse keeper and the sea and the storm",
    ));
    let live = post(&sandbox, &question, &[]).await;
    assert_eq!(header(&live, "x-switchboard-cache"), "miss");
    let live = sse(live).await;
    assert_eq!(
        shape(&live),
        ["role", "content", "finish", "usage", "done"],
        "{live:?}"
    );
    wait_cached(&sandbox, &question, true).await;

    let calls = provider_calls(&sandbox);
    let replay = post(&sandbox, &question, &[]).await;
    assert_eq!(replay.status(), 200);
    assert_eq!(header(&replay, "x-switchboard-cache"), "hit");
    assert!(header(&replay, "content-type").starts_with("text/event-stream"));
    let replay = sse(replay).await;
    assert_eq!(
        provider_calls(&sandbox),
        calls,
        "a replay reaches no provider"
    );
    assert_eq!(shape(&replay), shape(&live), "{replay:?}");
    assert_eq!(content(&replay), content(&live));
    assert!(replay.len() > 4, "the content comes in pieces: {replay:?}");
    assert_eq!(usage(&replay), usage(&live));
    let finish: Value = serde_json::from_str(&replay[replay.len() - 3]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");

    // gRPC: chunks of the same kinds, then the summary with the cached usage.
    let mut gateway = sandbox.gateway().await.unwrap();
    let request = StreamChatCompletionRequest {
        request: Some(chat("stream this grpc answer twice please")),
        cache: None,
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut stream = gateway
            .stream_chat_completion(authed(request.clone()))
            .await
            .unwrap()
            .into_inner();
        let (mut kinds, mut text, mut summary) = (Vec::new(), String::new(), None);
        while let Some(message) = stream.next().await {
            match message.unwrap().event.unwrap() {
                Event::Chunk(chunk) => {
                    let choice = &chunk.choices[0];
                    let kind = if choice.role == Role::Assistant as i32 {
                        "role"
                    } else if choice.finish_reason != 0 {
                        "finish"
                    } else {
                        "content"
                    };
                    if kind != "content" || kinds.last() != Some(&"content") {
                        kinds.push(kind);
                    }
                    text.push_str(&choice.content);
                }
                Event::Summary(s) => summary = Some(s),
            }
        }
        runs.push((kinds, text, summary.unwrap()));
        // The second run must find the first one stored.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while runs.len() == 1 {
            let probe = gateway
                .create_chat_completion(authed(CreateChatCompletionRequest {
                    request: request.request.clone(),
                    cache: Some(CacheControl {
                        only_if_cached: true,
                        ..Default::default()
                    }),
                }))
                .await;
            if probe.is_ok() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never stored");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let (live, replay) = (&runs[0], &runs[1]);
    assert_eq!(live.2.cache, CacheStatus::Miss as i32);
    assert_eq!(replay.2.cache, CacheStatus::Hit as i32);
    assert_eq!(live.0, ["role", "content", "finish"]);
    assert_eq!(replay.0, live.0);
    assert_eq!(replay.1, live.1);
    assert_eq!(replay.2.usage, live.2.usage);
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn errors_truncated_answers_and_cut_or_abandoned_streams_are_not_stored() {
    let sandbox = Sandbox::start().await.unwrap();

    // Every target fails: 502, nothing to store.
    sandbox.primary.fail_next(MODEL, 500, 1);
    sandbox.backup.fail_next(MODEL, 500, 1);
    let failed = body("this one fails upstream");
    let response = post(&sandbox, &failed, &[]).await;
    assert_eq!(response.status(), 502);

    // Truncated by max_tokens (finish_reason length), unary and streamed.
    let mut truncated = body("one two three four five six seven");
    truncated["max_tokens"] = json!(2);
    let response = post(&sandbox, &truncated, &[]).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let mut truncated_stream = streamed(body("eight nine ten eleven twelve thirteen"));
    truncated_stream["max_tokens"] = json!(2);
    let response = post(&sandbox, &truncated_stream, &[]).await;
    let events = sse(response).await;
    assert!(
        events.iter().any(|e| e.contains("\"length\"")),
        "{events:?}"
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    // Cut by the provider after two chunks: the stream ends with an error event, no [DONE].
    sandbox.primary.fail_stream_after(MODEL, 2, 1);
    let cut = streamed(body("a stream the provider cuts in the middle"));
    let response = post(&sandbox, &cut, &[]).await;
    assert_eq!(response.status(), 200);
    let cut_id = header(&response, "x-switchboard-request-id");
    let events = sse(response).await;
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");

    // Abandoned by the client: the provider stalls after two chunks, the client reads the first
    // chunk and goes away.
    sandbox
        .primary
        .inject(MODEL, Fault::StreamStall { after_chunks: 2 }, 1);
    let abandoned = streamed(body("a stream the client walks away from"));
    let response = post(&sandbox, &abandoned, &[]).await;
    assert_eq!(response.status(), 200);
    let abandoned_id = header(&response, "x-switchboard-request-id");
    let mut bytes = response.bytes_stream();
    let first = bytes.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(bytes);

    // The cut and the abandoned streams are recorded as partial once the gateway gave up on them.
    for id in [&cut_id, &abandoned_id] {
        let row = sandbox.wait_for_record(id).await.unwrap();
        assert_eq!(row.status, RequestStatus::Partial as i32, "{id}");
    }
    barrier(&sandbox, "after the failures").await;
    for (name, question) in [
        ("upstream error", &failed),
        ("truncated", &truncated),
        ("truncated stream", &truncated_stream),
        ("cut stream", &cut),
        ("abandoned stream", &abandoned),
    ] {
        assert!(!cached(&sandbox, question).await, "{name} was stored");
    }
    // The same questions answered completely are stored (the checks above can fail).
    let complete = streamed(body("a stream the provider cuts in the middle"));
    let events = sse(post(&sandbox, &complete, &[]).await).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    wait_cached(&sandbox, &complete, true).await;
    sandbox.stop().await.unwrap();
}
