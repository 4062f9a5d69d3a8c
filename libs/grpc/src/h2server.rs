//! The serving half of ADR 010: each accepted connection is one task that speaks h2 and runs its
//! calls inline.
//!
//! tonic's `Server` hands every call to hyper, which spawns a task per call: the call's handler runs
//! there and its response frames go to the connection task through h2's shared state, one task
//! hand-off (and, under load, one cross-thread wake-up) per call and per direction. Here the
//! connection task accepts a stream, runs the routed service's future and pipes the response body
//! to h2 itself, polling every call of the connection together (`FuturesUnordered`). A unary call's
//! headers, message and trailers are queued in one pass and leave in one write ([`Corked`]).
//!
//! Kept from tonic's server: one traced span per call around the handler (`trace_fn`), the
//! server-side `grpc-timeout` (`CANCELLED` when it expires before the response, as tonic does),
//! hyper's flow-control windows, a stream reset by the client drops its handler (which cancels what
//! the handler was waiting on), and graceful shutdown: no new connections, GOAWAY on open ones, and
//! calls in flight run to their end.

use std::{future::Future, pin::Pin, time::Duration};

use bytes::Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use h2::server::SendResponse;
use http::{Request, Response};
use http_body::Body as HttpBody;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tonic::{body::Body, service::Routes};
use tower::Service;
use tracing::Instrument;

use crate::{
    Corked,
    h2channel::{CONNECTION_WINDOW, H2Body, MAX_SEND_BUFFER, STREAM_WINDOW, grpc_timeout},
};

/// How long the accept loop waits after a failed `accept` (out of file descriptors, say).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves `routes` on `listener` until `shutdown` resolves, then drains: open connections get a
/// GOAWAY and finish the calls they have; the future resolves when every connection has closed.
pub(crate) async fn serve(
    listener: TcpListener,
    routes: Routes,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    let _ = tcp.set_nodelay(true);
                    connections.spawn(connection(Corked::new(tcp), routes.clone(), stopped.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a gRPC connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            // Reap finished connections so that the set does not grow with the connection count.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
}

type CallFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One connection: the h2 handshake, then every stream it opens, run in this task.
async fn connection(
    io: Corked<tokio::net::TcpStream>,
    routes: Routes,
    mut stopped: watch::Receiver<bool>,
) {
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(io);
    let mut connection = tokio::select! {
        handshaken = handshake => match handshaken {
            Ok(connection) => connection,
            Err(error) => {
                tracing::debug!(%error, "gRPC connection failed its HTTP/2 handshake");
                return;
            }
        },
        _ = stopped.wait_for(|stop| *stop) => return,
    };
    let mut calls: FuturesUnordered<CallFuture> = FuturesUnordered::new();
    let mut closing = false;
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    calls.push(Box::pin(call(routes.clone(), request, respond)));
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "gRPC connection closed");
                    break;
                }
                None => break,
            },
            Some(()) = calls.next(), if !calls.is_empty() => {}
            _ = stopped.wait_for(|stop| *stop), if !closing => {
                closing = true;
                connection.graceful_shutdown();
            }
        }
    }
}

/// One call: the routed handler (in its server span, bounded by the call's `grpc-timeout`), then
/// its response head and body. A reset from the client ends it wherever it is.
async fn call(
    mut routes: Routes,
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (head, stream) = request.into_parts();
    let bodyless = Request::from_parts(head, ());
    // Health checks (readiness probes, `/readyz`, every few seconds) and reflection are not
    // traced: each would be a root trace of its own in every service.
    let path = bodyless.uri().path();
    let span = if path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.") {
        tracing::Span::none()
    } else {
        switchboard_telemetry::grpc_server_span(&bodyless)
    };
    let timeout = grpc_timeout(bodyless.headers());
    let handler = routes
        .call(bodyless.map(|()| H2Body::new(stream)))
        .instrument(span);
    let handled = async {
        let handled = match timeout {
            Some(limit) => tokio::time::timeout(limit, handler).await.ok(),
            None => Some(handler.await),
        };
        handled.map(|routed| routed.unwrap_or_else(|never| match never {}))
    };
    let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
    let response = tokio::select! {
        handled = handled => handled,
        _ = reset => return,
    };
    let Some(response) = response else {
        // tonic's server answers an expired `grpc-timeout` the same way.
        let expired = tonic::Status::cancelled("Timeout expired").into_http::<()>();
        let _ = respond.send_response(expired, true);
        return;
    };
    let (head, body) = response.into_parts();
    let end = body.is_end_stream();
    let Ok(send) = respond.send_response(Response::from_parts(head, ()), end) else {
        return;
    };
    if !end {
        pipe(body, send).await;
    }
}

/// Sends a response body's frames to the client: data as it comes (waiting for flow-control
/// capacity when the client's window is full), trailers last. Stops when the client resets the
/// stream; dropping the body then cancels whatever produced it. (The client's `send_body` is the
/// same loop without the capacity wait: a unary request's message must be queued in the calling
/// pass, before its new stream has been given any capacity.)
async fn pipe(mut body: Body, mut send: h2::SendStream<Bytes>) {
    loop {
        let frame = tokio::select! {
            frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => frame,
            _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => return,
        };
        match frame {
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if !has_capacity(&mut send).await {
                        return;
                    }
                    let end = body.is_end_stream();
                    if send.send_data(data, end).is_err() || end {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = send.send_trailers(trailers);
                    }
                    return;
                }
            },
            Some(Err(error)) => {
                tracing::debug!(%error, "gRPC response body failed");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
        }
    }
}

/// Waits until the stream may buffer more data (as hyper does: one byte reserved, then the whole
/// frame sent; h2 holds it until the client's window opens, up to the send buffer's size).
/// `false`: the stream is gone.
async fn has_capacity(send: &mut h2::SendStream<Bytes>) -> bool {
    send.reserve_capacity(1);
    if send.capacity() > 0 {
        return true;
    }
    loop {
        match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(0)) => {}
            Some(Ok(_)) => return true,
            Some(Err(_)) | None => return false,
        }
    }
}
