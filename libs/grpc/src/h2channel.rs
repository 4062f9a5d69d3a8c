//! A lean HTTP/2 client for the mesh's internal gRPC hops (ADR 010).
//!
//! tonic's `Channel` puts three tasks between a call and the socket: a `tower::Buffer` worker, the
//! hyper dispatch task, and the h2 connection task; hyper also spawns one task per call that waits
//! for the response and hands it to the caller through a oneshot. On a 2-vCPU machine each of those
//! task hand-offs is a scheduler pass, and under load a cross-thread wake-up. [`H2Channel`] speaks
//! h2 directly from the calling task: the call opens its stream and queues its message itself, the
//! connection task writes them (one write, see [`Corked`]), and the response wakes the caller
//! directly. What `Channel` did that the mesh relies on is kept: lazy connection with a connect
//! timeout, reconnection after the connection is lost (a call that finds the cached connection dead
//! before sending anything is retried once on a new one), HTTP/2 keep-alive pings, flow-control
//! windows as hyper sets them, the client-side `grpc-timeout`, and a user agent.
//!
//! Errors are `tonic::Status`: a connection that cannot be made or is lost is `Unavailable` (as
//! with `Channel`); stream resets map to codes as the gRPC HTTP/2 spec says.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use h2::{SendStream, client::SendRequest};
use http::{HeaderValue, Request, Response, Uri, uri::PathAndQuery};
use http_body::{Body as HttpBody, Frame};
use tonic::{Code, Status, body::Body};

use crate::{CoalescedBody, Corked};

/// How long dialling and the HTTP/2 handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Interval between keep-alive pings on an open connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A ping not answered within this closes the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Flow-control windows, as hyper sets them for tonic's channels (the server uses them too).
pub(crate) const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
pub(crate) const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
pub(crate) const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// The largest message the mesh's internal servers (guard, cache, router) decode by default
/// (`<service>.max_message_bytes`): what the gateway may send them at the largest
/// `gateway.max_body_bytes` it accepts (32 MiB), see [`internal_message_limit`]. tonic's own
/// default (4 MiB) would refuse requests the gateway has accepted.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The size of the largest message the gateway sends to (and accepts from) an internal hop when it
/// accepts request bodies of `max_body_bytes`: twice the body limit (at least 4 MiB), headroom for
/// what the gateway adds (ids, tags, a guard's rewritten prompt, a cached answer next to its
/// request). Each hop's `max_message_bytes` must be at least this (`switchboard check-config`).
pub fn internal_message_limit(max_body_bytes: usize) -> usize {
    max_body_bytes.max(4 * 1024 * 1024).saturating_mul(2)
}

const USER_AGENT: &str = concat!("switchboard-grpc/", env!("CARGO_PKG_VERSION"));

/// A lazily connected HTTP/2 channel to one endpoint; clones share the connection.
#[derive(Clone)]
pub struct H2Channel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for H2Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Channel")
            .field("authority", &self.shared.authority)
            .finish_non_exhaustive()
    }
}

struct Shared {
    authority: http::uri::Authority,
    host: String,
    port: u16,
    /// The open connection's request handle and its generation.
    current: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Held while a connection is being made, so that concurrent calls make one.
    connecting: tokio::sync::Mutex<Dialling>,
}

/// What the last dials did.
#[derive(Default)]
struct Dialling {
    /// Generation of the newest connection.
    generation: u64,
    /// When the last dial failed, and why: calls that were waiting while it failed share the
    /// failure instead of each waiting out a connect timeout of its own.
    failed: Option<(std::time::Instant, Status)>,
}

/// Why a URL cannot be an [`H2Channel`] endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("not a URI: {0}")]
    Uri(#[from] http::uri::InvalidUri),
    #[error("only http:// endpoints are supported inside the mesh")]
    Scheme,
    #[error("no host")]
    NoHost,
}

impl H2Channel {
    /// A channel to `url` (`http://host:port`); nothing is dialled until the first call.
    pub fn new(url: &str) -> Result<Self, EndpointError> {
        let uri: Uri = url.parse()?;
        if uri.scheme_str() != Some("http") {
            return Err(EndpointError::Scheme);
        }
        let authority = uri.authority().cloned().ok_or(EndpointError::NoHost)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(EndpointError::NoHost);
        }
        Ok(Self {
            shared: Arc::new(Shared {
                port: authority.port_u16().unwrap_or(80),
                authority,
                host,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(Dialling::default()),
            }),
        })
    }

    /// Generation of the open connection, `None` while none is open. It changes whenever the
    /// channel reconnects, so a caller can tell that what it learnt from its peer may be stale
    /// (the peer restarted, perhaps with another configuration).
    pub fn generation(&self) -> Option<u64> {
        self.shared.cached().map(|(generation, _)| generation)
    }

    /// Dials now, so that a missing peer shows at start-up rather than at the first call.
    pub async fn connect(&self) -> Result<(), Status> {
        Shared::sender(&self.shared).await.map(|_| ())
    }
}

