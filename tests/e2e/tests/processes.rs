//! The mesh as users run it: the real binaries as separate processes, configured by one file plus
//! environment overrides, exporting traces over OTLP to a receiver inside this test. One request must
//! produce one trace that spans all five services, the provider call and the ledger's consumption
//! after NATS, with correct parent links.

#![allow(clippy::unwrap_used)]

use std::{
    collections::{HashMap, HashSet},
    process::{Child, Command, Stdio},
    time::Duration,
};

use switchboard_e2e::{KEY_A, MODEL, bin_dir, mesh_toml, wait_port};
use switchboard_proto::ledger::v1::{
    GetUsageRecordRequest, ledger_service_client::LedgerServiceClient,
};
use switchboard_testkit::{TestNats, TestPg, free_ports, otlp};

struct Processes(Vec<(String, Child)>);

impl Processes {
    async fn terminate(&mut self) {
        for (_, child) in &self.0 {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
        for (name, child) in &mut self.0 {
            let mut waited = 0;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    _ if waited > 300 => {
                        let _ = child.kill();
                        panic!("{name} did not stop within 30 s of SIGTERM");
                    }
                    _ => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        waited += 1;
                    }
                }
            }
        }
        self.0.clear();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
        }
    }
}

#[tokio::test]
async fn real_binaries_serve_a_request_in_one_trace_across_all_five_services() {
    let dir = bin_dir();
    for bin in [
        "fake-provider",
        "gateway",
        "guard",
        "cache",
        "router",
        "ledger",
    ] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: run `cargo build --workspace --bins` first",
            dir.join(bin).display()
        );
    }
    let (sink_addr, sink) = otlp::spawn().await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let pg = TestPg::create().await.unwrap();
    let ports = free_ports(8);
    let (fake, http, gw_grpc, guard, cache, router, ledger, fake2) = (
        ports[0], ports[1], ports[2], ports[3], ports[4], ports[5], ports[6], ports[7],
    );
    let config = mesh_toml(
        &format!("http://127.0.0.1:{fake}/v1"),
        &format!("http://127.0.0.1:{fake2}/v1"),
        &pg.url,
        &nats,
    );
    let config_path =
        std::env::temp_dir().join(format!("switchboard-e2e-{}.toml", uuid::Uuid::now_v7()));
    std::fs::write(&config_path, config).unwrap();

    let env: HashMap<&str, String> = HashMap::from([
        (
            "SWITCHBOARD__TELEMETRY__OTLP_ENDPOINT",
            format!("http://{sink_addr}"),
        ),
        (
            "SWITCHBOARD__GATEWAY__HTTP_ADDR",
            format!("127.0.0.1:{http}"),
        ),
        (
            "SWITCHBOARD__GATEWAY__GRPC_ADDR",
            format!("127.0.0.1:{gw_grpc}"),
        ),
        (
            "SWITCHBOARD__GATEWAY__GUARD_URL",
            format!("http://127.0.0.1:{guard}"),
        ),
        (
            "SWITCHBOARD__GATEWAY__CACHE_URL",
            format!("http://127.0.0.1:{cache}"),
        ),
        (
            "SWITCHBOARD__GATEWAY__ROUTER_URL",
            format!("http://127.0.0.1:{router}"),
        ),
        (
            "SWITCHBOARD__GUARD__GRPC_ADDR",
            format!("127.0.0.1:{guard}"),
        ),
        (
            "SWITCHBOARD__CACHE__GRPC_ADDR",
            format!("127.0.0.1:{cache}"),
        ),
        (
            "SWITCHBOARD__ROUTER__GRPC_ADDR",
            format!("127.0.0.1:{router}"),
        ),
        (
            "SWITCHBOARD__LEDGER__GRPC_ADDR",
            format!("127.0.0.1:{ledger}"),
        ),
        ("RUST_LOG", "info".to_owned()),
    ]);
    let mut processes = Processes(Vec::new());
    let spawn = |name: &str, args: &[String]| -> Child {
        Command::new(dir.join(name))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
    };
    processes.0.push((
        "fake-provider".into(),
        spawn(
            "fake-provider",
            &["--addr".into(), format!("127.0.0.1:{fake}")],
        ),
    ));
    processes.0.push((
        "fake-provider-2".into(),
        spawn(
            "fake-provider",
            &["--addr".into(), format!("127.0.0.1:{fake2}")],
        ),
    ));
    let config_arg = vec!["--config".to_owned(), config_path.display().to_string()];
    for name in ["ledger", "router", "cache", "guard", "gateway"] {
        processes.0.push((name.into(), spawn(name, &config_arg)));
    }
    for port in [fake, fake2, ledger, router, cache, guard, gw_grpc, http] {
        wait_port(port, "service").await;
    }
    // The gateway reaches every dependency's health service (a report lives one second).
    let mut ready = serde_json::Value::Null;
    for _ in 0..100 {
        let response = reqwest::get(format!("http://127.0.0.1:{http}/readyz"))
            .await
            .unwrap();
        let code = response.status();
        ready = response.json().await.unwrap();
        if ready["status"] == "ready" {
            assert_eq!(code, 200);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready["status"], "ready", "{ready}");
    let names: Vec<&str> = ready["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["router", "guard", "cache", "nats"], "{ready}");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "trace me"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-switchboard-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "echo: trace me");

    let mut ledger_client = LedgerServiceClient::connect(format!("http://127.0.0.1:{ledger}"))
        .await
        .unwrap();
    let mut recorded = None;
    for _ in 0..200 {
        if let Ok(found) = ledger_client
            .get_usage_record(GetUsageRecordRequest {
                request_id: request_id.clone(),
            })
            .await
        {
            recorded = found.into_inner().record;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recorded = recorded.expect("the ledger recorded the request");
    assert_eq!(
        recorded.trace_id, trace_id,
        "the ledger row carries the trace id"
    );

    // Graceful shutdown flushes every process's spans.
    drop(ledger_client);
    processes.terminate().await;
    let _ = std::fs::remove_file(&config_path);
    nats.cleanup().await;
    pg.drop_db().await;

    let spans: Vec<_> = sink
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect();
    let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for service in ["gateway", "guard", "cache", "router", "ledger"] {
        assert!(
            services.contains(service),
            "no span from {service} in the trace; got {services:?}"
        );
    }
    let by_id: HashMap<&str, &otlp::CollectedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for span in &spans {
        assert!(
            span.parent_span_id == caller_span || by_id.contains_key(span.parent_span_id.as_str()),
            "span {} of {} has a dangling parent {}",
            span.name,
            span.service,
            span.parent_span_id
        );
    }
    let parent_service = |span: &otlp::CollectedSpan| {
        by_id
            .get(span.parent_span_id.as_str())
            .map(|p| p.service.clone())
    };
    // The gateway's request span continues the caller's trace.
    assert!(
        spans
            .iter()
            .any(|s| s.service == "gateway" && s.parent_span_id == caller_span)
    );
    // Each downstream service's server span is a child of a gateway span.
    for service in ["guard", "cache", "router"] {
        assert!(
            spans.iter().any(|s| s.service == service
                && s.kind == 2
                && parent_service(s).as_deref() == Some("gateway")),
            "{service}: no server span parented to the gateway"
        );
    }
    // The provider call is a router span.
    assert!(
        spans
            .iter()
            .any(|s| s.service == "router" && s.name.contains("provider")),
        "no provider span"
    );
    // After NATS: the ledger's span is a child of the gateway's request span.
    let record = spans
        .iter()
        .find(|s| s.service == "ledger" && s.name == "ledger.record")
        .expect("ledger.record span");
    let request = by_id
        .get(record.parent_span_id.as_str())
        .expect("ledger.record has a parent");
    assert_eq!(request.service, "gateway");
    assert!(
        request.name.ends_with("/v1/chat/completions"),
        "{}",
        request.name
    );
    assert_eq!(request.parent_span_id, caller_span);
}

#[test]
fn every_service_binary_refuses_invalid_configuration_naming_the_field() {
    let dir = bin_dir();
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/switchboard.example.toml"
    );
    for (bin, variable, field) in [
        (
            "gateway",
            "SWITCHBOARD__GATEWAY__MAX_BODY_BYTES",
            "gateway.max_body_bytes",
        ),
        (
            "guard",
            "SWITCHBOARD__GUARD__DEFAULT_ACTION",
            "guard.default_action",
        ),
        (
            "cache",
            "SWITCHBOARD__CACHE__MAX_ENTRIES",
            "cache.max_entries",
        ),
        (
            "router",
            "SWITCHBOARD__ROUTER__ATTEMPT_TIMEOUT_MS",
            "router.attempt_timeout_ms",
        ),
        (
            "ledger",
            "SWITCHBOARD__LEDGER__BATCH_SIZE",
            "ledger.batch_size",
        ),
    ] {
        let value = if bin == "guard" { "shred" } else { "0" };
        let output = Command::new(dir.join(bin))
            .args(["--config", example])
            .env(variable, value)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{bin}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(field), "{bin}: {stderr}");
    }
}
