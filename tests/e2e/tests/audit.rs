//! End-to-end: the guard's audit trail. Blocked, redacted and pseudonymised requests go gateway →
//! guard → NATS (`<prefix>.audit.batch.v1`) → ledger → Postgres `audit_events`; a clean request is not
//! audited; and no planted sensitive value ends up in any table of the database or in the logs and
//! span fields of the in-process services (captured by a subscriber that prints every event with
//! its spans' fields, and every span's fields when it closes).

#![allow(clippy::unwrap_used)]

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use serde_json::{Value, json};
use switchboard_config::Source;
use switchboard_e2e::{KEY_A, KEY_B, KEY_C, MODEL, mesh_toml};
use switchboard_fake_provider::{FakeConfig, FakeProvider};
use switchboard_testkit::{TestNats, TestPg};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{
    EnvFilter, fmt::format::FmtSpan, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

const EMAIL_A: &str = "alice.secret@example.org";
const EMAIL_B: &str = "bob.hidden@example.net";
const EMAIL_C: &str = "carol.private@example.com";
const CARD: &str = "4111 1111 1111 1111";
const EMAIL_D: &str = "dave.answer@example.org";
/// API key of app `app-d`: emails pass in prompts but are redacted in answers.
const KEY_D: &str = "sk-test-app-d";
/// API key of app `app-e`, whose policy allows every entity: its prompts are pass-through.
const KEY_E: &str = "sk-test-app-e";
/// API key of app `app-f`: emails pass in prompts and are blocked in answers.
const KEY_F: &str = "sk-test-app-f";
/// A route that proceeds without the guard when the guard is unreachable.
const OPEN_ROUTE: &str = "open-route";
/// A route to an Anthropic-format target (the fake thinks `thinking about: <prompt>` when
/// extended thinking is on).
const THINKING_ROUTE: &str = "thinking-route";

/// Everything the in-process services log (and their span fields).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn captured() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_span_events(FmtSpan::CLOSE)
                    .with_writer(move || writer.clone())
                    .with_filter(EnvFilter::new(
                        "debug,h2=info,hyper=info,hyper_util=info,tower=info,async_nats=info,rustls=info",
                    )),
            )
            .init();
        switchboard_telemetry::install_propagator();
        logs
    })
}

use tracing_subscriber::Layer as _;

