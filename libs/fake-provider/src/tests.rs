#![allow(clippy::unwrap_used)]

use super::*;
use crate::answer::{Call, Finish, split_pieces};

fn answer_for(body: &Value) -> (Answer, u64, u64) {
    answer::answer(&openai::parse(body, None).unwrap())
}

fn body(messages: Value) -> Value {
    json!({ "model": "m", "messages": messages })
}

#[test]
fn answer_echoes_the_last_user_message_and_counts_words() {
    let request = body(json!([
        { "role": "system", "content": "be brief" },
        { "role": "user", "content": "first question" },
        { "role": "assistant", "content": "an answer" },
        { "role": "user", "content": [{ "type": "text", "text": "hello there" }, { "type": "image_url", "image_url": { "url": "x" } }] },
    ]));
    let (answer, prompt, completion) = answer_for(&request);
    assert_eq!(
        answer,
        Answer::Text {
            content: "echo: hello there".to_owned(),
            finish: Finish::Stop
        }
    );
    assert_eq!(prompt, 8);
    assert_eq!(completion, 3);
}

#[test]
fn max_tokens_truncates_with_length() {
    // OpenAI's `max_completion_tokens` and the older `max_tokens` of compatible servers alike.
    for field in ["max_completion_tokens", "max_tokens"] {
        let mut request = body(json!([{ "role": "user", "content": "one two three four" }]));
        request[field] = json!(2);
        let (answer, _, completion) = answer_for(&request);
        assert_eq!(
            answer,
            Answer::Text {
                content: "echo: one".to_owned(),
                finish: Finish::Length
            },
            "{field}"
        );
        assert_eq!(completion, 2, "{field}");
    }
}

#[test]
fn tools_and_call_tool_give_a_tool_call() {
    let mut request = body(json!([{ "role": "user", "content": "please call tool now" }]));
    request["tools"] =
        json!([{ "type": "function", "function": { "name": "get_weather", "parameters": {} } }]);
    let (answer, _, _) = answer_for(&request);
    assert_eq!(
        answer,
        Answer::ToolCalls(vec![Call {
            name: "get_weather".to_owned(),
            arguments: "{}".to_owned()
        }])
    );
}

#[test]
fn pieces_concatenate_back() {
    let text = "echo: héllo wörld";
    let pieces = split_pieces(text, 5);
    assert_eq!(pieces.len(), 5);
    assert_eq!(pieces.concat(), text);
    assert_eq!(split_pieces("ab", 5), vec!["a", "b"]);
    assert!(split_pieces("", 5).is_empty());
}

async fn start() -> FakeProvider {
    FakeProvider::start(FakeConfig {
        addr: "127.0.0.1:0".to_owned(),
        ..FakeConfig::default()
    })
    .await
    .unwrap()
}

fn chat(fake: &FakeProvider, request: Value) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", fake.base_url()))
        .bearer_auth("sk-test")
        .json(&request)
}

