use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use switchboard_bus::NatsConfig;
use switchboard_gateway::{App, Config};
use switchboard_telemetry::TelemetryConfig;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Switchboard gateway.
#[derive(Parser)]
struct Args {
    /// Configuration file (default: $SWITCHBOARD_CONFIG, else built-in defaults).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let loaded = switchboard_config::Source::load(args.config.as_deref()).and_then(|source| {
        Ok((
            source.section::<TelemetryConfig>("telemetry")?,
            source.section::<Config>("gateway")?,
            source.section::<NatsConfig>("nats")?,
        ))
    });
    let (telemetry, config, nats) = match loaded.and_then(|l| l.1.validate().map(|()| l)) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("invalid configuration: {error}");
            return ExitCode::from(64);
        }
    };
    let telemetry = match switchboard_telemetry::init("gateway", &telemetry) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("telemetry: {error}");
            return ExitCode::from(70);
        }
    };
    let outcome = match App::build(config, nats).await {
        Ok(app) => app.run_until(switchboard_grpc::shutdown_signal()).await,
        Err(error) => Err(error),
    };
    telemetry.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "gateway stopped");
            eprintln!("gateway: {error}");
            ExitCode::FAILURE
        }
    }
}