struct Mesh {
    http_url: String,
    ledger_url: String,
    guard_stop: CancellationToken,
    pg: TestPg,
    nats: TestNats,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Mesh {
    async fn start() -> anyhow::Result<Mesh> {
        let primary = FakeProvider::start(FakeConfig {
            addr: "127.0.0.1:0".into(),
            ..Default::default()
        })
        .await?;
        let nats = TestNats::create().await?;
        let pg = TestPg::create().await?;
        let hash_d = switchboard_gateway::hash_api_key(KEY_D);
        let hash_e = switchboard_gateway::hash_api_key(KEY_E);
        let hash_f = switchboard_gateway::hash_api_key(KEY_F);
        let toml = mesh_toml(&primary.base_url(), &primary.base_url(), &pg.url, &nats)
            .replacen(
                "keys = [\n",
                &format!(
                    "keys = [\n  {{ id = \"key-d\", sha256 = \"{hash_d}\", app = \"app-d\", team = \"team-4\" }},\n  \
                     {{ id = \"key-e\", sha256 = \"{hash_e}\", app = \"app-e\", team = \"team-5\" }},\n  \
                     {{ id = \"key-f\", sha256 = \"{hash_f}\", app = \"app-f\", team = \"team-6\" }},\n"
                ),
                1,
            )
            .replacen(
                "[guard.apps.app-b]",
                "[guard.apps.app-d]\nentities = [\"EMAIL_ADDRESS\", \"CREDIT_CARD\", \"IBAN_CODE\"]\n\
                 actions = { EMAIL_ADDRESS = \"allow\", CREDIT_CARD = \"pseudonymize\", IBAN_CODE = \"allow\" }\n\
                 answer_actions = { EMAIL_ADDRESS = \"redact\", IBAN_CODE = \"redact\" }\n\
                 [guard.apps.app-e]\naction = \"allow\"\n\
                 [guard.apps.app-f]\nentities = [\"EMAIL_ADDRESS\"]\nactions = { EMAIL_ADDRESS = \"allow\" }\n\
                 answer_actions = { EMAIL_ADDRESS = \"block\" }\n[guard.apps.app-b]",
                1,
            )
            .replacen(
                "[cache]",
                &format!("[gateway.guard]\nfail_open_routes = [\"{OPEN_ROUTE}\"]\n\n[cache]"),
                1,
            )
            .replacen(
                "[[router.routes]]",
                &format!(
                    "[[router.routes]]\nname = \"{OPEN_ROUTE}\"\n\
                     targets = [{{ provider = \"primary\", model = \"{MODEL}\" }}]\n\
                     [[router.routes]]\nname = \"{THINKING_ROUTE}\"\n\
                     targets = [{{ provider = \"claude\", model = \"claude-x\" }}]\n[[router.routes]]"
                ),
                1,
            )
            .replacen(
                "[router.providers.backup]",
                &format!(
                    "[router.providers.claude]\nkind = \"anthropic\"\nbase_url = \"{}\"\n\
                     api_key_env = \"E2E_CLAUDE_KEY\"\n[router.providers.backup]",
                    primary.base_url().trim_end_matches("/v1")
                ),
                1,
            );
        let source = Source::from_toml(&toml)?;
        let nats_config: switchboard_bus::NatsConfig = source.section("nats")?;
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        let ledger =
            switchboard_ledger::App::build(source.section("ledger")?, nats_config.clone()).await?;
        let ledger_url = format!("http://{}", ledger.local_addr());
        tasks.push(spawn(&cancel, |stop| async move {
            Ok(ledger.run_until(stop).await?)
        }));
        let mut router_config: switchboard_router::Config = source.section("router")?;
        // The fake wants some key; no test reads one from the environment.
        router_config.resolve_api_keys(|var| Some(format!("key-{var}")));
        let router = switchboard_router::App::build(router_config).await?;
        let router_url = format!("http://{}", router.local_addr());
        tasks.push(spawn(&cancel, |stop| async move {
            Ok(router.run_until(stop).await?)
        }));
        let cache =
            switchboard_cache::App::build(source.section("cache")?, nats_config.clone()).await?;
        let cache_url = format!("http://{}", cache.local_addr());
        tasks.push(spawn(&cancel, |stop| async move {
            Ok(cache.run_until(stop).await?)
        }));
        let guard = switchboard_guard::App::build_with_audit(
            source.section("guard")?,
            Some(nats_config.clone()),
        )
        .await?;
        assert!(guard.audit_stats().is_some(), "the audit trail is on");
        let guard_url = format!("http://{}", guard.local_addr());
        // The guard stops on its own token too (the fail-open/closed test stops it alone).
        let guard_stop = cancel.child_token();
        tasks.push(spawn(&guard_stop, |stop| async move {
            Ok(guard.run_until(stop).await?)
        }));
        let mut gateway_config: switchboard_gateway::Config = source.section("gateway")?;
        gateway_config.guard_url = guard_url;
        gateway_config.cache_url = cache_url;
        gateway_config.router_url = router_url;
        let gateway = switchboard_gateway::App::build(gateway_config, nats_config).await?;
        let http_url = format!("http://{}", gateway.http_addr());
        tasks.push(spawn(&cancel, |stop| async move {
            Ok(gateway.run_until(stop).await?)
        }));
        // The fake provider lives as long as the test: leak it into the last task.
        tasks.push(tokio::spawn(async move {
            let _primary = primary;
            std::future::pending::<()>().await;
            Ok(())
        }));
        Ok(Mesh {
            http_url,
            ledger_url,
            guard_stop,
            pg,
            nats,
            cancel,
            tasks,
        })
    }

    async fn post(&self, key: &str, text: &str) -> reqwest::Response {
        self.post_to(key, MODEL, text).await
    }

    async fn post_to(&self, key: &str, model: &str, text: &str) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", self.http_url))
            .bearer_auth(key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": text}]}))
            .send()
            .await
            .unwrap()
    }

    /// A streamed completion of `text`; asserts a 200 and returns the SSE body.
    async fn stream(&self, key: &str, text: &str) -> String {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", self.http_url))
            .bearer_auth(key)
            .json(&json!({"model": MODEL, "stream": true,
                "messages": [{"role": "user", "content": text}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    /// Stops the guard alone (the rest of the mesh keeps running).
    async fn stop_guard(&mut self) {
        self.guard_stop.cancel();
        let guard = self.tasks.remove(3);
        tokio::time::timeout(Duration::from_secs(20), guard)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        let fake = self.tasks.pop().unwrap();
        fake.abort();
        for task in self.tasks.drain(..) {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("service stops")
                .unwrap()
                .unwrap();
        }
        self.nats.cleanup().await;
        if let Ok(client) = async_nats::connect(&self.nats.url).await {
            let nats = switchboard_bus::NatsConfig {
                subject_prefix: self.nats.prefix.clone(),
                ..Default::default()
            };
            let js = async_nats::jetstream::new(client);
            let _ = js.delete_stream(nats.audit_stream()).await;
            let cache = switchboard_cache::replication::stream_name(&Default::default(), &nats);
            let _ = js.delete_stream(&cache).await;
        }
        self.pg.drop_db().await;
    }
}

fn spawn<F, Fut>(cancel: &CancellationToken, run: F) -> JoinHandle<anyhow::Result<()>>
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let cancel = cancel.clone();
    let stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(async move { cancel.cancelled_owned().await });
    tokio::spawn(run(stop))
}

/// The audit rows of `app`: (direction, decision, entity types, actions, team, policy version).
async fn audit_rows(
    pool: &sqlx::PgPool,
    app: &str,
) -> Vec<(String, String, Vec<String>, Vec<String>, String, String)> {
    sqlx::query_as(
        "SELECT direction, decision, entity_types, actions, team, policy_version \
         FROM audit_events WHERE app = $1 ORDER BY occurred_at",
    )
    .bind(app)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Every row of every table (all schemas but the catalogs) as JSON text.
async fn dump_database(pool: &sqlx::PgPool) -> String {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables \
         WHERE table_type = 'BASE TABLE' \
           AND table_schema NOT IN ('pg_catalog', 'information_schema')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        tables.iter().any(|(_, t)| t == "audit_events"),
        "{tables:?}"
    );
    let mut dump = String::new();
    for (schema, table) in tables {
        // Identifiers from the catalog, quoted (a `"` doubled).
        let (schema, table) = (schema.replace('"', "\"\""), table.replace('"', "\"\""));
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT row_to_json(t)::text FROM \"{schema}\".\"{table}\" t"
        )))
        .fetch_all(pool)
        .await
        .unwrap();
        for row in rows {
            dump.push_str(&row);
            dump.push('\n');
        }
    }
    dump
}

fn assert_no_planted_value(haystack: &str, what: &str) {
    let lower = haystack.to_lowercase();
    for value in [EMAIL_A, EMAIL_B, EMAIL_C, CARD, &CARD.replace(' ', "")] {
        assert!(!lower.contains(value), "{what} holds a planted value");
    }
    // Nor the local parts (a partial leak).
    for part in ["alice.secret", "bob.hidden", "carol.private"] {
        assert!(
            !lower.contains(part),
            "{what} holds part of a planted value"
        );
    }
}

#[tokio::test]
async fn blocked_redacted_and_pseudonymised_requests_are_audited_without_values() {
    let logs = captured();
    let mesh = Mesh::start().await.unwrap();
    let pool = sqlx::PgPool::connect(&mesh.pg.url).await.unwrap();

    // app-a redacts.
    let response = mesh
        .post(KEY_A, &format!("mail {EMAIL_A} and charge {CARD}"))
        .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.contains(EMAIL_A), "redacted before the provider");
    // app-b blocks.
    let response = mesh.post(KEY_B, &format!("mail {EMAIL_B}")).await;
    assert_eq!(response.status(), 403);
    let refusal = response.text().await.unwrap();
    assert!(refusal.contains("EMAIL_ADDRESS") && !refusal.contains(EMAIL_B));
    // app-c pseudonymises; the caller gets its own value back.
    let response = mesh.post(KEY_C, &format!("write to {EMAIL_C}")).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains(EMAIL_C)
    );
    // A clean prompt is allowed with no findings: not audited.
    let response = mesh.post(KEY_A, "what is the capital of France").await;
    assert_eq!(response.status(), 200);