/// Parses an SSE body into its `data:` payloads, checking the framing.
fn sse_data(text: &str) -> Vec<String> {
    assert!(text.ends_with("\n\n"), "{text:?}");
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| event.strip_prefix("data: ").unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn unary_completion_is_an_openai_object() {
    let fake = start().await;
    let response = chat(
        &fake,
        body(json!([{ "role": "user", "content": "hi you" }])),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let value: Value = response.json().await.unwrap();
    assert!(value["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(value["object"], "chat.completion");
    assert_eq!(value["model"], "m");
    assert!(value["created"].as_u64().unwrap() > 0);
    assert_eq!(value["choices"][0]["index"], 0);
    assert_eq!(value["choices"][0]["message"]["role"], "assistant");
    assert_eq!(value["choices"][0]["message"]["content"], "echo: hi you");
    assert_eq!(value["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        value["usage"],
        json!({ "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5 })
    );
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].authorization.as_deref(), Some("Bearer sk-test"));
    assert!(!requests[0].stream);
    assert_eq!(fake.request_count("m"), 1);
    fake.shutdown().await;
}

#[tokio::test]
async fn unary_tool_call() {
    let fake = start().await;
    let mut request = body(json!([{ "role": "user", "content": "call tool" }]));
    request["tools"] = json!([{ "type": "function", "function": { "name": "lookup" } }]);
    let value: Value = chat(&fake, request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let choice = &value["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    assert_eq!(
        choice["message"]["tool_calls"],
        json!([{ "id": "call_1", "type": "function", "function": { "name": "lookup", "arguments": "{}" } }])
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn stream_frames_chunks_usage_and_done() {
    let fake = start().await;
    let mut request = body(json!([{ "role": "user", "content": "stream this please" }]));
    request["stream"] = json!(true);
    request["stream_options"] = json!({ "include_usage": true });
    let response = chat(&fake, request.clone()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    // role, 5 content pieces, finish, usage
    assert_eq!(chunks.len(), 8);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"])
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks[1..6]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(content, "echo: stream this please");
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[7]["choices"], json!([]));
    assert_eq!(chunks[7]["usage"]["total_tokens"], 3 + 4);

    // Without include_usage there is no usage chunk.
    request["stream_options"] = json!({ "include_usage": false });
    let events = sse_data(
        &chat(&fake, request)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(events.len(), 8);
    assert!(events.iter().all(|e| !e.contains("\"usage\"")));
    assert!(fake.requests().iter().all(|r| r.stream));
    fake.shutdown().await;
}

#[tokio::test]
async fn streamed_tool_call_deltas() {
    let fake = start().await;
    let mut request = body(json!([{ "role": "user", "content": "call tool" }]));
    request["tools"] = json!([{ "type": "function", "function": { "name": "lookup" } }]);
    request["stream"] = json!(true);
    let events = sse_data(
        &chat(&fake, request)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let first = &chunks[1]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(first["index"], 0);
    assert_eq!(first["id"], "call_1");
    assert_eq!(first["function"]["name"], "lookup");
    let arguments: String = chunks[2..chunks.len() - 1]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(arguments, "{}");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn injected_failures_and_malformed_json() {
    let fake = start().await;
    fake.fail_next("m", 429, 1);
    fake.fail_next("m", 500, 1);
    let request = body(json!([{ "role": "user", "content": "x" }]));
    let response = chat(&fake, request.clone()).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()[header::RETRY_AFTER], "0");
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].is_string());
    assert_eq!(
        chat(&fake, request.clone()).send().await.unwrap().status(),
        500
    );
    assert_eq!(chat(&fake, request).send().await.unwrap().status(), 200);
    assert_eq!(fake.request_count("m"), 3);

    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", fake.base_url()))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    fake.shutdown().await;
}

#[tokio::test]
async fn a_stream_cut_after_its_opening_sends_no_answer() {
    let fake = start().await;
    fake.inject("m", Fault::OpeningThenCut, 1);
    let mut request = body(json!([{ "role": "user", "content": "a b c" }]));
    request["stream"] = json!(true);
    let response = chat(&fake, request).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut received = Vec::new();
    let mut stream = response.bytes_stream();
    let mut failed = false;
    while let Some(item) = futures::StreamExt::next(&mut stream).await {
        match item {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must end with an error");
    let events = sse_data(&String::from_utf8(received).unwrap());
    // The role delta with empty content, nothing of the answer, no end.
    assert_eq!(events.len(), 1, "{events:?}");
    let opening: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(opening["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(opening["choices"][0]["delta"]["content"], "");
    fake.shutdown().await;
}

#[tokio::test]
async fn a_keep_alive_stream_sends_comments_and_no_answer() {
    let fake = start().await;
    fake.inject(
        "m",
        Fault::KeepAlive {
            interval_ms: 1,
            count: 3,
        },
        1,
    );
    let mut request = body(json!([{ "role": "user", "content": "a b c" }]));
    request["stream"] = json!(true);
    let response = chat(&fake, request).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut received = Vec::new();
    let mut stream = response.bytes_stream();
    let mut failed = false;
    while let Some(item) = futures::StreamExt::next(&mut stream).await {
        match item {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must end with an error");
    let text = String::from_utf8(received).unwrap();
    assert_eq!(text.matches(": keep-alive\n\n").count(), 3, "{text}");
    // The opening role delta only: nothing of the answer, no end.
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|event| !event.is_empty() && !event.starts_with(':'))
        .collect();
    assert_eq!(events.len(), 1, "{text}");
    assert!(events[0].starts_with("data: "), "{text}");
    assert!(!text.contains("echo") && !text.contains("[DONE]"), "{text}");
    fake.shutdown().await;
}

#[tokio::test]
async fn interrupted_stream_has_no_done() {
    let fake = start().await;
    fake.fail_stream_after("m", 2, 1);
    let mut request = body(json!([{ "role": "user", "content": "a b c d e f" }]));
    request["stream"] = json!(true);
    let response = chat(&fake, request.clone()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut received = Vec::new();
    let mut stream = response.bytes_stream();
    let mut failed = false;
    while let Some(item) = futures::StreamExt::next(&mut stream).await {
        match item {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must end with an error");
    let text = String::from_utf8(received).unwrap();
    assert!(!text.contains("[DONE]"));
    assert_eq!(text.matches("data: ").count(), 3, "{text}");
    // The next stream is whole again.
    let text = chat(&fake, request)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    fake.shutdown().await;
}

#[tokio::test]
async fn control_endpoints_and_models() {
    let fake = start().await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", fake.addr());
    let ok = client
        .post(format!("{base}/_fake/fail"))
        .json(&json!({ "model": "x", "status": 503, "times": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    client
        .post(format!("{base}/_fake/latency"))
        .json(&json!({ "model": "x", "latency_ms": 1 }))
        .send()
        .await
        .unwrap();
    let mut request = body(json!([{ "role": "user", "content": "x" }]));
    request["model"] = json!("x");
    assert_eq!(
        chat(&fake, request.clone()).send().await.unwrap().status(),
        503
    );
    assert_eq!(chat(&fake, request).send().await.unwrap().status(), 200);
    let counts: Value = client
        .get(format!("{base}/_fake/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counts, json!({ "total": 2, "models": { "x": 2 } }));
    let models: Value = client
        .get(format!("{}/models", fake.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "x");
    fake.shutdown().await;
}

async fn send(fake: &FakeProvider, request: Value) -> reqwest::Response {
    chat(fake, request).send().await.unwrap()
}

#[tokio::test]
async fn injected_fault_kinds() {
    let fake = start().await;
    let request = body(json!([{ "role": "user", "content": "hello you" }]));
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);

    // Connection reset: no answer at all.
    fake.inject("m", Fault::ConnectionReset, 1);
    let error = chat(&fake, request.clone()).send().await.unwrap_err();
    assert!(!error.is_status(), "{error}");

    fake.inject(
        "m",
        Fault::RateLimited {
            retry_after_secs: 7,
        },
        1,
    );
    let response = send(&fake, request.clone()).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()[header::RETRY_AFTER], "7");

    fake.inject("m", Fault::MalformedJson, 1);
    let response = send(&fake, request.clone()).await;
    assert_eq!(response.status(), 200);
    assert!(response.json::<Value>().await.is_err());

    fake.inject("m", Fault::WrongContentType, 1);
    let response = send(&fake, request.clone()).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );

    fake.inject("m", Fault::ContextLengthExceeded, 1);
    let response = send(&fake, request.clone()).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "context_length_exceeded");

    fake.inject("m", Fault::ContentFilter, 1);
    let response = send(&fake, request.clone()).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "content_filter");

    fake.inject("m", Fault::ContentFilterFinish, 1);
    let value: Value = send(&fake, request.clone()).await.json().await.unwrap();
    assert_eq!(value["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(value["choices"][0]["message"]["content"], "echo:");

    fake.inject("m", Fault::SlowFirstByte { delay_ms: 1 }, 1);
    assert_eq!(send(&fake, request.clone()).await.status(), 200);

    // Stream-only faults wait for a streaming request.
    fake.inject("m", Fault::MalformedSse, 1);
    assert_eq!(send(&fake, request.clone()).await.status(), 200);
    let events = sse_data(&send(&fake, streaming.clone()).await.text().await.unwrap());
    assert!(serde_json::from_str::<Value>(&events[1]).is_err());
    assert_eq!(events.last().unwrap(), "[DONE]");

    fake.inject("m", Fault::StreamStall { after_chunks: 1 }, 1);
    let response = send(&fake, streaming.clone()).await;
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).contains("\"content\":\"e") {
        received.extend_from_slice(
            &futures::StreamExt::next(&mut stream)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let stalled = tokio::time::timeout(
        Duration::from_millis(200),
        futures::StreamExt::next(&mut stream),
    )
    .await;
    assert!(stalled.is_err(), "nothing more is sent");
    drop(stream);
    // The queue is empty again.
    let events = sse_data(&send(&fake, streaming).await.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    fake.shutdown().await;
}

#[tokio::test]
async fn fault_control_endpoint() {
    let fake = start().await;
    let client = reqwest::Client::new();
    let ok = client
        .post(format!("{}/_fake/fault", fake.root_url()))
        .json(&json!({ "model": "m", "kind": "rate_limited", "retry_after_secs": 3, "times": 2 }))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    client
        .post(format!("{}/_fake/fault", fake.root_url()))
        .json(&json!({ "model": "m", "kind": "connection_reset" }))
        .send()
        .await
        .unwrap();
    let request = body(json!([{ "role": "user", "content": "x" }]));
    for _ in 0..2 {
        let response = send(&fake, request.clone()).await;
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }
    assert!(chat(&fake, request.clone()).send().await.is_err());
    assert_eq!(send(&fake, request).await.status(), 200);
    let bad = client
        .post(format!("{}/_fake/fault", fake.root_url()))
        .json(&json!({ "model": "m", "kind": "nope" }))
        .send()
        .await
        .unwrap();
    assert!(bad.status().is_client_error());
    fake.shutdown().await;
}

#[tokio::test]
async fn azure_deployments() {
    let fake = start().await;
    let client = reqwest::Client::new();
    let url = format!(
        "{}/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21",
        fake.root_url()
    );
    let mut request = json!({ "messages": [{ "role": "user", "content": "hi there" }] });
    let value: Value = client
        .post(&url)
        .header("api-key", "az-key")
        .json(&request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(value["model"], "my-gpt");
    assert_eq!(value["choices"][0]["message"]["content"], "echo: hi there");
    assert!(value["prompt_filter_results"].is_array());
    let received = &fake.requests()[0];
    assert_eq!(received.format, ApiFormat::Azure);
    assert_eq!(received.headers["api-key"], "az-key");
    assert!(received.path.ends_with("api-version=2024-10-21"));

    request["stream"] = json!(true);
    let events = sse_data(
        &client
            .post(&url)
            .header("api-key", "az-key")
            .json(&request)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"], json!([]));
    assert!(first["prompt_filter_results"].is_array());
    assert_eq!(events.last().unwrap(), "[DONE]");

    let missing = client
        .post(format!(
            "{}/openai/deployments/my-gpt/chat/completions",
            fake.root_url()
        ))
        .header("api-key", "az-key")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    fake.shutdown().await;
}

fn anthropic(fake: &FakeProvider, request: &Value) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("{}/v1/messages", fake.root_url()))
        .header("x-api-key", "sk-ant")
        .header("anthropic-version", "2023-06-01")
        .json(request)
}

/// `(event, data)` pairs of an SSE body.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut event = String::new();
            let mut data = Value::Null;
            for line in e.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v.trim_end()).unwrap();
                }
            }
            (event, data)
        })
        .collect()
}

#[tokio::test]
async fn anthropic_messages_unary_stream_and_tools() {
    let fake = start().await;
    let request = json!({ "model": "claude-x", "max_tokens": 100, "system": "be brief",
        "messages": [{ "role": "user", "content": [{ "type": "text", "text": "hi there" }] }] });
    let value: Value = anthropic(&fake, &request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(value["type"], "message");
    assert!(value["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(
        value["content"],
        json!([{ "type": "text", "text": "echo: hi there" }])
    );
    assert_eq!(value["stop_reason"], "end_turn");
    assert_eq!(value["usage"]["input_tokens"], 4);
    assert_eq!(value["usage"]["output_tokens"], 3);
    let received = &fake.requests()[0];
    assert_eq!(received.format, ApiFormat::Anthropic);
    assert_eq!(received.headers["x-api-key"], "sk-ant");

    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let text = anthropic(&fake, &streaming)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = sse_events(&text);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(events.iter().all(|(e, d)| d["type"] == e.as_str()));
    let content: String = events
        .iter()
        .filter_map(|(_, d)| d.pointer("/delta/text").and_then(Value::as_str))
        .collect();
    assert_eq!(content, "echo: hi there");

    // Tool call, streamed as input_json_delta pieces.
    let mut tools = streaming.clone();
    tools["messages"][0]["content"] = json!("please call tool {\"city\":\"Paris\"}");
    tools["tools"] = json!([{ "name": "get_weather", "input_schema": { "type": "object" } }]);
    let events = sse_events(
        &anthropic(&fake, &tools)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let start = events
        .iter()
        .find(|(e, _)| e == "content_block_start")
        .unwrap();
    assert_eq!(start.1["content_block"]["type"], "tool_use");
    assert_eq!(start.1["content_block"]["name"], "get_weather");
    let pieces: Vec<&str> = events
        .iter()
        .filter_map(|(_, d)| d.pointer("/delta/partial_json").and_then(Value::as_str))
        .collect();
    assert!(pieces.len() > 1, "arguments split across events");
    assert_eq!(pieces.concat(), "{\"city\":\"Paris\"}");
    let delta = events.iter().find(|(e, _)| e == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");

    // The tool result must answer the previous turn's tool_use.
    let mut follow = request.clone();
    follow["messages"] = json!([
        { "role": "user", "content": "call tool" },
        { "role": "assistant", "content": [{ "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {} }] },
        { "role": "user", "content": [{ "type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny" },
                                      { "type": "text", "text": "thanks" }] },
    ]);
    let value: Value = anthropic(&fake, &follow)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(value["content"][0]["text"], "echo: thanks");
    follow["messages"][2]["content"][0]["tool_use_id"] = json!("toolu_9");
    let response = anthropic(&fake, &follow).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");

    // Validation: max_tokens, system role, headers.
    let mut bad = request.clone();
    bad.as_object_mut().unwrap().remove("max_tokens");
    assert_eq!(anthropic(&fake, &bad).send().await.unwrap().status(), 400);
    let mut bad = request.clone();
    bad["messages"] = json!([{ "role": "system", "content": "x" }]);
    assert_eq!(anthropic(&fake, &bad).send().await.unwrap().status(), 400);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages", fake.root_url()))
        .header("x-api-key", "k")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "anthropic-version is required");
    fake.shutdown().await;
}

#[tokio::test]
async fn anthropic_faults() {
    let fake = start().await;
    let request = json!({ "model": "claude-x", "max_tokens": 100,
        "messages": [{ "role": "user", "content": "hello" }] });
    fake.fail_next("claude-x", 529, 1);
    let response = anthropic(&fake, &request).send().await.unwrap();
    assert_eq!(response.status(), 529);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "overloaded_error");
    fake.inject("claude-x", Fault::ContextLengthExceeded, 1);
    let error: Value = anthropic(&fake, &request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("prompt is too long")
    );
    fake.inject("claude-x", Fault::ContentFilter, 1);
    let value: Value = anthropic(&fake, &request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(value["stop_reason"], "refusal");
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    fake.fail_stream_after("claude-x", 1, 1);
    let response = anthropic(&fake, &streaming).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let mut text = Vec::new();
    while let Some(Ok(bytes)) = futures::StreamExt::next(&mut stream).await {
        text.extend_from_slice(&bytes);
    }
    let text = String::from_utf8(text).unwrap();
    assert!(!text.contains("message_stop"));
    assert_eq!(text.matches("content_block_delta").count(), 2, "{text}");
    fake.shutdown().await;
}

fn gemini(
    fake: &FakeProvider,
    model: &str,
    stream: bool,
    request: &Value,
) -> reqwest::RequestBuilder {
    let url = if stream {
        format!(
            "{}/v1beta/models/{model}:streamGenerateContent?alt=sse",
            fake.root_url()
        )
    } else {
        format!("{}/v1beta/models/{model}:generateContent", fake.root_url())
    };
    reqwest::Client::new()
        .post(url)
        .header("x-goog-api-key", "g-key")
        .json(request)
}

#[tokio::test]
async fn gemini_generate_stream_tools_and_faults() {
    let fake = start().await;
    let request = json!({ "systemInstruction": { "parts": [{ "text": "be brief" }] },
        "contents": [{ "role": "user", "parts": [{ "text": "hi there" }] }] });
    let value: Value = gemini(&fake, "gem-x", false, &request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        value["candidates"][0]["content"]["parts"][0]["text"],
        "echo: hi there"
    );
    assert_eq!(value["candidates"][0]["finishReason"], "STOP");
    assert_eq!(value["usageMetadata"]["promptTokenCount"], 4);
    assert_eq!(value["usageMetadata"]["candidatesTokenCount"], 3);
    assert_eq!(value["modelVersion"], "gem-x");
    assert_eq!(fake.requests()[0].format, ApiFormat::Gemini);

    let text = gemini(&fake, "gem-x", true, &request)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("\r\n\r\n"));
    let events: Vec<Value> = text
        .split("\r\n\r\n")
        .filter(|e| !e.is_empty())
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    assert_eq!(events.len(), 5);
    assert!(
        events[..4]
            .iter()
            .all(|e| e["candidates"][0].get("finishReason").is_none())
    );
    assert_eq!(events[4]["candidates"][0]["finishReason"], "STOP");
    let content: String = events
        .iter()
        .map(|e| {
            e["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(content, "echo: hi there");

    let mut tools = request.clone();
    tools["contents"][0]["parts"][0]["text"] = json!("call every tool {\"q\":1}");
    tools["tools"] = json!([{ "functionDeclarations": [{ "name": "a" }, { "name": "b" }] }]);
    let value: Value = gemini(&fake, "gem-x", false, &tools)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        value["candidates"][0]["content"]["parts"],
        json!([{ "functionCall": { "name": "a", "args": { "q": 1 } } },
               { "functionCall": { "name": "b", "args": { "q": 1 } } }])
    );

    // Blocked prompt, safety finish, quota with RetryInfo, invalid role.
    fake.inject("gem-x", Fault::ContentFilter, 1);
    let value: Value = gemini(&fake, "gem-x", false, &request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(value["promptFeedback"]["blockReason"], "SAFETY");
    assert!(value.get("candidates").is_none());
    fake.inject("gem-x", Fault::ContentFilterFinish, 1);
    let value: Value = gemini(&fake, "gem-x", false, &request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(value["candidates"][0]["finishReason"], "SAFETY");
    fake.inject(
        "gem-x",
        Fault::RateLimited {
            retry_after_secs: 37,
        },
        1,
    );
    let response = gemini(&fake, "gem-x", false, &request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(error["error"]["details"][0]["retryDelay"], "37s");
    let mut bad = request.clone();
    bad["contents"][0]["role"] = json!("assistant");
    assert_eq!(
        gemini(&fake, "gem-x", false, &bad)
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    let keyless = reqwest::Client::new()
        .post(format!(
            "{}/v1beta/models/gem-x:generateContent",
            fake.root_url()
        ))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(keyless.status(), 403);
    fake.shutdown().await;
}

#[tokio::test]
async fn embeddings_are_deterministic_unit_vectors_with_usage() {
    let fake = start().await;
    let embed = |body: Value| {
        reqwest::Client::new()
            .post(format!("{}/embeddings", fake.base_url()))
            .bearer_auth("sk-test")
            .json(&body)
            .send()
    };
    let response = embed(json!({ "model": "e", "input": ["hello world", "other text here"] }))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let value: Value = response.json().await.unwrap();
    assert_eq!(value["object"], "list");
    assert_eq!(value["model"], "e");
    assert_eq!(value["usage"]["prompt_tokens"], 5);
    let first: Vec<f32> = serde_json::from_value(value["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(first.len(), embeddings::DEFAULT_DIMENSIONS);
    assert_eq!(first, embeddings::vector("hello world", first.len()));
    let norm: f32 = first.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
    assert_ne!(value["data"][0]["embedding"], value["data"][1]["embedding"]);
    assert_eq!(value["data"][1]["index"], 1);

    let value: Value = embed(json!({ "model": "e", "input": "hello world", "dimensions": 4 }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(value["data"][0]["embedding"].as_array().unwrap().len(), 4);
    assert_eq!(fake.request_count("e"), 2);

    fake.fail_next("e", 500, 1);
    assert_eq!(
        embed(json!({ "model": "e", "input": "x" }))
            .await
            .unwrap()
            .status(),
        500
    );
    for bad in [
        json!({ "model": "e", "input": [] }),
        json!({ "model": "e", "input": [[1, 2]] }),
        json!({ "model": "e", "input": "" }),
    ] {
        assert_eq!(embed(bad).await.unwrap().status(), 400);
    }
    let azure = reqwest::Client::new()
        .post(format!(
            "{}/openai/deployments/dep/embeddings?api-version=2024-10-21",
            fake.root_url()
        ))
        .header("api-key", "k")
        .json(&json!({ "input": ["a"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(azure.status(), 200);
    assert_eq!(fake.request_count("dep"), 1);
}

#[tokio::test]
async fn gemini_batch_embed_contents() {
    let fake = start().await;
    let url = format!(
        "{}/v1beta/models/text-embedding-004:batchEmbedContents",
        fake.root_url()
    );
    let embed = |body: Value, keyed: bool| {
        let mut request = reqwest::Client::new().post(&url).json(&body);
        if keyed {
            request = request.header("x-goog-api-key", "g-key");
        }
        request.send()
    };
    let one = |text: &str| json!({ "model": "models/text-embedding-004", "content": { "parts": [{ "text": text }] } });
    let response = embed(
        json!({ "requests": [one("hello world"), one("other text here")] }),
        true,
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let value: Value = response.json().await.unwrap();
    // Gemini's shape: no object, no index, no usage.
    assert_eq!(value.as_object().unwrap().len(), 1, "{value}");
    let embeddings = value["embeddings"].as_array().unwrap();
    assert_eq!(embeddings.len(), 2);
    let first: Vec<f32> = serde_json::from_value(embeddings[0]["values"].clone()).unwrap();
    assert_eq!(
        first,
        embeddings::vector("hello world", embeddings::DEFAULT_DIMENSIONS)
    );
    let second: Vec<f32> = serde_json::from_value(embeddings[1]["values"].clone()).unwrap();
    assert_eq!(
        second,
        embeddings::vector("other text here", embeddings::DEFAULT_DIMENSIONS)
    );
    let received = fake.requests();
    assert_eq!(received[0].format, ApiFormat::Gemini);
    assert_eq!(received[0].model, "text-embedding-004");
    assert_eq!(fake.request_count("text-embedding-004"), 1);

    let mut sized = one("hello world");
    sized["outputDimensionality"] = json!(4);
    let value: Value = embed(json!({ "requests": [sized] }), true)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        value["embeddings"][0]["values"].as_array().unwrap().len(),
        4
    );

    // No key: 403, in Gemini's error shape.
    let response = embed(json!({ "requests": [one("x")] }), false)
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let value: Value = response.json().await.unwrap();
    assert_eq!(value["error"]["status"], "PERMISSION_DENIED");
    for bad in [
        json!({ "requests": [] }),
        json!({ "requests": [{ "model": "models/other", "content": { "parts": [{ "text": "x" }] } }] }),
        json!({ "requests": [{ "model": "models/text-embedding-004", "content": { "parts": [] } }] }),
    ] {
        let response = embed(bad, true).await.unwrap();
        assert_eq!(response.status(), 400);
        let value: Value = response.json().await.unwrap();
        assert_eq!(value["error"]["status"], "INVALID_ARGUMENT");
    }
    fake.fail_next("text-embedding-004", 503, 1);
    assert_eq!(
        embed(json!({ "requests": [one("x")] }), true)
            .await
            .unwrap()
            .status(),
        503
    );
}

#[tokio::test]
async fn anthropic_thinking_blocks_are_signed_and_checked() {
    let fake = start().await;
    let ask = |messages: Value, stream: bool| {
        json!({ "model": "claude-x", "max_tokens": 2048, "stream": stream,
                "thinking": { "type": "enabled", "budget_tokens": 1024 }, "messages": messages })
    };
    let question = json!({ "role": "user", "content": "hi there" });
    let value: Value = anthropic(&fake, &ask(json!([question.clone()]), false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let thinking = "thinking about: hi there";
    let block = json!({ "type": "thinking", "thinking": thinking,
                        "signature": anthropic::signature_of(thinking) });
    assert_eq!(
        value["content"],
        json!([block.clone(), { "type": "text", "text": "echo: hi there" }])
    );
    // Thinking tokens are output tokens: 3 words of answer, 4 of thinking.
    assert_eq!(value["usage"]["output_tokens"], 7);

    // Streamed: the thinking block first (thinking_delta pieces, one signature_delta), then text.
    let text = anthropic(&fake, &ask(json!([question.clone()]), true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = sse_events(&text);
    let starts: Vec<&Value> = events
        .iter()
        .filter(|(e, _)| e == "content_block_start")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(starts[0]["index"], 0);
    assert_eq!(starts[0]["content_block"]["type"], "thinking");
    assert_eq!(starts[1]["index"], 1);
    assert_eq!(starts[1]["content_block"]["type"], "text");
    let deltas = |kind: &str, field: &str| -> String {
        events
            .iter()
            .filter(|(_, d)| d["delta"]["type"] == kind)
            .map(|(_, d)| d["delta"][field].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(deltas("thinking_delta", "thinking"), thinking);
    assert_eq!(
        deltas("signature_delta", "signature"),
        anthropic::signature_of(thinking)
    );
    assert_eq!(deltas("text_delta", "text"), "echo: hi there");

    // Sent back unchanged the block passes; changed, or in a user turn, it is refused.
    let follow = |block: Value| {
        ask(
            json!([question.clone(),
                   { "role": "assistant", "content": [block, { "type": "text", "text": "echo: hi there" }] },
                   { "role": "user", "content": "more" }]),
            false,
        )
    };
    let response = anthropic(&fake, &follow(block.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut changed = block.clone();
    changed["thinking"] = json!("thinking about: something else");
    let redacted = json!({ "type": "redacted_thinking", "data": "" });
    for bad in [follow(changed), follow(redacted)] {
        let response = anthropic(&fake, &bad).send().await.unwrap();
        assert_eq!(response.status(), 400);
    }
    let in_user_turn = ask(json!([{ "role": "user", "content": [block] }]), false);
    assert_eq!(
        anthropic(&fake, &in_user_turn)
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    // The budget is validated as the real API does.
    for thinking in [
        json!({ "type": "enabled", "budget_tokens": 512 }),
        json!({ "type": "enabled", "budget_tokens": 4096 }),
        json!({ "type": "sometimes" }),
    ] {
        let request = json!({ "model": "claude-x", "max_tokens": 2048, "thinking": thinking,
                              "messages": [question.clone()] });
        assert_eq!(
            anthropic(&fake, &request).send().await.unwrap().status(),
            400
        );
    }
}

#[tokio::test]
async fn anthropic_stops_at_a_stop_sequence_and_names_it() {
    let fake = start().await;
    let ask = |stream: bool| {
        json!({ "model": "claude-x", "max_tokens": 100, "stream": stream,
                "stop_sequences": ["zzz", "END"],
                "messages": [{ "role": "user", "content": "one two END three" }] })
    };
    let value: Value = anthropic(&fake, &ask(false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        value["content"],
        json!([{ "type": "text", "text": "echo: one two " }])
    );
    assert_eq!(value["stop_reason"], "stop_sequence");
    assert_eq!(value["stop_sequence"], "END");
    assert_eq!(value["usage"]["output_tokens"], 3);
    let text = anthropic(&fake, &ask(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = sse_events(&text);
    let delta = &events.iter().find(|(e, _)| e == "message_delta").unwrap().1;
    assert_eq!(delta["delta"]["stop_reason"], "stop_sequence");
    assert_eq!(delta["delta"]["stop_sequence"], "END");
    let streamed: String = events
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "text_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(streamed, "echo: one two ");
}

#[tokio::test]
async fn gemini_signs_the_first_function_call_when_thinking_is_asked() {
    let fake = start().await;
    let mut request = json!({
        "contents": [{ "role": "user", "parts": [{ "text": "call every tool {\"q\":1}" }] }],
        "tools": [{ "functionDeclarations": [{ "name": "a" }, { "name": "b" }] }],
        "generationConfig": { "thinkingConfig": { "includeThoughts": true, "thinkingBudget": 1024 } } });
    let signature = gemini::thought_signature_of(&Call {
        name: "a".to_owned(),
        arguments: "{\"q\":1}".to_owned(),
    });
    assert!(
        signature.contains(['/', '+']) && signature.ends_with('='),
        "{signature}"
    );
    let value: Value = gemini(&fake, "gem-x", false, &request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        value["candidates"][0]["content"]["parts"],
        json!([{ "functionCall": { "name": "a", "args": { "q": 1 } }, "thoughtSignature": signature },
               { "functionCall": { "name": "b", "args": { "q": 1 } } }])
    );
    let text = gemini(&fake, "gem-x", true, &request)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let event: Value =
        serde_json::from_str(text.trim_end().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(
        event["candidates"][0]["content"]["parts"][0]["thoughtSignature"],
        signature
    );
    // Thinking off (budget 0) or not asked: unsigned.
    request["generationConfig"]["thinkingConfig"]["thinkingBudget"] = json!(0);
    let value: Value = gemini(&fake, "gem-x", false, &request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        value["candidates"][0]["content"]["parts"][0]
            .get("thoughtSignature")
            .is_none()
    );
}

#[tokio::test]
async fn please_refuse_gets_an_openai_refusal_and_an_anthropic_refusal_stop() {
    let fake = start().await;
    let refuse = json!([{ "role": "user", "content": "please refuse this one" }]);
    let (answer, _, completion) = answer_for(&body(refuse.clone()));
    assert_eq!(
        answer,
        Answer::Text {
            content: answer::REFUSAL.to_owned(),
            finish: Finish::Refusal
        }
    );
    assert_eq!(completion, answer::word_count(answer::REFUSAL));

    // Unary: `refusal` with `content: null`, finish reason stop.
    let value: Value = chat(&fake, body(refuse.clone()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let choice = &value["choices"][0];
    assert_eq!(choice["message"]["content"], Value::Null);
    assert_eq!(choice["message"]["refusal"], answer::REFUSAL);
    assert_eq!(choice["finish_reason"], "stop");

    // Streamed: `delta.refusal` pieces, never content.
    let mut request = body(refuse.clone());
    request["stream"] = json!(true);
    let events = sse_data(
        &chat(&fake, request)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let refusal: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["refusal"].as_str())
        .collect();
    assert_eq!(refusal, answer::REFUSAL);
    assert!(
        chunks.iter().all(|c| c["choices"][0]["delta"]["content"]
            .as_str()
            .is_none_or(str::is_empty)),
        "{chunks:?}"
    );
    assert!(chunks.len() > 3, "the refusal comes in pieces");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );

    // Anthropic: the text, stop reason `refusal`.
    let request = json!({ "model": "claude-x", "max_tokens": 100, "messages": refuse });
    let value: Value = anthropic(&fake, &request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        value["content"],
        json!([{ "type": "text", "text": answer::REFUSAL }])
    );
    assert_eq!(value["stop_reason"], "refusal");

    // Any other prompt: no refusal.
    let value: Value = chat(
        &fake,
        body(json!([{ "role": "user", "content": "refuse nothing" }])),
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(value["choices"][0]["message"]["refusal"], Value::Null);
    fake.shutdown().await;
}
