//! The system under test: the fake provider and the five services as separate release processes,
//! one generated TOML file plus environment overrides, a fresh Postgres database and a private NATS
//! namespace. Everything is torn down by [`Mesh::shutdown`] (and children are killed on drop).

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, postgres::PgPoolOptions};
use tokio::process::{Child, Command};

use crate::otlp;

/// The route every scenario uses (but the semantic one).
pub const MODEL: &str = "gpt-4o-mini";

/// A second route to the same target with the semantic cache on (`[cache.semantic.routes]`).
pub const SEMANTIC_MODEL: &str = "bench-semantic";

/// The hard budgets of a budget scenario's app and key: large enough never to refuse.
const BENCH_BUDGET_USD_NANOS: i64 = 1_000_000 * 1_000_000_000;

/// Where to find things and how to reach Postgres / NATS.
pub struct MeshOptions {
    pub bin_dir: PathBuf,
    pub log_dir: PathBuf,
    pub pg_server: String,
    pub nats_url: String,
    pub stream_chunks: usize,
    /// Scenario names: each gets key `sk-bench-<name>` and app `bench-<name>`.
    pub apps: Vec<String>,
    /// Apps whose guard policy is `redact` (all others: `allow`).
    pub redact_apps: Vec<String>,
    /// `RUST_LOG` of the services.
    pub rust_log: String,
    /// Scenario names whose app and key get a hard budget (the gateway's budgets are on when any).
    pub budget_apps: Vec<String>,
    /// Load the embedding model and open [`SEMANTIC_MODEL`] to the semantic cache.
    pub semantic: bool,
}

/// A started process.
pub struct Proc {
    pub name: String,
    pub pid: u32,
    child: Child,
}

/// The running mesh. Create with [`Mesh::new`], then [`Mesh::start`]; always call [`Mesh::shutdown`].
#[derive(Default)]
pub struct Mesh {
    pub procs: Vec<Proc>,
    pub fake_addr: Option<SocketAddr>,
    /// The fake provider's own gRPC server of the gateway API (the direct gRPC baseline).
    pub fake_grpc_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub grpc_addr: Option<SocketAddr>,
    pub guard_addr: Option<SocketAddr>,
    pub ledger_addr: Option<SocketAddr>,
    pub otlp: Option<otlp::Counter>,
    otlp_task: Option<otlp::Receiver>,
    db_name: Option<String>,
    pg_server: String,
    pool: Option<sqlx::PgPool>,
    nats_url: String,
    stream: Option<String>,
    /// The audit and cache streams of the run's prefix (deleted with the usage stream).
    derived_streams: Vec<String>,
    config_path: Option<PathBuf>,
}

/// API key of a scenario.
pub fn api_key(scenario: &str) -> String {
    format!("sk-bench-{scenario}")
}

/// App of a scenario (its ledger rows carry it).
pub fn app_name(scenario: &str) -> String {
    format!("bench-{scenario}")
}

fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn config_toml(
    opts: &MeshOptions,
    fake: SocketAddr,
    database_url: &str,
    prefix: &str,
    stream: &str,
) -> String {
    let keys: Vec<String> = opts
        .apps
        .iter()
        .map(|s| {
            format!(
                "  {{ id = \"key-{s}\", sha256 = \"{}\", app = \"{}\", team = \"bench\" }},",
                hex::encode(Sha256::digest(api_key(s).as_bytes())),
                app_name(s)
            )
        })
        .collect();
    let policies: String = opts
        .redact_apps
        .iter()
        .map(|s| format!("[guard.apps.{}]\naction = \"redact\"\n", app_name(s)))
        .collect();
    let budgets = if opts.budget_apps.is_empty() {
        String::new()
    } else {
        // Budgets are read from the ledger every second (a budget created after start-up is in force
        // before its scenario runs).
        "[gateway.budgets]\nenabled = true\nrefresh_ms = 1000\n".to_owned()
    };
    let semantic = if opts.semantic {
        format!(
            "[cache.semantic]\nenabled = true\n[cache.semantic.routes.{SEMANTIC_MODEL}]\nthreshold = 0.99\n"
        )
    } else {
        String::new()
    };
    format!(
        r#"
[telemetry]
log_filter = "warn"

[nats]
url = "{nats_url}"
subject_prefix = "{prefix}"
usage_stream = "{stream}"

[gateway]
max_body_bytes = 1048576
cache_enabled = true
usage_queue_capacity = 1000000
keys = [
{keys}
]
{budgets}
[guard]
default_action = "allow"
entities = ["EMAIL_ADDRESS", "CREDIT_CARD"]
{policies}
[cache]
default_ttl_secs = 3600
max_entries = 100000
{semantic}
[router]
attempt_timeout_ms = 30000
max_retries = 0
retry_backoff_ms = 1
[router.providers.fake]
kind = "openai"
base_url = "http://{fake}/v1"
[[router.routes]]
name = "{MODEL}"
targets = [{{ provider = "fake", model = "{MODEL}" }}]
[[router.routes]]
name = "{SEMANTIC_MODEL}"
targets = [{{ provider = "fake", model = "{MODEL}" }}]

[ledger]
database_url = "{database_url}"
max_connections = 8
consumer_name = "ledger"
batch_size = 200
ack_wait_secs = 30
[[ledger.prices]]
model = "{MODEL}"
input = "0.15"
cached_input = "0.075"
output = "0.60"
effective_from = "2024-07-18"
"#,
        nats_url = opts.nats_url,
        keys = keys.join("\n"),
    )
}

/// A hard lifetime budget on the scenario's app and one on its key (both reserved per request).
async fn create_budgets(ledger: SocketAddr, scenario: &str) -> anyhow::Result<()> {
    use switchboard_proto::ledger::v1::{
        Budget, BudgetEnforcement, BudgetPeriod, BudgetScope, BudgetScopeKind, CreateBudgetRequest,
        budget_service_client::BudgetServiceClient,
    };
    let mut client = BudgetServiceClient::connect(format!("http://{ledger}")).await?;
    let scopes = [
        ("app", BudgetScopeKind::App, app_name(scenario)),
        ("key", BudgetScopeKind::Key, format!("key-{scenario}")),
    ];
    for (label, kind, id) in scopes {
        let budget = Budget {
            id: format!("bench-{label}-{scenario}"),
            scope: Some(BudgetScope {
                kind: kind as i32,
                id,
            }),
            period: BudgetPeriod::Lifetime as i32,
            limit_usd_nanos: BENCH_BUDGET_USD_NANOS,
            enforcement: BudgetEnforcement::Hard as i32,
            ..Default::default()
        };
        client
            .create_budget(CreateBudgetRequest {
                budget: Some(budget),
            })
            .await
            .with_context(|| format!("creating the budgets of {scenario}"))?;
    }
    Ok(())
}

async fn wait_port(name: &str, addr: SocketAddr, child: &mut Child) -> anyhow::Result<()> {
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!("{name} exited during start-up ({status}); see its log");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{name}: nothing listening on {addr} after 30 s")
}

impl Mesh {
    pub fn new() -> Mesh {
        Mesh::default()
    }

