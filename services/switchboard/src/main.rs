//! `switchboard`: runs the whole mesh locally (each service on its own port, real gRPC between them)
//! and hosts operator commands.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use switchboard_config::{ConfigError, Source};
use tokio_util::sync::CancellationToken;

mod cache_cmd;
mod prices;
mod spend;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "switchboard", about = "Switchboard LLM orchestration mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run all five services in one process, each on its configured port.
    Run {
        /// Configuration file (default: $SWITCHBOARD_CONFIG).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also start the FAKE provider (a demo backend, never for production) on this address.
        #[arg(long, value_name = "ADDR")]
        with_fake_provider: Option<String>,
    },
    /// Validate a configuration file: every section of every service.
    CheckConfig {
        /// Configuration file (default: $SWITCHBOARD_CONFIG).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Price administration: import LiteLLM's price map, re-price a period (ledger database).
    Prices {
        #[command(subcommand)]
        command: prices::PricesCommand,
    },
    /// Spend for finance, grouped by team, model, day, … (ledger gRPC, read from the rollups).
    Spend(spend::SpendArgs),
    /// Usage rows for finance: `usage export` (ledger gRPC, streamed).
    Usage {
        #[command(subcommand)]
        command: spend::UsageCommand,
    },
    /// Cache administration: `cache purge --app X` (cache gRPC; every replica).
    Cache {
        #[command(subcommand)]
        command: cache_cmd::CacheCommand,
    },
    /// Print the SHA-256 of an API key, for `gateway.keys[].sha256`.
    HashKey {
        /// The key.
        key: String,
    },
}

/// Every section of the mesh, validated.
struct Mesh {
    telemetry: switchboard_telemetry::TelemetryConfig,
    nats: switchboard_bus::NatsConfig,
    gateway: switchboard_gateway::Config,
    guard: switchboard_guard::Config,
    cache: switchboard_cache::Config,
    router: switchboard_router::Config,
    ledger: switchboard_ledger::Config,
}

fn load(path: Option<&std::path::Path>) -> Result<Mesh, ConfigError> {
    let source = Source::load(path)?;
    let mesh = Mesh {
        telemetry: source.section("telemetry")?,
        nats: source.section("nats")?,
        gateway: source.section("gateway")?,
        guard: source.section("guard")?,
        cache: source.section("cache")?,
        router: source.section("router")?,
        ledger: source.section("ledger")?,
    };
    mesh.gateway.validate()?;
    mesh.guard.validate()?;
    mesh.cache.validate()?;
    mesh.router.validate()?;
    mesh.ledger.validate()?;
    check_message_limits(&mesh)?;
    Ok(mesh)
}

