//! The real `router` binary reloads its configuration file on SIGHUP.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(unix)]

use std::{process::Stdio, time::Duration};

use switchboard_fake_provider::{FakeConfig, FakeProvider};
use switchboard_proto::{
    chat::v1::{ChatRequest, Message, Role},
    router::v1::{RouteRequest, router_service_client::RouterServiceClient},
};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_router");

fn config(port: u16, base_url: &str, route: &str, model: &str) -> String {
    format!(
        r#"
[router]
grpc_addr = "127.0.0.1:{port}"
config_poll_ms = 0
[router.providers.fake]
base_url = "{base_url}"
[[router.routes]]
name = "{route}"
targets = [ {{ provider = "fake", model = "{model}" }} ]
"#
    )
}

fn chat(model: &str) -> RouteRequest {
    RouteRequest {
        request: Some(ChatRequest {
            model: model.to_owned(),
            messages: vec![Message::text(Role::User, "hi")],
            ..Default::default()
        }),
        caller: None,
        allowance: None,
    }
}

#[tokio::test]
async fn sighup_reloads_the_configuration_file() {
    let fake = FakeProvider::start(FakeConfig {
        addr: "127.0.0.1:0".to_owned(),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let port = switchboard_testkit::free_port();
    let dir = std::env::temp_dir().join(format!("switchboard-sighup-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("router.toml");
    std::fs::write(&path, config(port, &fake.base_url(), "a", "ma")).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env_remove("SWITCHBOARD_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut client = None;
    for _ in 0..400 {
        if let Ok(connected) = RouterServiceClient::connect(url.clone()).await {
            client = Some(connected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut client = client.expect("the router listens");
    let served = client.route(chat("a")).await.unwrap().into_inner();
    assert_eq!(served.route.unwrap().target, "fake/ma");

    std::fs::write(&path, config(port, &fake.base_url(), "b", "mb")).unwrap();
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut reloaded = false;
    for _ in 0..400 {
        if client.route(chat("b")).await.is_ok() {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(reloaded, "route b serves after SIGHUP");
    assert_eq!(
        client.route(chat("a")).await.unwrap_err().code(),
        Code::NotFound
    );
    // A broken file is rejected; the process keeps serving the last good configuration.
    std::fs::write(&path, "[router\n").unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(client.route(chat("b")).await.is_ok());
    assert!(child.try_wait().unwrap().is_none(), "still running");
    child.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    fake.shutdown().await;
}
