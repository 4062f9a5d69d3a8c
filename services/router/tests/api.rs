//! API tests: the real router `App` on port 0 in front of fake providers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashMap, time::Duration};

use futures::StreamExt;
use switchboard_fake_provider::{ApiFormat, FakeConfig, FakeProvider, embeddings};
use switchboard_proto::{
    chat::v1::{
        ChatChunk, ChatRequest, FinishReason, Message, Role, RouteInfo, SamplingParams,
        ThinkingConfig, Tool, ToolCall, ToolCallDelta,
    },
    router::v1::{
        Caller, EmbedRequest, ListModelsRequest, RouteRequest, RouteResponse, RouteStreamRequest,
        route_stream_response::Event, router_service_client::RouterServiceClient,
    },
};
use switchboard_router::{App, Config, ProviderConfig, ProviderKind, RouteConfig, TargetConfig};
use switchboard_status::{ErrorCode, status_metadata};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

const PRIMARY: &str = "primary-model";
const BACKUP: &str = "backup-model";

struct Harness {
    fake: FakeProvider,
    backup: FakeProvider,
    client: RouterServiceClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut Config)) -> Harness {
        let fake_config = FakeConfig {
            addr: "127.0.0.1:0".to_owned(),
            ..FakeConfig::default()
        };
        let fake = FakeProvider::start(fake_config.clone()).await.unwrap();
        let backup = FakeProvider::start(fake_config).await.unwrap();
        let mut config = Config {
            grpc_addr: "127.0.0.1:0".to_owned(),
            retry_backoff_ms: 1,
            max_retries: 1,
            ..Config::default()
        };
        config.providers.insert(
            "fake".to_owned(),
            ProviderConfig::openai(fake.base_url(), Some("sk-fake")),
        );
        config.providers.insert(
            "backup".to_owned(),
            ProviderConfig::openai(backup.base_url(), Some("sk-backup")),
        );
        config.providers.insert(
            "down".to_owned(),
            ProviderConfig::openai("http://127.0.0.1:1/v1", None),
        );
        config.routes = vec![
            RouteConfig::new(
                "chat".to_owned(),
                vec![
                    TargetConfig::new("fake", PRIMARY),
                    TargetConfig::new("backup", BACKUP),
                ],
            ),
            RouteConfig::new(
                "unreachable".to_owned(),
                vec![
                    TargetConfig::new("down", "m"),
                    TargetConfig::new("fake", PRIMARY),
                ],
            ),
        ];
        adjust(&mut config);
        let app = App::build(config).await.unwrap();
        let url = switchboard_grpc::url_of(app.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let client = RouterServiceClient::connect(url).await.unwrap();
        Harness {
            fake,
            backup,
            client,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn route(&self, request: ChatRequest) -> Result<RouteResponse, Status> {
        let request = RouteRequest {
            request: Some(request),
            caller: Some(Caller {
                request_id: "req-1".to_owned(),
                app: "app".to_owned(),
                team: "team".to_owned(),
            }),
            allowance: None,
        };
        self.client
            .clone()
            .route(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Chunks and route info of a stream, plus the error that ended it, if any.
    async fn stream(
        &self,
        request: ChatRequest,
    ) -> Result<(Vec<ChatChunk>, Option<RouteInfo>, Option<Status>), Status> {
        let request = RouteStreamRequest {
            request: Some(request),
            caller: Some(Caller {
                request_id: "req-2".to_owned(),
                ..Default::default()
            }),
            allowance: None,
        };
        let mut stream = self
            .client
            .clone()
            .route_stream(request)
            .await?
            .into_inner();
        let (mut chunks, mut info, mut error) = (Vec::new(), None, None);
        while let Some(item) = stream.next().await {
            match item {
                Ok(message) => match message.event.unwrap() {
                    Event::Chunk(chunk) => {
                        assert!(info.is_none(), "no chunk after the route info");
                        chunks.push(chunk);
                    }
                    Event::Route(route) => info = Some(route),
                    // A cut's account of its attempts (tests/cut_usage.rs).
                    Event::Interrupted(_) => {}
                },
                Err(status) => {
                    error = Some(status);
                    break;
                }
            }
        }
        Ok((chunks, info, error))
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        self.fake.shutdown().await;
        self.backup.shutdown().await;
    }
}

fn chat(model: &str, text: &str) -> ChatRequest {
    ChatRequest {
        model: model.to_owned(),
        messages: vec![Message::text(Role::User, text)],
        ..Default::default()
    }
}

fn with_tool(mut request: ChatRequest) -> ChatRequest {
    request.tools = vec![Tool {
        name: "get_weather".to_owned(),
        description: "weather of a city".to_owned(),
        parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}}}"#.to_owned(),
        strict: false,
    }];
    request
}

fn text_of(response: &RouteResponse) -> String {
    response.response.as_ref().unwrap().choices[0]
        .message
        .as_ref()
        .unwrap()
        .joined_text()
}

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

fn codes(info: &RouteInfo) -> Vec<(String, u32)> {
    info.attempts
        .iter()
        .map(|a| (a.error_code.clone(), a.http_status))
        .collect()
}

fn streamed_text(chunks: &[ChatChunk]) -> String {
    chunks
        .iter()
        .flat_map(|c| c.choices.iter().map(|d| d.content.clone()))
        .collect()
}

#[tokio::test]
async fn unary_success_with_route_info() {
    let h = Harness::start().await;
    let response = h.route(chat("chat", "hello world")).await.unwrap();
    assert_eq!(text_of(&response), "echo: hello world");
    let answer = response.response.as_ref().unwrap();
    assert_eq!(answer.id, "req-1");
    assert_eq!(answer.model, PRIMARY);
    assert_eq!(answer.choices[0].finish_reason, FinishReason::Stop as i32);
    let usage = answer.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (2, 3, 5)
    );
    let info = response.route.unwrap();
    assert_eq!(info.route, "chat");
    assert_eq!(info.provider, "fake");
    assert_eq!(info.model, PRIMARY);
    assert_eq!(info.target, "fake/primary-model");
    assert_eq!(info.attempt_count, 1);
    assert_eq!(codes(&info), vec![(String::new(), 200)]);
    assert_eq!(info.attempts[0].usage.unwrap().total_tokens, 5);
    let received = h.fake.requests();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].authorization.as_deref(), Some("Bearer sk-fake"));
    assert_eq!(received[0].model, PRIMARY);
    assert!(!received[0].stream);
    h.shutdown().await;
}

