//! The cache process: configuration in, gRPC server out.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use switchboard_bus::NatsConfig;
use switchboard_grpc::MetricsEndpoint;
use switchboard_proto::cache::v1::cache_service_server::{CacheServiceServer, SERVICE_NAME};
use tokio::net::TcpListener;
use tokio_util::{
    sync::{CancellationToken, DropGuard},
    task::TaskTracker,
};
use tonic::service::Routes;

use crate::{
    cache::Cache,
    config::Config,
    error::StartupError,
    grpc::CacheGrpc,
    metrics::Metrics,
    replication::{ReplicationError, SharedStore},
    semantic::{SWEEP_INTERVAL, Semantic},
    store::{CacheStore, EvictHook, MemoryStore},
};

/// Forgets, in the semantic index, every entry the store drops.
fn evict_hook(semantic: &Arc<Semantic>) -> EvictHook {
    let semantic = Arc::clone(semantic);
    Arc::new(move |key| semantic.on_remove(key))
}

/// A built cache: listener bound, store ready (and, when shared, in sync with the stream).
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    cache: Arc<Cache>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    _stop_tasks_on_drop: DropGuard,
    /// `cache.max_message_bytes`.
    max_message_bytes: usize,
    metrics: Arc<Metrics>,
    /// `/metrics` (`cache.metrics_addr`), bound.
    metrics_endpoint: Option<MetricsEndpoint>,
}

impl App {
    /// Validates `config`, creates the bounded in-memory store and binds `config.grpc_addr`.
    ///
    /// With `cache.shared` (the default), the store is shared through NATS JetStream (`nats`): the
    /// replica connects, creates or updates the stream, and loads every live entry before this
    /// returns, so it never serves (health included) before it is in sync; it fails after
    /// `cache.sync_timeout_secs` if NATS does not answer.
    pub async fn build(config: Config, nats: NatsConfig) -> Result<App, StartupError> {
        config.validate()?;
        let local = Arc::new(MemoryStore::new(config.max_entries));
        if !config.shared {
            return Self::build_with_store(config, local).await;
        }
        // The semantic layer first: the sync indexes the replicated semantic tags into it, and
        // what the local index evicts leaves the semantic index from the first entry on.
        let semantic = Semantic::load(&config.semantic).await?;
        if let Some(semantic) = &semantic {
            local.on_evict(evict_hook(semantic));
        }
        let shared = Arc::new(SharedStore::connect(&config, &nats, local).await?);
        if let Some(semantic) = &semantic {
            shared.attach_semantic(Arc::clone(semantic));
        }
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let (ready_tx, mut ready) = tokio::sync::watch::channel(false);
        tasks.spawn(shared.clone().sync(ready_tx, cancel.clone()));
        let seconds = config.sync_timeout_secs;
        let synced =
            tokio::time::timeout(Duration::from_secs(seconds), ready.wait_for(|ready| *ready))
                .await;
        if !matches!(synced, Ok(Ok(_))) {
            cancel.cancel();
            return Err(ReplicationError::SyncTimeout {
                stream: shared.stream_name().to_owned(),
                seconds,
            }
            .into());
        }
        tracing::info!(stream = %shared.stream_name(), "shared cache in sync");
        Self::assemble(config, shared, semantic, tasks, cancel).await
    }

    /// Like [`App::build`], over a caller-provided store.
    pub async fn build_with_store(
        config: Config,
        store: Arc<dyn CacheStore>,
    ) -> Result<App, StartupError> {
        config.validate()?;
        let semantic = Semantic::load(&config.semantic).await?;
        Self::assemble(
            config,
            store,
            semantic,
            TaskTracker::new(),
            CancellationToken::new(),
        )
        .await
    }

    async fn assemble(
        config: Config,
        store: Arc<dyn CacheStore>,
        semantic: Option<Arc<Semantic>>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Result<App, StartupError> {
        if let Some(semantic) = &semantic {
            // Entries the store drops leave the semantic index; expired ones are swept from it
            // (a scope nobody stores into again would otherwise keep them).
            store.on_evict(evict_hook(semantic));
            tasks.spawn(
                Arc::clone(semantic).sweep_periodically(SWEEP_INTERVAL, cancel.child_token()),
            );
        }
        let cache = Arc::new(Cache::new(&config, store).with_semantic(semantic));
        let listener = switchboard_grpc::bind(&config.grpc_addr).await?;
        let local_addr = listener.local_addr()?;
        let metrics_endpoint =
            MetricsEndpoint::bind_configured("cache", config.metrics_addr.as_deref()).await?;
        Ok(App {
            listener,
            local_addr,
            cache,
            tasks,
            _stop_tasks_on_drop: cancel.clone().drop_guard(),
            cancel,
            max_message_bytes: config.max_message_bytes,
            metrics: Arc::default(),
            metrics_endpoint,
        })
    }

    /// The address the gRPC server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound `/metrics` address, when `cache.metrics_addr` is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_endpoint
            .as_ref()
            .map(MetricsEndpoint::local_addr)
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls and stops the sync task.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        tracing::info!(addr = %self.local_addr, "cache listening");
        if let Some(endpoint) = self.metrics_endpoint {
            let metrics = self.metrics.clone();
            let cache = self.cache.clone();
            let render = move || metrics.render(&cache.store_stats());
            self.tasks
                .spawn(endpoint.serve(render, self.cancel.clone().cancelled_owned()));
        }
        let routes = Routes::new(
            CacheServiceServer::new(CacheGrpc::new(self.cache, self.metrics))
                .max_decoding_message_size(self.max_message_bytes),
        );
        let served =
            switchboard_grpc::serve(self.listener, routes, &[SERVICE_NAME], shutdown).await;
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        served?;
        tracing::info!("cache stopped");
        Ok(())
    }
}
