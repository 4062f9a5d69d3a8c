//! `switchboard prices import|reprice` as an operator runs them, against a real Postgres.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use switchboard_testkit::TestPg;

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
