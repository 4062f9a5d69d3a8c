//! End-to-end: a Gemini thought signature survives a two-turn tool conversation through the
//! gateway's OpenAI HTTP face, whose wire format has no field for it: the tool call's id carries
//! it to the client and back, and the next request reaches Gemini with the call signed.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use switchboard_e2e::{KEY_A, Sandbox};
use switchboard_fake_provider::ApiFormat;

const ROUTE: &str = "gemini-chat";

async fn sandbox() -> Sandbox {
    Sandbox::start_with(|primary| {
        format!(
            r#"
[router.providers.gem]
kind = "gemini"
base_url = "{root}"
api_key_env = "GEMINI_KEY"
[[router.routes]]
name = "{ROUTE}"
targets = [{{ provider = "gem", model = "gemini-x" }}]
"#,
            root = primary.root_url()
        )
    })
    .await
    .unwrap()
}

async fn post(sandbox: &Sandbox, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", sandbox.http_url))
        .bearer_auth(KEY_A)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn ask(messages: Value, stream: bool) -> Value {
    // `reasoning_effort` turns Gemini's thinking on: the fake then signs the function call.
    json!({ "model": ROUTE, "messages": messages, "reasoning_effort": "low", "stream": stream,
            "tools": [{ "type": "function", "function": { "name": "get_weather",
                "parameters": { "type": "object", "properties": { "city": { "type": "string" } } } } }] })
}

#[tokio::test]
async fn a_gemini_thought_signature_round_trips_through_the_openai_face() {
    let sandbox = sandbox().await;
    let question = json!({ "role": "user", "content": r#"please call tool {"city":"Paris"}"# });

    // Turn 1: the call's id carries the signature, in characters safe in an id.
    let response = post(&sandbox, &ask(json!([question]), false)).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let message = &answer["choices"][0]["message"];
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
    let id = message["tool_calls"][0]["id"].as_str().unwrap().to_owned();
    let (plain, encoded) = id.split_once("__thought__").unwrap();
    assert!(plain.starts_with("call_"), "{id}");
    assert!(
        !encoded.is_empty()
            && encoded
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        "{id}"
    );
    let sent = sandbox.primary.requests();
    let first = sent.last().unwrap();
    assert_eq!(first.format, ApiFormat::Gemini);
    assert!(
        first.body["generationConfig"]["thinkingConfig"].is_object(),
        "{}",
        first.body
    );

    // Streamed, the delta that carries the id shows the same id.
    let text = post(&sandbox, &ask(json!([question]), true))
        .await
        .text()
        .await
        .unwrap();
    let streamed_id = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str::<Value>(data).unwrap())
        .find_map(|chunk| {
            chunk["choices"][0]["delta"]["tool_calls"][0]["id"]
                .as_str()
                .map(str::to_owned)
        })
        .unwrap();
    assert_eq!(streamed_id, id);

    // Turn 2: the client sends the call and its result back with the id it was shown.
    let messages = json!([
        question,
        { "role": "assistant", "content": null, "tool_calls": message["tool_calls"] },
        { "role": "tool", "tool_call_id": id, "content": "sunny" },
        { "role": "user", "content": "thanks" },
    ]);
    let response = post(&sandbox, &ask(messages, false)).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "echo: thanks");

    // Gemini got the call signed with the fake's own signature (not the placeholder), and the
    // result answers it by name.
    let second = sandbox.primary.requests().pop().unwrap();
    assert_eq!(second.format, ApiFormat::Gemini);
    let contents = second.body["contents"].as_array().unwrap();
    let call = contents
        .iter()
        .flat_map(|c| c["parts"].as_array().unwrap())
        .find(|p| p.get("functionCall").is_some())
        .unwrap();
    assert_eq!(call["functionCall"]["name"], "get_weather");
    let signature = call["thoughtSignature"].as_str().unwrap();
    assert!(signature.starts_with("fake/thought+sig"), "{signature}");
    let result = contents
        .iter()
        .flat_map(|c| c["parts"].as_array().unwrap())
        .find(|p| p.get("functionResponse").is_some())
        .unwrap();
    assert_eq!(result["functionResponse"]["name"], "get_weather");
    assert!(!second.body.to_string().contains("__thought__"));

    sandbox.stop().await.unwrap();
}
