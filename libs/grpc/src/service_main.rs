//! What every service binary's `main` does, in one place: parse `--config`, load the configuration
//! (exit 64 naming the bad field when it is invalid), install telemetry, run until SIGINT/SIGTERM,
//! flush spans, and turn the outcome into an exit code. A service that reloads its configuration
//! uses [`run_reloadable_service`], which also hands it the [`ConfigFile`] it was loaded from.

use std::{
    fmt::Display,
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use clap::Parser;
use switchboard_config::{CONFIG_FILE_ENV, ConfigError, Source};
use switchboard_telemetry::TelemetryConfig;

/// The shutdown signal handed to a service's `run` function.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Parser)]
struct Args {
    /// Configuration file (default: `$SWITCHBOARD_CONFIG`, else defaults and environment only).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// The `[runtime]` section: which tokio runtime a service runs, and its memory settings.
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads of the process's tokio runtime: N ≥ 1, a multi-thread runtime with N workers
    /// (default 1); 0, a current-thread runtime, every task of the service on its main thread.
    /// ADR 004: with the whole mesh on a small machine, one worker per service costs the least CPU
    /// per request; the current-thread runtime had a lower p99 at 1,000 rps but a lower saturation
    /// rate. A service with cores of its own raises it. Blocking work (the embedding model) runs
    /// on its own threads either way.
    pub worker_threads: usize,
    /// Let the allocator back its arenas with transparent huge pages (default false). mimalloc asks
    /// for them (`MADV_HUGEPAGE`), and then every touched 2 MB region is resident as a whole: the
    /// guard, for one, sat at 88 MB with them and 61 MB without. Off, the process opts out of
    /// THP (`prctl(PR_SET_THP_DISABLE)`) before its runtime starts.
    pub transparent_huge_pages: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: 1,
            transparent_huge_pages: false,
        }
    }
}

impl RuntimeConfig {
    /// Applies the process-wide memory settings (see [`RuntimeConfig::transparent_huge_pages`]).
    /// Failure is reported on stderr and is not fatal: the service still runs, with more RSS.
    pub fn apply_memory_settings(&self, name: &str) {
        #[cfg(target_os = "linux")]
        if !self.transparent_huge_pages
            && let Err(error) = nix::sys::prctl::set_thp_disable(true)
        {
            eprintln!("{name}: cannot opt out of transparent huge pages: {error}");
        }
        #[cfg(not(target_os = "linux"))]
        let _ = name;
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.worker_threads > 1024 {
            return Err(ConfigError::invalid(
                "runtime.worker_threads",
                "must be at most 1024 (0: a current-thread runtime)",
            ));
        }
        Ok(())
    }

    /// Builds the tokio runtime this section describes (see [`RuntimeConfig::worker_threads`]).
    pub fn build(&self, name: &'static str) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = match self.worker_threads {
            0 => tokio::runtime::Builder::new_current_thread(),
            workers => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(workers);
                builder
            }
        };
        builder.thread_name(name).enable_all().build()
    }
}

/// The configuration file a service was started with (`--config`, else `$SWITCHBOARD_CONFIG`),
/// for reading it again on reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFile {
    path: Option<PathBuf>,
}

impl ConfigFile {
    /// The file at `path` (`None`: defaults and environment only).
    pub fn new(path: Option<PathBuf>) -> Self {
        ConfigFile { path }
    }

    /// `--config`, else `$SWITCHBOARD_CONFIG`, else none.
    pub fn resolve(flag: Option<PathBuf>) -> Self {
        let path = flag.or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from));
        ConfigFile { path }
    }

    /// The file's path, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reads the file and the process environment again.
    pub fn load(&self) -> Result<Source, ConfigError> {
        Source::load(self.path.as_deref())
    }

    /// The file's modification time (`None` without a file or when it cannot be read).
    pub fn modified(&self) -> Option<SystemTime> {
        let path = self.path.as_deref()?;
        std::fs::metadata(path).and_then(|m| m.modified()).ok()
    }

    /// Watches for reasons to read the configuration again: SIGHUP, and a change of the file's
    /// modification time, checked every `poll` (`Duration::ZERO`: only the signal). Call within a
    /// tokio runtime: the SIGHUP handler is installed here (a SIGHUP no longer ends the process).
    pub fn watch(&self, poll: Duration) -> ConfigWatch {
        ConfigWatch {
            seen: self.modified(),
            file: self.clone(),
            poll,
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }
}