    // Bounded wait for the three audited decisions (the clean one publishes nothing).
    let mut seen = 0i64;
    for _ in 0..300 {
        seen = sqlx::query_scalar("SELECT count(*) FROM audit_events")
            .fetch_one(&pool)
            .await
            .unwrap();
        if seen >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, 3, "one audit row per audited decision");

    let a = audit_rows(&pool, "app-a").await;
    assert_eq!(a.len(), 1, "the clean request is not audited: {a:?}");
    let (direction, decision, types, actions, team, policy) = &a[0];
    assert_eq!(
        (direction.as_str(), decision.as_str()),
        ("prompt", "transform")
    );
    assert_eq!(types, &["CREDIT_CARD", "EMAIL_ADDRESS"]);
    assert_eq!(actions, &["redact", "redact"]);
    assert_eq!(team, "team-1");
    assert!(!policy.is_empty());
    let b = audit_rows(&pool, "app-b").await;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].1, "block");
    assert_eq!(b[0].2, ["EMAIL_ADDRESS"]);
    assert_eq!(b[0].3, ["block"]);
    assert_eq!(b[0].4, "team-2");
    let c = audit_rows(&pool, "app-c").await;
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].1, "transform");
    assert_eq!(c[0].3, ["pseudonymize"]);

    // Trace ids and request ids are recorded (ids, never text).
    let ids: Vec<(String, String, String)> =
        sqlx::query_as("SELECT event_id, request_id, route FROM audit_events")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (event_id, request_id, route) in &ids {
        assert_eq!(event_id, &format!("{request_id}:prompt:0"));
        assert_eq!(route, MODEL);
    }

    // The table is append-only.
    assert!(
        sqlx::query("DELETE FROM audit_events")
            .execute(&pool)
            .await
            .is_err()
    );

    // No planted value anywhere: every table, the logs, the span fields.
    let dump = dump_database(&pool).await;
    assert!(
        dump.contains("EMAIL_ADDRESS"),
        "the dump covers the audit rows"
    );
    assert_no_planted_value(&dump, "the database");
    pool.close().await;
    mesh.stop().await;
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        logs.contains("prompt checked"),
        "the guard's decisions were logged and captured"
    );
    assert_no_planted_value(&logs, "the logs or span fields");
}

