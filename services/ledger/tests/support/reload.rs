//! Shared by `reload.rs` and `reload_sighup.rs`: a real `App` (real Postgres and NATS) started
//! from a configuration file it watches, and its budget and price answers.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use switchboard_bus::NatsConfig;
use switchboard_grpc::ConfigFile;
use switchboard_ledger::{App, Config, StartupError};
use switchboard_proto::ledger::v1::{
    Budget, GetPricesRequest, ListBudgetsRequest, PriceTarget,
    budget_service_client::BudgetServiceClient,
};
use switchboard_testkit::{TestNats, TestPg};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub const TEAM_ID: &str = "config.team.team-1";
pub const ORG_ID: &str = "config.org";
/// One USD per million tokens, in nano-USD per million tokens.
pub const USD: i64 = 1_000_000_000;

/// The `[ledger]` section with `body` (`[[ledger.prices]]`, `[[ledger.budgets]]`, …) appended.
pub fn ledger_toml(database_url: &str, poll_ms: u64, settings: &str, body: &str) -> String {
    format!(
        "[ledger]\n\
         grpc_addr = \"127.0.0.1:0\"\n\
         database_url = \"{database_url}\"\n\
         max_connections = 4\n\
         price_reload_secs = 0\n\
         config_poll_ms = {poll_ms}\n\
         metrics_addr = \"127.0.0.1:0\"\n\
         {settings}\n\
         {body}"
    )
}

/// A `[[ledger.prices]]` entry for provider `*`, model `m`.
pub fn price(input: &str, output: &str, from: &str) -> String {
    format!(
        "[[ledger.prices]]\nmodel = \"m\"\ninput = \"{input}\"\noutput = \"{output}\"\n\
         effective_from = \"{from}\"\n"
    )
}

/// The team budget `team-1`, monthly, with `limit` USD.
pub fn team_budget(limit: &str) -> String {
    format!(
        "[[ledger.budgets]]\nscope = \"team\"\nid = \"team-1\"\nlimit_usd = \"{limit}\"\n\
         period = \"month\"\n"
    )
}

/// The organisation budget: soft, lifetime, 1,000 USD.
pub fn org_budget() -> String {
    "[[ledger.budgets]]\nscope = \"org\"\nlimit_usd = \"1000\"\nperiod = \"lifetime\"\n\
     enforcement = \"soft\"\n"
        .to_owned()
}

pub struct Env {
    pub pg: TestPg,
    pub nats: TestNats,
    pub nats_config: NatsConfig,
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl Env {
    pub async fn new() -> Env {
        let pg = TestPg::create().await.expect("postgres");
        let nats = TestNats::create().await.expect("nats");
        let nats_config = nats.config();
        let dir = std::env::temp_dir().join(format!(
            "switchboard-ledger-reload-{}",
            uuid::Uuid::now_v7()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("switchboard.toml");
        Env {
            pg,
            nats,
            nats_config,
            dir,
            path,
        }
    }

    /// Builds the ledger from the file (as `main` does), watches the file and runs the ledger.
    pub async fn start(&self) -> Running {
        let file = ConfigFile::new(Some(self.path.clone()));
        let config: Config = file
            .load()
            .expect("file loads")
            .section("ledger")
            .expect("[ledger]");
        let mut app = App::build(config, self.nats_config.clone())
            .await
            .expect("app builds");
        app.watch_config(&file);
        let addr = app.local_addr();
        let metrics = app.metrics_addr().expect("metrics endpoint");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        let client = BudgetServiceClient::connect(switchboard_grpc::url_of(addr))
            .await
            .expect("client");
        Running {
            client,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    pub async fn cleanup(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        self.nats.cleanup().await;
        self.pg.drop_db().await;
    }
}

/// Replaces the file in one step (written next to it, then renamed over it), so that a watcher
/// never reads half a file, with modification time `generation` seconds after a fixed instant,
/// so that every generation has its own.
pub fn write_file(path: &Path, text: &str, generation: u64) {
    let tmp = path.with_extension(format!("tmp{generation}"));
    std::fs::write(&tmp, text).expect("write");
    let file = std::fs::File::options()
        .write(true)
        .open(&tmp)
        .expect("open");
    file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + generation))
        .expect("set mtime");
    drop(file);
    std::fs::rename(&tmp, path).expect("rename");
}

pub struct Running {
    pub client: BudgetServiceClient<Channel>,
    pub metrics: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), StartupError>>,
}

impl Running {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("join").expect("clean shutdown");
    }

    /// Every budget, by id.
    pub async fn budgets(&self) -> BTreeMap<String, Budget> {
        self.client
            .clone()
            .list_budgets(ListBudgetsRequest {})
            .await
            .expect("list budgets")
            .into_inner()
            .budgets
            .into_iter()
            .map(|b| (b.id.clone(), b))
            .collect()
    }

    /// The limit of budget `id`, if it exists.
    pub async fn limit(&self, id: &str) -> Option<i64> {
        self.budgets().await.get(id).map(|b| b.limit_usd_nanos)
    }

    /// The input rate in use for `openai`/`m` today (nano-USD per million tokens).
    pub async fn input_rate(&self) -> Option<i64> {
        self.client
            .clone()
            .get_prices(GetPricesRequest {
                targets: vec![PriceTarget {
                    provider: "openai".into(),
                    model: "m".into(),
                }],
            })
            .await
            .expect("get prices")
            .into_inner()
            .prices
            .first()
            .and_then(|p| p.base.as_ref())
            .map(|r| r.input)
    }

    /// A counter of the `/metrics` endpoint.
    /// Waits until the counter `name` reads `value` (`what`: for the timeout message).
    pub async fn wait_for(&self, what: &str, name: &str, value: u64) {
        eventually(what, || async move {
            (self.counter(name).await == value).then_some(())
        })
        .await;
    }

    pub async fn counter(&self, name: &str) -> u64 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(self.metrics)
            .await
            .expect("metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: ledger\r\n\r\n")
            .await
            .expect("request");
        let mut body = String::new();
        stream.read_to_string(&mut body).await.expect("response");
        body.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    }
}

/// Polls `probe` (every 25 ms, at most 400 times) until it returns `Some`.
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..400 {
        if let Some(value) = probe().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("gave up waiting for {what}");
}
