//! End-to-end: every request goes gateway → guard → cache → router → fake provider over real gRPC,
//! and the usage event goes through real NATS JetStream into the ledger's real Postgres.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use switchboard_e2e::{KEY_A, KEY_B, MAX_BODY, MODEL, Sandbox, authed, expected_cost_nanos};
use switchboard_proto::{
    chat::v1::{ChatRequest, Message, Role},
    gateway::v1::{
        CreateChatCompletionRequest, StreamChatCompletionRequest,
        stream_chat_completion_response::Event,
    },
    ledger::v1::{CacheOutcome, GetSpendRequest, RequestStatus},
};
use switchboard_status::ErrorCode;

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

fn body(text: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}], "temperature": 0})
}

async fn post(sandbox: &Sandbox, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = http()
        .post(format!("{}/v1/chat/completions", sandbox.http_url))
        .json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
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

#[tokio::test]
async fn http_completion_is_recorded_priced_and_then_served_from_cache() {
    let sandbox = Sandbox::start().await.unwrap();
    let request = body("what is the capital of france");

    let first = post(&sandbox, Some(KEY_A), &request).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-switchboard-cache"), "miss");
    assert_eq!(header(&first, "x-switchboard-provider"), "primary");
    let first_id = header(&first, "x-switchboard-request-id");
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(
        first["choices"][0]["message"]["content"],
        "echo: what is the capital of france"
    );
    assert_eq!(first["choices"][0]["finish_reason"], "stop");
    assert_eq!(first["switchboard"]["provider"], "primary");
    assert_eq!(first["switchboard"]["attempts"], 1);
    let prompt = first["usage"]["prompt_tokens"].as_i64().unwrap();
    let completion = first["usage"]["completion_tokens"].as_i64().unwrap();
    assert!(prompt > 0 && completion > 0);

    let row = sandbox.wait_for_record(&first_id).await.unwrap();
    assert_eq!(row.app, "app-a");
    assert_eq!(row.team, "team-1");
    assert_eq!(row.key_id, "key-a");
    assert_eq!(row.provider, "primary");
    assert_eq!(row.model, MODEL);
    assert_eq!(row.prompt_tokens as i64, prompt);
    assert_eq!(row.completion_tokens as i64, completion);
    assert_eq!(
        row.cost_usd_nanos,
        Some(expected_cost_nanos(prompt, completion))
    );
    assert_eq!(row.cache, CacheOutcome::Miss as i32);
    assert_eq!(row.status, RequestStatus::Ok as i32);

    // The identical request again: served from the cache, recorded as a hit with the cost it saved.
    let second = post(&sandbox, Some(KEY_A), &request).await;
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-switchboard-cache"), "hit");
    let second_id = header(&second, "x-switchboard-request-id");
    assert_ne!(second_id, first_id);
    let second_body: Value = second.json().await.unwrap();
    assert_eq!(
        second_body["choices"][0]["message"]["content"],
        "echo: what is the capital of france"
    );
    assert_eq!(
        sandbox.primary.request_count(MODEL),
        1,
        "a cache hit must not reach the provider"
    );
    let hit = sandbox.wait_for_record(&second_id).await.unwrap();
    assert_eq!(hit.cache, CacheOutcome::Hit as i32);
    assert_eq!(hit.cost_usd_nanos, Some(0));
    assert_eq!(hit.saved_usd_nanos, expected_cost_nanos(prompt, completion));

    // The same prompt from another app never hits the first app's entry.
    let other_app = post(&sandbox, Some(KEY_B), &request).await;
    assert_eq!(other_app.status(), 200);
    assert_eq!(header(&other_app, "x-switchboard-cache"), "miss");

    // Finance sees spend per app and model.
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
    assert_eq!(spend.rows.len(), 1);
    assert_eq!(spend.rows[0].app, "app-a");
    assert_eq!(spend.rows[0].requests, 2);
    assert_eq!(spend.rows[0].cache_hits, 1);
    assert_eq!(
        spend.rows[0].cost_usd_nanos,
        expected_cost_nanos(prompt, completion)
    );
    assert_eq!(
        spend.total_cost_usd_nanos,
        expected_cost_nanos(prompt, completion)
    );
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn grpc_completion_and_cache_hit() {
    let sandbox = Sandbox::start().await.unwrap();
    let mut gateway = sandbox.gateway().await.unwrap();
    let request = CreateChatCompletionRequest {
        request: Some(chat("hello over grpc")),
        cache: None,
    };
    let first = gateway
        .create_chat_completion(authed(request.clone(), KEY_A))
        .await
        .unwrap();
    // The metadata names the request as its body does (and as the HTTP header does).
    let named = first
        .metadata()
        .get("x-switchboard-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let first = first.into_inner();
    assert_eq!(named, first.request_id);
    let answer = first.response.as_ref().unwrap();
    assert_eq!(
        answer.choices[0].message.as_ref().unwrap().joined_text(),
        "echo: hello over grpc"
    );
    let route = first.route.as_ref().unwrap();
    assert_eq!(route.provider, "primary");
    assert_eq!(route.attempt_count, 1);
    assert_eq!(
        first.cache,
        switchboard_proto::gateway::v1::CacheStatus::Miss as i32
    );
    let row = sandbox.wait_for_record(&first.request_id).await.unwrap();
    let usage = answer.usage.unwrap();
    assert_eq!(row.prompt_tokens, usage.prompt_tokens);
    assert_eq!(
        row.cost_usd_nanos,
        Some(expected_cost_nanos(
            usage.prompt_tokens.into(),
            usage.completion_tokens.into()
        ))
    );

    let second = gateway
        .create_chat_completion(authed(request, KEY_A))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        second.cache,
        switchboard_proto::gateway::v1::CacheStatus::Hit as i32
    );
    let hit = sandbox.wait_for_record(&second.request_id).await.unwrap();
    assert_eq!(hit.cache, CacheOutcome::Hit as i32);
    assert!(hit.saved_usd_nanos > 0);
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn fallback_on_500_and_429_names_the_target_that_served() {
    let sandbox = Sandbox::start().await.unwrap();
    for (status, text) in [(500u16, "first question"), (429, "second question")] {
        sandbox.primary.fail_next(MODEL, status, 1);
        let response = post(&sandbox, Some(KEY_A), &body(text)).await;
        assert_eq!(response.status(), 200, "fallback after {status}");
        assert_eq!(header(&response, "x-switchboard-provider"), "backup");
        assert_eq!(header(&response, "x-switchboard-attempts"), "2");
        let id = header(&response, "x-switchboard-request-id");
        let json: Value = response.json().await.unwrap();
        assert_eq!(json["switchboard"]["provider"], "backup");
        assert_eq!(
            json["switchboard"]["attempt_errors"][0]["http_status"],
            status
        );
        let row = sandbox.wait_for_record(&id).await.unwrap();
        assert_eq!(row.provider, "backup");
        assert_eq!(row.attempts, 2);
    }
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn sse_stream_arrives_in_order_ends_with_done_and_is_recorded() {
    let sandbox = Sandbox::start().await.unwrap();
    let mut request = body("tell me a story about a lighthouse keeper");
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let response = post(&sandbox, Some(KEY_A), &request).await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    // Who serves is in the head, before the first chunk, as for a unary answer.
    assert_eq!(header(&response, "x-switchboard-provider"), "primary");
    assert_eq!(header(&response, "x-switchboard-attempts"), "1");
    assert!(!header(&response, "x-switchboard-model").is_empty());
    let id = header(&response, "x-switchboard-request-id");
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect::<Vec<_>>()
        .join("");
    assert_eq!(content, "echo: tell me a story about a lighthouse keeper");
    assert!(
        chunks
            .iter()
            .filter(|c| c["choices"][0]["delta"]["content"].is_string())
            .count()
            > 1,
        "more than one chunk"
    );
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    let row = sandbox.wait_for_record(&id).await.unwrap();
    assert!(row.streamed);
    assert_eq!(
        row.completion_tokens as u64,
        usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(row.status, RequestStatus::Ok as i32);

    // Without include_usage there is no usage chunk, and the cached answer is replayed as a stream.
    request["stream_options"] = json!({"include_usage": false});
    let replay = post(&sandbox, Some(KEY_A), &request).await;
    assert_eq!(header(&replay, "x-switchboard-cache"), "hit");
    assert_eq!(header(&replay, "x-switchboard-provider"), "primary");
    let text = replay.text().await.unwrap();
    assert!(!text.contains("\"usage\""));
    assert!(text.contains("echo: tell me a story about a lighthouse keeper"));
    assert!(text.trim_end().ends_with("data: [DONE]"));
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn a_long_cached_answer_streams_back_whole() {
    let sandbox = Sandbox::start().await.unwrap();
    // An answer of ~6 KB: replayed in more pieces than the stream's buffer holds.
    let prompt = "a long question that the model repeats back ".repeat(140);
    let unary = post(&sandbox, Some(KEY_A), &body(&prompt)).await;
    assert_eq!(unary.status(), 200);
    assert_eq!(header(&unary, "x-switchboard-cache"), "miss");
    let answer: Value = unary.json().await.unwrap();
    let expected = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(expected.len() > 6_000, "{}", expected.len());
    let mut request = body(&prompt);
    request["stream"] = json!(true);
    // A bound so that a hang fails the test instead of stalling the suite (not a speed limit).
    let (cache, text) = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        let replay = post(&sandbox, Some(KEY_A), &request).await;
        (
            header(&replay, "x-switchboard-cache"),
            replay.text().await.unwrap(),
        )
    })
    .await
    .expect("the cached answer's stream never came");
    assert_eq!(cache, "hit");
    let events: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    assert!(events.len() > 64, "{} events", events.len());
    let content: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, expected);
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn grpc_stream_delivers_chunks_then_summary() {
    let sandbox = Sandbox::start().await.unwrap();
    let mut gateway = sandbox.gateway().await.unwrap();
    let request = StreamChatCompletionRequest {
        request: Some(chat("stream me five words please")),
        cache: None,
    };
    let stream = gateway
        .stream_chat_completion(authed(request, KEY_A))
        .await
        .unwrap();
    let head = stream.metadata().clone();
    let mut stream = stream.into_inner();
    let mut text = String::new();
    let mut chunks = 0;
    let mut summary = None;
    while let Some(message) = stream.message().await.unwrap() {
        match message.event.unwrap() {
            Event::Chunk(chunk) => {
                assert!(summary.is_none(), "no chunk after the summary");
                chunks += 1;
                for choice in chunk.choices {
                    text.push_str(&choice.content);
                }
            }
            Event::Summary(s) => summary = Some(s),
        }
    }
    assert_eq!(text, "echo: stream me five words please");
    assert!(chunks > 1);
    let summary = summary.expect("summary");
    let usage = summary.usage.unwrap();
    assert!(usage.completion_tokens > 0);
    assert_eq!(summary.route.unwrap().provider, "primary");
    // The response head names the request and the cache's part before the first chunk.
    assert_eq!(
        head.get("x-switchboard-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        summary.request_id
    );
    assert_eq!(head.get("x-switchboard-cache").unwrap(), "miss");
    assert_eq!(head.get("x-switchboard-provider").unwrap(), "primary");
    assert_eq!(head.get("x-switchboard-attempts").unwrap(), "1");
    let row = sandbox.wait_for_record(&summary.request_id).await.unwrap();
    assert!(row.streamed);
    assert_eq!(row.completion_tokens, usage.completion_tokens);
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn guard_redacts_before_the_provider_and_blocks_per_app() {
    let sandbox = Sandbox::start().await.unwrap();
    let response = post(
        &sandbox,
        Some(KEY_A),
        &body("mail me at jane.doe@example.com with card 4111 1111 1111 1111"),
    )
    .await;
    assert_eq!(response.status(), 200);
    let sent = sandbox.primary.requests();
    let sent = serde_json::to_string(&sent.last().unwrap().body).unwrap();
    assert!(
        !sent.contains("jane.doe@example.com"),
        "the provider must not see the email"
    );
    assert!(
        !sent.contains("4111 1111 1111 1111"),
        "the provider must not see the card"
    );
    assert!(sent.contains("[EMAIL_ADDRESS]") && sent.contains("[CREDIT_CARD]"));
    assert_eq!(header(&response, "x-switchboard-cache"), "miss");

    // The cache keys what the provider received: another prompt that redacts to the same text is
    // a hit (the gateway looked it up again under the guard's transformed text).
    let provider_calls = sandbox.primary.requests().len();
    let same_after_redaction = post(
        &sandbox,
        Some(KEY_A),
        &body("mail me at john.roe@example.org with card 5555 5555 5555 4444"),
    )
    .await;
    assert_eq!(same_after_redaction.status(), 200);
    assert_eq!(header(&same_after_redaction, "x-switchboard-cache"), "hit");
    assert_eq!(sandbox.primary.requests().len(), provider_calls);

    let blocked = post(
        &sandbox,
        Some(KEY_B),
        &body("my email is jane.doe@example.com"),
    )
    .await;
    assert_eq!(blocked.status(), 403);
    let error: Value = blocked.json().await.unwrap();
    assert_eq!(error["error"]["type"], "permission_error");
    assert_eq!(error["error"]["code"], "PERMISSION_DENIED");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("EMAIL_ADDRESS") && !message.contains("jane.doe"),
        "{message}"
    );
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn bad_http_input_gets_typed_openai_errors_and_writes_nothing() {
    let sandbox = Sandbox::start().await.unwrap();
    let url = format!("{}/v1/chat/completions", sandbox.http_url);
    let mut rejected_ids = Vec::new();
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "malformed json",
            http()
                .post(&url)
                .bearer_auth(KEY_A)
                .header("content-type", "application/json")
                .body("{\"model\": "),
            400,
            "invalid_request_error",
        ),
        (
            "missing messages",
            http()
                .post(&url)
                .bearer_auth(KEY_A)
                .json(&json!({"model": MODEL})),
            400,
            "invalid_request_error",
        ),
        (
            "unknown model",
            http().post(&url).bearer_auth(KEY_A).json(
                &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
            ),
            404,
            "not_found_error",
        ),
        (
            "missing key",
            http().post(&url).json(&body("hi")),
            401,
            "authentication_error",
        ),
        (
            "wrong key",
            http().post(&url).bearer_auth("sk-wrong").json(&body("hi")),
            401,
            "authentication_error",
        ),
        (
            "too large",
            http()
                .post(&url)
                .bearer_auth(KEY_A)
                .json(&body(&"x".repeat(MAX_BODY + 10))),
            413,
            "invalid_request_error",
        ),
        (
            "guard block",
            http()
                .post(&url)
                .bearer_auth(KEY_B)
                .json(&body("card 4111-1111-1111-1111")),
            403,
            "permission_error",
        ),
    ];
    for (name, request, status, kind) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{name}");
        if let Some(id) = response.headers().get("x-switchboard-request-id") {
            rejected_ids.push(id.to_str().unwrap().to_owned());
        }
        let error: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{name}: body is not JSON: {e}"));
        assert_eq!(error["error"]["type"], kind, "{name}: {error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
    assert!(
        sandbox.primary.requests().is_empty() && sandbox.backup.requests().is_empty(),
        "nothing reached a provider"
    );
    // A later successful request is recorded; the rejected ones (published before it, if at all) are not.
    let ok = post(&sandbox, Some(KEY_A), &body("fine")).await;
    let ok_id = header(&ok, "x-switchboard-request-id");
    sandbox.wait_for_record(&ok_id).await.unwrap();
    for id in rejected_ids {
        assert!(
            !sandbox.has_record(&id).await.unwrap(),
            "no ledger row for rejected request {id}"
        );
    }
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn bad_grpc_input_gets_typed_statuses_with_error_info() {
    use tonic_types::StatusExt;
    let sandbox = Sandbox::start().await.unwrap();
    let mut gateway = sandbox.gateway().await.unwrap();
    let cases = vec![
        (
            "no key",
            tonic::Request::new(CreateChatCompletionRequest {
                request: Some(chat("hi")),
                cache: None,
            }),
            tonic::Code::Unauthenticated,
            ErrorCode::Unauthenticated,
        ),
        (
            "wrong key",
            authed(
                CreateChatCompletionRequest {
                    request: Some(chat("hi")),
                    cache: None,
                },
                "sk-nope",
            ),
            tonic::Code::Unauthenticated,
            ErrorCode::Unauthenticated,
        ),
        (
            "no messages",
            authed(
                CreateChatCompletionRequest {
                    request: Some(ChatRequest {
                        model: MODEL.into(),
                        ..Default::default()
                    }),
                    cache: None,
                },
                KEY_A,
            ),
            tonic::Code::InvalidArgument,
            ErrorCode::InvalidArgument,
        ),
        (
            "unknown model",
            authed(
                CreateChatCompletionRequest {
                    request: Some(ChatRequest {
                        model: "nope".into(),
                        ..chat("hi")
                    }),
                    cache: None,
                },
                KEY_A,
            ),
            tonic::Code::NotFound,
            ErrorCode::NotFound,
        ),
        (
            "guard block",
            authed(
                CreateChatCompletionRequest {
                    request: Some(chat("reach me at a.b@example.org")),
                    cache: None,
                },
                KEY_B,
            ),
            tonic::Code::PermissionDenied,
            ErrorCode::PermissionDenied,
        ),
    ];
    for (name, request, code, reason) in cases {
        let status = gateway.create_chat_completion(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{name}: {status:?}");
        let info = status
            .get_details_error_info()
            .unwrap_or_else(|| panic!("{name}: no ErrorInfo"));
        assert_eq!(info.reason, reason.as_str(), "{name}");
        // A refusal after authentication names the request (for logs, traces and support);
        // an unauthenticated call has none.
        let id = status.metadata().get("x-switchboard-request-id");
        if code == tonic::Code::Unauthenticated {
            assert!(id.is_none(), "{name}");
        } else {
            assert!(
                id.is_some_and(|id| !id.is_empty()),
                "{name}: no request id in {:?}",
                status.metadata()
            );
        }
    }
    assert!(sandbox.primary.requests().is_empty());
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn models_are_listed_and_retrieved_over_http_and_unknown_urls_get_typed_errors() {
    let sandbox = Sandbox::start().await.unwrap();
    let response = http()
        .get(format!("{}/v1/models", sandbox.http_url))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let list: Value = response.json().await.unwrap();
    assert_eq!(list["object"], "list");
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == MODEL)
    );
    let unauthorized = http()
        .get(format!("{}/v1/models", sandbox.http_url))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    // One model (OpenAI's "retrieve model"); ids may hold slashes.
    let get = |path: &str| {
        http()
            .get(format!("{}{path}", sandbox.http_url))
            .bearer_auth(KEY_A)
            .send()
    };
    let one = get(&format!("/v1/models/{MODEL}")).await.unwrap();
    assert_eq!(one.status(), 200);
    let model: Value = one.json().await.unwrap();
    assert_eq!(model["id"], MODEL);
    assert_eq!(model["object"], "model");
    let missing = get("/v1/models/vendor/no-such-model").await.unwrap();
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["type"], "not_found_error");
    assert_eq!(error["error"]["code"], "model_not_found");
    assert_eq!(error["error"]["param"], "model");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("vendor/no-such-model"),
        "{error}"
    );
    let anonymous = http()
        .get(format!("{}/v1/models/{MODEL}", sandbox.http_url))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    // A wrong base URL or method gets an OpenAI-style body, not an empty 404 / 405; the query
    // (where clients sometimes put a key) is not echoed.
    let unknown = get("/chat/completions?api-key=secret-in-query")
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let error: Value = unknown.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unknown_url");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("GET /chat/completions"), "{message}");
    assert!(!message.contains("secret-in-query"), "{message}");
    let wrong_method = get("/v1/chat/completions").await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "POST");
    let error: Value = wrong_method.json().await.unwrap();
    assert_eq!(error["error"]["code"], "method_not_allowed");
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn the_same_usage_event_published_twice_makes_one_row() {
    let sandbox = Sandbox::start().await.unwrap();
    let response = post(&sandbox, Some(KEY_A), &body("count me once")).await;
    let id = header(&response, "x-switchboard-request-id");
    let row = sandbox.wait_for_record(&id).await.unwrap();
    // Republish events with the same request id: as a gateway retry would (its time, as single
    // messages, not the gateway's batch, so JetStream's de-duplication does not apply), and once
    // with a time three days off. The ledger's key and its ±7-day probe keep one row (ADR 009).
    let client = async_nats::connect(&sandbox.nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let config = switchboard_bus::NatsConfig {
        url: sandbox.nats.url.clone(),
        subject_prefix: sandbox.nats.prefix.clone(),
        usage_stream: sandbox.nats.stream.clone(),
        ..Default::default()
    };
    let time = row.time.unwrap();
    for offset in [0, 3 * 86_400] {
        let event = switchboard_bus::UsageEvent {
            request_id: id.clone(),
            app: "app-a".into(),
            requested_model: MODEL.into(),
            status: RequestStatus::Ok as i32,
            usage: Some(switchboard_proto::chat::v1::Usage {
                prompt_tokens: 999,
                completion_tokens: 999,
                total_tokens: 1998,
                ..Default::default()
            }),
            time: Some(prost_types::Timestamp {
                seconds: time.seconds + offset,
                nanos: time.nanos,
            }),
            ..Default::default()
        };
        switchboard_bus::publish_usage(&js, &config, &event)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // A marker request after it: once its row exists, the duplicate has been consumed too.
    let marker = post(&sandbox, Some(KEY_A), &body("marker")).await;
    sandbox
        .wait_for_record(&header(&marker, "x-switchboard-request-id"))
        .await
        .unwrap();
    let again = sandbox.wait_for_record(&id).await.unwrap();
    assert_eq!(
        again.prompt_tokens, row.prompt_tokens,
        "the first row stands"
    );
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
    let requests: u64 = spend.rows.iter().map(|r| r.requests).sum();
    assert_eq!(
        requests, 2,
        "one row for the twice-published event, one for the marker"
    );
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn every_service_answers_health_checks_and_reflection() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let sandbox = Sandbox::start().await.unwrap();
    for (service, url) in &sandbox.grpc_urls {
        let channel = tonic::transport::Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        let status = health
            .check(HealthCheckRequest {
                service: (*service).to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32, "{service}");

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("{service}: no service list")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n == service),
            "{service} not listed by reflection: {names:?}"
        );
    }
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn a_stream_cut_mid_answer_is_billed_at_the_deployment_that_was_cut() {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.primary.fail_stream_after(MODEL, 2, 1);
    let mut request = body("one two three four five six seven eight");
    request["stream"] = json!(true);
    let response = post(&sandbox, Some(KEY_A), &request).await;
    assert_eq!(response.status(), 200);
    let id = header(&response, "x-switchboard-request-id");
    let text = response.text().await.unwrap();
    assert!(text.contains("echo"), "{text}");
    assert!(!text.contains("[DONE]"), "never a clean finish: {text}");
    let row = sandbox.wait_for_record(&id).await.unwrap();
    assert_eq!(row.status, RequestStatus::Partial as i32);
    // The router named the deployment that was streaming: the row names it and prices what it
    // consumed (counted locally: the provider sent no usage before the cut).
    assert_eq!(row.provider, "primary");
    assert_eq!(row.model, MODEL);
    assert!(
        row.prompt_tokens > 0 && row.completion_tokens > 0,
        "{row:?}"
    );
    assert_eq!(
        row.cost_usd_nanos,
        Some(expected_cost_nanos(
            row.prompt_tokens.into(),
            row.completion_tokens.into()
        ))
    );
    sandbox.stop().await.unwrap();
}
