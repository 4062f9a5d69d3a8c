//! `switchboard prices import|reprice` as an operator runs them, against a real Postgres.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use switchboard_ledger::internals::{Repository, Tokens, UsageRow};
use switchboard_proto::ledger::v1::{CacheOutcome, RequestStatus};
use switchboard_testkit::TestPg;
use time::macros::datetime;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

fn fixture() -> String {
    format!(
        "{}/../ledger/tests/fixtures/litellm_excerpt.json",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SWITCHBOARD_CONFIG")
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn import_and_reprice_from_the_command_line() {
    let pg = TestPg::create().await.unwrap();
    let file = fixture();
    let base = ["--database-url", pg.url.as_str(), "--actor", "cli-test"];

    let mut args = vec![
        "prices",
        "import",
        file.as_str(),
        "--effective-from",
        "2025-11-01",
    ];
    args.extend(base);
    let dry_args: Vec<&str> = args.iter().copied().chain(["--dry-run"]).collect();
    let dry = run(&dry_args);
    let shown = text(&dry);
    assert!(dry.status.success(), "{shown}");
    assert!(
        shown.contains("would import 6 new price versions effective 2025-11-01"),
        "{shown}"
    );
    assert!(shown.contains("6 invalid"), "{shown}");
    assert!(
        shown.contains(r#"$["bad/negative"].input_cost_per_token: price must not be negative"#),
        "{shown}"
    );
    assert!(shown.contains("dry run: nothing written"), "{shown}");

    let real = run(&args);
    let shown = text(&real);
    assert!(real.status.success(), "{shown}");
    assert!(shown.contains("imported 6 new price versions"), "{shown}");
    assert!(shown.contains("price_imports.id"), "{shown}");
    let again = text(&run(&args));
    assert!(
        again.contains("imported 0 new price versions") && again.contains("6 unchanged"),
        "{again}"
    );

    let mut reprice = vec![
        "prices",
        "reprice",
        "--since",
        "2025-11-01",
        "--until",
        "2025-12-01",
        "--reason",
        "test",
    ];
    reprice.extend(base);
    let done = run(&reprice);
    let shown = text(&done);
    assert!(done.status.success(), "{shown}");
    assert!(
        shown.contains("changed 0 of 0 rows") && shown.contains("reprice_audits.id"),
        "{shown}"
    );
    assert!(!shown.contains("left as recorded"), "{shown}");

    // A fallback recorded before the earlier attempts' usage was kept: left as recorded, and said so.
    let repo = Repository::connect(&pg.url, 2).await.unwrap();
    let legacy = UsageRow {
        request_id: uuid::Uuid::now_v7(),
        time: datetime!(2025-11-10 12:00 UTC),
        app: "billing".into(),
        team: "finance".into(),
        key_id: "k1".into(),
        requested_model: "gpt-4o-mini".into(),
        provider: "openai".into(),
        model: "gpt-4o-mini".into(),
        attempts: 2,
        tokens: Tokens {
            prompt: 1_000,
            completion: 500,
            ..Tokens::default()
        },
        earlier_attempts: None,
        cost_usd_nanos: Some(645_000),
        saved_usd_nanos: 0,
        cache: CacheOutcome::Miss,
        status: RequestStatus::Ok,
        error_code: String::new(),
        streamed: false,
        latency_ms: 5,
        trace_id: String::new(),
        tags: Default::default(),
    };
    repo.insert_batch(std::slice::from_ref(&legacy))
        .await
        .unwrap();
    let done = run(&reprice);
    let shown = text(&done);
    assert!(done.status.success(), "{shown}");
    assert!(
        shown.contains("changed 0 of 1 rows; total 645000 -> 645000 nano-USD")
            && shown.contains("left as recorded: 1 rows with more than one attempt")
            && shown.contains(
                "WHERE attempts > 1 AND earlier_attempts IS NULL AND time >= '2025-11-01T00:00:00Z' \
                 AND time < '2025-12-01T00:00:00Z'"
            ),
        "{shown}"
    );
    let cost = repo.get(legacy.request_id).await.unwrap().unwrap();
    assert_eq!(cost.cost_usd_nanos, Some(645_000));
    repo.pool().close().await;

    // Bad arguments name themselves and exit 64; an unreadable file exits 66; a file that is not a
    // price map exits 65.
    let mut bad_date = vec![
        "prices",
        "import",
        file.as_str(),
        "--effective-from",
        "2025-13-01",
    ];
    bad_date.extend(base);
    let bad = run(&bad_date);
    assert_eq!(bad.status.code(), Some(64), "{}", text(&bad));
    assert!(text(&bad).contains("--effective-from"));
    let mut missing = vec![
        "prices",
        "import",
        "/nonexistent/prices.json",
        "--effective-from",
        "2025-11-01",
    ];
    missing.extend(base);
    assert_eq!(run(&missing).status.code(), Some(66));
    let not_a_map = std::env::temp_dir().join(format!("not-prices-{}.json", std::process::id()));
    std::fs::write(&not_a_map, "[1, 2, 3]").unwrap();
    let not_a_map_text = not_a_map.display().to_string();
    let mut wrong = vec![
        "prices",
        "import",
        not_a_map_text.as_str(),
        "--effective-from",
        "2025-11-01",
    ];
    wrong.extend(base);
    assert_eq!(run(&wrong).status.code(), Some(65));
    let _ = std::fs::remove_file(&not_a_map);
    let mut backwards = vec![
        "prices",
        "reprice",
        "--since",
        "2025-12-01",
        "--until",
        "2025-11-01",
    ];
    backwards.extend(base);
    assert_eq!(run(&backwards).status.code(), Some(64));
    pg.drop_db().await;
}