#[tokio::test]
async fn falls_back_when_the_first_target_answers_500() {
    let h = Harness::start().await;
    h.fake.fail_next(PRIMARY, 500, 2);
    let response = h.route(chat("chat", "hi")).await.unwrap();
    assert_eq!(text_of(&response), "echo: hi");
    let info = response.route.unwrap();
    assert_eq!(info.target, "backup/backup-model");
    assert_eq!(info.attempt_count, 3);
    assert_eq!(
        codes(&info),
        vec![
            ("UPSTREAM_ERROR".to_owned(), 500),
            ("UPSTREAM_ERROR".to_owned(), 500),
            (String::new(), 200)
        ]
    );
    assert_eq!(info.attempts[0].target, "fake/primary-model");
    assert_eq!(h.fake.request_count(PRIMARY), 2);
    assert_eq!(
        h.backup.requests()[0].authorization.as_deref(),
        Some("Bearer sk-backup")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn falls_back_when_the_first_target_answers_429() {
    let h = Harness::start().await;
    h.fake.fail_next(PRIMARY, 429, 2);
    let response = h.route(chat("chat", "hi")).await.unwrap();
    let info = response.route.unwrap();
    assert_eq!(info.provider, "backup");
    assert_eq!(
        codes(&info),
        vec![
            ("RATE_LIMITED".to_owned(), 429),
            ("RATE_LIMITED".to_owned(), 429),
            (String::new(), 200)
        ]
    );
    h.shutdown().await;
}

#[tokio::test]
async fn retries_the_same_target() {
    let h = Harness::start().await;
    h.fake.fail_next(PRIMARY, 503, 1);
    let response = h.route(chat("chat", "again")).await.unwrap();
    let info = response.route.unwrap();
    assert_eq!(info.target, "fake/primary-model");
    assert_eq!(
        codes(&info),
        vec![("UPSTREAM_ERROR".to_owned(), 503), (String::new(), 200)]
    );
    assert_eq!(h.fake.request_count(PRIMARY), 2);
    assert_eq!(h.backup.request_count(BACKUP), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn bad_request_is_not_retried_and_maps_to_upstream_rejected() {
    let h = Harness::start().await;
    h.fake.fail_next(PRIMARY, 400, 1);
    let status = h.route(chat("chat", "hi")).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "UPSTREAM_REJECTED");
    assert_eq!(ErrorCode::from_status(&status), ErrorCode::UpstreamRejected);
    assert_eq!(
        status_metadata(&status)
            .get("http_status")
            .map(String::as_str),
        Some("400")
    );
    assert_eq!(h.fake.request_count(PRIMARY), 1);
    assert_eq!(h.backup.request_count(BACKUP), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn authentication_error_falls_back_without_retry() {
    let h = Harness::start().await;
    h.fake.fail_next(PRIMARY, 401, 5);
    let info = h.route(chat("chat", "hi")).await.unwrap().route.unwrap();
    assert_eq!(
        codes(&info),
        vec![
            ("AUTHENTICATION_ERROR".to_owned(), 401),
            (String::new(), 200)
        ]
    );
    assert_eq!(h.fake.request_count(PRIMARY), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn unknown_route_is_not_found() {
    let h = Harness::start().await;
    let status = h.route(chat("no-such-model", "hi")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(reason(&status), "NOT_FOUND");
    assert_eq!(
        status_metadata(&status).get("model").map(String::as_str),
        Some("no-such-model")
    );
    let status = h
        .stream(chat("no-such-model", "hi"))
        .await
        .map(|(_, _, e)| e);
    let status = match status {
        Err(status) | Ok(Some(status)) => status,
        Ok(None) => panic!("stream of an unknown route succeeded"),
    };
    assert_eq!(status.code(), Code::NotFound);
    h.shutdown().await;
}

#[tokio::test]
async fn all_targets_down_is_upstream_unavailable() {
    let h = Harness::start().await;
    h.fake.fail_next(PRIMARY, 500, 10);
    h.backup.fail_next(BACKUP, 502, 10);
    let status = h
        .route(chat("chat", "very secret prompt"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "UPSTREAM_UNAVAILABLE");
    let metadata = status_metadata(&status);
    assert_eq!(metadata.get("attempts").map(String::as_str), Some("4"));
    assert!(
        metadata
            .get("last_error")
            .unwrap()
            .contains("UPSTREAM_ERROR"),
        "{metadata:?}"
    );
    assert!(
        status
            .message()
            .contains("fake/primary-model UPSTREAM_ERROR (HTTP 500)"),
        "{}",
        status.message()
    );
    assert!(
        status
            .message()
            .contains("backup/backup-model UPSTREAM_ERROR (HTTP 502)"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains("secret"));
    h.shutdown().await;
}

#[tokio::test]
async fn connection_errors_are_retried_then_fall_back() {
    let h = Harness::start().await;
    let info = h
        .route(chat("unreachable", "hi"))
        .await
        .unwrap()
        .route
        .unwrap();
    assert_eq!(
        codes(&info),
        vec![
            ("CONNECTION_ERROR".to_owned(), 0),
            ("CONNECTION_ERROR".to_owned(), 0),
            (String::new(), 200)
        ]
    );
    h.shutdown().await;
}

#[tokio::test]
async fn attempt_timeout_falls_back() {
    let h = Harness::start_with(|config| {
        config.attempt_timeout_ms = 100;
        config.max_retries = 0;
    })
    .await;
    h.fake.set_latency(PRIMARY, 2_000);
    let info = h.route(chat("chat", "hi")).await.unwrap().route.unwrap();
    assert_eq!(
        codes(&info),
        vec![("TIMEOUT".to_owned(), 0), (String::new(), 200)]
    );
    h.shutdown().await;
}

#[tokio::test]
async fn streams_chunks_in_order_with_usage_and_route_info() {
    let h = Harness::start().await;
    let (chunks, info, error) = h.stream(chat("chat", "stream me please")).await.unwrap();
    assert!(error.is_none(), "{error:?}");
    assert_eq!(streamed_text(&chunks), "echo: stream me please");
    assert_eq!(chunks[0].choices[0].role, Role::Assistant as i32);
    assert!(chunks.iter().all(|c| c.id == "req-2"));
    let finish: Vec<i32> = chunks
        .iter()
        .flat_map(|c| c.choices.iter().map(|d| d.finish_reason))
        .filter(|f| *f != 0)
        .collect();
    assert_eq!(finish, vec![FinishReason::Stop as i32]);
    let last = chunks.last().unwrap();
    assert_eq!(last.usage.unwrap().total_tokens, 3 + 4);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c.usage.is_none()));
    let info = info.expect("route info after the last chunk");
    assert_eq!(info.target, "fake/primary-model");
    assert_eq!(info.attempt_count, 1);
    assert_eq!(info.attempts[0].usage.unwrap().total_tokens, 7);
    let received = &h.fake.requests()[0];
    assert!(received.stream);
    assert_eq!(received.body["stream_options"]["include_usage"], true);
    h.shutdown().await;
}

#[tokio::test]
async fn stream_failure_before_the_first_chunk_fails_over() {
    let h = Harness::start().await;
    h.fake.fail_stream_after(PRIMARY, 0, 1);
    h.fake.fail_next(PRIMARY, 500, 1);
    let (chunks, info, error) = h.stream(chat("chat", "hi there")).await.unwrap();
    assert!(error.is_none(), "{error:?}");
    assert_eq!(streamed_text(&chunks), "echo: hi there");
    let info = info.unwrap();
    assert_eq!(info.target, "backup/backup-model");
    assert_eq!(
        codes(&info),
        // An injected HTTP failure is served before an injected stream failure.
        vec![
            ("UPSTREAM_ERROR".to_owned(), 500),
            ("STREAM_INTERRUPTED".to_owned(), 0),
            (String::new(), 200)
        ]
    );
    h.shutdown().await;
}

#[tokio::test]
async fn a_streams_head_names_the_deployment_it_committed_to() {
    use switchboard_status::serving;
    let h = Harness::start().await;
    // The primary fails before its first chunk; the backup serves, after three attempts.
    h.fake.fail_next(PRIMARY, 500, 2);
    let response = h
        .client
        .clone()
        .route_stream(RouteStreamRequest {
            request: Some(chat("chat", "hi there")),
            caller: Some(Caller {
                request_id: "req-3".to_owned(),
                ..Default::default()
            }),
            allowance: None,
        })
        .await
        .unwrap();
    let head = |name: &str| {
        response
            .metadata()
            .get(name)
            .map(|value| value.to_str().unwrap().to_owned())
    };
    assert_eq!(head(serving::PROVIDER).as_deref(), Some("backup"));
    assert_eq!(head(serving::MODEL).as_deref(), Some(BACKUP));
    assert_eq!(
        head(serving::TARGET).as_deref(),
        Some("backup/backup-model")
    );
    assert_eq!(head(serving::ATTEMPTS).as_deref(), Some("3"));
    let mut stream = response.into_inner();
    let mut routed = None;
    while let Some(message) = stream.next().await {
        if let Some(Event::Route(route)) = message.unwrap().event {
            routed = Some(route);
        }
    }
    // The same deployment the final route info names.
    let routed = routed.unwrap();
    assert_eq!(routed.target, "backup/backup-model");
    assert_eq!(routed.attempt_count, 3);
    h.shutdown().await;
}

#[tokio::test]
async fn stream_failure_after_the_first_chunk_ends_with_an_error() {
    let h = Harness::start().await;
    h.fake.fail_stream_after(PRIMARY, 2, 1);
    let (chunks, info, error) = h
        .stream(chat("chat", "one two three four five six"))
        .await
        .unwrap();
    assert!(info.is_none());
    let status = error.expect("the stream must end with an error status");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "UPSTREAM_UNAVAILABLE");
    assert_eq!(chunks.len(), 3, "role chunk and two content chunks");
    assert_eq!(status.message(), "stream interrupted after 3 chunks");
    assert_eq!(h.backup.request_count(BACKUP), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn tool_calls_round_trip() {
    let h = Harness::start().await;
    let response = h
        .route(with_tool(chat("chat", "please call tool")))
        .await
        .unwrap();
    let choice = &response.response.as_ref().unwrap().choices[0];
    assert_eq!(choice.finish_reason, FinishReason::ToolCalls as i32);
    assert_eq!(
        choice.message.as_ref().unwrap().tool_calls,
        vec![ToolCall {
            id: "call_1".to_owned(),
            name: "get_weather".to_owned(),
            arguments_json: "{}".to_owned(),
            signature: String::new(),
        }]
    );
    let sent = &h.fake.requests()[0].body;
    assert_eq!(sent["tools"][0]["type"], "function");
    assert_eq!(sent["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(
        sent["tools"][0]["function"]["parameters"]["properties"]["city"]["type"],
        "string"
    );

    // The tool result goes back as a tool message.
    let mut follow_up = with_tool(chat("chat", "please call tool"));
    let mut assistant = Message::text(Role::Assistant, "");
    assistant.content.clear();
    assistant.tool_calls = choice.message.as_ref().unwrap().tool_calls.clone();
    let mut result = Message::text(Role::Tool, "sunny");
    result.tool_call_id = "call_1".to_owned();
    follow_up
        .messages
        .extend([assistant, result, Message::text(Role::User, "thanks")]);
    let response = h.route(follow_up).await.unwrap();
    assert_eq!(text_of(&response), "echo: thanks");
    let sent = &h.fake.requests()[1].body;
    assert_eq!(sent["messages"][1]["tool_calls"][0]["id"], "call_1");
    assert_eq!(sent["messages"][2]["tool_call_id"], "call_1");

    let (chunks, info, error) = h
        .stream(with_tool(chat("chat", "call tool now")))
        .await
        .unwrap();
    assert!(error.is_none() && info.is_some());
    let deltas: Vec<ToolCallDelta> = chunks
        .iter()
        .flat_map(|c| c.choices.iter().flat_map(|d| d.tool_calls.clone()))
        .collect();
    assert_eq!(deltas[0].id, "call_1");
    assert_eq!(deltas[0].name, "get_weather");
    assert!(deltas.iter().all(|d| d.index == 0));
    assert_eq!(
        deltas
            .iter()
            .map(|d| d.arguments_delta.as_str())
            .collect::<String>(),
        "{}"
    );
    let finish: Vec<i32> = chunks
        .iter()
        .flat_map(|c| c.choices.iter().map(|d| d.finish_reason))
        .filter(|f| *f != 0)
        .collect();
    assert_eq!(finish, vec![FinishReason::ToolCalls as i32]);
    h.shutdown().await;
}

#[tokio::test]
async fn tags_are_not_forwarded_but_sampling_is() {
    let h = Harness::start().await;
    let mut request = chat("chat", "one two three four");
    request.tags = HashMap::from([("customer".to_owned(), "tag-value-123".to_owned())]);
    request.sampling = Some(SamplingParams {
        max_tokens: Some(2),
        seed: Some(3),
        ..Default::default()
    });
    request.user = "end-user".to_owned();
    let response = h.route(request).await.unwrap();
    assert_eq!(text_of(&response), "echo: one");
    assert_eq!(
        response.response.unwrap().choices[0].finish_reason,
        FinishReason::Length as i32
    );
    let sent = &h.fake.requests()[0].body;
    assert!(!sent.to_string().contains("tag-value-123"));
    assert!(sent.get("tags").is_none() && sent.get("metadata").is_none());
    assert_eq!(sent["max_tokens"], 2);
    assert_eq!(sent["seed"], 3);
    assert_eq!(sent["user"], "end-user");
    h.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_are_rejected_before_any_attempt() {
    let h = Harness::start().await;
    let mut request = with_tool(chat("chat", "hi"));
    request.tools[0].parameters_json = "{broken".to_owned();
    let status = h.route(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status_metadata(&status).get("field").map(String::as_str),
        Some("request.tools[0].parameters_json")
    );
    assert!(h.fake.requests().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn list_models_returns_the_routes() {
    let h = Harness::start().await;
    let models = h
        .client
        .clone()
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let ids: Vec<(&str, &str)> = models
        .iter()
        .map(|m| (m.id.as_str(), m.owned_by.as_str()))
        .collect();
    assert_eq!(
        ids,
        vec![("chat", "switchboard"), ("unreachable", "switchboard")]
    );
    h.shutdown().await;
}

#[tokio::test]
async fn caller_deadline_bounds_the_request() {
    let h = Harness::start_with(|config| config.max_retries = 0).await;
    h.fake.set_latency(PRIMARY, 5_000);
    h.backup.set_latency(BACKUP, 5_000);
    let mut request = tonic::Request::new(RouteRequest {
        request: Some(chat("chat", "hi")),
        caller: None,
        allowance: None,
    });
    request.set_timeout(Duration::from_millis(200));
    let status = h.client.clone().route(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert_eq!(
        h.backup.request_count(BACKUP),
        0,
        "no fallback after the deadline"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn the_router_answers_a_caller_deadline_with_its_attempts() {
    let h = Harness::start_with(|config| config.max_retries = 0).await;
    h.fake.set_latency(PRIMARY, 5_000);
    let mut request = tonic::Request::new(RouteRequest {
        request: Some(chat("chat", "hi")),
        caller: None,
        allowance: None,
    });
    request.set_timeout(Duration::from_millis(600));
    let status = h.client.clone().route(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(&status), "TIMEOUT");
    let metadata = status_metadata(&status);
    assert_eq!(metadata.get("attempts").map(String::as_str), Some("1"));
    assert!(metadata.get("last_error").unwrap().contains("TIMEOUT"));
    assert_eq!(h.backup.request_count(BACKUP), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_misses_the_caller_deadline_ends_with_a_timeout() {
    let h = Harness::start_with(|config| config.max_retries = 0).await;
    h.fake.set_latency(PRIMARY, 5_000);
    let mut request = tonic::Request::new(RouteStreamRequest {
        request: Some(chat("chat", "hi")),
        caller: None,
        allowance: None,
    });
    request.set_timeout(Duration::from_millis(400));
    // A stream that never started is answered with its status alone (the router's response head
    // waits for the first event).
    let status = h
        .client
        .clone()
        .route_stream(request)
        .await
        .expect_err("no token came before the deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(&status), "TIMEOUT");
    h.shutdown().await;
}

#[tokio::test]
async fn the_request_timeout_bounds_a_request_without_a_caller_deadline() {
    let h = Harness::start_with(|config| {
        config.max_retries = 3;
        config.request_timeout_ms = 300;
    })
    .await;
    h.fake.set_latency(PRIMARY, 5_000);
    let status = h.route(chat("chat", "hi")).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(h.fake.request_count(PRIMARY), 1);
    assert_eq!(h.backup.request_count(BACKUP), 0);
    h.shutdown().await;
}

/// A Gemini provider on the primary fake, and routes `gemini-embed` / `gemini-chat` /
/// `claude-chat` to it.
async fn start_with_gemini_and_anthropic() -> Harness {
    Harness::start_with(|config| {
        // The primary fake's root URL (its OpenAI base URL without `/v1`).
        let root = config.providers["fake"]
            .base_url
            .trim_end_matches("/v1")
            .to_owned();
        config.providers.insert(
            "gem".to_owned(),
            ProviderConfig::of_kind(ProviderKind::Gemini, root.clone(), Some("g-key")),
        );
        config.providers.insert(
            "claude".to_owned(),
            ProviderConfig::of_kind(ProviderKind::Anthropic, root, Some("a-key")),
        );
        config.routes.push(RouteConfig::new(
            "gemini-embed".to_owned(),
            vec![TargetConfig::new("gem", "text-embedding-004")],
        ));
        config.routes.push(RouteConfig::new(
            "gemini-chat".to_owned(),
            vec![TargetConfig::new("gem", "gemini-x")],
        ));
        config.routes.push(RouteConfig::new(
            "claude-chat".to_owned(),
            vec![TargetConfig::new("claude", "claude-x")],
        ));
    })
    .await
}

#[tokio::test]
async fn embed_routes_to_a_gemini_target_through_batch_embed_contents() {
    let h = start_with_gemini_and_anthropic().await;
    let inputs = vec![
        "first text".to_owned(),
        "the second, longer text".to_owned(),
    ];
    let response = h
        .client
        .clone()
        .embed(EmbedRequest {
            model: "gemini-embed".to_owned(),
            inputs: inputs.clone(),
            dimensions: Some(8),
            user: String::new(),
            caller: Some(Caller {
                request_id: "req-e".to_owned(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    // The fake's vectors are deterministic: the same as it gives any format for these texts.
    assert_eq!(response.embeddings.len(), 2);
    for (i, embedding) in response.embeddings.iter().enumerate() {
        assert_eq!(embedding.index, i as u32);
        assert_eq!(embedding.values, embeddings::vector(&inputs[i], 8));
    }
    assert_eq!(response.model, "text-embedding-004");
    // Gemini reports no usage: four characters a token, rounded up.
    let chars: usize = inputs.iter().map(String::len).sum();
    let usage = response.usage.unwrap();
    assert_eq!(usage.prompt_tokens as usize, chars.div_ceil(4));
    assert_eq!(usage.total_tokens, usage.prompt_tokens);
    assert_eq!(usage.completion_tokens, 0);
    let route = response.route.unwrap();
    assert_eq!(route.target, "gem/text-embedding-004");
    assert_eq!(route.provider, "gem");
    let received = h.fake.requests();
    let last = received.last().unwrap();
    assert_eq!(last.format, ApiFormat::Gemini);
    assert_eq!(last.model, "text-embedding-004");
    assert!(
        last.path
            .starts_with("/v1beta/models/text-embedding-004:batchEmbedContents"),
        "{}",
        last.path
    );
    assert_eq!(
        last.headers.get("x-goog-api-key").map(String::as_str),
        Some("g-key")
    );
    assert_eq!(
        last.body["requests"][1],
        serde_json::json!({ "model": "models/text-embedding-004",
            "content": { "parts": [{ "text": "the second, longer text" }] },
            "outputDimensionality": 8 })
    );
    h.shutdown().await;
}

#[tokio::test]
async fn top_k_reaches_anthropic_gemini_and_openai_compatible_targets() {
    let h = start_with_gemini_and_anthropic().await;
    let with_top_k = |model: &str| {
        let mut request = chat(model, "hello there");
        request.sampling = Some(SamplingParams {
            top_k: Some(7),
            max_tokens: Some(20),
            ..Default::default()
        });
        request
    };
    for route in ["chat", "gemini-chat", "claude-chat"] {
        let response = h.route(with_top_k(route)).await.unwrap();
        assert_eq!(text_of(&response), "echo: hello there", "{route}");
    }
    let received = h.fake.requests();
    let body_of = |format: ApiFormat| {
        received
            .iter()
            .find(|r| r.format == format)
            .map(|r| r.body.clone())
            .unwrap()
    };
    // The fake at 127.0.0.1 is an OpenAI-compatible server, not api.openai.com: it gets top_k.
    assert_eq!(body_of(ApiFormat::Openai)["top_k"], 7);
    assert_eq!(body_of(ApiFormat::Anthropic)["top_k"], 7);
    assert_eq!(body_of(ApiFormat::Gemini)["generationConfig"]["topK"], 7);
    h.shutdown().await;
}

/// Extended thinking end to end: enabled through `ChatRequest.thinking`, the Anthropic fake
/// answers with a signed thinking block (unary and streamed alike), and the block sent back in
/// the next turn passes the fake's signature check only when it is unchanged.
#[tokio::test]
async fn anthropic_thinking_round_trips_with_its_signature() {
    let h = start_with_gemini_and_anthropic().await;
    let ask = |messages: Vec<Message>| ChatRequest {
        model: "claude-chat".to_owned(),
        messages,
        sampling: Some(SamplingParams {
            max_tokens: Some(2048),
            ..Default::default()
        }),
        thinking: Some(ThinkingConfig {
            enabled: true,
            budget_tokens: 1024,
            ..Default::default()
        }),
        ..Default::default()
    };
    let question = Message::text(Role::User, "why is the sky blue");
    let response = h.route(ask(vec![question.clone()])).await.unwrap();
    let answer = response.response.unwrap();
    let message = answer.choices[0].message.clone().unwrap();
    assert_eq!(message.joined_text(), "echo: why is the sky blue");
    assert_eq!(message.thinking.len(), 1);
    let block = &message.thinking[0];
    assert_eq!(block.text, "thinking about: why is the sky blue");
    assert!(block.signature.starts_with("fakesig"), "{block:?}");
    let sent = h.fake.requests().last().unwrap().body.clone();
    assert_eq!(
        sent["thinking"],
        serde_json::json!({ "type": "enabled", "budget_tokens": 1024 })
    );

    // Streamed: the same block, in pieces, with its signature.
    let (chunks, _, error) = h.stream(ask(vec![question.clone()])).await.unwrap();
    assert!(error.is_none(), "{error:?}");
    let pieces: Vec<_> = chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .flat_map(|d| d.thinking.iter())
        .collect();
    assert!(pieces.iter().all(|p| p.index == 0));
    let text: String = pieces.iter().map(|p| p.text.as_str()).collect();
    let signature: String = pieces.iter().map(|p| p.signature.as_str()).collect();
    assert_eq!(
        (text.as_str(), signature.as_str()),
        (block.text.as_str(), block.signature.as_str())
    );
    let content: String = chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .map(|d| d.content.as_str())
        .collect();
    assert_eq!(content, "echo: why is the sky blue");

    // The next turn sends the block back unchanged, first in the assistant turn.
    let follow_up = Message::text(Role::User, "and at sunset");
    let response = h
        .route(ask(vec![
            question.clone(),
            message.clone(),
            follow_up.clone(),
        ]))
        .await
        .unwrap();
    assert_eq!(
        response.response.unwrap().choices[0]
            .message
            .as_ref()
            .unwrap()
            .joined_text(),
        "echo: and at sunset"
    );
    let sent = h.fake.requests().last().unwrap().body.clone();
    assert_eq!(
        sent["messages"][1]["content"][0],
        serde_json::json!({ "type": "thinking", "thinking": block.text,
                            "signature": block.signature })
    );
    // A block that was changed on the way fails the signature check: the request is rejected.
    let mut tampered = message.clone();
    tampered.thinking[0].text.push('!');
    let status = h
        .route(ask(vec![question, tampered, follow_up]))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "UPSTREAM_REJECTED", "{status:?}");
    h.shutdown().await;
}

/// Anthropic's `stop_sequence` comes back with the sequence (unary and streamed), and a tool
/// result's error flag reaches Anthropic as `is_error`.
#[tokio::test]
async fn anthropic_stop_sequence_and_tool_errors_cross_the_wire() {
    let h = start_with_gemini_and_anthropic().await;
    let mut request = chat("claude-chat", "tell me a story END of it");
    request.sampling = Some(SamplingParams {
        stop: vec!["END".to_owned(), "never".to_owned()],
        max_tokens: Some(100),
        ..Default::default()
    });
    let answer = h.route(request.clone()).await.unwrap().response.unwrap();
    assert_eq!(answer.choices[0].finish_reason, FinishReason::Stop as i32);
    let message = answer.choices[0].message.as_ref().unwrap();
    assert_eq!(message.joined_text(), "echo: tell me a story ");
    assert_eq!(message.stop_sequence, "END");
    let (chunks, _, error) = h.stream(request).await.unwrap();
    assert!(error.is_none(), "{error:?}");
    let last = chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .find(|d| d.finish_reason != FinishReason::Unspecified as i32)
        .unwrap();
    assert_eq!(last.finish_reason, FinishReason::Stop as i32);
    assert_eq!(last.stop_sequence, "END");
    // Without a matched sequence: a plain stop, no sequence.
    let plain = h.route(chat("claude-chat", "hello")).await.unwrap();
    let message = plain.response.unwrap().choices[0].message.clone().unwrap();
    assert!(message.stop_sequence.is_empty());

    let mut assistant = Message::text(Role::Assistant, "");
    assistant.content.clear();
    assistant.tool_calls = vec![ToolCall {
        id: "toolu_1".to_owned(),
        name: "weather".to_owned(),
        arguments_json: "{}".to_owned(),
        signature: String::new(),
    }];
    let mut result = Message::text(Role::Tool, "service down");
    result.tool_call_id = "toolu_1".to_owned();
    result.tool_error = true;
    let request = ChatRequest {
        model: "claude-chat".to_owned(),
        messages: vec![
            Message::text(Role::User, "weather please"),
            assistant,
            result,
        ],
        tools: vec![Tool {
            name: "weather".to_owned(),
            parameters_json: r#"{"type":"object"}"#.to_owned(),
            ..Default::default()
        }],
        ..Default::default()
    };
    h.route(request).await.unwrap();
    let sent = h.fake.requests().last().unwrap().body.clone();
    assert_eq!(
        sent["messages"][2]["content"][0],
        serde_json::json!({ "type": "tool_result", "tool_use_id": "toolu_1", "is_error": true,
                            "content": "service down" })
    );
    h.shutdown().await;
}
