//! The end-to-end sandbox: all five services, each on its own port with real gRPC between them, in
//! one test process, against the machine's Postgres and NATS and two fake providers.
//!
//! The configuration is written as TOML, exactly as a user would, so these tests also exercise the
//! configuration format.

use std::time::Duration;

use anyhow::Context as _;
use switchboard_config::Source;
use switchboard_fake_provider::{FakeConfig, FakeProvider};
use switchboard_proto::{
    gateway::v1::gateway_service_client::GatewayServiceClient,
    ledger::v1::{GetUsageRecordRequest, UsageRecord, ledger_service_client::LedgerServiceClient},
};
use switchboard_testkit::{TestNats, TestPg};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// API key of app `app-a` (guard: redact).
pub const KEY_A: &str = "sk-test-app-a";
/// API key of app `app-b` (guard: block).
pub const KEY_B: &str = "sk-test-app-b";
/// API key of app `app-c` (guard: reversible pseudonyms, restored in the answer).
pub const KEY_C: &str = "sk-test-app-c";
/// API key of app `app-a` that may call only `gpt-4o-*` models (`gateway.keys[].models`) and
/// tags its requests `cost_center = cc-42` (`gateway.keys[].tags`).
pub const KEY_MINI: &str = "sk-test-app-a-mini";
/// API key of app `app-a` that expired on 2000-01-01 (`gateway.keys[].expires_at`).
pub const KEY_EXPIRED: &str = "sk-test-app-a-expired";
/// The route every test uses: primary fake provider, then the backup.
pub const MODEL: &str = "gpt-4o-mini";
/// The embeddings route: primary fake provider, then the backup.
pub const EMBEDDING_MODEL: &str = "text-embedding-3-small";
/// Request body limit of the sandbox gateway.
pub const MAX_BODY: usize = 64 * 1024;

/// A running mesh.
pub struct Sandbox {
    /// First target of the route.
    pub primary: FakeProvider,
    /// Second target of the route.
    pub backup: FakeProvider,
    /// `http://127.0.0.1:PORT` of the gateway's HTTP API.
    pub http_url: String,
    /// gRPC URL of the gateway.
    pub gateway_grpc_url: String,
    /// gRPC URL of the ledger.
    pub ledger_url: String,
    /// gRPC URL of every service, by name.
    pub grpc_urls: Vec<(&'static str, String)>,
    /// The test's NATS namespace.
    pub nats: TestNats,
    /// The test's database.
    pub pg: Option<TestPg>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

/// The mesh configuration used by the sandbox, with the dynamic parts filled in.
pub fn mesh_toml(primary: &str, backup: &str, database_url: &str, nats: &TestNats) -> String {
    let hash_a = switchboard_gateway::hash_api_key(KEY_A);
    let hash_b = switchboard_gateway::hash_api_key(KEY_B);
    let hash_c = switchboard_gateway::hash_api_key(KEY_C);
    let hash_mini = switchboard_gateway::hash_api_key(KEY_MINI);
    let hash_expired = switchboard_gateway::hash_api_key(KEY_EXPIRED);
    format!(
        r#"
[nats]
url = "{nats_url}"
subject_prefix = "{prefix}"
usage_stream = "{stream}"

[gateway]
http_addr = "127.0.0.1:0"
grpc_addr = "127.0.0.1:0"
max_body_bytes = {MAX_BODY}
keys = [
  {{ id = "key-a", sha256 = "{hash_a}", app = "app-a", team = "team-1" }},
  {{ id = "key-b", sha256 = "{hash_b}", app = "app-b", team = "team-2" }},
  {{ id = "key-c", sha256 = "{hash_c}", app = "app-c", team = "team-3" }},
  {{ id = "key-mini", sha256 = "{hash_mini}", app = "app-a", team = "team-1", models = ["gpt-4o-*"], tags = {{ cost_center = "cc-42" }} }},
  {{ id = "key-expired", sha256 = "{hash_expired}", app = "app-a", team = "team-1", expires_at = "2000-01-01T00:00:00Z" }},
]

[guard]
grpc_addr = "127.0.0.1:0"
default_action = "redact"
# Answers pass unchecked (no CheckAnswer RPC, streams not held back) unless an app says otherwise.
answer_action = "allow"
[guard.apps.app-b]
action = "block"
[guard.apps.app-c]
action = "pseudonymize"

[cache]
grpc_addr = "127.0.0.1:0"
default_ttl_secs = 600

[router]
grpc_addr = "127.0.0.1:0"
attempt_timeout_ms = 5000
max_retries = 0
retry_backoff_ms = 1
[router.providers.primary]
kind = "openai"
base_url = "{primary}"
[router.providers.backup]
kind = "openai"
base_url = "{backup}"
[[router.routes]]
name = "{MODEL}"
targets = [{{ provider = "primary", model = "{MODEL}" }}, {{ provider = "backup", model = "{MODEL}" }}]
[[router.routes]]
name = "{EMBEDDING_MODEL}"
targets = [{{ provider = "primary", model = "{EMBEDDING_MODEL}" }}, {{ provider = "backup", model = "{EMBEDDING_MODEL}" }}]

[ledger]
grpc_addr = "127.0.0.1:0"
database_url = "{database_url}"
consumer_name = "ledger"
batch_size = 100
ack_wait_secs = 5
[[ledger.prices]]
model = "{MODEL}"
input = "0.15"
cached_input = "0.075"
output = "0.60"
effective_from = "2024-01-01"
[[ledger.prices]]
model = "{EMBEDDING_MODEL}"
input = "0.02"
output = "0"
effective_from = "2024-01-01"
"#,
        nats_url = nats.url,
        prefix = nats.prefix,
        stream = nats.stream,
    )
}

/// `message` with `authorization: Bearer <key>` metadata, as a caller of the gateway's gRPC API sends it.
pub fn authed<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::try_from(format!("Bearer {key}"))
            .expect("an API key is a valid header value"),
    );
    request
}

