//! End-to-end: Anthropic Messages at the gateway's front door (`POST /v1/messages`), through the
//! whole mesh (guard → cache → router → fake provider) into the ledger.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use switchboard_e2e::{KEY_A, MODEL, Sandbox};
use switchboard_proto::ledger::v1::{GetSpendRequest, RequestStatus};

async fn post(sandbox: &Sandbox, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/messages", sandbox.http_url))
        .header("x-api-key", KEY_A)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// `(event name, data)` of each SSE frame (keep-alive comments skipped).
fn frames(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|frame| {
            let mut name = None;
            let mut data = None;
            for line in frame.lines() {
                if let Some(rest) = line.strip_prefix("event: ") {
                    name = Some(rest.to_owned());
                } else if let Some(rest) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(rest).unwrap());
                }
            }
            Some((name?, data?))
        })
        .collect()
}

async fn requests_of_app_a(sandbox: &Sandbox) -> u64 {
    let spend = sandbox
        .ledger()
        .await
        .unwrap()
        .get_spend(GetSpendRequest {
            start: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            end: Some(prost_types::Timestamp {
                seconds: 4_000_000_000,
                nanos: 0,
            }),
            app: "app-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    spend.rows.iter().map(|r| r.requests).sum()
}

#[tokio::test]
async fn unary_message_streamed_message_and_errors() {
    let sandbox = Sandbox::start().await.unwrap();

    // Unary text.
    let request = json!({"model": MODEL, "max_tokens": 100, "system": "be brief",
        "messages": [{"role": "user", "content": "hello from an anthropic client"}]});
    let response = post(&sandbox, &request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-switchboard-provider"), "primary");
    let id = header(&response, "x-switchboard-request-id");
    let message: Value = response.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["id"], format!("msg_{}", id.replace('-', "")));
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "echo: hello from an anthropic client"}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert!(message["stop_sequence"].is_null());
    let input = message["usage"]["input_tokens"].as_u64().unwrap();
    let output = message["usage"]["output_tokens"].as_u64().unwrap();
    assert!(input > 0 && output > 0);
    assert_eq!(message["usage"]["cache_read_input_tokens"], 0);
    let row = sandbox.wait_for_record(&id).await.unwrap();
    assert_eq!(u64::from(row.prompt_tokens), input);
    assert_eq!(u64::from(row.completion_tokens), output);
    assert!(!row.streamed);
    // The provider saw the system prompt and the sampling limit.
    let sent = &sandbox.primary.requests()[0].body;
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(sent["max_tokens"], 100);

    // max_tokens truncation maps to stop_reason max_tokens; Bearer credentials work too.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages", sandbox.http_url))
        .bearer_auth(KEY_A)
        .json(&json!({"model": MODEL, "max_tokens": 2,
            "messages": [{"role": "user", "content": "one two three four"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let truncated: Value = response.json().await.unwrap();
    assert_eq!(truncated["stop_reason"], "max_tokens");

    // Streaming: the exact event sequence.
    let mut streamed = json!({"model": MODEL, "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "tell me about lighthouses please"}]});
    let response = post(&sandbox, &streamed).await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    assert_eq!(header(&response, "x-switchboard-provider"), "primary");
    let stream_id = header(&response, "x-switchboard-request-id");
    let events = frames(&response.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..3],
        ["message_start", "content_block_start", "ping"],
        "{names:?}"
    );
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(
        names[3..names.len() - 3]
            .iter()
            .all(|n| *n == "content_block_delta")
    );
    for (name, data) in &events {
        assert_eq!(
            data["type"],
            name.as_str(),
            "data type matches the event name"
        );
    }
    assert_eq!(
        events[0].1["message"]["id"],
        format!("msg_{}", stream_id.replace('-', ""))
    );
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, "echo: tell me about lighthouses please");
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    let output = delta["usage"]["output_tokens"].as_u64().unwrap();
    assert!(output > 0);
    let row = sandbox.wait_for_record(&stream_id).await.unwrap();
    assert!(row.streamed);
    assert_eq!(u64::from(row.completion_tokens), output);
    assert_eq!(row.status, RequestStatus::Ok as i32);

    // Missing max_tokens: Anthropic's error shape, 400, nothing sent to a provider.
    let before = sandbox.primary.request_count(MODEL);
    streamed.as_object_mut().unwrap().remove("max_tokens");
    let response = post(&sandbox, &streamed).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    assert_eq!(sandbox.primary.request_count(MODEL), before);

    // Unknown key and unknown model, typed.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages", sandbox.http_url))
        .header("x-api-key", "sk-nope")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "authentication_error");
    let response = post(
        &sandbox,
        &json!({"model": "no-such-model", "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "not_found_error");

    // Each served request made exactly one ledger row (three above; errors before a provider none).
    assert_eq!(requests_of_app_a(&sandbox).await, 3);
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn tool_use_round_trip() {
    let sandbox = Sandbox::start().await.unwrap();
    let tools = json!([{"name": "get_weather", "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let question = json!({"role": "user", "content": "please call tool {\"city\":\"Paris\"}"});
    let response = post(
        &sandbox,
        &json!({"model": MODEL, "max_tokens": 100, "tools": tools, "messages": [question]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let message: Value = response.json().await.unwrap();
    assert_eq!(message["stop_reason"], "tool_use");
    let call = message["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap()
        .clone();
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["input"], json!({"city": "Paris"}));
    let sent = &sandbox.primary.requests()[0].body;
    assert_eq!(sent["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(
        sent["tools"][0]["function"]["parameters"]["properties"]["city"]["type"],
        "string"
    );

    // Streamed, the call arrives as a tool_use block with input_json_delta pieces.
    let response = post(
        &sandbox,
        &json!({"model": MODEL, "max_tokens": 100, "tools": tools, "messages": [question],
            "stream": true}),
    )
    .await;
    let events = frames(&response.text().await.unwrap());
    let start = events
        .iter()
        .find(|(n, d)| n == "content_block_start" && d["content_block"]["type"] == "tool_use")
        .unwrap();
    assert_eq!(start.1["content_block"]["name"], "get_weather");
    let partial: String = events
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "input_json_delta")
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&partial).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(
        events[events.len() - 2].1["delta"]["stop_reason"],
        "tool_use"
    );
    assert_eq!(events.last().unwrap().0, "message_stop");

    // The tool result goes back; the provider sees a tool message answering the call.
    let response = post(
        &sandbox,
        &json!({"model": MODEL, "max_tokens": 100, "tools": tools, "messages": [
            question,
            {"role": "assistant", "content": message["content"]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call["id"], "content": "sunny, 21 degrees"},
                {"type": "text", "text": "summarise it"}]}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["stop_reason"], "end_turn");
    assert_eq!(answer["content"][0]["text"], "echo: summarise it");
    let requests = sandbox.primary.requests();
    let sent = &requests.last().unwrap().body;
    let messages = sent["messages"].as_array().unwrap();
    let assistant = &messages[1];
    assert_eq!(assistant["tool_calls"][0]["id"], call["id"]);
    assert_eq!(
        serde_json::from_str::<Value>(
            assistant["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap()
        )
        .unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(messages[2]["role"], "tool");
    assert_eq!(messages[2]["tool_call_id"], call["id"]);
    assert_eq!(messages[3]["role"], "user");
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn a_stream_failing_mid_way_ends_with_an_error_event() {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.primary.fail_stream_after(MODEL, 2, 1);
    let response = post(
        &sandbox,
        &json!({"model": MODEL, "max_tokens": 100, "stream": true,
            "messages": [{"role": "user", "content": "a long answer that will be cut"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let id = header(&response, "x-switchboard-request-id");
    let events = frames(&response.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "message_start");
    assert!(names.contains(&"content_block_delta"), "{names:?}");
    assert_eq!(names.last(), Some(&"error"), "{names:?}");
    assert!(!names.contains(&"message_stop"));
    assert!(!names.contains(&"message_delta"));
    let error = &events.last().unwrap().1;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "api_error");
    let row = sandbox.wait_for_record(&id).await.unwrap();
    assert_eq!(row.status, RequestStatus::Partial as i32);
    assert!(row.streamed);
    assert_eq!(requests_of_app_a(&sandbox).await, 1);
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn anthropic_clients_list_models_and_get_anthropic_errors_on_paths_we_do_not_serve() {
    let sandbox = Sandbox::start().await.unwrap();
    let get = |path: &str, key: Option<&str>| {
        let mut request = reqwest::Client::new()
            .get(format!("{}{path}", sandbox.http_url))
            .header("anthropic-version", "2023-06-01");
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        request.send()
    };
    // `client.models.list()`: x-api-key, Anthropic's page shape.
    let list = get("/v1/models", Some(KEY_A)).await.unwrap();
    assert_eq!(list.status(), 200);
    let page: Value = list.json().await.unwrap();
    let data = page["data"].as_array().unwrap();
    let model = data.iter().find(|m| m["id"] == MODEL).unwrap();
    assert_eq!(model["type"], "model");
    assert_eq!(model["display_name"], MODEL);
    assert!(
        model["created_at"].as_str().unwrap().contains('T'),
        "{model}"
    );
    assert_eq!(page["has_more"], false);
    assert_eq!(page["first_id"], data[0]["id"]);
    assert_eq!(page["last_id"], data[data.len() - 1]["id"]);
    // `client.models.retrieve(id)`.
    let one: Value = get(&format!("/v1/models/{MODEL}"), Some(KEY_A))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["type"], "model");
    assert_eq!(one["id"], MODEL);
    // Errors in Anthropic's shape, which the SDK turns into its typed exceptions.
    let anonymous = get("/v1/models", None).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let error: Value = anonymous.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "authentication_error");
    let missing = get("/v1/models/no-such-model", Some(KEY_A)).await.unwrap();
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["type"], "not_found_error");
    // Messages API sub-resources the gateway does not serve (token counting, batches): a 404 an
    // Anthropic client can read, even without the version header.
    let count = reqwest::Client::new()
        .post(format!("{}/v1/messages/count_tokens", sandbox.http_url))
        .header("x-api-key", KEY_A)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(count.status(), 404);
    let error: Value = count.json().await.unwrap();
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error"]["type"], "not_found_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/messages/count_tokens")
    );
    let wrong_method = get("/v1/messages", Some(KEY_A)).await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    let error: Value = wrong_method.json().await.unwrap();
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    sandbox.stop().await.unwrap();
}
