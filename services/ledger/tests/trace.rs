//! The usage event's trace continues across NATS: `ledger.record` is a consumer span whose parent
//! is the publisher's span (own process, because telemetry installs a global subscriber).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_bus::{UsageEvent, publish_usage};
use switchboard_ledger::{App, Config};
use switchboard_telemetry::TelemetryConfig;
use switchboard_testkit::{TestNats, TestPg, otlp};
use tokio::sync::oneshot;
use tracing::Instrument as _;

#[tokio::test]
async fn ledger_record_span_is_a_child_of_the_publisher() {
    let (otlp_addr, sink) = otlp::spawn().await.expect("otlp receiver");
    let telemetry = switchboard_telemetry::init(
        "ledger",
        &TelemetryConfig {
            otlp_endpoint: Some(format!("http://{otlp_addr}")),
            ..Default::default()
        },
    )
    .expect("telemetry");
    let pg = TestPg::create().await.expect("postgres");
    let nats = TestNats::create().await.expect("nats");
    let nats_config = nats.config();
    let config = Config {
        grpc_addr: "127.0.0.1:0".into(),
        database_url: pg.url.clone(),
        ..Config::default()
    };
    let app = App::build(config, nats_config.clone()).await.expect("app");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));

    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.expect("nats"));
    let request_id = uuid::Uuid::now_v7().to_string();
    let event = UsageEvent {
        request_id: request_id.clone(),
        app: "billing".into(),
        ..Default::default()
    };
    let publisher = tracing::info_span!("test.publish", otel.kind = "producer");
    let trace_id = async {
        publish_usage(&js, &nats_config, &event)
            .await
            .expect("publish")
            .await
            .expect("stored");
        switchboard_telemetry::current_trace_id()
    }
    .instrument(publisher)
    .await;
    assert_eq!(trace_id.len(), 32);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (record, parent) = loop {
        let spans = sink.spans();
        let record = spans
            .iter()
            .find(|s| s.name == "ledger.record" && s.trace_id == trace_id)
            .cloned();
        let parent = spans.iter().find(|s| s.name == "test.publish").cloned();
        if let (Some(record), Some(parent)) = (record, parent) {
            break (record, parent);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ledger.record span not exported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(record.kind, 5, "consumer span");
    assert_eq!(record.parent_span_id, parent.span_id);
    assert_eq!(parent.trace_id, trace_id);
    assert!(
        record
            .attributes
            .iter()
            .any(|(k, v)| k == "request.id" && *v == request_id),
        "{:?}",
        record.attributes
    );

    // A batch message: each event's span continues its own request's trace, not the batch's.
    let mut parents = Vec::new();
    let mut events = Vec::new();
    for name in ["request.a", "request.b"] {
        let span = tracing::info_span!("test.request", otel.name = name);
        let cx = tracing_opentelemetry::OpenTelemetrySpanExt::context(&span);
        parents.push((name, cx));
        events.push(UsageEvent {
            request_id: uuid::Uuid::now_v7().to_string(),
            app: "billing".into(),
            ..Default::default()
        });
    }
    let batch: Vec<_> = events
        .iter()
        .zip(&parents)
        .map(|(e, (_, cx))| (e, cx))
        .collect();
    switchboard_bus::publish_usage_batch(&js, &nats_config, &batch)
        .await
        .expect("publish")
        .await
        .expect("stored");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for ((name, _), event) in parents.iter().zip(&events) {
        let (record, parent) = loop {
            let spans = sink.spans();
            let record = spans
                .iter()
                .find(|s| {
                    s.name == "ledger.record"
                        && s.attributes
                            .iter()
                            .any(|(k, v)| k == "request.id" && *v == event.request_id)
                })
                .cloned();
            let parent = spans.iter().find(|s| s.name == *name).cloned();
            if let (Some(record), Some(parent)) = (record, parent) {
                break (record, parent);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ledger.record span of {name} not exported"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(record.trace_id, parent.trace_id, "{name}");
        assert_eq!(record.parent_span_id, parent.span_id, "{name}");
    }

    let _ = stop.send(());
    task.await.expect("join").expect("shutdown");
    telemetry.shutdown();
    nats.cleanup().await;
    pg.drop_db().await;
}
