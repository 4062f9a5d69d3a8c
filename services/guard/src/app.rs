//! The guard process: configuration in, gRPC server out.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use switchboard_bus::NatsConfig;
use switchboard_grpc::MetricsEndpoint;
use switchboard_proto::guard::v1::guard_service_server::{GuardServiceServer, SERVICE_NAME};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::service::Routes;

use crate::{
    admission::{Admission, AdmissionStats},
    audit::{AuditSink, AuditStats, Queued, Timing, publish_loop},
    config::Config,
    error::StartupError,
    grpc::GuardGrpc,
    guard::Guard,
    metrics::Metrics,
};

/// The audit trail's publisher side, set up at build time.
struct Audit {
    sink: AuditSink,
    rx: tokio::sync::mpsc::Receiver<Queued>,
    js: async_nats::jetstream::Context,
    nats: NatsConfig,
    timing: Timing,
}

/// A built guard: listener bound, policies compiled.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    guard: Arc<Guard>,
    audit: Option<Audit>,
    admission: Admission,
    /// `guard.max_message_bytes`.
    max_message_bytes: usize,
    metrics: Arc<Metrics>,
    /// `/metrics` (`guard.metrics_addr`), bound.
    metrics_endpoint: Option<MetricsEndpoint>,
}

impl App {
    /// Validates `config`, compiles the recognisers and policies and binds `config.grpc_addr`.
    /// No audit trail: see [`App::build_with_audit`].
    pub async fn build(config: Config) -> Result<App, StartupError> {
        Self::build_with_audit(config, None).await
    }

    /// [`App::build`], and when `nats` is given and `guard.audit.enabled`, connects NATS, creates
    /// the audit stream if needed and publishes an audit event per audited decision.
    pub async fn build_with_audit(
        config: Config,
        nats: Option<NatsConfig>,
    ) -> Result<App, StartupError> {
        let guard = Arc::new(Guard::new(&config)?);
        let admission = Admission::new(&config.admission);
        let audit = match nats {
            Some(nats) if config.audit.enabled => {
                let client = nats.connect().await?;
                let js = async_nats::jetstream::new(client);
                nats.ensure_audit_stream(&js).await?;
                let (sink, rx) = AuditSink::channel(config.audit.queue_capacity);
                Some(Audit {
                    sink,
                    rx,
                    js,
                    nats,
                    timing: Timing {
                        timeout: Duration::from_millis(config.audit.publish_timeout_ms),
                        linger: Duration::from_millis(config.audit.linger_ms),
                    },
                })
            }
            _ => None,
        };
        let listener = switchboard_grpc::bind(&config.grpc_addr).await?;
        let local_addr = listener.local_addr()?;
        let metrics_endpoint =
            MetricsEndpoint::bind_configured("guard", config.metrics_addr.as_deref()).await?;
        Ok(App {
            listener,
            local_addr,
            guard,
            audit,
            admission,
            max_message_bytes: config.max_message_bytes,
            metrics: Arc::default(),
            metrics_endpoint,
        })
    }

    /// The address the gRPC server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound `/metrics` address, when `guard.metrics_addr` is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_endpoint
            .as_ref()
            .map(MetricsEndpoint::local_addr)
    }

    /// The audit counters (queued, published, dropped, failed), when the audit trail is on.
    pub fn audit_stats(&self) -> Option<Arc<AuditStats>> {
        self.audit.as_ref().map(|a| a.sink.stats().clone())
    }

    /// The admission counters (calls admitted, refused).
    pub fn admission_stats(&self) -> Arc<AdmissionStats> {
        self.admission.stats().clone()
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls and the audit queue.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        tracing::info!(addr = %self.local_addr, "guard listening");
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let sink = match self.audit {
            Some(Audit {
                sink,
                rx,
                js,
                nats,
                timing,
            }) => {
                tasks.spawn(publish_loop(
                    rx,
                    js,
                    nats,
                    sink.stats().clone(),
                    timing,
                    cancel.clone(),
                ));
                Some(sink)
            }
            None => None,
        };
        if let Some(endpoint) = self.metrics_endpoint {
            let metrics = self.metrics.clone();
            let audit = sink.as_ref().map(|sink| sink.stats().clone());
            let admission = self.admission.clone();
            let render = move || metrics.render(audit.as_deref(), &admission);
            tasks.spawn(endpoint.serve(render, cancel.clone().cancelled_owned()));
        }
        tasks.close();
        let routes = Routes::new(
            self.admission.wrap(
                GuardServiceServer::new(GuardGrpc::new(
                    self.guard,
                    sink,
                    self.admission.clone(),
                    self.metrics,
                ))
                .max_decoding_message_size(self.max_message_bytes),
            ),
        );
        let served =
            switchboard_grpc::serve(self.listener, routes, &[SERVICE_NAME], shutdown).await;
        // The server (and its sink clones) is gone: the publisher drains what is queued.
        cancel.cancel();
        tasks.wait().await;
        served?;
        tracing::info!("guard stopped");
        Ok(())
    }
}