/// The request id behind a response id (`chatcmpl-` + the UUID without dashes).
fn request_id_of(answer: &Value) -> String {
    let hex = answer["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("chatcmpl-");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

async fn metric(mesh: &Mesh, name: &str) -> String {
    let text = reqwest::get(format!("{}/metrics", mesh.http_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")).map(str::to_owned))
        .unwrap_or_default()
}

#[tokio::test]
async fn an_unreachable_guard_fails_closed_by_default_and_open_on_listed_routes() {
    captured();
    let mut mesh = Mesh::start().await.unwrap();
    // The guard is up: both routes are checked.
    let response = mesh.post_to(KEY_A, OPEN_ROUTE, "hello").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        metric(&mesh, "switchboard_guard_fail_open_total").await,
        "0"
    );

    // Stop the guard alone.
    mesh.stop_guard().await;

    // Default route: closed, a typed 503 that says the guard is down (not shedding load); nothing
    // reaches the provider.
    let response = mesh.post(KEY_A, "hello again").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "guard_unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("guard is unavailable"), "{body}");

    // Listed route: open, served, counted, and the usage record says it went unchecked.
    let response = mesh.post_to(KEY_A, OPEN_ROUTE, "hello, unchecked").await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "echo: hello, unchecked"
    );
    assert_eq!(
        metric(&mesh, "switchboard_guard_fail_open_total").await,
        "1"
    );
    let request_id = request_id_of(&answer);
    let mut ledger =
        switchboard_proto::ledger::v1::ledger_service_client::LedgerServiceClient::connect(
            mesh.ledger_url.clone(),
        )
        .await
        .unwrap();
    let mut record = None;
    for _ in 0..200 {
        match ledger
            .get_usage_record(switchboard_proto::ledger::v1::GetUsageRecordRequest {
                request_id: request_id.clone(),
            })
            .await
        {
            Ok(found) => {
                record = found.into_inner().record;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let record = record.expect("usage record of the unchecked request");
    assert_eq!(
        record.tags.get("switchboard.guard").map(String::as_str),
        Some("unchecked")
    );
    // And the audit trail has the gateway's `unchecked` event of it.
    let pool = sqlx::PgPool::connect(&mesh.pg.url).await.unwrap();
    let mut unchecked: Vec<(String, String, String)> = Vec::new();
    for _ in 0..200 {
        unchecked = sqlx::query_as(
            "SELECT request_id, source, route FROM audit_events WHERE decision = 'unchecked'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        if !unchecked.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        unchecked,
        [(request_id, "gateway".to_owned(), OPEN_ROUTE.to_owned())]
    );
    pool.close().await;
    mesh.stop().await;
}

#[tokio::test]
async fn unary_answers_are_checked_when_the_policy_acts_on_answers() {
    captured();
    let mesh = Mesh::start().await.unwrap();
    let pool = sqlx::PgPool::connect(&mesh.pg.url).await.unwrap();
    // app-d lets the email through in the prompt; the fake echoes it; the answer check redacts it.
    // The store is asynchronous: ask again (bounded) until the cache answers.
    let mut caches = Vec::new();
    for _ in 0..100 {
        if caches.last().is_some_and(|c| c == "hit") {
            break;
        }
        if !caches.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let response = mesh.post(KEY_D, &format!("contact {EMAIL_D} now")).await;
        assert_eq!(response.status(), 200);
        let cache = response
            .headers()
            .get("x-switchboard-cache")
            .map(|v| v.to_str().unwrap().to_lowercase())
            .unwrap_or_default();
        let answer: Value = response.json().await.unwrap();
        let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
        // The cache holds the checked answer: a hit is redacted too.
        assert_eq!(
            content, "echo: contact [EMAIL_ADDRESS] now",
            "cache {cache}"
        );
        caches.push(cache);
    }
    assert_eq!(caches.first().map(String::as_str), Some("miss"));
    assert_eq!(caches.last().map(String::as_str), Some("hit"));
    // The answer decision is audited.
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = audit_rows(&pool, "app-d").await;
        if rows.iter().any(|r| r.0 == "answer") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer_row = rows
        .iter()
        .find(|r| r.0 == "answer")
        .expect("answer audit row");
    assert_eq!(answer_row.1, "transform");
    assert_eq!(answer_row.3, ["redact"]);
    pool.close().await;
    mesh.stop().await;
}

#[tokio::test]
async fn streamed_answers_are_redacted_across_chunks_and_pseudonyms_still_restored() {
    captured();
    let mesh = Mesh::start().await.unwrap();
    // Long enough for windows to be released mid-stream; the fake splits it into 5 chunks, so the
    // email (allowed in the prompt, redacted in answers) and the card's placeholder (restored)
    // straddle chunk boundaries.
    let filler = "lorem ipsum dolor sit amet ".repeat(8);
    let prompt = format!("{filler}mail {EMAIL_D} {filler}card {CARD} done");
    let body = mesh.stream(KEY_D, &prompt).await;
    let mut content = String::new();
    let mut events = 0;
    let mut finish = Vec::new();
    let mut done = false;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        events += 1;
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            content.push_str(text);
        }
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            finish.push(reason.to_owned());
        }
    }
    assert!(done, "SSE framing kept: {body}");
    assert_eq!(finish, ["stop"]);
    assert!(events >= 5, "still a stream: {events} events");
    assert!(!content.contains(EMAIL_D), "the email is redacted");
    assert_eq!(
        content,
        format!("echo: {filler}mail [EMAIL_ADDRESS] {filler}card {CARD} done")
    );
    mesh.stop().await;
}

#[tokio::test]
async fn streamed_reasoning_is_checked_like_the_answer_and_a_rewritten_block_loses_its_signature() {
    captured();
    let mesh = Mesh::start().await.unwrap();
    let stream = |text: String| {
        reqwest::Client::new()
            .post(format!("{}/v1/messages", mesh.http_url))
            .header("x-api-key", KEY_D)
            .header("anthropic-version", "2023-06-01")
            .json(
                &json!({"model": THINKING_ROUTE, "max_tokens": 2048, "stream": true,
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "messages": [{"role": "user", "content": text}]}),
            )
            .send()
    };
    // (thinking text, signature, answer text) of an Anthropic SSE body.
    let read = |body: &str| {
        let (mut thinking, mut signature, mut text) = (String::new(), String::new(), String::new());
        for line in body.lines() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let event: Value = serde_json::from_str(data).unwrap();
            let delta = &event["delta"];
            match delta["type"].as_str() {
                Some("thinking_delta") => thinking.push_str(delta["thinking"].as_str().unwrap()),
                Some("signature_delta") => signature.push_str(delta["signature"].as_str().unwrap()),
                Some("text_delta") => text.push_str(delta["text"].as_str().unwrap()),
                _ => {}
            }
        }
        (thinking, signature, text)
    };

    // Nothing to redact: the reasoning and its signature pass as the provider sent them.
    let response = stream("why is the sky blue".to_owned()).await.unwrap();
    assert_eq!(response.status(), 200);
    let (thinking, signature, text) = read(&response.text().await.unwrap());
    assert_eq!(thinking, "thinking about: why is the sky blue");
    assert!(signature.starts_with("fakesig"), "{signature}");
    assert_eq!(text, "echo: why is the sky blue");

    // The email (allowed in prompts, redacted in answers) is redacted in the reasoning too, and
    // the block's signature, which covers the original text, is not passed on.
    let filler = "lorem ipsum dolor sit amet ".repeat(8);
    let prompt = format!("{filler}mail {EMAIL_D} {filler}done");
    let response = stream(prompt).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(!body.contains(EMAIL_D), "redacted everywhere: {body}");
    let (thinking, signature, text) = read(&body);
    assert_eq!(
        thinking,
        format!("thinking about: {filler}mail [EMAIL_ADDRESS] {filler}done")
    );
    assert!(
        signature.is_empty(),
        "rewritten reasoning is unsigned: {signature}"
    );
    assert_eq!(
        text,
        format!("echo: {filler}mail [EMAIL_ADDRESS] {filler}done")
    );
    mesh.stop().await;
}

#[tokio::test]
async fn an_entity_across_a_stream_window_boundary_is_redacted_whole() {
    captured();
    let mesh = Mesh::start().await.unwrap();
    // The fake answers `echo: <prompt>` in 5 equal chunks; with 1,000 characters each chunk is
    // 200. After the first chunk the gateway holds back 128 characters, so the first window ends
    // at or before character 72: the old cut (the last whitespace there not between two digits)
    // fell right after `GB82 `, splitting the grouped IBAN between two windows, and neither
    // window's check saw it whole.
    let iban = "GB82 WEST 1234 5698 7654 32";
    let mut before = "lorem ipsum dolor sit amet ".repeat(3)[..72 - 5 - "echo: ".len()].to_owned();
    before.push(' ');
    let after_len = 1000 - "echo: ".len() - before.len() - iban.len();
    let after = " lorem ipsum dolor sit amet".repeat(40)[..after_len].to_owned();
    let prompt = format!("{before}{iban}{after}");
    let answer = format!("echo: {prompt}");
    assert_eq!(answer.chars().count(), 1000);
    assert_eq!(
        &answer[68..73],
        "GB82 ",
        "the IBAN straddles the old cut at 72"
    );
    let body = mesh.stream(KEY_D, &prompt).await;
    let mut content = String::new();
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            content.push_str(text);
        }
    }
    assert!(
        !content.contains("WEST 1234"),
        "the IBAN is redacted: {content}"
    );
    assert_eq!(content, format!("echo: {before}[IBAN_CODE]{after}"));
    mesh.stop().await;
}