/// Cost in USD nanos at the sandbox prices (0.15 in / 0.60 out per million tokens).
pub fn expected_cost_nanos(prompt_tokens: i64, completion_tokens: i64) -> i64 {
    // nanos = tokens * (USD per Mtok * 1e9) / 1e6 = tokens * 150 (input) and tokens * 600 (output)
    prompt_tokens * 150 + completion_tokens * 600
}

impl Sandbox {
    /// Starts two fake providers and the five services.
    pub async fn start() -> anyhow::Result<Sandbox> {
        Self::start_with(|_| String::new()).await
    }

    /// Starts the mesh with `extra(primary)` appended to its configuration (e.g. more providers
    /// and routes on the primary fake provider). A provider's `api_key_env` there resolves to
    /// `sandbox-key-<VAR>`.
    pub async fn start_with(
        extra: impl FnOnce(&FakeProvider) -> String,
    ) -> anyhow::Result<Sandbox> {
        let primary = FakeProvider::start(FakeConfig {
            addr: "127.0.0.1:0".into(),
            ..Default::default()
        })
        .await?;
        let backup = FakeProvider::start(FakeConfig {
            addr: "127.0.0.1:0".into(),
            ..Default::default()
        })
        .await?;
        let nats = TestNats::create().await?;
        let pg = TestPg::create().await?;
        let source = Source::from_toml(
            &(mesh_toml(&primary.base_url(), &backup.base_url(), &pg.url, &nats)
                + &extra(&primary)),
        )?;
        let nats_config: switchboard_bus::NatsConfig = source.section("nats")?;
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();

        let ledger = switchboard_ledger::App::build(source.section("ledger")?, nats_config.clone())
            .await
            .context("ledger")?;
        let ledger_url = format!("http://{}", ledger.local_addr());
        tasks.push(spawn(cancel.clone(), |stop| async move {
            Ok(ledger.run_until(stop).await?)
        }));

        let mut router_config: switchboard_router::Config = source.section("router")?;
        router_config.resolve_api_keys(|var| Some(format!("sandbox-key-{var}")));
        let router = switchboard_router::App::build(router_config)
            .await
            .context("router")?;
        let router_url = format!("http://{}", router.local_addr());
        tasks.push(spawn(cancel.clone(), |stop| async move {
            Ok(router.run_until(stop).await?)
        }));

        let cache = switchboard_cache::App::build(source.section("cache")?, nats_config.clone())
            .await
            .context("cache")?;
        let cache_url = format!("http://{}", cache.local_addr());
        tasks.push(spawn(cancel.clone(), |stop| async move {
            Ok(cache.run_until(stop).await?)
        }));

        let guard = switchboard_guard::App::build(source.section("guard")?)
            .await
            .context("guard")?;
        let guard_url = format!("http://{}", guard.local_addr());
        tasks.push(spawn(cancel.clone(), |stop| async move {
            Ok(guard.run_until(stop).await?)
        }));

        let mut gateway_config: switchboard_gateway::Config = source.section("gateway")?;
        let mut grpc_urls = vec![
            ("switchboard.guard.v1.GuardService", guard_url.clone()),
            ("switchboard.cache.v1.CacheService", cache_url.clone()),
            ("switchboard.router.v1.RouterService", router_url.clone()),
            ("switchboard.ledger.v1.LedgerService", ledger_url.clone()),
        ];
        gateway_config.guard_url = guard_url;
        gateway_config.cache_url = cache_url;
        gateway_config.router_url = router_url;
        let gateway = switchboard_gateway::App::build(gateway_config, nats_config)
            .await
            .context("gateway")?;
        let http_url = format!("http://{}", gateway.http_addr());
        let gateway_grpc_url = format!("http://{}", gateway.grpc_addr());
        grpc_urls.push((
            "switchboard.gateway.v1.GatewayService",
            gateway_grpc_url.clone(),
        ));
        tasks.push(spawn(cancel.clone(), |stop| async move {
            Ok(gateway.run_until(stop).await?)
        }));

        Ok(Sandbox {
            primary,
            backup,
            http_url,
            gateway_grpc_url,
            ledger_url,
            grpc_urls,
            nats,
            pg: Some(pg),
            cancel,
            tasks,
        })
    }

