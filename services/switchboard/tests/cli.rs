//! The `switchboard` command as users run it: the example configuration is valid, and
//! `switchboard run --with-fake-provider` serves a request end to end (the README's run command).

use std::{
    process::{Child, Command, Stdio},
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

/// `switchboard run --config <config> --with-fake-provider` on free ports, with a private NATS
/// prefix and database; returns the process and the gateway's HTTP port.
fn spawn_mesh(config: &str, nats: &TestNats, pg: &TestPg) -> (Child, u16) {
    let ports = switchboard_testkit::free_ports(7);
    let (http, grpc, guard, cache, router, ledger, fake) = (
        ports[0], ports[1], ports[2], ports[3], ports[4], ports[5], ports[6],
    );
    let local = |port: u16| format!("127.0.0.1:{port}");
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let child = Command::new(BIN)
        .args([
            "run",
            "--config",
            config,
            "--with-fake-provider",
            &local(fake),
        ])
        .env("SWITCHBOARD__NATS__SUBJECT_PREFIX", &nats.prefix)
        .env("SWITCHBOARD__NATS__USAGE_STREAM", &nats.stream)
        .env("SWITCHBOARD__GATEWAY__HTTP_ADDR", local(http))
        .env("SWITCHBOARD__GATEWAY__GRPC_ADDR", local(grpc))
        .env("SWITCHBOARD__GATEWAY__GUARD_URL", url(guard))
        .env("SWITCHBOARD__GATEWAY__CACHE_URL", url(cache))
        .env("SWITCHBOARD__GATEWAY__ROUTER_URL", url(router))
        .env("SWITCHBOARD__GUARD__GRPC_ADDR", local(guard))
        .env("SWITCHBOARD__CACHE__GRPC_ADDR", local(cache))
        .env("SWITCHBOARD__ROUTER__GRPC_ADDR", local(router))
        .env(
            "SWITCHBOARD__ROUTER__PROVIDERS__FAKE__BASE_URL",
            format!("http://127.0.0.1:{fake}/v1"),
        )
        .env("SWITCHBOARD__LEDGER__GRPC_ADDR", local(ledger))
        .env("SWITCHBOARD__LEDGER__DATABASE_URL", &pg.url)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("switchboard starts");
    (child, http)
}

/// One chat completion for `model` with the demo key, retried while the gateway is not listening
/// yet (up to 15 s): the status and the JSON body.
async fn chat(http: u16, model: &str) -> (reqwest::StatusCode, serde_json::Value) {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        let sent = client
            .post(format!("http://127.0.0.1:{http}/v1/chat/completions"))
            .bearer_auth("sk-switchboard-demo")
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hello mesh"}]}))
            .send()
            .await;
        if let Ok(response) = sent {
            let status = response.status();
            return (status, response.json().await.expect("a JSON body"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway did not answer within 15 s");
}

/// `kill -<signal>` of the child.
fn signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status();
}

/// SIGTERM, then waits up to 20 s; whether the process stopped by itself.
async fn stop(mut child: Child) -> bool {
    signal(&child, "TERM");
    for _ in 0..200 {
        if child.try_wait().expect("wait").is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    false
}

#[tokio::test]
async fn switchboard_run_serves_the_demo_key_end_to_end() {
    let nats = TestNats::create().await.unwrap();
    let pg = TestPg::create().await.unwrap();
    let (child, http) = spawn_mesh(&example_config(), &nats, &pg);
    let (status, body) = chat(http, "gpt-4o-mini").await;
    let stopped = stop(child).await;
    nats.cleanup().await;
    pg.drop_db().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hello mesh");
    assert_eq!(body["switchboard"]["provider"], "fake");
    assert!(stopped, "switchboard run stops on SIGTERM");
}

#[tokio::test]
async fn switchboard_run_reloads_the_routes_on_sighup() {
    let nats = TestNats::create().await.unwrap();
    let pg = TestPg::create().await.unwrap();
    let dir = std::env::temp_dir().join(format!("sb-run-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("switchboard.toml");
    std::fs::copy(example_config(), &config).unwrap();
    let (child, http) = spawn_mesh(config.to_str().unwrap(), &nats, &pg);
    let (before, before_body) = chat(http, "reloaded-model").await;
    // A new route, appended to the file the mesh runs from; SIGHUP makes the router read it again.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[[router.routes]]\nname = \"reloaded-model\"\ntargets = [{ provider = \"fake\", model = \"gpt-4o-mini\" }]\n",
    );
    std::fs::write(&config, text).unwrap();
    signal(&child, "HUP");
    let mut after = None;
    for _ in 0..100 {
        let (status, body) = chat(http, "reloaded-model").await;
        if status == 200 {
            after = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped = stop(child).await;
    nats.cleanup().await;
    pg.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        before, 404,
        "an unknown model before the reload: {before_body}"
    );
    let after = after.expect("the new route served within 10 s of SIGHUP");
    assert_eq!(
        after["choices"][0]["message"]["content"],
        "echo: hello mesh"
    );
    assert_eq!(after["switchboard"]["provider"], "fake");
    assert!(stopped, "switchboard run stops on SIGTERM after a reload");
}
