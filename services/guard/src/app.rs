//! The guard process: configuration in, gRPC server out.

use std::{future::Future, net::SocketAddr, sync::Arc};

use switchboard_proto::guard::v1::guard_service_server::{GuardServiceServer, SERVICE_NAME};
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::{config::Config, error::StartupError, grpc::GuardGrpc, guard::Guard};

/// A built guard: listener bound, policies compiled.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    guard: Arc<Guard>,
}

impl App {
    /// Validates `config`, compiles the recognisers and policies and binds `config.grpc_addr`.
    pub async fn build(config: Config) -> Result<App, StartupError> {
        let guard = Arc::new(Guard::new(&config)?);
        let listener = switchboard_grpc::bind(&config.grpc_addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(App {
            listener,
            local_addr,
            guard,
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
        tracing::info!(addr = %self.local_addr, "guard listening");
        let routes = Routes::new(GuardServiceServer::new(GuardGrpc::new(self.guard)));
        switchboard_grpc::serve(self.listener, routes, &[SERVICE_NAME], shutdown).await?;
        tracing::info!("guard stopped");
        Ok(())
    }
}