impl Shared {
    fn cached(&self) -> Option<(u64, SendRequest<Bytes>)> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Drops the cached connection if it is still generation `generation`.
    fn forget(&self, generation: u64) {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }

    /// The open connection, or a new one.
    async fn sender(this: &Arc<Self>) -> Result<(u64, SendRequest<Bytes>), Status> {
        if let Some(open) = this.cached() {
            return Ok(open);
        }
        let waiting_since = std::time::Instant::now();
        let mut dialling = this.connecting.lock().await;
        if let Some(open) = this.cached() {
            return Ok(open);
        }
        if let Some((at, status)) = &dialling.failed
            && *at >= waiting_since
        {
            return Err(status.clone());
        }
        let dialled = tokio::time::timeout(CONNECT_TIMEOUT, this.dial(dialling.generation + 1))
            .await
            .unwrap_or_else(|_| {
                Err(Status::unavailable(format!(
                    "cannot connect to {}: timed out after {:?}",
                    this.authority, CONNECT_TIMEOUT
                )))
            });
        let sender = match dialled {
            Ok(sender) => sender,
            Err(status) => {
                dialling.failed = Some((std::time::Instant::now(), status.clone()));
                return Err(status);
            }
        };
        dialling.generation += 1;
        dialling.failed = None;
        let open = (dialling.generation, sender);
        *this
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(open.clone());
        Ok(open)
    }

    /// Dials, handshakes and spawns the connection task of generation `generation`.
    async fn dial(self: &Arc<Self>, generation: u64) -> Result<SendRequest<Bytes>, Status> {
        let unavailable = |e: &dyn std::fmt::Display| {
            Status::unavailable(format!("cannot connect to {}: {e}", self.authority))
        };
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unavailable(&e))?;
        tcp.set_nodelay(true).map_err(|e| unavailable(&e))?;
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(Corked::new(tcp))
            .await
            .map_err(|e| unavailable(&e))?;
        let ping = connection.ping_pong();
        let shared = Arc::downgrade(self);
        tokio::spawn(drive(connection, ping, shared, generation));
        Ok(sender)
    }

    async fn call(self: Arc<Self>, request: Request<Body>) -> Result<Response<H2Body>, Status> {
        let (mut head, body) = request.into_parts();
        let path = head
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        head.uri = Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| Status::internal(format!("cannot build the request URI: {e}")))?;
        head.headers
            .entry(http::header::USER_AGENT)
            .or_insert(HeaderValue::from_static(USER_AGENT));
        let timeout = grpc_timeout(&head.headers);
        let exchange = self.exchange(Request::from_parts(head, ()), body);
        match timeout {
            Some(limit) => tokio::time::timeout(limit, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded("the call's grpc-timeout expired"))
                }),
            None => exchange.await,
        }
    }

    /// Sends the request on the open connection (on a new one if that turns out to be closed
    /// before anything was sent) and waits for the response head.
    async fn exchange(
        self: &Arc<Self>,
        head: Request<()>,
        body: Body,
    ) -> Result<Response<H2Body>, Status> {
        let mut retried = false;
        let (generation, mut sender) = loop {
            let (generation, sender) = Shared::sender(self).await?;
            match sender.ready().await {
                Ok(ready) => break (generation, ready),
                Err(error) => {
                    self.forget(generation);
                    if retried {
                        return Err(status_from_h2(&error));
                    }
                    retried = true;
                }
            }
        };
        // Refused only when the connection closed since `ready`: nothing was sent.
        let (response, stream) = sender.send_request(head, false).map_err(|error| {
            self.forget(generation);
            Status::unavailable(format!("internal gRPC connection lost: {error}"))
        })?;
        let mut pump = Box::pin(send_body(CoalescedBody::new(body), stream));
        // A unary message is ready now and goes out with this call; a streaming body that is not
        // ready yet is sent by its own task.
        if futures::poll!(pump.as_mut()).is_pending() {
            tokio::spawn(pump);
        }
        let response = response.await.map_err(|e| status_from_h2(&e))?;
        Ok(response.map(H2Body::new))
    }
}

