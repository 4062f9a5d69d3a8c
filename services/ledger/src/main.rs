//! The `ledger` binary.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use switchboard_bus::NatsConfig;
use switchboard_config::Source;
use switchboard_ledger::{App, Config};
use switchboard_telemetry::TelemetryConfig;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Switchboard ledger.
#[derive(Parser)]
struct Args {
    /// Configuration file (default: `$SWITCHBOARD_CONFIG`).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let loaded = Source::load(args.config.as_deref()).and_then(|source| {
        let config: Config = source.section("ledger")?;
        config.validate()?;
        Ok((
            source.section::<TelemetryConfig>("telemetry")?,
            config,
            source.section::<NatsConfig>("nats")?,
        ))
    });
    let (telemetry, config, nats) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("ledger: {error}");
            return ExitCode::from(64);
        }
    };
    let telemetry = match switchboard_telemetry::init("ledger", &telemetry) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("ledger: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match App::build(config, nats).await {
        Ok(app) => app.run_until(switchboard_grpc::shutdown_signal()).await,
        Err(error) => Err(error),
    };
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "ledger failed");
            eprintln!("ledger: {error}");
            ExitCode::from(if error.is_config() { 64 } else { 1 })
        }
    }
}
