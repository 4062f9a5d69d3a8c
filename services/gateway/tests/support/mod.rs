//! What the gateway's integration tests share: stand-in downstream services served over real
//! gRPC, and a gateway `App` over them.

#![allow(clippy::unwrap_used, dead_code)]

use switchboard_gateway::{App, Config, KeyConfig, hash_api_key};
use switchboard_testkit::TestNats;
use tokio_util::sync::CancellationToken;

/// Serves `routes` (the stand-ins) on a free port until `stop`; returns their URL.
pub async fn serve(routes: tonic::service::Routes, stop: &CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let until = stop.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move { until.cancelled().await },
            ),
    );
    url
}

/// The gateway's configuration with every downstream service at `url`, its outbox in `outbox`,
/// and one key, `key`, of app `app`.
pub fn config(url: &str, outbox: &std::path::Path, key: &str, app: &str) -> Config {
    Config {
        http_addr: "127.0.0.1:0".into(),
        grpc_addr: "127.0.0.1:0".into(),
        guard_url: url.to_owned(),
        cache_url: url.to_owned(),
        router_url: url.to_owned(),
        outbox_dir: outbox.display().to_string(),
        keys: vec![KeyConfig {
            id: format!("key-{app}"),
            sha256: hash_api_key(key),
            app: app.to_owned(),
            team: String::new(),
            models: Vec::new(),
            expires_at: None,
            tags: Default::default(),
        }],
        ..Config::default()
    }
}

/// Builds the gateway and runs it until `stop`; returns its HTTP base URL.
pub async fn start(config: Config, nats: &TestNats, stop: &CancellationToken) -> String {
    let app = App::build(config, nats.config()).await.unwrap();
    let http = format!("http://{}", app.http_addr());
    let until = stop.clone();
    tokio::spawn(app.run_until(async move { until.cancelled().await }));
    http
}

/// The gateway's `/metrics` text (`http`: its HTTP base URL).
pub async fn metrics(http: &str) -> String {
    reqwest::get(format!("{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one series in a `/metrics` text (0 when absent).
pub fn series(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0, |v| v.parse().unwrap())
}