/// Drives the connection and pings it every [`KEEPALIVE_INTERVAL`]; when it ends (closed by the
/// peer, an I/O error, an unanswered ping), the channel forgets it and the next call reconnects.
async fn drive(
    connection: h2::client::Connection<Corked<tokio::net::TcpStream>, Bytes>,
    mut ping: Option<h2::PingPong>,
    shared: Weak<Shared>,
    generation: u64,
) {
    let mut connection = std::pin::pin!(connection);
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::now() + KEEPALIVE_INTERVAL,
        KEEPALIVE_INTERVAL,
    );
    loop {
        tokio::select! {
            result = &mut connection => {
                if let Err(error) = result {
                    tracing::debug!(%error, "internal gRPC connection closed");
                }
                break;
            }
            _ = ticks.tick(), if ping.is_some() => {
                let Some(pinger) = ping.as_mut() else { break };
                let pong = tokio::time::timeout(KEEPALIVE_TIMEOUT, pinger.ping(h2::Ping::opaque()));
                tokio::select! {
                    result = &mut connection => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "internal gRPC connection closed");
                        }
                        break;
                    }
                    answered = pong => {
                        if !matches!(answered, Ok(Ok(_))) {
                            tracing::warn!("internal gRPC peer did not answer a keep-alive ping; reconnecting");
                            break;
                        }
                    }
                }
            }
        }
    }
    if let Some(shared) = shared.upgrade() {
        shared.forget(generation);
    }
}

/// Sends a request body's frames; the data frame that ends the body carries END_STREAM.
async fn send_body(mut body: CoalescedBody, mut stream: SendStream<Bytes>) {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    if stream.send_data(data, end).is_err() || end {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                    }
                    return;
                }
            },
            Some(Err(_)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
        }
    }
}

impl tower::Service<Request<Body>> for H2Channel {
    type Response = Response<H2Body>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<Response<H2Body>, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Readiness is per call: h2 queues a stream beyond the peer's concurrency limit.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        Box::pin(Arc::clone(&self.shared).call(request))
    }
}

/// A body read straight from an h2 stream (a client's response, a server's request), returning
/// flow-control capacity as it goes.
#[derive(Debug)]
pub struct H2Body {
    stream: h2::RecvStream,
    data_done: bool,
}

impl H2Body {
    pub(crate) fn new(stream: h2::RecvStream) -> Self {
        Self {
            stream,
            data_done: false,
        }
    }
}

impl HttpBody for H2Body {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if !this.data_done {
            match this.stream.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(error))) => {
                    return Poll::Ready(Some(Err(status_from_h2(&error))));
                }
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.stream.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(error)) => Poll::Ready(Some(Err(status_from_h2(&error)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

/// The call's `grpc-timeout` header, if any.
pub(crate) fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    parse_grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)
}

/// A `grpc-timeout` value (`<1 to 8 digits><unit>`, units `H M S m u n`), as the gRPC HTTP/2
/// protocol spec writes it.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// An h2 error as a gRPC status: lost connections are `Unavailable`; resets map as the gRPC
/// HTTP/2 protocol spec says.
fn status_from_h2(error: &h2::Error) -> Status {
    if error.is_io() || error.is_go_away() {
        return Status::unavailable(format!("internal gRPC connection lost: {error}"));
    }
    let code = match error.reason() {
        Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(h2::Reason::CANCEL) => Code::Cancelled,
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
        _ => Code::Internal,
    };
    Status::new(code, format!("internal gRPC stream failed: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let header = |v: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", HeaderValue::from_static(v));
            grpc_timeout(&headers)
        };
        assert_eq!(header("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(header("3M"), Some(Duration::from_secs(180)));
        assert_eq!(header("4S"), Some(Duration::from_secs(4)));
        assert_eq!(header("250m"), Some(Duration::from_millis(250)));
        assert_eq!(header("7u"), Some(Duration::from_micros(7)));
        assert_eq!(header("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(header("9x"), None);
        assert_eq!(header("S"), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
        // The spec allows at most eight digits.
        assert_eq!(
            parse_grpc_timeout("99999999S"),
            Some(Duration::from_secs(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("100000000S"), None);
        // As the router reads its callers' deadlines.
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
    }

    #[test]
    fn only_plain_http_endpoints_with_a_host_are_accepted() {
        assert!(H2Channel::new("http://127.0.0.1:50051").is_ok());
        assert!(H2Channel::new("http://[::1]:50051").is_ok());
        assert!(matches!(
            H2Channel::new("https://example.com"),
            Err(EndpointError::Scheme)
        ));
        assert!(H2Channel::new("127.0.0.1:1").is_err());
    }
}
