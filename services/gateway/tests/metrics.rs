//! The gateway's operational gauges on `GET /metrics`: requests in flight (the admission
//! semaphore, read at scrape time) and the streams' time to first token. The router and the guard
//! are stand-ins over real gRPC on loopback; the router's stream stops after its first chunk until
//! the test lets it finish, so that the scrape sees the request in flight.

#![allow(clippy::unwrap_used)]

mod support;

use std::{pin::Pin, sync::Arc};

use futures::StreamExt as _;
use serde_json::json;
use support::{metrics, series};
use switchboard_gateway::Config;
use switchboard_proto::{
    chat::v1::{ChatChunk, ChoiceDelta, FinishReason, Role, RouteInfo, Usage},
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
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const KEY: &str = "sk-metrics";

/// A guard that allows everything, answers unchecked.
struct Guard;

#[tonic::async_trait]
impl GuardService for Guard {
    async fn check_prompt(
        &self,
        _request: Request<CheckPromptRequest>,
    ) -> Result<Response<CheckPromptResponse>, Status> {
        Ok(Response::new(CheckPromptResponse {
            decision: Decision::Allow as i32,
            ..Default::default()
        }))
    }

    async fn check_answer(
        &self,
        _request: Request<CheckAnswerRequest>,
    ) -> Result<Response<CheckAnswerResponse>, Status> {
        Ok(Response::new(CheckAnswerResponse {
            decision: Decision::Allow as i32,
            ..Default::default()
        }))
    }
}

/// A router whose stream sends its first chunk, then waits for a permit of `gate` to finish.
struct Router {
    gate: Arc<Semaphore>,
}

fn chunk(delta: ChoiceDelta, usage: Option<Usage>) -> Result<RouteStreamResponse, Status> {
    Ok(RouteStreamResponse {
        event: Some(route_stream_response::Event::Chunk(ChatChunk {
            model: "gpt-4o".into(),
            choices: vec![delta],
            usage,
            created: 1_700_000_000,
            ..Default::default()
        })),
    })
}

#[tonic::async_trait]
impl RouterService for Router {
    async fn route(
        &self,
        _request: Request<RouteRequest>,
    ) -> Result<Response<RouteResponse>, Status> {
        Err(Status::unimplemented("route"))
    }

    type RouteStreamStream =
        Pin<Box<dyn futures::Stream<Item = Result<RouteStreamResponse, Status>> + Send>>;

    async fn route_stream(
        &self,
        _request: Request<RouteStreamRequest>,
    ) -> Result<Response<Self::RouteStreamStream>, Status> {
        let first = chunk(
            ChoiceDelta {
                role: Role::Assistant as i32,
                content: "Hello".into(),
                ..Default::default()
            },
            None,
        );
        let gate = self.gate.clone();
        let rest = futures::stream::once(async move {
            gate.acquire().await.unwrap().forget();
            futures::stream::iter([
                chunk(
                    ChoiceDelta {
                        finish_reason: FinishReason::Stop as i32,
                        ..Default::default()
                    },
                    Some(Usage {
                        prompt_tokens: 3,
                        completion_tokens: 1,
                        total_tokens: 4,
                        ..Default::default()
                    }),
                ),
                Ok(RouteStreamResponse {
                    event: Some(route_stream_response::Event::Route(RouteInfo {
                        route: "gpt".into(),
                        provider: "openai".into(),
                        model: "gpt-4o".into(),
                        target: "openai/gpt-4o".into(),
                        attempt_count: 1,
                        ..Default::default()
                    })),
                }),
            ])
        })
        .flatten();
        Ok(Response::new(Box::pin(
            futures::stream::iter([first]).chain(rest),
        )))
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

#[tokio::test]
async fn metrics_show_a_stream_in_flight_and_its_time_to_first_token() {
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(0));
    let routes = tonic::service::Routes::new(GuardServiceServer::new(Guard))
        .add_service(RouterServiceServer::new(Router { gate: gate.clone() }));
    let url = support::serve(routes, &stop).await;
    let nats = TestNats::create().await.unwrap();
    let outbox = tempfile::tempdir().unwrap();
    let config = Config {
        cache_enabled: false,
        max_in_flight: 7,
        ..support::config(&url, outbox.path(), KEY, "app-metrics")
    };
    let http = support::start(config, &nats, &stop).await;

    let in_flight = "switchboard_gateway_in_flight";
    let ttft = "switchboard_gateway_time_to_first_token_seconds_count{source=\"provider\"}";
    let ttft_inf =
        "switchboard_gateway_time_to_first_token_seconds_bucket{source=\"provider\",le=\"+Inf\"}";
    let before = metrics(&http).await;
    assert_eq!(series(&before, in_flight), 0, "{before}");
    assert_eq!(series(&before, "switchboard_gateway_max_in_flight"), 7);

    let response = reqwest::Client::new()
        .post(format!("{http}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({ "model": "gpt", "stream": true,
            "messages": [{ "role": "user", "content": "Hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The head left with the first chunk: the stream is being served, its first token counted.
    let during = metrics(&http).await;
    assert_eq!(series(&during, in_flight), 1, "{during}");
    assert!(
        series(&during, ttft) > series(&before, ttft),
        "{ttft} did not move:\n{during}"
    );
    assert_eq!(series(&during, ttft_inf), series(&during, ttft));

    gate.add_permits(1);
    let text = response.text().await.unwrap();
    assert!(text.contains("Hello"), "{text}");
    assert!(text.contains("[DONE]"), "{text}");
    // The permit goes back when the stream's pump ends, just after the last frame.
    let mut after = metrics(&http).await;
    for _ in 0..200 {
        if series(&after, in_flight) == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        after = metrics(&http).await;
    }
    assert_eq!(series(&after, in_flight), 0, "{after}");
    // One stream, one observation.
    assert_eq!(series(&after, ttft), series(&during, ttft));

    stop.cancel();
    nats.cleanup().await;
}
