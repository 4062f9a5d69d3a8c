//! The cache process: configuration in, gRPC server out.

use std::{future::Future, net::SocketAddr, sync::Arc};

use switchboard_proto::cache::v1::cache_service_server::{CacheServiceServer, SERVICE_NAME};
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::{
    cache::Cache,
    config::Config,
    error::StartupError,
    grpc::CacheGrpc,
    store::{CacheStore, MemoryStore},
};

/// A built cache: listener bound, store ready.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    cache: Arc<Cache>,
}

impl App {
    /// Validates `config`, creates the bounded in-memory store and binds `config.grpc_addr`.
    pub async fn build(config: Config) -> Result<App, StartupError> {
        config.validate()?;
        let store = Arc::new(MemoryStore::new(config.max_entries));
        Self::build_with_store(config, store).await
    }

    /// Like [`App::build`], over a caller-provided store.
    pub async fn build_with_store(
        config: Config,
        store: Arc<dyn CacheStore>,
    ) -> Result<App, StartupError> {
        config.validate()?;
        let semantic = crate::semantic::Semantic::load(&config.semantic).await?;
        let cache = Arc::new(Cache::new(&config, store).with_semantic(semantic));
        let listener = switchboard_grpc::bind(&config.grpc_addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(App {
            listener,
            local_addr,
            cache,
        })
    }

    /// The address the gRPC server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        tracing::info!(addr = %self.local_addr, "cache listening");
        let routes = Routes::new(CacheServiceServer::new(CacheGrpc::new(self.cache)));
        switchboard_grpc::serve(self.listener, routes, &[SERVICE_NAME], shutdown).await?;
        tracing::info!("cache stopped");
        Ok(())
    }
}
