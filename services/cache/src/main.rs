use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use switchboard_cache::{App, Config};
use switchboard_config::Source;
use switchboard_telemetry::TelemetryConfig;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Switchboard cache: exact-match response cache.
#[derive(Parser)]
struct Args {
    /// Configuration file (default: `$SWITCHBOARD_CONFIG`, else defaults and environment only).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let loaded = Source::load(args.config.as_deref()).and_then(|source| {
        let config = source.section::<Config>("cache")?;
        config.validate()?;
        Ok((source.section::<TelemetryConfig>("telemetry")?, config))
    });
    let (telemetry, config) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("cache: {error}");
            return Ok(ExitCode::from(64));
        }
    };
    let _telemetry = switchboard_telemetry::init("cache", &telemetry)?;
    App::build(config)
        .await?
        .run_until(switchboard_grpc::shutdown_signal())
        .await?;
    Ok(ExitCode::SUCCESS)
}
