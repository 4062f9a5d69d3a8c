//! The router process: configuration in, gRPC server out.

use std::{future::Future, net::SocketAddr, sync::Arc};

use switchboard_config::ConfigError;
use switchboard_grpc::GrpcError;
use switchboard_proto::router::v1::router_service_server::RouterServiceServer;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::service::Routes as GrpcRoutes;

use crate::{config::Config, grpc::RouterGrpc, routing::Routes};

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
}

/// A built router, bound and ready to serve.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    service: RouterGrpc,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl App {
    /// Validates `config`, builds the provider clients and binds `config.grpc_addr`.
    pub async fn build(config: Config) -> Result<App, StartupError> {
        config.validate()?;
        let routes = Routes::new(&config)?;
        let listener = switchboard_grpc::bind(&config.grpc_addr).await?;
        let local_addr = listener.local_addr().map_err(StartupError::LocalAddr)?;
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let service = RouterGrpc::new(Arc::new(routes), tracker.clone(), cancel.clone());
        tracing::info!(grpc.addr = %local_addr, routes = config.routes.len(), providers = config.providers.len(), "router built");
        Ok(App {
            listener,
            local_addr,
            service,
            tracker,
            cancel,
        })
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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
            ..
        } = self;
        let routes = GrpcRoutes::new(RouterServiceServer::new(service));
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
