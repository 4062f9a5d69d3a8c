//! Virtual keys are added and revoked by editing the configuration file while the gateway serves;
//! an invalid file is rejected and the keys in force stay.

#![allow(clippy::unwrap_used)]

use std::{path::Path, time::Duration};

use switchboard_gateway::{App, Config, hash_api_key};
use switchboard_grpc::ConfigFile;
use switchboard_testkit::TestNats;
use tokio_util::sync::CancellationToken;

/// A `[gateway]` file with these keys (`sk-<name>`, app `app-<name>`), watched every 20 ms.
fn write_config(path: &Path, names: &[&str], extra: &str) {
    let keys: Vec<String> = names
        .iter()
        .map(|name| {
            format!(
                "  {{ id = \"key-{name}\", sha256 = \"{}\", app = \"app-{name}\" }},",
                hash_api_key(&format!("sk-{name}"))
            )
        })
        .collect();
    let text = format!(
        "[gateway]\nhttp_addr = \"127.0.0.1:0\"\ngrpc_addr = \"127.0.0.1:0\"\nconfig_poll_ms = 20\n{extra}keys = [\n{}\n]\n",
        keys.join("\n")
    );
    // Written next to the file and renamed over it: the watcher never reads half a file.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// Whether `key` is accepted (`GET /v1/models` answers anything but 401).
async fn accepted(http: &str, key: &str) -> bool {
    let response = reqwest::Client::new()
        .get(format!("{http}/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    response.status() != 401
}

/// Polls until `key`'s acceptance is `want`, bounded.
async fn until(http: &str, key: &str, want: bool) {
    for _ in 0..200 {
        if accepted(http, key).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{key}: accepted should be {want} after the reload");
}

#[tokio::test]
async fn keys_are_added_and_revoked_by_a_reload_and_a_bad_file_changes_nothing() {
    let nats = TestNats::create().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchboard.toml");
    let outbox = dir.path().join("outbox");
    let outbox_line = format!("outbox_dir = \"{}\"\n", outbox.display());
    write_config(&path, &["one"], &outbox_line);
    let file = ConfigFile::new(Some(path.clone()));
    let config: Config = file.load().unwrap().section("gateway").unwrap();
    let mut app = App::build(config, nats.config()).await.unwrap();
    app.watch_config(&file);
    let http = format!("http://{}", app.http_addr());
    let stop = CancellationToken::new();
    let until_stopped = stop.clone();
    let served = tokio::spawn(app.run_until(async move { until_stopped.cancelled().await }));

    assert!(accepted(&http, "sk-one").await);
    assert!(!accepted(&http, "sk-two").await);

    // Added without a restart; the other key stays.
    write_config(&path, &["one", "two"], &outbox_line);
    until(&http, "sk-two", true).await;
    assert!(accepted(&http, "sk-one").await);

    // Revoked without a restart.
    write_config(&path, &["two"], &outbox_line);
    until(&http, "sk-one", false).await;
    assert!(accepted(&http, "sk-two").await);

    // An invalid file (a key hash that is not 64 hex digits) is rejected: the keys in force stay,
    // for as long as ten polls of the file.
    std::fs::write(
        &path,
        format!(
            "[gateway]\nconfig_poll_ms = 20\n{outbox_line}keys = [{{ id = \"bad\", sha256 = \"abc\", app = \"a\" }}]\n"
        ),
    )
    .unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            accepted(&http, "sk-two").await,
            "a rejected reload revoked a key"
        );
    }

    // The watcher still works after the rejection.
    write_config(&path, &["three"], &outbox_line);
    until(&http, "sk-three", true).await;
    assert!(!accepted(&http, "sk-two").await);

    stop.cancel();
    served.await.unwrap().unwrap();
    nats.cleanup().await;
}
