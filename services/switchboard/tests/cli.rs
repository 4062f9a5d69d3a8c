//! The `switchboard` command as users run it: the example configuration is valid, and
//! `switchboard run --with-fake-provider` serves a request end to end (the README's run command).

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use switchboard_testkit::{TestNats, TestPg};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

fn example_config() -> String {
    format!(
        "{}/../../deploy/switchboard.example.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn the_example_configuration_is_valid() {
    let output = Command::new(BIN)
        .args(["check-config", "--config", &example_config()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn an_invalid_configuration_names_the_field_and_exits_64() {
    let output = Command::new(BIN)
        .args(["check-config", "--config", &example_config()])
        .env("SWITCHBOARD__GATEWAY__ROUTER_URL", "not-a-url")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("gateway.router_url"), "{stderr}");
}

#[test]
fn hash_key_prints_the_configured_demo_hash() {
    let output = Command::new(BIN)
        .args(["hash-key", "sk-switchboard-demo"])
        .output()
        .unwrap();
    let hash = String::from_utf8(output.stdout).unwrap();
    let config = std::fs::read_to_string(example_config()).unwrap();
    assert!(
        config.contains(hash.trim()),
        "the example's demo key hash matches `hash-key`"
    );
}

#[tokio::test]
async fn switchboard_run_serves_the_demo_key_end_to_end() {
    let nats = TestNats::create().await.unwrap();
    let pg = TestPg::create().await.unwrap();
    let ports = switchboard_testkit::free_ports(7);
    let (http, grpc, guard, cache, router, ledger, fake) = (
        ports[0], ports[1], ports[2], ports[3], ports[4], ports[5], ports[6],
    );
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--config",
            &example_config(),
            "--with-fake-provider",
            &format!("127.0.0.1:{fake}"),
        ])
        .env("SWITCHBOARD__NATS__SUBJECT_PREFIX", &nats.prefix)
        .env("SWITCHBOARD__NATS__USAGE_STREAM", &nats.stream)
        .env(
            "SWITCHBOARD__GATEWAY__HTTP_ADDR",
            format!("127.0.0.1:{http}"),
        )
        .env(
            "SWITCHBOARD__GATEWAY__GRPC_ADDR",
            format!("127.0.0.1:{grpc}"),
        )
        .env(
            "SWITCHBOARD__GATEWAY__GUARD_URL",
            format!("http://127.0.0.1:{guard}"),
        )
        .env(
            "SWITCHBOARD__GATEWAY__CACHE_URL",
            format!("http://127.0.0.1:{cache}"),
        )
        .env(
            "SWITCHBOARD__GATEWAY__ROUTER_URL",
            format!("http://127.0.0.1:{router}"),
        )
        .env(
            "SWITCHBOARD__GUARD__GRPC_ADDR",
            format!("127.0.0.1:{guard}"),
        )
        .env(
            "SWITCHBOARD__CACHE__GRPC_ADDR",
            format!("127.0.0.1:{cache}"),
        )
        .env(
            "SWITCHBOARD__ROUTER__GRPC_ADDR",
            format!("127.0.0.1:{router}"),
        )
        .env(
            "SWITCHBOARD__ROUTER__PROVIDERS__FAKE__BASE_URL",
            format!("http://127.0.0.1:{fake}/v1"),
        )
        .env(
            "SWITCHBOARD__LEDGER__GRPC_ADDR",
            format!("127.0.0.1:{ledger}"),
        )
        .env("SWITCHBOARD__LEDGER__DATABASE_URL", &pg.url)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let mut answer = None;
    for _ in 0..300 {
        let sent = client
            .post(format!("http://127.0.0.1:{http}/v1/chat/completions"))
            .bearer_auth("sk-switchboard-demo")
            .json(&serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello mesh"}]}))
            .send()
            .await;
        if let Ok(response) = sent {
            answer = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = answer.expect("the gateway answered within 15 s");
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    drop(client);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let mut stopped = false;
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !stopped {
        let _ = child.kill();
    }
    nats.cleanup().await;
    pg.drop_db().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hello mesh");
    assert_eq!(body["switchboard"]["provider"], "fake");
    assert!(stopped, "switchboard run stops on SIGTERM");
}
