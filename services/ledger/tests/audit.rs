//! The audit table: idempotent inserts (a redelivered event is stored once) and append-only rows.

use switchboard_bus::AuditEvent;
use switchboard_ledger::internals::{Repository, audit_row_of, insert_audit};
use switchboard_proto::guard::v1::Finding;
use switchboard_testkit::TestPg;

#[tokio::test]
async fn audit_rows_are_stored_once_and_never_changed() {
    let pg = TestPg::create().await.expect("postgres");
    let repo = Repository::connect(&pg.url, 2).await.expect("repo");
    let event = AuditEvent {
        event_id: "req-1:prompt:0".into(),
        request_id: "req-1".into(),
        app: "app-a".into(),
        team: "team-1".into(),
        route: "gpt-4o-mini".into(),
        direction: "prompt".into(),
        decision: "transform".into(),
        findings: vec![Finding {
            entity_type: "EMAIL_ADDRESS".into(),
            count: 1,
            action: "redact".into(),
            kind: "entity".into(),
        }],
        occurred_at_unix_ms: 1_780_000_000_000,
        source: "guard".into(),
        ..Default::default()
    };
    let row = audit_row_of(event).expect("row");
    assert_eq!(
        insert_audit(repo.pool(), std::slice::from_ref(&row))
            .await
            .expect("insert"),
        1
    );
    // A redelivery is a no-op.
    assert_eq!(insert_audit(repo.pool(), &[row]).await.expect("again"), 0);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(repo.pool())
        .await
        .expect("count");
    assert_eq!(count, 1);
    for statement in [
        "UPDATE audit_events SET decision = 'allow'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ] {
        let refused = sqlx::query(statement).execute(repo.pool()).await;
        let error = refused.expect_err(statement).to_string();
        assert!(error.contains("append-only"), "{statement}: {error}");
    }
    let decision: String = sqlx::query_scalar("SELECT decision FROM audit_events")
        .fetch_one(repo.pool())
        .await
        .expect("row");
    assert_eq!(decision, "transform");
    repo.pool().close().await;
    pg.drop_db().await;
}
