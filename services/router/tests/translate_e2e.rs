//! End to end per provider format: the real router `App` in front of the fake provider speaking
//! OpenAI, Azure OpenAI, Anthropic and Gemini, unary and streamed, text and tools (tool-call
//! arguments streamed in pieces), a tool round trip, and streams that break.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::StreamExt;
use serde_json::{Value, json};
use switchboard_fake_provider::{ApiFormat, FakeConfig, FakeProvider, Fault};
use switchboard_proto::{
    chat::v1::{
        ChatChunk, ChatRequest, FinishReason, Message, Role, RouteInfo, Tool, ToolCall, Usage,
    },
    router::v1::{
        Caller, RouteRequest, RouteResponse, RouteStreamRequest, route_stream_response::Event,
        router_service_client::RouterServiceClient,
    },
};
use switchboard_router::{App, Config};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Status, transport::Channel};

/// (route, provider model, format) of each provider kind.
const FORMATS: [(&str, &str, ApiFormat); 4] = [
    ("via-openai", "m-openai", ApiFormat::Openai),
    ("via-azure", "m-azure", ApiFormat::Azure),
    ("via-anthropic", "m-anthropic", ApiFormat::Anthropic),
    ("via-gemini", "m-gemini", ApiFormat::Gemini),
];

struct Harness {
    fake: FakeProvider,
    client: RouterServiceClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Harness {
    async fn start() -> Harness {
        let fake = FakeProvider::start(FakeConfig {
            addr: "127.0.0.1:0".to_owned(),
            ..FakeConfig::default()
        })
        .await
        .unwrap();
        let (v1, root) = (fake.base_url(), fake.root_url());
        let text = format!(
            r#"
[router]
grpc_addr = "127.0.0.1:0"
max_retries = 0
retry_backoff_ms = 1
[router.providers.oa]
kind = "openai"
base_url = "{v1}"
api_key_env = "OA_KEY"
[router.providers.az]
kind = "azure"
base_url = "{root}"
api_version = "2024-10-21"
api_key_env = "AZ_KEY"
[router.providers.claude]
kind = "anthropic"
base_url = "{root}"
api_key_env = "ANT_KEY"
default_max_tokens = 512
[router.providers.gem]
kind = "gemini"
base_url = "{root}"
api_key_env = "GEM_KEY"
[[router.routes]]
name = "via-openai"
targets = [{{ provider = "oa", model = "m-openai" }}]
[[router.routes]]
name = "via-azure"
targets = [{{ provider = "az", model = "m-azure" }}]
[[router.routes]]
name = "via-anthropic"
targets = [{{ provider = "claude", model = "m-anthropic" }}]
[[router.routes]]
name = "via-gemini"
targets = [{{ provider = "gem", model = "m-gemini" }}]
[[router.routes]]
name = "small-then-large"
targets = [{{ provider = "claude", model = "m-small" }}, {{ provider = "gem", model = "m-large" }}]
"#
        );
        let mut config: Config = switchboard_config::Source::from_toml(&text)
            .unwrap()
            .section("router")
            .unwrap();
        let missing = config.resolve_api_keys(|var| Some(format!("key-{var}")));
        assert!(missing.is_empty());
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
    ) -> (Vec<ChatChunk>, Option<RouteInfo>, Option<Status>) {
        let request = RouteStreamRequest {
            request: Some(request),
            caller: Some(Caller {
                request_id: "req-2".to_owned(),
                ..Default::default()
            }),
            allowance: None,
        };
        let mut stream = match self.client.clone().route_stream(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return (Vec::new(), None, Some(status)),
        };
        let (mut chunks, mut info, mut error) = (Vec::new(), None, None);
        while let Some(item) = stream.next().await {
            match item {
                Ok(message) => match message.event.unwrap() {
                    Event::Chunk(chunk) => chunks.push(chunk),
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
        (chunks, info, error)
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        self.fake.shutdown().await;
    }
}

fn chat(route: &str, text: &str) -> ChatRequest {
    ChatRequest {
        model: route.to_owned(),
        messages: vec![
            Message::text(Role::System, "be brief"),
            Message::text(Role::User, text),
        ],
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

fn usage_of(chunks: &[ChatChunk]) -> Option<Usage> {
    chunks.iter().rev().find_map(|c| c.usage)
}

fn finishes(chunks: &[ChatChunk]) -> Vec<i32> {
    chunks
        .iter()
        .flat_map(|c| c.choices.iter().map(|d| d.finish_reason))
        .filter(|f| *f != 0)
        .collect()
}

/// The auth header each format sends, and its value.
fn auth_header(format: ApiFormat) -> (&'static str, &'static str) {
    match format {
        ApiFormat::Openai => ("authorization", "Bearer key-OA_KEY"),
        ApiFormat::Azure => ("api-key", "key-AZ_KEY"),
        ApiFormat::Anthropic => ("x-api-key", "key-ANT_KEY"),
        ApiFormat::Gemini => ("x-goog-api-key", "key-GEM_KEY"),
    }
}

#[tokio::test]
async fn text_unary_and_streamed_in_every_format() {
    let h = Harness::start().await;
    for (route, model, format) in FORMATS {
        let response = h.route(chat(route, "hello there")).await.unwrap();
        let answer = response.response.unwrap();
        let choice = &answer.choices[0];
        assert_eq!(
            choice.message.as_ref().unwrap().joined_text(),
            "echo: hello there",
            "{route}"
        );
        assert_eq!(choice.finish_reason, FinishReason::Stop as i32, "{route}");
        let usage = answer.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens
            ),
            (4, 3, 7),
            "{route}: the system prompt reached the provider"
        );
        assert_eq!(response.route.unwrap().model, model);
        let sent = h.fake.requests().pop().unwrap();
        assert_eq!(sent.format, format, "{route}");
        assert_eq!(sent.model, model);
        let (name, value) = auth_header(format);
        assert_eq!(
            sent.headers.get(name).map(String::as_str),
            Some(value),
            "{route}"
        );
        if format == ApiFormat::Anthropic {
            assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
            assert_eq!(sent.body["max_tokens"], 512, "the provider's default");
            assert_eq!(sent.body["system"], "be brief");
        }

        let (chunks, info, error) = h.stream(chat(route, "stream this please")).await;
        assert!(error.is_none(), "{route}: {error:?}");
        assert!(info.is_some());
        let text: String = chunks
            .iter()
            .flat_map(|c| c.choices.iter().map(|d| d.content.as_str()))
            .collect();
        assert_eq!(text, "echo: stream this please", "{route}");
        assert!(chunks.len() > 3, "{route}: streamed in pieces");
        assert_eq!(
            finishes(&chunks),
            vec![FinishReason::Stop as i32],
            "{route}"
        );
        let usage = usage_of(&chunks).unwrap_or_else(|| panic!("{route}: usage"));
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (5, 4),
            "{route}"
        );
        assert!(h.fake.requests().pop().unwrap().stream);
    }
    h.shutdown().await;
}

#[tokio::test]
async fn tool_calls_in_every_format() {
    let h = Harness::start().await;
    for (route, _, format) in FORMATS {
        let ask = with_tool(chat(route, r#"please call tool {"city":"Paris"}"#));
        let response = h.route(ask.clone()).await.unwrap();
        let choice = &response.response.unwrap().choices[0];
        assert_eq!(
            choice.finish_reason,
            FinishReason::ToolCalls as i32,
            "{route}"
        );
        let calls = choice.message.as_ref().unwrap().tool_calls.clone();
        assert_eq!(calls.len(), 1, "{route}");
        assert_eq!(calls[0].name, "get_weather");
        assert!(!calls[0].id.is_empty(), "{route}: a call has an id");
        let arguments: Value = serde_json::from_str(&calls[0].arguments_json).unwrap();
        assert_eq!(arguments, json!({ "city": "Paris" }), "{route}");

        // The result goes back in the format's own shape; the fake checks it answers the call.
        let mut follow_up = ask.clone();
        let mut assistant = Message::text(Role::Assistant, "");
        assistant.content.clear();
        assistant.tool_calls = calls.clone();
        let mut result = Message::text(Role::Tool, "sunny");
        result.tool_call_id = calls[0].id.clone();
        follow_up
            .messages
            .extend([assistant, result, Message::text(Role::User, "thanks")]);
        let response = h.route(follow_up).await.unwrap();
        let answer = response.response.unwrap();
        assert_eq!(
            answer.choices[0].message.as_ref().unwrap().joined_text(),
            "echo: thanks",
            "{route}"
        );
        assert!(
            answer.usage.unwrap().prompt_tokens >= 6,
            "{route}: system, question, result and thanks are all counted"
        );

        // Streamed: the arguments arrive in pieces (Gemini sends a call whole).
        let (chunks, _, error) = h.stream(ask).await;
        assert!(error.is_none(), "{route}: {error:?}");
        let deltas: Vec<_> = chunks
            .iter()
            .flat_map(|c| c.choices.iter().flat_map(|d| d.tool_calls.clone()))
            .collect();
        assert_eq!(deltas[0].name, "get_weather", "{route}");
        assert_eq!(deltas[0].id, calls[0].id, "{route}");
        assert!(deltas.iter().all(|d| d.index == 0), "{route}");
        let streamed: String = deltas.iter().map(|d| d.arguments_delta.as_str()).collect();
        assert_eq!(
            serde_json::from_str::<Value>(&streamed).unwrap(),
            json!({ "city": "Paris" }),
            "{route}"
        );
        let pieces = deltas
            .iter()
            .filter(|d| !d.arguments_delta.is_empty())
            .count();
        if format == ApiFormat::Gemini {
            assert_eq!(pieces, 1);
        } else {
            assert!(pieces > 1, "{route}: arguments split across chunks");
        }
        assert_eq!(
            finishes(&chunks),
            vec![FinishReason::ToolCalls as i32],
            "{route}"
        );
    }
    h.shutdown().await;
}

#[tokio::test]
async fn parallel_tool_calls_keep_their_indexes() {
    let h = Harness::start().await;
    for (route, _, _) in FORMATS {
        let mut ask = with_tool(chat(route, "call every tool {\"q\":1}"));
        ask.tools.push(Tool {
            name: "get_time".to_owned(),
            ..Default::default()
        });
        let response = h.route(ask.clone()).await.unwrap();
        let calls: Vec<ToolCall> = response.response.unwrap().choices[0]
            .message
            .clone()
            .unwrap()
            .tool_calls;
        let names: Vec<&str> = calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["get_weather", "get_time"], "{route}");
        assert_ne!(calls[0].id, calls[1].id);
        let (chunks, _, error) = h.stream(ask).await;
        assert!(error.is_none(), "{route}: {error:?}");
        let mut arguments = [String::new(), String::new()];
        for delta in chunks
            .iter()
            .flat_map(|c| c.choices.iter().flat_map(|d| d.tool_calls.iter()))
        {
            arguments[delta.index as usize].push_str(&delta.arguments_delta);
        }
        assert_eq!(arguments, ["{\"q\":1}", "{\"q\":1}"], "{route}");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn broken_streams_never_finish_cleanly_in_any_format() {
    let h = Harness::start().await;
    for (route, model, _) in FORMATS {
        // Cut after the opening events and two more: an error, never a clean end.
        h.fake.fail_stream_after(model, 2, 1);
        let (chunks, info, error) = h.stream(chat(route, "one two three four five six")).await;
        assert!(error.is_some(), "{route}: a cut stream ends with an error");
        assert!(info.is_none(), "{route}");
        assert!(finishes(&chunks).is_empty(), "{route}");

        // Cut after the opening events alone (OpenAI's role delta, Anthropic's message_start):
        // nothing of the answer was forwarded, the attempt failed before committing.
        h.fake.inject(model, Fault::OpeningThenCut, 1);
        let (chunks, info, error) = h.stream(chat(route, "one two three")).await;
        assert!(chunks.is_empty(), "{route}: {chunks:?}");
        assert!(info.is_none(), "{route}");
        let error = error.unwrap();
        assert!(
            error.message().contains("STREAM_INTERRUPTED") && !error.message().contains("after"),
            "{route}: {error:?}"
        );

        // A malformed event mid-stream.
        h.fake.inject(model, Fault::MalformedSse, 1);
        let (_, info, error) = h.stream(chat(route, "one two three")).await;
        assert!(
            error.is_some() && info.is_none(),
            "{route}: malformed event"
        );

        // A proxy's HTML page instead of the answer.
        h.fake.inject(model, Fault::WrongContentType, 1);
        let error = h.route(chat(route, "x")).await.unwrap_err();
        assert!(
            error.message().contains("PROTOCOL_ERROR"),
            "{route}: {error:?}"
        );
    }
    h.shutdown().await;
}

#[tokio::test]
async fn context_length_falls_over_to_a_target_of_another_format() {
    let h = Harness::start().await;
    h.fake.inject("m-small", Fault::ContextLengthExceeded, 1);
    let response = h
        .route(chat("small-then-large", "a long prompt"))
        .await
        .unwrap();
    let info = response.route.unwrap();
    assert_eq!(info.model, "m-large");
    assert_eq!(info.attempts.len(), 2);
    assert_eq!(info.attempts[0].error_code, "CONTEXT_LENGTH_EXCEEDED");
    assert_eq!(info.attempts[0].http_status, 400);
    assert_eq!(
        response.response.unwrap().choices[0]
            .message
            .as_ref()
            .unwrap()
            .joined_text(),
        "echo: a long prompt"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn content_filters_in_every_format() {
    let h = Harness::start().await;
    for (route, model, format) in FORMATS {
        // The answer cut by the filter is an answer that says so.
        h.fake.inject(model, Fault::ContentFilterFinish, 1);
        let response = h.route(chat(route, "tell me more")).await.unwrap();
        assert_eq!(
            response.response.unwrap().choices[0].finish_reason,
            FinishReason::ContentFilter as i32,
            "{route}"
        );
        // A blocked prompt is an error where the format has one (Anthropic answers a refusal).
        h.fake.inject(model, Fault::ContentFilter, 1);
        let outcome = h.route(chat(route, "tell me more")).await;
        match format {
            ApiFormat::Anthropic => assert_eq!(
                outcome.unwrap().response.unwrap().choices[0].finish_reason,
                FinishReason::ContentFilter as i32
            ),
            _ => {
                let status = outcome.unwrap_err();
                assert!(
                    status.message().contains("content filtered"),
                    "{route}: {status:?}"
                );
            }
        }
    }
    h.shutdown().await;
}
