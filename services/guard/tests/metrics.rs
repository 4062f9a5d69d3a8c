//! `/metrics` on `guard.metrics_addr`: the real App (with its audit trail on a test NATS
//! namespace) checks a clean prompt, a prompt with an email and a blocked card, and an answer; the
//! scrape shows the checks by direction and decision, the findings, the admitted calls and the
//! audit events published.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use switchboard_grpc::metrics::{sample, scrape};
use switchboard_guard::{App, Config};
use switchboard_proto::{
    chat::v1::{Message, Role},
    guard::v1::{
        CheckAnswerRequest, CheckPromptRequest, Decision, guard_service_client::GuardServiceClient,
    },
};
use switchboard_testkit::TestNats;

fn prompt(text: &str) -> CheckPromptRequest {
    CheckPromptRequest {
        request_id: format!("req-{}", text.len()),
        app: "billing".into(),
        team: "t".into(),
        messages: vec![Message::text(Role::User, text)],
        route: String::new(),
    }
}

#[tokio::test]
async fn metrics_count_checks_findings_and_published_audit_events() {
    let nats = TestNats::create().await.unwrap();
    let config = Config {
        grpc_addr: "127.0.0.1:0".into(),
        metrics_addr: Some("127.0.0.1:0".into()),
        entities: vec!["EMAIL_ADDRESS".into(), "CREDIT_CARD".into()],
        actions: BTreeMap::from([("CREDIT_CARD".into(), "block".into())]),
        ..Config::default()
    };
    let mut audit = config.audit.clone();
    audit.linger_ms = 0;
    let config = Config { audit, ..config };
    let app = App::build_with_audit(config, Some(nats.config()))
        .await
        .unwrap();
    let metrics = app.metrics_addr().unwrap();
    let audit_stats = app.audit_stats().unwrap();
    let url = switchboard_grpc::url_of(app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));

    let before = scrape(metrics).await.unwrap();
    let mut client = GuardServiceClient::connect(url).await.unwrap();
    let clean = client.check_prompt(prompt("Hello there")).await.unwrap();
    assert_eq!(clean.into_inner().decision, Decision::Allow as i32);
    let email = client
        .check_prompt(prompt("Write to jane.doe@example.com or john@example.org"))
        .await
        .unwrap();
    assert_eq!(email.into_inner().decision, Decision::Transform as i32);
    let card = client
        .check_prompt(prompt("My card is 4111-1111-1111-1111"))
        .await
        .unwrap();
    assert_eq!(card.into_inner().decision, Decision::Block as i32);
    client
        .check_answer(CheckAnswerRequest {
            request_id: "req-answer".into(),
            app: "billing".into(),
            messages: vec![Message::text(Role::Assistant, "Sure.")],
            ..Default::default()
        })
        .await
        .unwrap();

    // Two audited decisions (the transform and the block): wait until JetStream acknowledged
    // them (the publisher runs off the request path).
    for _ in 0..500 {
        if audit_stats
            .published
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let after = scrape(metrics).await.unwrap();
    let moved = |series: &str, by: f64| {
        assert_eq!(
            sample(&after, series) - sample(&before, series),
            by,
            "{series}:\n{after}"
        );
    };
    moved(
        "switchboard_guard_checks_total{direction=\"prompt\",decision=\"allow\"}",
        1.0,
    );
    moved(
        "switchboard_guard_checks_total{direction=\"prompt\",decision=\"transform\"}",
        1.0,
    );
    moved(
        "switchboard_guard_checks_total{direction=\"prompt\",decision=\"block\"}",
        1.0,
    );
    moved(
        "switchboard_guard_checks_total{direction=\"answer\",decision=\"allow\"}",
        1.0,
    );
    moved(
        "switchboard_guard_findings_total{direction=\"prompt\",kind=\"entity\",action=\"redact\"}",
        2.0,
    );
    moved(
        "switchboard_guard_findings_total{direction=\"prompt\",kind=\"entity\",action=\"block\"}",
        1.0,
    );
    moved("switchboard_guard_admitted_total", 4.0);
    moved(
        "switchboard_guard_shed_total{reason=\"max_in_flight\"}",
        0.0,
    );
    moved(
        "switchboard_guard_audit_events_total{outcome=\"queued\"}",
        2.0,
    );
    moved(
        "switchboard_guard_audit_events_total{outcome=\"published\"}",
        2.0,
    );
    moved(
        "switchboard_guard_audit_events_total{outcome=\"dropped\"}",
        0.0,
    );
    assert!(
        after.contains("# TYPE switchboard_guard_audit_events_total counter"),
        "{after}"
    );
    // Bounded labels: no app, team or request id.
    for word in ["billing", "req-"] {
        assert!(!after.contains(word), "{word} in:\n{after}");
    }

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    nats.cleanup().await;
}
