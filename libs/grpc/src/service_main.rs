//! What every service binary's `main` does, in one place: parse `--config`, load the configuration
//! (exit 64 naming the bad field when it is invalid), install telemetry, run until SIGINT/SIGTERM,
//! flush spans, and turn the outcome into an exit code.

use std::{fmt::Display, future::Future, path::PathBuf, pin::Pin, process::ExitCode};

use clap::Parser;
use switchboard_config::{ConfigError, Source};
use switchboard_telemetry::TelemetryConfig;

/// The shutdown signal handed to a service's `run` function.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Parser)]
struct Args {
    /// Configuration file (default: `$SWITCHBOARD_CONFIG`, else defaults and environment only).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Runs service `name`: `load` reads its sections from the configuration (and validates them),
/// `run` builds and serves it until the shutdown future resolves.
pub async fn run_service<C, L, R, Fut, E>(name: &'static str, load: L, run: R) -> ExitCode
where
    L: FnOnce(&Source) -> Result<C, ConfigError>,
    R: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let args = Args::parse();
    let loaded = Source::load(args.config.as_deref()).and_then(|source| {
        Ok((
            source.section::<TelemetryConfig>("telemetry")?,
            load(&source)?,
        ))
    });
    let (telemetry, config) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("{name}: invalid configuration: {error}");
            return ExitCode::from(64);
        }
    };
    let telemetry = match switchboard_telemetry::init(name, &telemetry) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("{name}: telemetry: {error}");
            return ExitCode::from(70);
        }
    };
    let outcome = run(config, Box::pin(crate::shutdown_signal())).await;
    let code = match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "{name} stopped");
            eprintln!("{name}: {error}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}
