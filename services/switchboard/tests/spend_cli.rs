//! `switchboard spend` and `switchboard usage export` as finance runs them, against a real ledger
//! (in process, real Postgres and NATS) seeded with known rows.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use switchboard_ledger::{
    App, Config,
    internals::{Repository, Tokens, UsageRow},
};
use switchboard_proto::ledger::v1::{CacheOutcome, RequestStatus};
use switchboard_testkit::{TestNats, TestPg};
use time::{OffsetDateTime, macros::datetime};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

fn row(time: OffsetDateTime, team: &str, model: &str, cost: Option<i64>) -> UsageRow {
    UsageRow {
        request_id: uuid::Uuid::now_v7(),
        time,
        app: "billing".into(),
        team: team.into(),
        key_id: "k1".into(),
        requested_model: "fast".into(),
        provider: "openai".into(),
        model: model.into(),
        attempts: 1,
        tokens: Tokens {
            prompt: 1_000,
            completion: 100,
            ..Tokens::default()
        },
        earlier_attempts: None,
        cost_usd_nanos: cost,
        saved_usd_nanos: 0,
        cache: CacheOutcome::Miss,
        status: RequestStatus::Ok,
        error_code: String::new(),
        streamed: false,
        latency_ms: 5,
        trace_id: String::new(),
        tags: [("env".to_owned(), "prod, eu".to_owned())].into(),
    }
}

async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env_remove("SWITCHBOARD_CONFIG")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_and_export_from_the_command_line() {
    let pg = TestPg::create().await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let app = App::build(
        Config {
            grpc_addr: "127.0.0.1:0".into(),
            database_url: pg.url.clone(),
            max_connections: 4,
            ..Config::default()
        },
        nats.config(),
    )
    .await
    .unwrap();
    let ledger = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let repo = Repository::connect(&pg.url, 2).await.unwrap();
    repo.insert_batch(&[
        row(
            datetime!(2026-11-01 09:00 UTC),
            "finance",
            "gpt-4o",
            Some(1_500_000_000),
        ),
        row(
            datetime!(2026-11-03 10:30:00.123456 UTC),
            "finance",
            "gpt-4o-mini",
            Some(250_000_001),
        ),
        row(
            datetime!(2026-11-04 11:00 UTC),
            "platform",
            "gpt-4o",
            Some(3),
        ),
        row(datetime!(2026-11-05 12:00 UTC), "platform", "mystery", None),
        // Outside the period.
        row(
            datetime!(2026-10-31 23:59 UTC),
            "finance",
            "gpt-4o",
            Some(999),
        ),
    ])
    .await
    .unwrap();

    let base = |extra: &[&str]| -> Vec<String> {
        extra
            .iter()
            .map(|s| (*s).to_owned())
            .chain(
                [
                    "--since",
                    "2026-11-01",
                    "--until",
                    "2026-12-01",
                    "--ledger",
                    ledger.as_str(),
                ]
                .map(str::to_owned),
            )
            .collect()
    };

    // CSV by team: exact dollars and nanos per team.
    let csv = stdout(&run(base(&["spend", "--by", "team", "--format", "csv"])).await);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "team,requests,prompt_tokens,completion_tokens,cost_usd,cost_usd_nanos,unpriced_requests,\
         saved_usd,saved_usd_nanos,error_requests,cache_hits"
    );
    assert_eq!(
        &lines[1..],
        [
            "finance,2,2000,200,1.750000001,1750000001,0,0.000000000,0,0,0",
            "platform,2,2000,200,0.000000003,3,1,0.000000000,0,0,0",
        ]
    );

    // JSON by team and model parses, and its totals add up.
    let json = stdout(&run(base(&["spend", "--by", "team,model", "--format", "json"])).await);
    let document: serde_json::Value = serde_json::from_str(&json).unwrap();
    let groups = document["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 4);
    assert_eq!(groups[0]["team"], "finance");
    assert_eq!(groups[0]["model"], "gpt-4o");
    assert_eq!(groups[0]["cost_usd"], "1.500000000");
    assert_eq!(document["total"]["requests"], 4);
    assert_eq!(document["total"]["cost_usd_nanos"], 1_750_000_004i64);
    assert_eq!(document["total"]["unpriced_requests"], 1);

    // Filtered by app and a table with a total line.
    let table = stdout(
        &run(base(&[
            "spend", "--by", "model", "--team", "platform", "--format", "table",
        ]))
        .await,
    );
    assert!(
        table.lines().next().unwrap().starts_with("model"),
        "{table}"
    );
    assert!(table.contains("mystery"), "{table}");
    assert!(!table.contains("gpt-4o-mini"), "{table}");
    let total = table.lines().last().unwrap();
    assert!(
        total.starts_with("TOTAL") && total.contains("0.000000003"),
        "{table}"
    );

    // Export: every row of the period, in time order, CSV and JSON lines.
    let exported = stdout(
        &run(base(&[
            "usage",
            "export",
            "--format",
            "csv",
            "--page-size",
            "2",
        ]))
        .await,
    );
    let lines: Vec<&str> = exported.lines().collect();
    assert_eq!(lines.len(), 5, "{exported}");
    assert!(lines[0].starts_with("request_id,time,app,team"));
    assert!(lines[1].contains(",2026-11-01T09:00:00Z,billing,finance,"));
    assert!(lines[1].contains(",1.500000000,1500000000,"));
    assert!(
        lines[1].ends_with(",\"{\"\"env\"\":\"\"prod, eu\"\"}\""),
        "{}",
        lines[1]
    );
    assert!(lines[4].contains(",mystery,"));
    // Times keep their fraction of a second (the row's key is (request id, time)).
    assert!(
        lines[2].contains(",2026-11-03T10:30:00.123456Z,billing,finance,"),
        "{}",
        lines[2]
    );
    let jsonl = stdout(&run(base(&["usage", "export", "--format", "jsonl"])).await);
    let rows: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[3]["cost_usd"], serde_json::Value::Null);
    assert_eq!(rows[0]["tags"]["env"], "prod, eu");
    assert_eq!(rows[1]["time"], "2026-11-03T10:30:00.123456Z");

    // The JSON's since and until are the instants queried, fractions included.
    let json = stdout(
        &run(vec![
            "spend".into(),
            "--format".into(),
            "json".into(),
            "--since".into(),
            "2026-11-03T10:30:00.123456Z".into(),
            "--until".into(),
            "2026-11-03T10:30:00.5Z".into(),
            "--ledger".into(),
            ledger.clone(),
        ])
        .await,
    );
    let document: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(document["since"], "2026-11-03T10:30:00.123456Z");
    assert_eq!(document["until"], "2026-11-03T10:30:00.5Z");
    assert_eq!(document["total"]["requests"], 1);

    // Bad arguments: exit 64 with the reason.
    let bad = run(base(&["spend", "--by", "teams"])).await;
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--by \"teams\""));

    let _ = stop.send(());
    running.await.unwrap().unwrap();
    repo.pool().close().await;
    nats.cleanup().await;
    pg.drop_db().await;
}
