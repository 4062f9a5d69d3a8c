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

/// The `[runtime]` section: how many tokio worker threads a service runs.
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads of the process's tokio runtime; 0 means the service's own default (see
    /// `docs/BENCHMARKS.md`: on a small machine running the whole mesh, one worker per light
    /// service costs less CPU per request than a work-stealing pool).
    pub worker_threads: usize,
}

impl RuntimeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.worker_threads > 1024 {
            return Err(ConfigError::invalid(
                "runtime.worker_threads",
                "must be at most 1024 (0: the service's default)",
            ));
        }
        Ok(())
    }
}

/// Runs service `name` to completion and returns its exit code: `load` reads its sections from
/// the configuration (and validates them), then a tokio runtime with `default_workers` worker
/// threads (unless `runtime.worker_threads` says otherwise) runs `run` until the shutdown future
/// resolves.
pub fn run_service<C, L, R, Fut, E>(
    name: &'static str,
    default_workers: usize,
    load: L,
    run: R,
) -> ExitCode
where
    L: FnOnce(&Source) -> Result<C, ConfigError>,
    R: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let args = Args::parse();
    let loaded = Source::load(args.config.as_deref()).and_then(|source| {
        let runtime = source.section::<RuntimeConfig>("runtime")?;
        runtime.validate()?;
        Ok((
            runtime,
            source.section::<TelemetryConfig>("telemetry")?,
            load(&source)?,
        ))
    });
    let (runtime, telemetry, config) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("{name}: invalid configuration: {error}");
            return ExitCode::from(64);
        }
    };
    let workers = match runtime.worker_threads {
        0 => default_workers.max(1),
        n => n,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("{name}: cannot start the runtime: {error}");
            return ExitCode::from(71);
        }
    };
    rt.block_on(serve(name, telemetry, config, run))
}

async fn serve<C, R, Fut, E>(
    name: &'static str,
    telemetry: TelemetryConfig,
    config: C,
    run: R,
) -> ExitCode
where
    R: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
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
