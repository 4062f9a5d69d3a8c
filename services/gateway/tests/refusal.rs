//! A model's refusal (OpenAI `refusal`) reaches every front door: the OpenAI face returns
//! `message.refusal` (`content: null`) and streams `delta.refusal`; the Anthropic face returns it as
//! text with `stop_reason: "refusal"`, unary and streamed; an assistant refusal in the history
//! reaches the router; the unary answer check sees the refusal. The router and the guard are
//! stand-ins over real gRPC on loopback, answering what the router makes of OpenAI's refusal (its
//! golden fixtures `openai/unary_refusal.json` and `openai/stream_refusal.json` pin that part).

#![allow(clippy::unwrap_used)]

mod support;

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use switchboard_gateway::Config;
use switchboard_proto::{
    chat::v1::{
        ChatChunk, ChatRequest, ChatResponse, Choice, ChoiceDelta, FinishReason, Message, Role,
        RouteInfo, Usage,
    },
    guard::v1::{
        CheckAnswerRequest, CheckAnswerResponse, CheckPromptRequest, CheckPromptResponse, Decision,
        guard_service_server::{GuardService, GuardServiceServer},
    },
    router::v1::{
        EmbedRequest, EmbedResponse, ListModelsRequest, ListModelsResponse, RouteRequest,
        RouteResponse, RouteStreamRequest, RouteStreamResponse, route_stream_response,
        router_service_server::{RouterService, RouterServiceServer},
    },
};
use switchboard_testkit::TestNats;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const KEY: &str = "sk-refusal";
const REFUSAL: &str = "I'm sorry, I can't help with that.";
const PIECES: [&str; 3] = ["I'm sorry, ", "I can't help ", "with that."];

/// What the stand-ins received.
#[derive(Clone, Default)]
struct Seen {
    /// The chat requests the router got.
    routed: Arc<Mutex<Vec<ChatRequest>>>,
    /// The messages of every CheckAnswer.
    checked: Arc<Mutex<Vec<Vec<Message>>>>,
}

/// A guard that allows everything and asks for the answer check.
struct Guard(Seen);

#[tonic::async_trait]
impl GuardService for Guard {
    async fn check_prompt(
        &self,
        _request: Request<CheckPromptRequest>,
    ) -> Result<Response<CheckPromptResponse>, Status> {
        Ok(Response::new(CheckPromptResponse {
            decision: Decision::Allow as i32,
            check_answer: true,
            ..Default::default()
        }))
    }

    async fn check_answer(
        &self,
        request: Request<CheckAnswerRequest>,
    ) -> Result<Response<CheckAnswerResponse>, Status> {
        self.0
            .checked
            .lock()
            .unwrap()
            .push(request.into_inner().messages);
        Ok(Response::new(CheckAnswerResponse {
            decision: Decision::Allow as i32,
            ..Default::default()
        }))
    }
}

/// A router whose provider refuses, as the router translates OpenAI's refusal.
struct Router(Seen);

fn usage() -> Usage {
    Usage {
        prompt_tokens: 5,
        completion_tokens: 8,
        total_tokens: 13,
        ..Default::default()
    }
}

