//! Configuration reload without dropping requests: the routing table sits behind one
//! `RwLock<Arc<Routes>>`, read once per request (a request in flight keeps the `Arc` it started
//! with, so streams finish on the table they began on). A reload reads and validates `[router]`,
//! re-resolves API keys from the environment, builds the new table next to the old one (keeping
//! the state of deployments that still exist, see [`Routes::rebuild`]) and swaps it in; an invalid
//! configuration is rejected, logged with the field it names, and the old table keeps serving.

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use switchboard_config::Source;
use switchboard_grpc::ConfigWatch;
use tokio_util::sync::CancellationToken;

use crate::{app::StartupError, config::Config, routing::Routes};

/// The live routing table.
pub(crate) struct Live {
    current: RwLock<Arc<Routes>>,
    /// Serialises reloads (held while a table is built, never across an await).
    reloading: Mutex<()>,
    /// Listen addresses the process was started with (a reload cannot move them), and its
    /// server's message limit (fixed when the server was built).
    grpc_addr: String,
    metrics_addr: Option<String>,
    max_message_bytes: usize,
}

impl Live {
    pub(crate) fn new(routes: Routes, config: &Config) -> Self {
        Live {
            current: RwLock::new(Arc::new(routes)),
            reloading: Mutex::new(()),
            grpc_addr: config.grpc_addr.clone(),
            metrics_addr: config.metrics_addr.clone(),
            max_message_bytes: config.max_message_bytes,
        }
    }

    /// The current table (one read-lock acquisition and an `Arc` clone).
    pub(crate) fn load(&self) -> Arc<Routes> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Reloads the router's configuration while it serves (see [`crate::App::reloader`]).
#[derive(Clone)]
pub struct Reloader {
    live: Arc<Live>,
}

impl Reloader {
    pub(crate) fn new(live: Arc<Live>) -> Self {
        Reloader { live }
    }

    /// Reads `[router]` from `source`, validates it, resolves its API keys from the process
    /// environment and replaces the routing table. On error nothing changes; the error (which
    /// names the bad field) is logged and returned.
    pub fn reload(&self, source: &Source) -> Result<(), StartupError> {
        let outcome = source
            .section::<Config>("router")
            .map_err(StartupError::from)
            .and_then(|config| self.apply_with(config, |var| std::env::var(var).ok()));
        if let Err(error) = &outcome {
            tracing::error!(%error, "router configuration reload rejected; the previous configuration stays");
        }
        outcome
    }

    /// Replaces the routing table with `config` (keys set in code are kept; `api_key_env`
    /// variables are read from the process environment). On error nothing changes.
    pub fn apply(&self, config: Config) -> Result<(), StartupError> {
        self.apply_with(config, |var| std::env::var(var).ok())
    }

    fn apply_with(
        &self,
        mut config: Config,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), StartupError> {
        config.validate()?;
        let _reloading = self
            .live
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for missing in config.resolve_api_keys(lookup) {
            tracing::warn!(provider = %missing, "api key environment variable is unset, calling the provider without a key");
        }
        if config.grpc_addr != self.live.grpc_addr {
            tracing::warn!("router.grpc_addr changed; it takes effect after a restart");
        }
        if config.metrics_addr != self.live.metrics_addr {
            tracing::warn!("router.metrics_addr changed; it takes effect after a restart");
        }
        if config.max_message_bytes != self.live.max_message_bytes {
            tracing::warn!("router.max_message_bytes changed; it takes effect after a restart");
        }
        let previous = self.live.load();
        let routes = Arc::new(Routes::rebuild(&config, &previous)?);
        *self
            .live
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = routes;
        tracing::info!(
            routes = config.routes.len(),
            providers = config.providers.len(),
            "router configuration reloaded"
        );
        Ok(())
    }
}

/// Reloads on every SIGHUP or change of the configuration file until `cancel`.
pub(crate) async fn watch(mut watch: ConfigWatch, reloader: Reloader, cancel: CancellationToken) {
    loop {
        let cause = tokio::select! {
            () = cancel.cancelled() => return,
            cause = watch.changed() => cause,
        };
        tracing::info!(cause, "reloading the router configuration");
        match watch.file().load() {
            Ok(source) => {
                // Errors are logged by `reload`.
                let _ = reloader.reload(&source);
            }
            Err(error) => {
                tracing::error!(%error, "router configuration reload rejected; the previous configuration stays");
            }
        }
    }
}