#[tokio::test]
async fn a_passthrough_policy_is_checked_while_the_prompt_is_routed_and_a_rewriting_one_never_is() {
    captured();
    let mut mesh = Mesh::start().await.unwrap();
    let overlapped = "switchboard_guard_overlapped_total";
    // app-e allows every entity. Its first prompt is checked before it is routed (the guard's
    // answer says the policy is pass-through); later ones are routed while they are checked.
    for i in 0..3 {
        let text = format!("note {i} for {EMAIL_A}");
        let response = mesh.post(KEY_E, &text).await;
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            format!("echo: {text}")
        );
    }
    assert_eq!(metric(&mesh, overlapped).await, "2");
    let body = mesh.stream(KEY_E, "a streamed note").await;
    assert!(body.contains("data: [DONE]"), "{body}");
    assert_eq!(metric(&mesh, overlapped).await, "3");

    // A redacting app is never overlapped: the provider only ever sees the rewritten prompt.
    for i in 0..2 {
        let response = mesh.post(KEY_A, &format!("mail {i} to {EMAIL_B}")).await;
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            format!("echo: mail {i} to [EMAIL_ADDRESS]")
        );
    }
    assert_eq!(metric(&mesh, overlapped).await, "3");

    // The guard stops. What the gateway learnt belonged to that connection: the next prompt is
    // checked first again, and its fail-closed route refuses it before any provider call.
    mesh.stop_guard().await;
    let response = mesh.post(KEY_E, "after the guard stopped").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "guard_unavailable", "{body}");
    assert_eq!(metric(&mesh, overlapped).await, "3");
    mesh.stop().await;
}