fn route_info() -> RouteInfo {
    RouteInfo {
        route: "gpt".into(),
        provider: "openai".into(),
        model: "gpt-4o".into(),
        target: "openai/gpt-4o".into(),
        attempt_count: 1,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl RouterService for Router {
    async fn route(
        &self,
        request: Request<RouteRequest>,
    ) -> Result<Response<RouteResponse>, Status> {
        let request = request.into_inner().request.unwrap_or_default();
        self.0.routed.lock().unwrap().push(request);
        Ok(Response::new(RouteResponse {
            response: Some(ChatResponse {
                model: "gpt-4o".into(),
                choices: vec![Choice {
                    index: 0,
                    message: Some(Message {
                        role: Role::Assistant as i32,
                        refusal: REFUSAL.into(),
                        ..Default::default()
                    }),
                    finish_reason: FinishReason::Stop as i32,
                }],
                usage: Some(usage()),
                created: 1_700_000_000,
                ..Default::default()
            }),
            route: Some(route_info()),
        }))
    }

    type RouteStreamStream =
        Pin<Box<dyn futures::Stream<Item = Result<RouteStreamResponse, Status>> + Send>>;

    async fn route_stream(
        &self,
        request: Request<RouteStreamRequest>,
    ) -> Result<Response<Self::RouteStreamStream>, Status> {
        let request = request.into_inner().request.unwrap_or_default();
        self.0.routed.lock().unwrap().push(request);
        let chunk = |delta: ChoiceDelta, usage: Option<Usage>| {
            Ok(RouteStreamResponse {
                event: Some(route_stream_response::Event::Chunk(ChatChunk {
                    model: "gpt-4o".into(),
                    choices: vec![delta],
                    usage,
                    created: 1_700_000_000,
                    ..Default::default()
                })),
            })
        };
        let mut events = vec![chunk(
            ChoiceDelta {
                role: Role::Assistant as i32,
                ..Default::default()
            },
            None,
        )];
        for piece in PIECES {
            events.push(chunk(
                ChoiceDelta {
                    refusal: piece.into(),
                    ..Default::default()
                },
                None,
            ));
        }
        events.push(chunk(
            ChoiceDelta {
                finish_reason: FinishReason::Stop as i32,
                ..Default::default()
            },
            Some(usage()),
        ));
        events.push(Ok(RouteStreamResponse {
            event: Some(route_stream_response::Event::Route(route_info())),
        }));
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Err(Status::unimplemented("list_models"))
    }

    async fn embed(
        &self,
        _request: Request<EmbedRequest>,
    ) -> Result<Response<EmbedResponse>, Status> {
        Err(Status::unimplemented("embed"))
    }
}

/// A gateway (cache off) over the stand-ins, and what they saw.
struct Gateway {
    http: String,
    seen: Seen,
    stop: CancellationToken,
    nats: TestNats,
    _outbox: tempfile::TempDir,
}

async fn gateway() -> Gateway {
    let seen = Seen::default();
    let stop = CancellationToken::new();
    let routes = tonic::service::Routes::new(GuardServiceServer::new(Guard(seen.clone())))
        .add_service(RouterServiceServer::new(Router(seen.clone())));
    let url = support::serve(routes, &stop).await;
    let nats = TestNats::create().await.unwrap();
    let outbox = tempfile::tempdir().unwrap();
    let config = Config {
        cache_enabled: false,
        ..support::config(&url, outbox.path(), KEY, "app-refusal")
    };
    let http = support::start(config, &nats, &stop).await;
    Gateway {
        http,
        seen,
        stop,
        nats,
        _outbox: outbox,
    }
}

impl Gateway {
    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.http))
            .bearer_auth(KEY)
            .header("anthropic-version", "2023-06-01")
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response
    }

    async fn stop(self) {
        self.stop.cancel();
        self.nats.cleanup().await;
    }
}

/// `(event name, data)` of each SSE frame; unnamed frames (OpenAI's) get an empty name, `[DONE]`
/// is left out.
fn frames(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|frame| {
            let mut name = String::new();
            let mut data = None;
            for line in frame.lines() {
                if let Some(rest) = line.strip_prefix("event: ") {
                    name = rest.to_owned();
                } else if let Some(rest) = line.strip_prefix("data: ")
                    && rest != "[DONE]"
                {
                    data = Some(serde_json::from_str(rest).unwrap());
                }
            }
            Some((name, data?))
        })
        .collect()
}

