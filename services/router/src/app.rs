//! The router process: configuration in, gRPC server out.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use switchboard_config::ConfigError;
use switchboard_grpc::{ConfigFile, ConfigWatch, GrpcError, MetricsBindError, MetricsEndpoint};
use switchboard_proto::router::v1::router_service_server::RouterServiceServer;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::service::Routes as GrpcRoutes;

use crate::{
    config::Config,
    grpc::RouterGrpc,
    reload::{Live, Reloader},
    routing::Routes,
};

/// Errors while starting or running the router.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A provider HTTP client could not be built.
    #[error("cannot build the HTTP client of provider `{provider}`: {source}")]
    HttpClient {
        provider: String,
        source: reqwest::Error,
    },
    /// The gRPC server failed.
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    /// The bound address is unknown.
    #[error("cannot read the bound address: {0}")]
    LocalAddr(std::io::Error),
    /// The metrics address cannot be bound.
    #[error(transparent)]
    MetricsBind(#[from] MetricsBindError),
}

/// A built router, bound and ready to serve.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics: Option<MetricsEndpoint>,
    live: Arc<Live>,
    config_poll: Duration,
    watch: Option<ConfigWatch>,
    service: RouterGrpc,
    tracker: TaskTracker,
    cancel: CancellationToken,
    /// `router.max_message_bytes`.
    max_message_bytes: usize,
}

impl App {
    /// Validates `config`, builds the provider clients and binds `config.grpc_addr`.
    pub async fn build(config: Config) -> Result<App, StartupError> {
        config.validate()?;
        let live = Arc::new(Live::new(Routes::new(&config)?, &config));
        let listener = switchboard_grpc::bind(&config.grpc_addr).await?;
        let local_addr = listener.local_addr().map_err(StartupError::LocalAddr)?;
        let metrics =
            MetricsEndpoint::bind_configured("router", config.metrics_addr.as_deref()).await?;
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let service = RouterGrpc::new(live.clone(), tracker.clone(), cancel.clone());
        tracing::info!(grpc.addr = %local_addr, routes = config.routes.len(), providers = config.providers.len(), "router built");
        Ok(App {
            listener,
            local_addr,
            metrics,
            live,
            config_poll: Duration::from_millis(config.config_poll_ms),
            watch: None,
            service,
            tracker,
            cancel,
            max_message_bytes: config.max_message_bytes,
        })
    }

    /// A handle that reloads the configuration while the router serves (tests, embedders).
    pub fn reloader(&self) -> Reloader {
        Reloader::new(self.live.clone())
    }

    /// Reloads `[router]` from `file` on SIGHUP and whenever the file's modification time changes
    /// (checked every `config_poll_ms`) while [`App::run_until`] runs. Installs the SIGHUP handler.
    pub fn watch_config(&mut self, file: &ConfigFile) {
        self.watch = Some(file.watch(self.config_poll));
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound `/metrics` address, when `metrics_addr` is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsEndpoint::local_addr)
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls and stops stream producers.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        let App {
            listener,
            service,
            tracker,
            cancel,
            metrics,
            live,
            watch,
            max_message_bytes,
            ..
        } = self;
        if let Some(watch) = watch {
            let reloader = Reloader::new(live.clone());
            tracker.spawn(crate::reload::watch(watch, reloader, cancel.clone()));
        }
        if let Some(endpoint) = metrics {
            let render = move || crate::metrics::render(live.load().deployments());
            tracker.spawn(endpoint.serve(render, cancel.clone().cancelled_owned()));
        }
        let routes = GrpcRoutes::new(
            RouterServiceServer::new(service).max_decoding_message_size(max_message_bytes),
        );
        let served = switchboard_grpc::serve(
            listener,
            routes,
            &["switchboard.router.v1.RouterService"],
            shutdown,
        )
        .await;
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        served?;
        Ok(())
    }
}
