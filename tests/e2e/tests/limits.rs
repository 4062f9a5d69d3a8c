//! Message size limits across the mesh: a request the gateway accepts (up to a raised
//! `gateway.max_body_bytes`) is also accepted by the guard, cache and router behind it, and a
//! message a hop refuses for its size is a typed "payload too large", never a dependency that is
//! down (a false `guard_unavailable` 503) nor a guard fail-open. An over-limit gRPC request to the
//! gateway itself is refused the way HTTP's 413 is.
//!
//! The provider is a stand-in without a body limit (the fake provider's JSON extractor stops at
//! 2 MB); guard, cache, router and gateway are the real services over real gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use switchboard_config::Source;
use switchboard_e2e::authed;
use switchboard_proto::{
    chat::v1::{ChatRequest, ContentPart, ImageUrl, Message, Role, content_part::Part},
    gateway::v1::{CreateChatCompletionRequest, gateway_service_client::GatewayServiceClient},
};
use switchboard_testkit::TestNats;
use tokio_util::sync::CancellationToken;
use tonic_types::StatusExt;

const KEY: &str = "sk-test-limits";
const MIB: usize = 1024 * 1024;
/// The gateway's raised body limit.
const MAX_BODY: usize = 8 * MIB;
/// What the guard accepts in this mesh: less than the gateway may send (which `check-config`
/// refuses, but each service starts with it), so that a hop's own refusal can be seen.
const GUARD_LIMIT: usize = 6 * MIB;

/// A provider that answers every chat completion with a fixed answer, whatever its size.
async fn provider(stop: CancellationToken) -> SocketAddr {
    async fn chat(_body: axum::body::Bytes) -> axum::Json<serde_json::Value> {
        axum::Json(serde_json::json!({
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 0,
            "model": "stub-model",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "a very large picture"},
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 4, "total_tokens": 1004}
        }))
    }
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(chat))
        .layer(axum::extract::DefaultBodyLimit::disable());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .unwrap();
    });
    addr
}

struct Mesh {
    http: String,
    grpc: String,
    nats: TestNats,
    stop: CancellationToken,
}

impl Mesh {
    async fn start() -> Mesh {
        let stop = CancellationToken::new();
        let provider = provider(stop.clone()).await;
        let nats = TestNats::create().await.unwrap();
        let hash = switchboard_gateway::hash_api_key(KEY);
        let toml = format!(
            r#"
[nats]
url = "{nats_url}"
subject_prefix = "{prefix}"
usage_stream = "{stream}"

[gateway]
http_addr = "127.0.0.1:0"
grpc_addr = "127.0.0.1:0"
max_body_bytes = {MAX_BODY}
keys = [{{ id = "key-limits", sha256 = "{hash}", app = "app-limits" }}]
[gateway.guard]
fail_open_routes = ["big-open"]

[guard]
grpc_addr = "127.0.0.1:0"
max_message_bytes = {GUARD_LIMIT}

[cache]
grpc_addr = "127.0.0.1:0"
shared = false

[router]
grpc_addr = "127.0.0.1:0"
max_retries = 0
[router.providers.stub]
kind = "openai"
base_url = "http://{provider}/v1"
[[router.routes]]
name = "big"
targets = [{{ provider = "stub", model = "stub-model" }}]
[[router.routes]]
name = "big-open"
targets = [{{ provider = "stub", model = "stub-model" }}]
"#,
            nats_url = nats.url,
            prefix = nats.prefix,
            stream = nats.stream,
        );
        let source = Source::from_toml(&toml).unwrap();
        let nats_config: switchboard_bus::NatsConfig = source.section("nats").unwrap();

        let mut router_config: switchboard_router::Config = source.section("router").unwrap();
        router_config.resolve_api_keys(|_| Some("stub-key".to_owned()));
        let router = switchboard_router::App::build(router_config).await.unwrap();
        let router_url = format!("http://{}", router.local_addr());
        let until = stop.clone();
        tokio::spawn(router.run_until(until.cancelled_owned()));

        let cache =
            switchboard_cache::App::build(source.section("cache").unwrap(), nats_config.clone())
                .await
                .unwrap();
        let cache_url = format!("http://{}", cache.local_addr());
        let until = stop.clone();
        tokio::spawn(cache.run_until(until.cancelled_owned()));

        let guard = switchboard_guard::App::build(source.section("guard").unwrap())
            .await
            .unwrap();
        let guard_url = format!("http://{}", guard.local_addr());
        let until = stop.clone();
        tokio::spawn(guard.run_until(until.cancelled_owned()));

        let mut gateway_config: switchboard_gateway::Config = source.section("gateway").unwrap();
        gateway_config.guard_url = guard_url;
        gateway_config.cache_url = cache_url;
        gateway_config.router_url = router_url;
        let outbox = std::env::temp_dir().join(format!("switchboard-limits-{}", nats.prefix));
        gateway_config.outbox_dir = outbox.display().to_string();
        let gateway = switchboard_gateway::App::build(gateway_config, nats_config)
            .await
            .unwrap();
        let http = format!("http://{}", gateway.http_addr());
        let grpc = format!("http://{}", gateway.grpc_addr());
        let until = stop.clone();
        tokio::spawn(gateway.run_until(until.cancelled_owned()));
        Mesh {
            http,
            grpc,
            nats,
            stop,
        }
    }

    async fn client(&self) -> GatewayServiceClient<tonic::transport::Channel> {
        GatewayServiceClient::connect(self.grpc.clone())
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.nats.cleanup().await;
    }
}