#[tokio::test]
async fn an_openai_client_gets_the_refusal_unary_and_streamed() {
    let gateway = gateway().await;
    // The history carries an earlier refusal: it reaches the router as `Message.refusal`.
    let request = json!({ "model": "gpt", "messages": [
        { "role": "user", "content": "Plan the heist." },
        { "role": "assistant", "content": null, "refusal": REFUSAL },
        { "role": "user", "content": "Please?" },
    ] });
    let completion: Value = gateway
        .post("/v1/chat/completions", &request)
        .await
        .json()
        .await
        .unwrap();
    let message = &completion["choices"][0]["message"];
    assert_eq!(message["refusal"], REFUSAL, "{completion}");
    assert_eq!(message["content"], Value::Null, "{completion}");
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");
    let routed = gateway.seen.routed.lock().unwrap()[0].clone();
    assert_eq!(routed.messages[1].refusal, REFUSAL);
    assert!(routed.messages[1].content.is_empty());
    // The answer check saw the refusal.
    let checked = gateway.seen.checked.lock().unwrap().clone();
    assert_eq!(checked.len(), 1);
    assert_eq!(checked[0][0].refusal, REFUSAL);

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let text = gateway
        .post("/v1/chat/completions", &streamed)
        .await
        .text()
        .await
        .unwrap();
    let chunks: Vec<Value> = frames(&text).into_iter().map(|(_, data)| data).collect();
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["delta"])
        .collect();
    let pieces: Vec<&str> = deltas
        .iter()
        .filter_map(|d| d.get("refusal").and_then(Value::as_str))
        .collect();
    // With the answer check on, the refusal is held whole and checked as one window before
    // it is sent (without it, its pieces would reach the caller unchecked).
    assert_eq!(pieces.concat(), REFUSAL, "{text}");
    let checked = gateway.seen.checked.lock().unwrap().clone();
    assert!(
        checked[1..]
            .iter()
            .flatten()
            .any(|m| m.joined_text() == REFUSAL),
        "the stream's refusal was not checked: {checked:?}"
    );
    assert!(
        deltas
            .iter()
            .all(|d| d.get("content").is_none_or(|c| c.as_str() == Some(""))),
        "no content: {text}"
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("stop")], "{text}");
    gateway.stop().await;
}

#[tokio::test]
async fn an_anthropic_client_gets_the_refusal_as_text_with_stop_reason_refusal() {
    let gateway = gateway().await;
    let request = json!({ "model": "gpt", "max_tokens": 100,
        "messages": [{ "role": "user", "content": "Plan the heist." }] });
    let message: Value = gateway
        .post("/v1/messages", &request)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        message["content"],
        json!([{ "type": "text", "text": REFUSAL }]),
        "{message}"
    );
    assert_eq!(message["stop_reason"], "refusal");

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let text = gateway
        .post("/v1/messages", &streamed)
        .await
        .text()
        .await
        .unwrap();
    let events = frames(&text);
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    // The refusal is checked whole (the answer check is on), so it comes as one text delta.
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ],
        "{text}"
    );
    assert_eq!(
        events[1].1["content_block"],
        json!({ "type": "text", "text": "" })
    );
    let streamed_text: String = events
        .iter()
        .filter(|(_, data)| data["delta"]["type"] == "text_delta")
        .map(|(_, data)| data["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(streamed_text, REFUSAL);
    assert_eq!(events[5].1["delta"]["stop_reason"], "refusal", "{text}");
    gateway.stop().await;
}

#[tokio::test]
async fn metrics_count_a_served_request_and_a_refusal() {
    let gateway = gateway().await;
    let metrics = || support::metrics(&gateway.http);
    let served = "switchboard_gateway_requests_total{kind=\"unary\",status=\"ok\"}";
    let bypass = "switchboard_gateway_cache_total{outcome=\"bypass\"}";
    let latency = "switchboard_gateway_request_duration_seconds_count{kind=\"unary\"}";
    let refused = "switchboard_gateway_refusals_total{face=\"openai\",reason=\"invalid_key\",code=\"UNAUTHENTICATED\"}";
    let before = metrics().await;
    let request = json!({ "model": "gpt", "messages": [{ "role": "user", "content": "Hi" }] });
    gateway.post("/v1/chat/completions", &request).await;
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gateway.http))
        .bearer_auth("sk-not-a-key")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let after = metrics().await;
    for name in [served, bypass, latency, refused] {
        assert!(
            support::series(&after, name) > support::series(&before, name),
            "{name} did not move:\n{after}"
        );
    }
    gateway.stop().await;
}