#[tokio::test]
async fn a_blocked_answer_is_refused_and_what_the_provider_was_paid_is_recorded() {
    captured();
    let mesh = Mesh::start().await.unwrap();
    let pool = sqlx::PgPool::connect(&mesh.pg.url).await.unwrap();
    // app-f lets the email through in the prompt; the fake echoes it; the answer check blocks it.
    let response = mesh.post(KEY_F, &format!("write to {EMAIL_D}")).await;
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("EMAIL_ADDRESS"), "{body}");
    assert!(!message.contains(EMAIL_D), "{body}");
    // The provider answered and was paid: one row, with its tokens, its cost and the refusal.
    let mut row = None;
    for _ in 0..200 {
        row = sqlx::query_as::<_, (String, String, i64, i64, Option<i64>)>(
            "SELECT status, error_code, prompt_tokens, completion_tokens, cost_usd_nanos \
             FROM usage_records WHERE app = 'app-f'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        if row.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, error_code, prompt, completion, cost) = row.expect("a usage row");
    assert_eq!(
        (status.as_str(), error_code.as_str()),
        ("error", "PERMISSION_DENIED")
    );
    assert!(prompt > 0 && completion > 0, "{prompt} / {completion}");
    assert!(cost.is_some_and(|c| c > 0), "{cost:?}");
    pool.close().await;
    mesh.stop().await;
}