/// A `data:` image URL of about `bytes` bytes.
fn image_url(bytes: usize) -> String {
    format!("data:image/png;base64,{}", "A".repeat(bytes))
}

/// A chat request to `model` whose image makes it about `bytes` bytes long.
fn chat(model: &str, bytes: usize) -> ChatRequest {
    ChatRequest {
        model: model.to_owned(),
        messages: vec![Message {
            role: Role::User as i32,
            content: vec![
                ContentPart {
                    part: Some(Part::Text("what is in this picture?".to_owned())),
                },
                ContentPart {
                    part: Some(Part::ImageUrl(ImageUrl {
                        url: image_url(bytes),
                        detail: String::new(),
                    })),
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn request(model: &str, bytes: usize) -> tonic::Request<CreateChatCompletionRequest> {
    authed(
        CreateChatCompletionRequest {
            request: Some(chat(model, bytes)),
            ..Default::default()
        },
        KEY,
    )
}

/// The status is the typed "payload too large" (INVALID_ARGUMENT, reason PAYLOAD_TOO_LARGE), never
/// a dependency that is down.
fn assert_payload_too_large(status: &tonic::Status) -> std::collections::HashMap<String, String> {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"));
    assert_eq!(info.reason, "PAYLOAD_TOO_LARGE", "{status:?}");
    assert_ne!(
        info.metadata.get("reason").map(String::as_str),
        Some("guard_unavailable")
    );
    info.metadata
}

/// The gateway's own refusal of a request over its `max_body_bytes`: payload too large, naming
/// the limit, with a request id.
fn assert_over_max_body(status: &tonic::Status) {
    let metadata = assert_payload_too_large(status);
    assert_eq!(
        metadata.get("limit").map(String::as_str),
        Some(MAX_BODY.to_string().as_str()),
        "{status:?}"
    );
    assert!(
        status.metadata().get("x-switchboard-request-id").is_some(),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_between_4_mib_and_a_raised_body_limit_is_served_over_grpc_and_http() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client().await;
    // Over tonic's 4 MiB default, under the gateway's 8 MiB and the guard's 6 MiB.
    for model in ["big", "big-open"] {
        let served = client
            .create_chat_completion(request(model, 5 * MIB))
            .await
            .unwrap_or_else(|status| panic!("{model}: {status:?}"));
        let served = served.into_inner();
        assert_eq!(served.route.unwrap().provider, "stub");
    }

    // The same over HTTP (a 5 MB image, as an operator raises the limit for).
    let body = serde_json::json!({
        "model": "big",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is in this picture?"},
            {"type": "image_url", "image_url": {"url": image_url(5 * MIB)}}
        ]}]
    });
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mesh.http))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, reqwest::StatusCode::OK, "{text}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_a_hops_limit_is_payload_too_large_never_guard_unavailable() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client().await;
    // Under the gateway's 8 MiB, over the guard's 6 MiB: fail-closed and fail-open routes alike
    // (a guard that refused a message for its size did not fail; nothing goes unchecked).
    for model in ["big", "big-open"] {
        let status = client
            .create_chat_completion(request(model, 7 * MIB))
            .await
            .expect_err(model);
        let metadata = assert_payload_too_large(&status);
        assert_eq!(
            metadata.get("service").map(String::as_str),
            Some("guard"),
            "{status:?}"
        );
        assert!(
            status.metadata().get("x-switchboard-request-id").is_some(),
            "{status:?}"
        );
    }
    // HTTP: 413, not 503.
    let body = serde_json::json!({
        "model": "big",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url(7 * MIB)}}
        ]}]
    });
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mesh.http))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, reqwest::StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(!text.contains("guard_unavailable"), "{text}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_request_over_max_body_bytes_is_refused_like_http_413() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client().await;
    let status = client
        .create_chat_completion(request("big", 9 * MIB))
        .await
        .expect_err("over the gateway's limit");
    assert_over_max_body(&status);
    // Streams are refused the same way.
    let stream = client
        .stream_chat_completion(authed(
            switchboard_proto::gateway::v1::StreamChatCompletionRequest {
                request: Some(chat("big", 9 * MIB)),
                ..Default::default()
            },
            KEY,
        ))
        .await
        .expect_err("over the gateway's limit");
    assert_payload_too_large(&stream);
    mesh.stop().await;
}

/// A stub that compresses its requests (grpc-java, grpc-go or grpcio with gzip on) is served, and
/// the body limit applies to the decompressed message: a request that compresses far under the
/// limit but decompresses over it is the same typed refusal (a compression bomb is stopped at the
/// limit, never decompressed whole).
#[tokio::test(flavor = "multi_thread")]
async fn gzip_compressed_grpc_requests_are_served_and_limited_by_their_decompressed_size() {
    use tonic::codec::CompressionEncoding;
    let mesh = Mesh::start().await;
    let mut client = mesh
        .client()
        .await
        .send_compressed(CompressionEncoding::Gzip);
    let served = client
        .create_chat_completion(request("big", 64 * 1024))
        .await
        .unwrap_or_else(|status| panic!("compressed request refused: {status:?}"))
        .into_inner();
    assert_eq!(served.route.unwrap().provider, "stub");

    // 9 MiB of one letter compresses to a few KiB; decompressed it is over the 8 MiB limit.
    let status = client
        .create_chat_completion(request("big", 9 * MIB))
        .await
        .expect_err("over the gateway's limit once decompressed");
    assert_over_max_body(&status);
    mesh.stop().await;
}
