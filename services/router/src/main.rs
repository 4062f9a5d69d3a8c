//! `router`: the Switchboard router service.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use switchboard_config::{ConfigError, Source};
use switchboard_router::{App, Config};
use switchboard_telemetry::TelemetryConfig;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Configuration file (default: `$SWITCHBOARD_CONFIG`).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn load(args: &Args) -> Result<(TelemetryConfig, Config), ConfigError> {
    let source = Source::load(args.config.as_deref())?;
    let telemetry = source.section::<TelemetryConfig>("telemetry")?;
    let config = source.section::<Config>("router")?;
    config.validate()?;
    Ok((telemetry, config))
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let (telemetry, mut config) = match load(&Args::parse()) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("{error}");
            return Ok(ExitCode::from(64));
        }
    };
    let _telemetry = switchboard_telemetry::init("router", &telemetry)?;
    for provider in config.resolve_api_keys(|var| std::env::var(var).ok()) {
        tracing::warn!(%provider, "api key environment variable is unset, calling the provider without a key");
    }
    App::build(config)
        .await?
        .run_until(switchboard_grpc::shutdown_signal())
        .await?;
    Ok(ExitCode::SUCCESS)
}