/// See [`ConfigFile::watch`].
#[derive(Debug)]
pub struct ConfigWatch {
    file: ConfigFile,
    poll: Duration,
    seen: Option<SystemTime>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl ConfigWatch {
    /// The watched file.
    pub fn file(&self) -> &ConfigFile {
        &self.file
    }

    /// Waits for the next reason to reload: `"signal"` (SIGHUP) or `"file"` (its modification
    /// time differs from the last one seen).
    pub async fn changed(&mut self) -> &'static str {
        let ConfigWatch {
            file,
            poll,
            seen,
            #[cfg(unix)]
            hangup,
        } = self;
        let file_changed = async {
            if poll.is_zero() || file.path().is_none() {
                return futures::future::pending::<()>().await;
            }
            loop {
                tokio::time::sleep(*poll).await;
                let now = file.modified();
                if now.is_some() && now != *seen {
                    *seen = now;
                    return;
                }
            }
        };
        #[cfg(unix)]
        let signal = async {
            let received = match hangup {
                Some(hangup) => hangup.recv().await.is_some(),
                None => false,
            };
            if !received {
                futures::future::pending::<()>().await;
            }
        };
        #[cfg(not(unix))]
        let signal = futures::future::pending::<()>();
        tokio::select! {
            () = signal => "signal",
            () = file_changed => "file",
        }
    }
}

/// Runs service `name` to completion and returns its exit code: `load` reads its sections from
/// the configuration (and validates them), then the tokio runtime of `[runtime]` (one worker by
/// default) runs `run` until the shutdown future resolves.
pub fn run_service<C, L, R, Fut, E>(name: &'static str, load: L, run: R) -> ExitCode
where
    L: FnOnce(&Source) -> Result<C, ConfigError>,
    R: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    run_reloadable_service(name, load, |config, shutdown, _file| run(config, shutdown))
}

/// [`run_service`] for a service that reloads its configuration: `run` also gets the
/// [`ConfigFile`] the configuration came from (see [`ConfigFile::watch`]).
pub fn run_reloadable_service<C, L, R, Fut, E>(name: &'static str, load: L, run: R) -> ExitCode
where
    L: FnOnce(&Source) -> Result<C, ConfigError>,
    R: FnOnce(C, Shutdown, ConfigFile) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let args = Args::parse();
    let file = ConfigFile::resolve(args.config);
    let loaded = file.load().and_then(|source| {
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
    runtime.apply_memory_settings(name);
    let rt = match runtime.build(name) {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("{name}: cannot start the runtime: {error}");
            return ExitCode::from(71);
        }
    };
    rt.block_on(serve(name, telemetry, config, |config, shutdown| {
        run(config, shutdown, file)
    }))
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
    // The flush blocks until the exporter has sent the last spans, and the exporter's channel is
    // driven by this runtime: block a thread of the blocking pool, not the runtime's own (with a
    // current-thread runtime that would wait for itself until the flush timed out).
    if let Err(error) = tokio::task::spawn_blocking(move || telemetry.shutdown()).await {
        eprintln!("{name}: telemetry shutdown: {error}");
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_are_off_by_default() {
        assert!(!RuntimeConfig::default().transparent_huge_pages);
    }

    #[test]
    fn a_service_runs_one_worker_by_default_n_when_asked_and_a_current_thread_runtime_at_0() {
        use tokio::runtime::RuntimeFlavor;
        let default = RuntimeConfig::default().build("test").expect("runtime");
        assert_eq!(
            default.handle().runtime_flavor(),
            RuntimeFlavor::MultiThread
        );
        assert_eq!(default.metrics().num_workers(), 1);
        let current = RuntimeConfig {
            worker_threads: 0,
            ..RuntimeConfig::default()
        }
        .build("test")
        .expect("runtime");
        assert_eq!(
            current.handle().runtime_flavor(),
            RuntimeFlavor::CurrentThread
        );
        let two = RuntimeConfig {
            worker_threads: 2,
            ..RuntimeConfig::default()
        }
        .build("test")
        .expect("runtime");
        assert_eq!(two.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(two.metrics().num_workers(), 2);
    }

    #[test]
    fn more_than_1024_workers_is_a_configuration_error() {
        let config = RuntimeConfig {
            worker_threads: 1025,
            ..RuntimeConfig::default()
        };
        let error = config.validate().expect_err("1025 workers");
        assert!(
            error.to_string().contains("runtime.worker_threads"),
            "{error}"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn memory_settings_opt_the_process_out_of_huge_pages() {
        RuntimeConfig::default().apply_memory_settings("test");
        assert!(nix::sys::prctl::get_thp_disable().expect("prctl"));
    }
}
