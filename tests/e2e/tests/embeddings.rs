//! End-to-end: embeddings over HTTP (`POST /v1/embeddings`) and gRPC (`CreateEmbeddings`), through
//! the guard and the router's `Embed` to the fake provider, priced by the ledger.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use switchboard_e2e::{EMBEDDING_MODEL, KEY_A, KEY_B, Sandbox};
use switchboard_fake_provider::embeddings::vector;
use switchboard_proto::{
    gateway::v1::CreateEmbeddingsRequest,
    ledger::v1::{CacheOutcome, RequestStatus},
};
use tonic::metadata::MetadataValue;

async fn post(sandbox: &Sandbox, key: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/embeddings", sandbox.http_url))
        .bearer_auth(key)
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

fn floats(value: &Value) -> Vec<f32> {
    serde_json::from_value(value.clone()).unwrap()
}

fn decode_base64(text: &str) -> Vec<u8> {
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.chars().filter(|c| *c != '=') {
        bits = (bits << 6) | alphabet.find(c).unwrap() as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}

/// Price of the sandbox embeddings model: 0.02 USD per million input tokens = 20 nanos a token.
const NANOS_PER_TOKEN: i64 = 20;

#[tokio::test]
async fn http_embeddings_are_guarded_routed_recorded_and_typed() {
    let sandbox = Sandbox::start().await.unwrap();
    let texts = ["hello world", "a second text"];
    let response = post(
        &sandbox,
        KEY_A,
        &json!({"model": EMBEDDING_MODEL, "input": texts, "dimensions": 8}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-switchboard-provider"), "primary");
    assert_eq!(header(&response, "x-switchboard-cache"), "bypass");
    let id = header(&response, "x-switchboard-request-id");
    let list: Value = response.json().await.unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["model"], EMBEDDING_MODEL);
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(list["data"][i]["object"], "embedding");
        assert_eq!(list["data"][i]["index"], i);
        assert_eq!(floats(&list["data"][i]["embedding"]), vector(text, 8));
    }
    assert_eq!(
        list["usage"],
        json!({"prompt_tokens": 5, "total_tokens": 5})
    );
    assert_eq!(list["switchboard"]["provider"], "primary");
    let sent = &sandbox.primary.requests()[0].body;
    assert_eq!(sent["input"], json!(texts));
    assert_eq!(sent["dimensions"], 8);
    let row = sandbox.wait_for_record(&id).await.unwrap();
    assert_eq!(row.prompt_tokens, 5);
    assert_eq!(row.completion_tokens, 0);
    assert_eq!(row.provider, "primary");
    assert_eq!(row.model, EMBEDDING_MODEL);
    assert_eq!(row.cost_usd_nanos, Some(5 * NANOS_PER_TOKEN));
    assert_eq!(row.cache, CacheOutcome::Bypass as i32);
    assert_eq!(row.status, RequestStatus::Ok as i32);
    assert!(!row.streamed);

    // base64: little-endian f32, as OpenAI encodes it.
    let response = post(
        &sandbox,
        KEY_A,
        &json!({"model": EMBEDDING_MODEL, "input": "hello world", "encoding_format": "base64"}),
    )
    .await;
    let list: Value = response.json().await.unwrap();
    let bytes = decode_base64(list["data"][0]["embedding"].as_str().unwrap());
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(decoded, vector("hello world", decoded.len()));

    // The guard applies: app-a's policy redacts, app-b's blocks.
    let response = post(
        &sandbox,
        KEY_A,
        &json!({"model": EMBEDDING_MODEL, "input": "write to bob@example.com"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let sent = sandbox.primary.requests().last().unwrap().body.clone();
    let input = sent["input"][0].as_str().unwrap();
    assert!(!input.contains("bob@example.com"), "{input}");
    assert!(input.contains("[EMAIL_ADDRESS]"), "{input}");
    let before = sandbox.primary.request_count(EMBEDDING_MODEL);
    let blocked = post(
        &sandbox,
        KEY_B,
        &json!({"model": EMBEDDING_MODEL, "input": "write to bob@example.com"}),
    )
    .await;
    assert_eq!(blocked.status(), 403);
    assert_eq!(sandbox.primary.request_count(EMBEDDING_MODEL), before);

    // A failing primary falls over to the backup.
    sandbox.primary.fail_next(EMBEDDING_MODEL, 500, 1);
    let response = post(
        &sandbox,
        KEY_A,
        &json!({"model": EMBEDDING_MODEL, "input": "fall over"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-switchboard-provider"), "backup");
    assert_eq!(header(&response, "x-switchboard-attempts"), "2");
    let fallback_id = header(&response, "x-switchboard-request-id");
    let row = sandbox.wait_for_record(&fallback_id).await.unwrap();
    assert_eq!(row.provider, "backup");
    assert_eq!(row.attempts, 2);

    // Typed errors; none reaches a provider.
    let before = sandbox.primary.request_count(EMBEDDING_MODEL);
    for (body, status, param) in [
        (json!({"model": EMBEDDING_MODEL, "input": []}), 400, "input"),
        (
            json!({"model": EMBEDDING_MODEL, "input": ["ok", ""]}),
            400,
            "input[1]",
        ),
        (
            json!({"model": EMBEDDING_MODEL, "input": [[1, 2, 3]]}),
            400,
            "input",
        ),
        (
            json!({"model": "no-such-embedder", "input": "x"}),
            404,
            "no-such-embedder",
        ),
    ] {
        let response = post(&sandbox, KEY_A, &body).await;
        assert_eq!(response.status(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], param, "{error}");
    }
    assert_eq!(sandbox.primary.request_count(EMBEDDING_MODEL), before);
    let unauthenticated = reqwest::Client::new()
        .post(format!("{}/v1/embeddings", sandbox.http_url))
        .json(&json!({"model": EMBEDDING_MODEL, "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn grpc_embeddings_and_typed_statuses() {
    let sandbox = Sandbox::start().await.unwrap();
    let mut gateway = sandbox.gateway().await.unwrap();
    let authed = |message: CreateEmbeddingsRequest| {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {KEY_A}")).unwrap(),
        );
        request
    };
    let response = gateway
        .create_embeddings(authed(CreateEmbeddingsRequest {
            model: EMBEDDING_MODEL.into(),
            inputs: vec!["one over grpc".into(), "two".into()],
            dimensions: Some(4),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.embeddings.len(), 2);
    assert_eq!(response.embeddings[0].values, vector("one over grpc", 4));
    assert_eq!(response.embeddings[1].index, 1);
    let usage = response.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (4, 0));
    assert_eq!(response.route.as_ref().unwrap().provider, "primary");
    let row = sandbox.wait_for_record(&response.request_id).await.unwrap();
    assert_eq!(row.prompt_tokens, 4);
    assert_eq!(row.cost_usd_nanos, Some(4 * NANOS_PER_TOKEN));

    let empty = gateway
        .create_embeddings(authed(CreateEmbeddingsRequest {
            model: EMBEDDING_MODEL.into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    let unknown = gateway
        .create_embeddings(authed(CreateEmbeddingsRequest {
            model: "no-such-embedder".into(),
            inputs: vec!["x".into()],
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let unauthenticated = gateway
        .create_embeddings(CreateEmbeddingsRequest {
            model: EMBEDDING_MODEL.into(),
            inputs: vec!["x".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);
    assert_eq!(sandbox.primary.request_count(EMBEDDING_MODEL), 1);
    sandbox.stop().await.unwrap();
}