/// Refuses a gateway that accepts requests larger than a hop behind it decodes: each of the
/// guard, the cache (when enabled) and the router must take the gateway's largest message
/// ([`switchboard_grpc::internal_message_limit`] of `gateway.max_body_bytes`), or such requests
/// would fail inside the mesh.
fn check_message_limits(mesh: &Mesh) -> Result<(), ConfigError> {
    let needed = switchboard_grpc::internal_message_limit(mesh.gateway.max_body_bytes);
    let hops = [
        ("guard", mesh.guard.max_message_bytes, true),
        (
            "cache",
            mesh.cache.max_message_bytes,
            mesh.gateway.cache_enabled,
        ),
        ("router", mesh.router.max_message_bytes, true),
    ];
    match hops
        .into_iter()
        .find(|&(_, accepts, called)| called && accepts < needed)
    {
        Some((hop, accepts, _)) => Err(ConfigError::invalid(
            "gateway.max_body_bytes",
            format!(
                "{} lets the gateway send messages of up to {needed} bytes (twice the body \
                 limit, at least 8 MiB), but {hop}.max_message_bytes = {accepts}: raise \
                 {hop}.max_message_bytes to at least {needed} or lower gateway.max_body_bytes",
                mesh.gateway.max_body_bytes
            ),
        )),
        None => Ok(()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Prices { command } => prices::run(command).await,
        Command::Spend(args) => spend::run_spend(args).await,
        Command::Usage { command } => spend::run_usage(command).await,
        Command::Cache { command } => cache_cmd::run(command).await,
        Command::HashKey { key } => {
            println!("{}", switchboard_gateway::hash_api_key(&key));
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match load(config.as_deref()) {
            Ok(_) => {
                println!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("invalid configuration: {error}");
                ExitCode::from(64)
            }
        },
        Command::Run {
            config,
            with_fake_provider,
        } => {
            let mesh = match load(config.as_deref()) {
                Ok(mesh) => mesh,
                Err(error) => {
                    eprintln!("invalid configuration: {error}");
                    return ExitCode::from(64);
                }
            };
            let telemetry = match switchboard_telemetry::init("switchboard", &mesh.telemetry) {
                Ok(telemetry) => telemetry,
                Err(error) => {
                    eprintln!("telemetry: {error}");
                    return ExitCode::from(70);
                }
            };
            // The router and the ledger re-read their sections of this file on SIGHUP or when it
            // changes, as their own binaries do.
            let file = switchboard_grpc::ConfigFile::resolve(config);
            let outcome = run(mesh, with_fake_provider, file).await;
            telemetry.shutdown();
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("switchboard: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(
    mut mesh: Mesh,
    fake_provider: Option<String>,
    file: switchboard_grpc::ConfigFile,
) -> anyhow::Result<()> {
    let fake = match fake_provider {
        Some(addr) => {
            let fake = switchboard_fake_provider::FakeProvider::start(
                switchboard_fake_provider::FakeConfig {
                    addr,
                    ..Default::default()
                },
            )
            .await?;
            tracing::warn!(addr = %fake.addr(), "FAKE provider running: a demo backend, not a real model");
            Some(fake)
        }
        None => None,
    };
    for provider in mesh.router.resolve_api_keys(|var| std::env::var(var).ok()) {
        tracing::warn!(%provider, "api key environment variable is unset, calling the provider without a key");
    }
    let cancel = CancellationToken::new();
    let stop = |cancel: &CancellationToken| {
        let cancel = cancel.clone();
        async move { cancel.cancelled_owned().await }
    };
    let mut ledger = switchboard_ledger::App::build(mesh.ledger, mesh.nats.clone()).await?;
    ledger.watch_config(&file);
    let mut router = switchboard_router::App::build(mesh.router).await?;
    router.watch_config(&file);
    let cache = switchboard_cache::App::build(mesh.cache, mesh.nats.clone()).await?;
    let guard =
        switchboard_guard::App::build_with_audit(mesh.guard, Some(mesh.nats.clone())).await?;
    let mut gateway = switchboard_gateway::App::build(mesh.gateway, mesh.nats).await?;
    gateway.watch_config(&file);
    tracing::info!(
        http = %gateway.http_addr(),
        grpc = %gateway.grpc_addr(),
        guard = %guard.local_addr(),
        cache = %cache.local_addr(),
        router = %router.local_addr(),
        ledger = %ledger.local_addr(),
        "switchboard mesh running"
    );
    let signal = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            switchboard_grpc::shutdown_signal().await;
            cancel.cancel();
        })
    };
    let (gateway, guard, cache, router, ledger) = tokio::join!(
        async {
            let result = gateway
                .run_until(stop(&cancel))
                .await
                .map_err(anyhow::Error::from);
            cancel.cancel();
            result.map_err(|e| e.context("gateway"))
        },
        async {
            let result = guard
                .run_until(stop(&cancel))
                .await
                .map_err(anyhow::Error::from);
            cancel.cancel();
            result.map_err(|e| e.context("guard"))
        },
        async {
            let result = cache
                .run_until(stop(&cancel))
                .await
                .map_err(anyhow::Error::from);
            cancel.cancel();
            result.map_err(|e| e.context("cache"))
        },
        async {
            let result = router
                .run_until(stop(&cancel))
                .await
                .map_err(anyhow::Error::from);
            cancel.cancel();
            result.map_err(|e| e.context("router"))
        },
        async {
            let result = ledger
                .run_until(stop(&cancel))
                .await
                .map_err(anyhow::Error::from);
            cancel.cancel();
            result.map_err(|e| e.context("ledger"))
        },
    );
    signal.abort();
    if let Some(fake) = fake {
        fake.shutdown().await;
    }
    gateway?;
    guard?;
    cache?;
    router?;
    ledger?;
    Ok(())
}
