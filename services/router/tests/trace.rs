//! The trace of a streamed request continues from the handler into the producer task and the
//! provider client span, which carries gen_ai attributes and never the prompt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use switchboard_fake_provider::{FakeConfig, FakeProvider};
use switchboard_proto::{
    chat::v1::{ChatRequest, Message, Role},
    router::v1::{RouteStreamRequest, router_service_client::RouterServiceClient},
};
use switchboard_router::{App, Config, ProviderConfig, RouteConfig, TargetConfig};
use switchboard_telemetry::TelemetryConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_producer_and_provider_spans_continue_the_request_trace() {
    let (otlp, sink) = switchboard_testkit::otlp::spawn().await.unwrap();
    let telemetry = switchboard_telemetry::init(
        "router",
        &TelemetryConfig {
            otlp_endpoint: Some(format!("http://{otlp}")),
            ..TelemetryConfig::default()
        },
    )
    .unwrap();
    let fake = FakeProvider::start(FakeConfig {
        addr: "127.0.0.1:0".to_owned(),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let mut config = Config {
        grpc_addr: "127.0.0.1:0".to_owned(),
        ..Config::default()
    };
    config.providers.insert(
        "fake".to_owned(),
        ProviderConfig::openai(fake.base_url(), Some("sk-trace")),
    );
    config.routes = vec![RouteConfig::new(
        "chat".to_owned(),
        vec![TargetConfig::new("fake", "m")],
    )];
    let app = App::build(config).await.unwrap();
    let url = switchboard_grpc::url_of(app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));

    let mut client = RouterServiceClient::new(switchboard_grpc::channel(&url).unwrap());
    let request = RouteStreamRequest {
        request: Some(ChatRequest {
            model: "chat".to_owned(),
            messages: vec![Message::text(Role::User, "confidential prompt words")],
            ..Default::default()
        }),
        caller: None,
        allowance: None,
    };
    let mut stream = client.route_stream(request).await.unwrap().into_inner();
    while let Some(item) = stream.next().await {
        item.unwrap();
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    telemetry.shutdown();

    let mut spans = Vec::new();
    for _ in 0..50 {
        spans = sink.spans();
        if spans.iter().any(|s| s.name == "provider.chat") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span: {spans:#?}"))
    };
    let server_span = find("switchboard.router.v1.RouterService/RouteStream");
    let provider = find("provider.chat");
    // One span per RPC: the handler records into the server span instead of opening its own.
    assert!(
        spans.iter().all(|s| s.name != "route_stream"),
        "a handler span besides the server span"
    );
    assert_eq!(provider.parent_span_id, server_span.span_id);
    let server_attribute = |name: &str| {
        server_span
            .attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(server_attribute("route"), "chat", "{server_span:#?}");
    assert_eq!(server_attribute("target"), "fake/m", "{server_span:#?}");
    assert_eq!(provider.trace_id, server_span.trace_id);
    assert_eq!(provider.kind, 3, "client span");
    let attribute = |name: &str| {
        provider
            .attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(attribute("gen_ai.system"), "openai");
    assert_eq!(attribute("gen_ai.request.model"), "m");
    assert!(attribute("http.status_code").contains("200"));
    assert!(attribute("gen_ai.usage.input_tokens").contains('3'));
    for span in &spans {
        for (key, value) in &span.attributes {
            assert!(
                !value.contains("confidential") && !value.contains("sk-trace"),
                "{key}={value}"
            );
        }
    }
    fake.shutdown().await;
}
