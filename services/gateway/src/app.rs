//! Builds and runs the gateway: HTTP and gRPC listeners, clients of guard/cache/router, and the
//! usage publisher.

use std::{future::Future, net::SocketAddr, time::Duration};

use switchboard_bus::NatsConfig;
use switchboard_proto::gateway::v1::gateway_service_server::GatewayServiceServer;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::KeyStore,
    budget::Budgets,
    config::Config,
    grpc::GatewayGrpc,
    outbox::Outbox,
    pipeline::{Downstream, Pipeline},
    ratelimit::RateLimits,
    usage::{self, UsagePublisher},
};

/// Errors while starting or running the gateway.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] switchboard_config::ConfigError),
    /// A listener or client could not be set up.
    #[error(transparent)]
    Grpc(#[from] switchboard_grpc::GrpcError),
    /// The HTTP listener failed.
    #[error("HTTP listener on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
    /// NATS could not be reached.
    #[error(transparent)]
    Bus(#[from] switchboard_bus::BusError),
    /// The usage outbox could not be opened.
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
}

/// State shared by the HTTP and gRPC front ends.
#[derive(Clone)]
pub struct Shared {
    pub(crate) keys: KeyStore,
    pub(crate) pipeline: Pipeline,
    pub(crate) max_body_bytes: usize,
    pub(crate) readiness: crate::ready::Readiness,
}

/// A built, bound, not yet running gateway.
pub struct App {
    http: TcpListener,
    grpc: TcpListener,
    shared: Shared,
    budgets: Option<Budgets>,
    publisher: UsagePublisher,
    nats_client: async_nats::Client,
    tasks: TaskTracker,
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
    /// The configuration it was built with, and what to watch for a reload of its keys.
    config: Config,
    watch: Option<switchboard_grpc::ConfigWatch>,
}

impl App {
    /// Validates the configuration, binds both listeners and prepares the clients. Dependencies are
    /// connected lazily: the gateway starts even when they are not up yet.
    pub async fn build(config: Config, nats: NatsConfig) -> Result<App, StartupError> {
        config.validate()?;
        let http = TcpListener::bind(&config.http_addr)
            .await
            .map_err(|source| StartupError::Http {
                addr: config.http_addr.clone(),
                source,
            })?;
        let grpc = switchboard_grpc::bind(&config.grpc_addr).await?;
        let http_addr = http.local_addr().map_err(|source| StartupError::Http {
            addr: config.http_addr.clone(),
            source,
        })?;
        let grpc_addr = grpc.local_addr().map_err(|source| StartupError::Http {
            addr: config.grpc_addr.clone(),
            source,
        })?;
        let outbox = Outbox::open(
            outbox_path(&config.outbox_dir, &nats.subject_prefix),
            config.outbox_max_bytes,
        )?;
        let nats_client = nats.connect().await?;
        let audit_nats = nats.clone();
        let (sink, publisher) =
            usage::channel_with_outbox(nats, config.usage_queue_capacity, outbox);
        let publisher = publisher.with_linger(Duration::from_millis(config.usage_linger_ms));
        let tasks = TaskTracker::new();
        let (guard, guard_transport) = switchboard_grpc::channel_with_transport(&config.guard_url)?;
        let downstream = Downstream {
            guard,
            cache: switchboard_grpc::channel(&config.cache_url)?,
            router: switchboard_grpc::channel(&config.router_url)?,
        };
        // Budgets and shared rate limits (ADR 007): nothing of them exists when not configured.
        let ledger = (config.budgets.enabled || !config.rate_limits.is_empty())
            .then(|| switchboard_grpc::channel(&config.ledger_url))
            .transpose()?;
        // `/readyz` asks the dependencies' health over the request path's own connections.
        let readiness = crate::ready::Readiness::new(
            crate::ready::Channels {
                router: downstream.router.clone(),
                guard: downstream.guard.clone(),
                cache: config.cache_enabled.then(|| downstream.cache.clone()),
                ledger: ledger.clone(),
            },
            nats_client.clone(),
            config.guard.fail_open_routes.is_empty(),
        );
        let budgets = match (&ledger, config.budgets.enabled) {
            (Some(ledger), true) => Some(Budgets::new(
                config.budgets.clone(),
                ledger.clone(),
                switchboard_grpc::channel(&config.router_url)?,
                // Beside the usage outbox: the replica's own durable state.
                Some(std::path::Path::new(&config.outbox_dir).join("budget-catalog.pb")),
            )),
            _ => None,
        };
        let rate_limits =
            ledger.and_then(|ledger| RateLimits::new(&config.rate_limits, ledger, &config.budgets));
        let pipeline = Pipeline::new(
            downstream,
            sink,
            config.cache_enabled,
            tasks.clone(),
            config.max_body_bytes,
            config.max_in_flight,
        )
        .with_limits(budgets.clone(), rate_limits)
        .with_guard_failure(crate::answer::GuardFailure::new(&config.guard).with_audit(
            async_nats::jetstream::new(nats_client.clone()),
            audit_nats,
            tasks.clone(),
        ))
        .with_passthrough(crate::overlap::Passthrough::new(
            config.guard.overlap_passthrough.then_some(guard_transport),
        ))
        .with_abandoned(config.abandoned_requests);
        let shared = Shared {
            keys: KeyStore::new(&config.keys),
            pipeline,
            max_body_bytes: config.max_body_bytes,
            readiness,
        };
        Ok(App {
            http,
            grpc,
            shared,
            budgets,
            publisher,
            nats_client,
            tasks,
            http_addr,
            grpc_addr,
            config,
            watch: None,
        })
    }

    /// Reloads the keys from `file` on SIGHUP and whenever it changes (checked every
    /// `gateway.config_poll_ms`) while [`App::run_until`] runs (`reload.rs`). Installs the SIGHUP
    /// handler.
    pub fn watch_config(&mut self, file: &switchboard_grpc::ConfigFile) {
        self.watch = Some(file.watch(Duration::from_millis(self.config.config_poll_ms)));
    }

    /// Address of the HTTP listener.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Address of the gRPC listener.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests and queued usage events.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
        let App {
            http,
            grpc,
            shared,
            budgets,
            publisher,
            nats_client,
            tasks,
            http_addr,
            grpc_addr,
            config,
            watch,
        } = self;
        let max_body = shared.max_body_bytes;
        let readiness = shared.readiness.clone();
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let stopper = tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
        let publisher_cancel = CancellationToken::new();
        let publisher_task = {
            let cancel = publisher_cancel.clone();
            tokio::spawn(publisher.run(nats_client, cancel, Duration::from_secs(10)))
        };
        let budgets_cancel = CancellationToken::new();
        let budgets_task = budgets.map(|budgets| tokio::spawn(budgets.run(budgets_cancel.clone())));
        if let Some(watch) = watch {
            tasks.spawn(crate::reload::watch_keys(
                watch,
                shared.keys.clone(),
                config,
                cancel.clone(),
            ));
        }
        tracing::info!(http.addr = %http_addr, grpc.addr = %grpc_addr, "gateway listening");
        let http_cancel = cancel.clone();
        let http = axum::serve::ListenerExt::tap_io(http, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let http_server = axum::serve(http, crate::http::router(shared.clone()))
            .with_graceful_shutdown(async move { http_cancel.cancelled().await });
        let grpc_service = GatewayServiceServer::new(GatewayGrpc::new(shared))
            // Stubs that compress their requests (grpc-java, grpc-go, grpcio with gzip on) are
            // served; the size limit applies to the decompressed message.
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(max_body)
            .max_encoding_message_size(max_body.max(4 * 1024 * 1024) * 2);
        let grpc_cancel = cancel.clone();
        // The gateway's gRPC health follows `/readyz` (`ready.rs`): NOT_SERVING until its first
        // report (up to a probe timeout when a dependency hangs), then while unavailable, and once
        // draining.
        let health = switchboard_grpc::Health::starting(&["switchboard.gateway.v1.GatewayService"]);
        tasks.spawn(readiness.keep_health(health.clone(), cancel.clone()));
        let grpc_server = switchboard_grpc::serve_with_health(
            grpc,
            // Over-size messages refused as HTTP's 413 is (typed, with a request id).
            tonic::service::Routes::new(crate::grpc::SizeLimited::new(grpc_service, max_body)),
            health,
            async move { grpc_cancel.cancelled().await },
        );
        let (http_result, grpc_result) = tokio::join!(http_server, grpc_server);
        // In-flight streams and cache stores finish; then the publisher drains its queue.
        tasks.close();
        tasks.wait().await;
        // Every request has settled: the leases go back with their final spend.
        budgets_cancel.cancel();
        if let Some(task) = budgets_task {
            let _ = task.await;
        }
        publisher_cancel.cancel();
        let _ = publisher_task.await;
        stopper.abort();
        http_result.map_err(|source| StartupError::Http {
            addr: http_addr.to_string(),
            source,
        })?;
        grpc_result?;
        Ok(())
    }
}

/// The outbox of one subject prefix: `<outbox_dir>/<prefix>` (events are never replayed elsewhere).
fn outbox_path(outbox_dir: &str, subject_prefix: &str) -> std::path::PathBuf {
    let name: String = subject_prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    std::path::Path::new(outbox_dir).join(if name.is_empty() || name.starts_with('.') {
        format!("_{name}")
    } else {
        name
    })
}

/// Hex SHA-256 of an API key (for `switchboard hash-key`).
pub fn hash_api_key(key: &str) -> String {
    crate::auth::hash_api_key(key)
}
