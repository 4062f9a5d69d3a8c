//! Serving and dialling gRPC the same way in every Switchboard service: health checking, server
//! reflection, one traced server span per RPC, graceful shutdown, and lazily connected channels
//! that propagate the trace context.

mod coalesce;
mod cork;
mod h2channel;
mod h2server;
pub mod metrics;
mod service_main;

pub use coalesce::CoalescedBody;
pub use cork::Corked;
pub use h2channel::{
    DEFAULT_MAX_MESSAGE_BYTES, EndpointError, H2Body, H2Channel, internal_message_limit,
    parse_grpc_timeout,
};
pub use metrics::{Histogram, MetricsBindError, MetricsEndpoint};

use std::{future::Future, net::SocketAddr};

pub use service_main::{
    ConfigFile, ConfigWatch, RuntimeConfig, Shutdown, run_reloadable_service, run_service,
};

use switchboard_telemetry::TracePropagation;
use tokio::net::TcpListener;
use tonic::service::{Routes, interceptor::InterceptedService};

/// A client channel for the mesh's internal hops: h2 straight from the calling task (see
/// [`H2Channel`], ADR 010), a unary call's message sent with END_STREAM (see [`CoalescedBody`]), and
/// the trace context injected into every call.
pub type TracedChannel = InterceptedService<H2Channel, TracePropagation>;

/// Errors while starting a server or building a client.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The address could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    /// The URL is not a valid endpoint for an internal channel.
    #[error("invalid gRPC endpoint `{url}`: {source}")]
    Url { url: String, source: EndpointError },
    /// Reflection could not be built from the descriptor set.
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(String),
    /// A client could not connect.
    #[error("cannot connect to `{url}`: {}", source.message())]
    Connect { url: String, source: tonic::Status },
}

/// Binds a TCP listener (`127.0.0.1:0` picks a free port).
pub async fn bind(addr: &str) -> Result<TcpListener, GrpcError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GrpcError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

/// A client channel without trace propagation, for callers outside the mesh (a connected
/// [`client`]): the same lean h2 transport as [`channel`] (ADR 010).
pub type ClientChannel = H2Channel;

/// A lazily connected channel to `url` with sensible keep-alive and connect timeouts.
/// Channels multiplex: build one per dependency and clone it per request.
pub fn channel(url: &str) -> Result<TracedChannel, GrpcError> {
    Ok(InterceptedService::new(h2_channel(url)?, TracePropagation))
}

/// [`channel`], and a clone of its transport (which shares the connection) for asking it
/// [`H2Channel::generation`].
pub fn channel_with_transport(url: &str) -> Result<(TracedChannel, H2Channel), GrpcError> {
    let transport = h2_channel(url)?;
    Ok((
        InterceptedService::new(transport.clone(), TracePropagation),
        transport,
    ))
}

fn h2_channel(url: &str) -> Result<H2Channel, GrpcError> {
    H2Channel::new(url).map_err(|source| GrpcError::Url {
        url: url.to_owned(),
        source,
    })
}

/// A channel to `url`, connected now, with the transport of [`channel`] (one write per call, h2
/// from the calling task; ADR 008, ADR 010) but no trace propagation: what a Rust caller of the
/// gateway's generated stubs uses. One call of `client` is one HTTP/2 connection.
pub async fn client(url: &str) -> Result<ClientChannel, GrpcError> {
    let channel = h2_channel(url)?;
    channel
        .connect()
        .await
        .map_err(|source| GrpcError::Connect {
            url: url.to_owned(),
            source,
        })?;
    Ok(channel)
}

/// Serves `routes` on `listener` with health checking (every named service reported SERVING
/// until the server drains), server reflection over the Switchboard descriptor set, and one
/// server span per RPC, until `shutdown` resolves; in-flight calls are then drained. Each
/// connection's calls run in the connection's own task (ADR 010), with `TCP_NODELAY` and corked
/// writes (ADR 008). A service whose health depends on more than being up uses
/// [`serve_with_health`].
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    health_names: &[&str],
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    serve_with_health(listener, routes, Health::new(health_names), shutdown).await
}

/// [`serve`] with a [`Health`] the service keeps a clone of, to report what it can serve. When
/// `shutdown` resolves, `health` turns NOT_SERVING for good (see [`Health::drain`]) before the
/// server drains.
pub async fn serve_with_health(
    listener: TcpListener,
    routes: Routes,
    health: Health,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    health.publish().await;
    let service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.inner.reporter.clone()),
    );
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| GrpcError::Reflection(e.to_string()))?;
    let routes = routes.add_service(service).add_service(reflection);
    let shutdown = async move {
        shutdown.await;
        health.drain().await;
    };
    h2server::serve(listener, routes, shutdown).await;
    Ok(())
}

/// What a server's `grpc.health.v1.Health` answers, for the server as a whole (service `""`)
/// and every named service alike: SERVING while the service says it can serve
/// ([`Health::set_serving`]) and it is not draining ([`Health::drain`]), else NOT_SERVING.
/// Clones share the state.
#[derive(Clone)]
pub struct Health {
    inner: std::sync::Arc<HealthInner>,
}

struct HealthInner {
    reporter: tonic_health::server::HealthReporter,
    names: Vec<String>,
    serving: std::sync::atomic::AtomicBool,
    draining: std::sync::atomic::AtomicBool,
    /// Serialises publishing, so that the last state set is the one reported.
    publish: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("names", &self.inner.names)
            .field("serving", &self.is_serving())
            .finish()
    }
}

impl Health {
    /// The health of a server of `names` (and `""`), SERVING to begin with.
    pub fn new(names: &[&str]) -> Health {
        Health::with_state(names, true)
    }

    /// The health of a server of `names` (and `""`), NOT_SERVING until the service first says it
    /// can serve ([`Health::set_serving`]): for a service whose first check of its dependencies
    /// takes time, so that a load balancer never sends it calls it cannot serve while it starts.
    pub fn starting(names: &[&str]) -> Health {
        Health::with_state(names, false)
    }

    fn with_state(names: &[&str], serving: bool) -> Health {
        Health {
            inner: std::sync::Arc::new(HealthInner {
                reporter: tonic_health::server::HealthReporter::new(),
                names: names.iter().map(|name| (*name).to_owned()).collect(),
                serving: std::sync::atomic::AtomicBool::new(serving),
                draining: std::sync::atomic::AtomicBool::new(false),
                publish: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Whether the service can serve (its dependencies allow it). Ignored once draining.
    pub async fn set_serving(&self, serving: bool) {
        let was = self
            .inner
            .serving
            .swap(serving, std::sync::atomic::Ordering::SeqCst);
        if was != serving {
            self.publish().await;
        }
    }

    /// NOT_SERVING from now on: the server is shutting down (called by [`serve_with_health`] when
    /// its shutdown future resolves).
    pub async fn drain(&self) {
        self.inner
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.publish().await;
    }

    /// What the health service answers now: SERVING (true) or NOT_SERVING.
    pub fn is_serving(&self) -> bool {
        self.inner.serving.load(std::sync::atomic::Ordering::SeqCst)
            && !self
                .inner
                .draining
                .load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn publish(&self) {
        let _serialised = self.inner.publish.lock().await;
        let status = if self.is_serving() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for name in self.inner.names.iter().map(String::as_str).chain([""]) {
            self.inner.reporter.set_service_status(name, status).await;
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = futures::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// The address a listener is bound to, as an `http://` URL for clients.
pub fn url_of(addr: SocketAddr) -> String {
    format!("http://{addr}")
}