    /// Creates the database and namespace, writes the configuration, starts every process and waits
    /// until each listens. On error, whatever was started is still owned by `self`.
    pub async fn start(&mut self, opts: &MeshOptions) -> anyhow::Result<()> {
        for bin in [
            "fake-provider",
            "ledger",
            "router",
            "cache",
            "guard",
            "gateway",
        ] {
            let path = opts.bin_dir.join(bin);
            anyhow::ensure!(
                path.exists(),
                "{} is missing: run `cargo build --release --bins` first",
                path.display()
            );
        }
        std::fs::create_dir_all(&opts.log_dir)?;
        let id = uuid::Uuid::now_v7().simple().to_string();

        // Postgres: a fresh database.
        self.pg_server = opts.pg_server.clone();
        let db_name = format!("sbbench_{id}");
        let mut admin = PgConnection::connect(&format!("{}/postgres", opts.pg_server))
            .await
            .with_context(|| format!("Postgres at {} is not reachable", opts.pg_server))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        self.db_name = Some(db_name.clone());
        let database_url = format!("{}/{db_name}", opts.pg_server);

        // NATS: check the server; the gateway/ledger create the stream.
        self.nats_url = opts.nats_url.clone();
        async_nats::connect(&opts.nats_url)
            .await
            .with_context(|| format!("NATS at {} is not reachable", opts.nats_url))?;
        let prefix = format!("bench.{id}");
        let stream = format!("BENCH_{id}");
        self.stream = Some(stream.clone());
        // The streams the services derive from the prefix (guard audit, cache replication).
        let nats = switchboard_bus::NatsConfig {
            subject_prefix: prefix.clone(),
            ..Default::default()
        };
        self.derived_streams = vec![nats.audit_stream(), nats.cache_stream()];

        // The in-process span counter.
        let (otlp_addr, counter, task) = otlp::spawn()?;
        self.otlp = Some(counter);
        self.otlp_task = Some(task);

        let ports = free_ports(8)?;
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let (fake, http, gw_grpc, guard, cache, router, ledger) = (
            addr(ports[0]),
            addr(ports[1]),
            addr(ports[2]),
            addr(ports[3]),
            addr(ports[4]),
            addr(ports[5]),
            addr(ports[6]),
        );
        let fake_grpc = addr(ports[7]);
        self.fake_addr = Some(fake);
        self.fake_grpc_addr = Some(fake_grpc);
        self.http_addr = Some(http);
        self.grpc_addr = Some(gw_grpc);
        self.guard_addr = Some(guard);
        self.ledger_addr = Some(ledger);

        let config_path = std::env::temp_dir().join(format!("switchboard-bench-{id}.toml"));
        std::fs::write(
            &config_path,
            config_toml(opts, fake, &database_url, &prefix, &stream),
        )?;
        self.config_path = Some(config_path.clone());

        let env: BTreeMap<&str, String> = BTreeMap::from([
            (
                "SWITCHBOARD__TELEMETRY__OTLP_ENDPOINT",
                format!("http://{otlp_addr}"),
            ),
            ("SWITCHBOARD__GATEWAY__HTTP_ADDR", http.to_string()),
            ("SWITCHBOARD__GATEWAY__GRPC_ADDR", gw_grpc.to_string()),
            ("SWITCHBOARD__GATEWAY__GUARD_URL", format!("http://{guard}")),
            ("SWITCHBOARD__GATEWAY__CACHE_URL", format!("http://{cache}")),
            (
                "SWITCHBOARD__GATEWAY__LEDGER_URL",
                format!("http://{ledger}"),
            ),
            (
                "SWITCHBOARD__GATEWAY__ROUTER_URL",
                format!("http://{router}"),
            ),
            ("SWITCHBOARD__GUARD__GRPC_ADDR", guard.to_string()),
            ("SWITCHBOARD__CACHE__GRPC_ADDR", cache.to_string()),
            ("SWITCHBOARD__ROUTER__GRPC_ADDR", router.to_string()),
            ("SWITCHBOARD__LEDGER__GRPC_ADDR", ledger.to_string()),
            ("RUST_LOG", opts.rust_log.clone()),
        ]);
        let config_arg = ["--config".to_owned(), config_path.display().to_string()];
        let fake_args = [
            "--addr".to_owned(),
            fake.to_string(),
            "--latency-ms".to_owned(),
            "0".to_owned(),
            "--stream-chunks".to_owned(),
            opts.stream_chunks.to_string(),
            "--grpc-addr".to_owned(),
            fake_grpc.to_string(),
        ];
        let plan: [(&str, &[String], SocketAddr); 6] = [
            ("fake-provider", &fake_args, fake),
            ("ledger", &config_arg, ledger),
            ("router", &config_arg, router),
            ("cache", &config_arg, cache),
            ("guard", &config_arg, guard),
            ("gateway", &config_arg, http),
        ];
        for (name, args, _) in &plan {
            self.spawn(name, args, &env, &opts.bin_dir, &opts.log_dir)?;
        }
        for (i, (name, _, port)) in plan.iter().enumerate() {
            wait_port(name, *port, &mut self.procs[i].child).await?;
        }
        let gw = self.procs.len() - 1;
        wait_port("gateway (gRPC)", gw_grpc, &mut self.procs[gw].child).await?;
        wait_port("fake provider (gRPC)", fake_grpc, &mut self.procs[0].child).await?;

        self.pool = Some(
            PgPoolOptions::new()
                .max_connections(2)
                .connect(&database_url)
                .await?,
        );
        for scenario in &opts.budget_apps {
            create_budgets(ledger, scenario).await?;
        }
        Ok(())
    }

