//! End-to-end: what common clients send and read, through the whole mesh (gateway → guard → cache
//! → router → fake provider). `null` where a field is optional (Python's
//! `messages.append(resp.choices[0].message.model_dump())`, hand-built dicts), parameters asking
//! for features Switchboard does not have (refused by name, never silently dropped), and the
//! input tokens of an Anthropic stream's `message_start`.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use switchboard_e2e::{KEY_A, MODEL, Sandbox};

async fn post(sandbox: &Sandbox, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", sandbox.http_url))
        .bearer_auth(KEY_A)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// `(event name or "", data)` of each SSE frame (keep-alive comments skipped).
fn frames(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter_map(|frame| {
            let mut name = String::new();
            let mut data = None;
            for line in frame.lines() {
                if let Some(rest) = line.strip_prefix("event: ") {
                    rest.clone_into(&mut name);
                } else if let Some(rest) = line.strip_prefix("data: ") {
                    data = Some(rest.to_owned());
                }
            }
            Some((name, data?))
        })
        .collect()
}

#[tokio::test]
async fn an_openai_client_may_send_null_and_is_told_what_is_not_supported() {
    let sandbox = Sandbox::start().await.unwrap();

    // The next turn after a tool call, the assistant messages as `model_dump()` gives them, and
    // every optional parameter `null`.
    let request = json!({
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "what is the weather", "name": null},
            {"role": "assistant", "content": null, "refusal": null, "audio": null,
             "function_call": null, "annotations": null,
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny.", "refusal": null, "audio": null,
             "function_call": null, "tool_calls": null, "annotations": []},
            {"role": "user", "content": "thanks for the nulls"}],
        "tools": null, "tool_choice": null, "stream": null, "stream_options": null,
        "stop": null, "n": null, "response_format": null, "temperature": null,
        "max_tokens": null, "seed": null, "user": null, "metadata": null,
        "parallel_tool_calls": null, "logprobs": null, "top_logprobs": null,
        "functions": null, "function_call": null, "modalities": null, "audio": null,
        "prediction": null, "reasoning_effort": null
    });
    let response = post(&sandbox, "/v1/chat/completions", &request).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["object"], "chat.completion",
        "stream: null is not a stream"
    );
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "echo: thanks for the nulls"
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");

    // Streamed, with `include_usage: null`: no usage chunk, a clean end.
    let response = post(
        &sandbox,
        "/v1/chat/completions",
        &json!({"model": MODEL, "stream": true, "stream_options": {"include_usage": null},
                "tools": null, "messages": [{"role": "user", "content": "stream with nulls"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let frames = frames(&response.text().await.unwrap());
    assert_eq!(frames.last().unwrap().1, "[DONE]");
    let text: String = frames[..frames.len() - 1]
        .iter()
        .map(|(_, data)| serde_json::from_str::<Value>(data).unwrap())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "echo: stream with nulls");

    // Logprobs asked for: refused by name, before any provider is called.
    let before = sandbox.primary.request_count(MODEL);
    let response = post(
        &sandbox,
        "/v1/chat/completions",
        &json!({"model": MODEL, "logprobs": true, "top_logprobs": 2,
                "messages": [{"role": "user", "content": "how sure are you"}]}),
    )
    .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert_eq!(error["error"]["param"], "logprobs");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("Switchboard does not support `logprobs`"),
        "{message}"
    );
    // A legacy function message: a clear refusal.
    let response = post(
        &sandbox,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [
            {"role": "user", "content": "call it"},
            {"role": "function", "name": "f", "content": "42"}]}),
    )
    .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "messages[1].role");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("legacy function messages"), "{message}");
    assert_eq!(sandbox.primary.request_count(MODEL), before);

    // Their neutral values are what SDKs send by default: accepted.
    let response = post(
        &sandbox,
        "/v1/chat/completions",
        &json!({"model": MODEL, "logprobs": false, "modalities": ["text"],
                "messages": [{"role": "user", "content": "defaults only"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn an_anthropic_client_may_send_null_and_reads_input_tokens_from_message_start() {
    let sandbox = Sandbox::start().await.unwrap();

    let request = json!({
        "model": MODEL, "max_tokens": 100, "system": null, "tools": null,
        "tool_choice": null, "stop_sequences": null, "metadata": null, "thinking": null,
        "temperature": null, "top_p": null, "top_k": null, "stream": null,
        "service_tier": null, "mcp_servers": null,
        "messages": [{"role": "user", "content": "anthropic with nulls"}]
    });
    let response = post(&sandbox, "/v1/messages", &request).await;
    assert_eq!(response.status(), 200);
    let message: Value = response.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "echo: anthropic with nulls"}])
    );
    assert_eq!(message["stop_reason"], "end_turn");

    // MCP servers would be silently missing: refused by name, in Anthropic's error shape.
    let before = sandbox.primary.request_count(MODEL);
    let response = post(
        &sandbox,
        "/v1/messages",
        &json!({"model": MODEL, "max_tokens": 100,
                "mcp_servers": [{"type": "url", "url": "https://mcp.example/sse", "name": "x"}],
                "messages": [{"role": "user", "content": "use the mcp tools"}]}),
    )
    .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let text = error["error"]["message"].as_str().unwrap();
    assert!(text.contains("`mcp_servers`"), "{text}");
    assert_eq!(sandbox.primary.request_count(MODEL), before);

    // A stream: message_start says the prompt's input tokens (LangChain reads them only there),
    // message_delta the provider's exact count.
    let response = post(
        &sandbox,
        "/v1/messages",
        &json!({"model": MODEL, "max_tokens": 100, "stream": true, "system": "be brief",
                "messages": [{"role": "user", "content": "count my input tokens please"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let events: Vec<(String, Value)> = frames(&response.text().await.unwrap())
        .into_iter()
        .map(|(name, data)| (name, serde_json::from_str(&data).unwrap()))
        .collect();
    let (name, start) = &events[0];
    assert_eq!(name, "message_start");
    let estimated = start["message"]["usage"]["input_tokens"].as_u64().unwrap();
    assert!(estimated > 0, "{start}");
    assert_eq!(start["message"]["usage"]["output_tokens"], 0);
    let (_, delta) = events
        .iter()
        .find(|(name, _)| name == "message_delta")
        .unwrap();
    assert!(
        delta["usage"]["input_tokens"].as_u64().unwrap() > 0,
        "{delta}"
    );
    assert!(
        delta["usage"]["output_tokens"].as_u64().unwrap() > 0,
        "{delta}"
    );
}