    /// A gRPC client of the gateway.
    pub async fn gateway(&self) -> anyhow::Result<GatewayServiceClient<Channel>> {
        Ok(GatewayServiceClient::connect(self.gateway_grpc_url.clone()).await?)
    }

    /// A gRPC client of the ledger.
    pub async fn ledger(&self) -> anyhow::Result<LedgerServiceClient<Channel>> {
        Ok(LedgerServiceClient::connect(self.ledger_url.clone()).await?)
    }

    /// Waits (bounded) until the ledger holds the row of `request_id`.
    pub async fn wait_for_record(&self, request_id: &str) -> anyhow::Result<UsageRecord> {
        let mut ledger = self.ledger().await?;
        for _ in 0..200 {
            match ledger
                .get_usage_record(GetUsageRecordRequest {
                    request_id: request_id.to_owned(),
                })
                .await
            {
                Ok(found) => return found.into_inner().record.context("empty record"),
                Err(status) if status.code() == tonic::Code::NotFound => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => anyhow::bail!("ledger: {status}"),
            }
        }
        anyhow::bail!("no ledger row for {request_id} after 10 s")
    }

    /// Whether the ledger has a row for `request_id` right now.
    pub async fn has_record(&self, request_id: &str) -> anyhow::Result<bool> {
        let mut ledger = self.ledger().await?;
        match ledger
            .get_usage_record(GetUsageRecordRequest {
                request_id: request_id.to_owned(),
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(false),
            Err(status) => anyhow::bail!("ledger: {status}"),
        }
    }

    /// Stops every service and cleans the test's database and stream.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.cancel.cancel();
        for task in self.tasks.drain(..) {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .context("service did not stop")???;
        }
        self.nats.cleanup().await;
        // The shared cache's stream (named after the test's subject prefix).
        if let Ok(client) = async_nats::connect(&self.nats.url).await {
            let nats = switchboard_bus::NatsConfig {
                subject_prefix: self.nats.prefix.clone(),
                ..Default::default()
            };
            let stream = switchboard_cache::replication::stream_name(&Default::default(), &nats);
            let _ = async_nats::jetstream::new(client)
                .delete_stream(&stream)
                .await;
        }
        if let Some(pg) = self.pg.take() {
            pg.drop_db().await;
        }
        Ok(())
    }
}

fn spawn<F, Fut>(cancel: CancellationToken, run: F) -> JoinHandle<anyhow::Result<()>>
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(async move { cancel.cancelled_owned().await });
    tokio::spawn(run(stop))
}

/// Directory of the workspace's binaries (`target/<profile>`), next to the running test's `deps/`:
/// the tests that run the services as processes start them from there.
pub fn bin_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(|deps| deps.parent()).map(Into::into))
        .unwrap_or_else(|| panic!("cannot locate the test executable's directory"))
}

/// Waits until something accepts connections on `127.0.0.1:port`; panics, naming `what`, after 30 s.
pub async fn wait_port(port: u16, what: &str) {
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: nothing listening on port {port} after 30 s");
}