    fn spawn(
        &mut self,
        name: &str,
        args: &[String],
        env: &BTreeMap<&str, String>,
        bin_dir: &Path,
        log_dir: &Path,
    ) -> anyhow::Result<()> {
        let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
        let child = Command::new(bin_dir.join(name))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id().with_context(|| format!("{name} has no pid"))?;
        self.procs.push(Proc {
            name: name.to_owned(),
            pid,
            child,
        });
        Ok(())
    }

    /// (name, pid) of every process.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs.iter().map(|p| (p.name.clone(), p.pid)).collect()
    }

    /// Names of processes that have exited.
    pub fn dead(&mut self) -> Vec<String> {
        self.procs
            .iter_mut()
            .filter_map(|p| match p.child.try_wait() {
                Ok(Some(_)) | Err(_) => Some(p.name.clone()),
                Ok(None) => None,
            })
            .collect()
    }

    /// Ledger rows of an app.
    pub async fn ledger_rows(&self, app: &str) -> anyhow::Result<i64> {
        let pool = self.pool.as_ref().context("no database pool")?;
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM usage_records WHERE app = $1")
            .bind(app)
            .fetch_one(pool)
            .await?;
        Ok(count)
    }

    /// SIGTERM everything (gateway first, fake provider last), wait up to 15 s each, then SIGKILL;
    /// then drop the database, delete the stream and remove the configuration file. Idempotent.
    pub async fn shutdown(&mut self) {
        for proc in self.procs.iter().rev() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(proc.pid.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for proc in self.procs.iter_mut().rev() {
            let stopped = tokio::time::timeout(Duration::from_secs(15), proc.child.wait()).await;
            if !matches!(stopped, Ok(Ok(_))) {
                eprintln!(
                    "{} did not stop within 15 s of SIGTERM: killing it",
                    proc.name
                );
                let _ = proc.child.kill().await;
            }
        }
        self.procs.clear();
        if let Some(pool) = self.pool.take() {
            pool.close().await;
        }
        if let Some(db) = self.db_name.take()
            && let Ok(mut admin) =
                PgConnection::connect(&format!("{}/postgres", self.pg_server)).await
        {
            let sql = format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)");
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await
            {
                eprintln!("could not drop database {db}: {e}");
            }
        }
        if let Some(stream) = self.stream.take()
            && let Ok(client) = async_nats::connect(&self.nats_url).await
        {
            let js = async_nats::jetstream::new(client);
            for stream in std::iter::once(stream).chain(std::mem::take(&mut self.derived_streams)) {
                if let Err(e) = js.delete_stream(&stream).await {
                    eprintln!("could not delete stream {stream}: {e}");
                }
            }
        }
        if let Some(path) = self.config_path.take() {
            let _ = std::fs::remove_file(path);
        }
        if let Some(mut receiver) = self.otlp_task.take() {
            receiver.stop();
        }
    }
}
