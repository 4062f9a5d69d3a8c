//! The internal channel and server (ADR 010): calls, streams, large bodies past the flow-control
//! windows, lost connections, unreachable peers, the client-side and the server-side deadline, and
//! a client's reset reaching the server's handler, and which calls get a server span.

use std::{
    convert::Infallible,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use switchboard_grpc::{H2Body, H2Channel, bind, channel, serve, url_of};
use tonic::{Code, body::Body, server::NamedService, service::Routes};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tower::{Service, ServiceExt};

/// Echoes a call's request body back as its response, followed by `grpc-status: 0` trailers.
/// `/test.Echo/Never` never answers; `/test.Echo/Endless` answers with a body that never ends
/// and counts its drop in [`ENDLESS_DROPPED`].
#[derive(Clone)]
struct Echo;

static ENDLESS_DROPPED: AtomicUsize = AtomicUsize::new(0);

/// Counts its drop: the server let go of the endless body.
struct DropCount;

impl Drop for DropCount {
    fn drop(&mut self) {
        ENDLESS_DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(async move {
            match request.uri().path() {
                "/test.Echo/Never" => futures::future::pending::<()>().await,
                "/test.Echo/Endless" => {
                    let guard = DropCount;
                    let frames = futures::stream::unfold(guard, |guard| async move {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        let frame = http_body::Frame::data(Bytes::from_static(b"tick"));
                        Some((Ok::<_, tonic::Status>(frame), guard))
                    });
                    return Ok(grpc_response(frames));
                }
                _ => {}
            }
            let received = request
                .into_body()
                .collect()
                .await
                .expect("request body")
                .to_bytes();
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let frames = futures::stream::iter([
                Ok::<_, tonic::Status>(http_body::Frame::data(received)),
                Ok(http_body::Frame::trailers(trailers)),
            ]);
            Ok(grpc_response(frames))
        })
    }
}

/// A gRPC response whose body is `frames`.
fn grpc_response(
    frames: impl futures::Stream<Item = Result<http_body::Frame<Bytes>, tonic::Status>> + Send + 'static,
) -> http::Response<Body> {
    http::Response::builder()
        .header("content-type", "application/grpc")
        .body(Body::new(http_body_util::StreamBody::new(frames)))
        .expect("response")
}

struct Server {
    url: String,
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(addr: &str) -> Self {
        let listener = bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, Routes::new(Echo), &["test.Echo"], async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        Self {
            url: url_of(addr),
            addr,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("server task");
    }
}

/// Calls `path` on `channel` with `payload` as the whole request body; the response head.
async fn call(channel: &mut H2Channel, path: &str, payload: Bytes) -> http::Response<H2Body> {
    let request = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Body::new(http_body_util::Full::new(payload)))
        .expect("request");
    channel
        .ready()
        .await
        .expect("ready")
        .call(request)
        .await
        .expect("call")
}

async fn echo(channel: &mut H2Channel, payload: Bytes) -> (Bytes, http::HeaderMap) {
    let response = call(channel, "/test.Echo/Call", payload).await;
    assert_eq!(response.status(), http::StatusCode::OK);
    let collected = response.into_body().collect().await.expect("response body");
    let trailers = collected.trailers().cloned().expect("trailers");
    (collected.to_bytes(), trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_and_server_streams_work_over_one_connection() {
    let server = Server::start("127.0.0.1:0").await;
    let mut health = HealthClient::new(channel(&server.url).expect("channel"));
    for _ in 0..3 {
        let answer = health
            .check(HealthCheckRequest {
                service: "test.Echo".into(),
            })
            .await
            .expect("check")
            .into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving);
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "test.Echo".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("stream").expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(
        unknown.code(),
        Code::NotFound,
        "the server's status reaches the caller"
    );
    // The server drains open calls before it stops: end the watch first.
    drop(watch);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_the_flow_control_windows_arrive_whole() {
    let server = Server::start("127.0.0.1:0").await;
    let mut channel = H2Channel::new(&server.url).expect("channel");
    // 4 × 3 MB: more than a stream's 2 MB window each, more than the connection's 5 MB in all,
    // so the calls complete only if the channel returns the capacity it reads.
    for round in 0u8..4 {
        let payload = Bytes::from(vec![round; 3 * 1024 * 1024]);
        let (echoed, trailers) = echo(&mut channel, payload.clone()).await;
        assert_eq!(echoed.len(), payload.len(), "round {round}");
        assert!(echoed == payload, "round {round}: the echo differs");
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_ready_at_once_is_streamed() {
    let server = Server::start("127.0.0.1:0").await;
    let mut channel = H2Channel::new(&server.url).expect("channel");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, tonic::Status>>(4);
    let request = http::Request::builder()
        .method("POST")
        .uri("/test.Echo/Call")
        .header("content-type", "application/grpc")
        .body(Body::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
        .expect("request");
    let call = tokio::spawn(channel.ready().await.expect("ready").call(request));
    for part in ["first ", "second ", "third"] {
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send(Ok(http_body::Frame::data(Bytes::from_static(
            part.as_bytes(),
        ))))
        .await
        .expect("send");
    }
    drop(tx);
    let response = call.await.expect("task").expect("call");
    let echoed = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(echoed, Bytes::from_static(b"first second third"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_reached_again_on_a_new_connection() {
    let server = Server::start("127.0.0.1:0").await;
    let addr = server.addr;
    let mut channel = H2Channel::new(&server.url).expect("channel");
    assert_eq!(channel.generation(), None, "nothing dialled yet");
    let (echoed, _) = echo(&mut channel, Bytes::from_static(b"before")).await;
    assert_eq!(echoed, Bytes::from_static(b"before"));
    let first = channel.generation().expect("connected");
    server.stop().await;

    let request = || {
        http::Request::builder()
            .method("POST")
            .uri("/test.Echo/Call")
            .body(Body::new(http_body_util::Full::new(Bytes::from_static(
                b"x",
            ))))
            .expect("request")
    };
    let down = channel
        .ready()
        .await
        .expect("ready")
        .call(request())
        .await
        .expect_err("peer down");
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");

    let server = Server::start(&addr.to_string()).await;
    let (echoed, _) = echo(&mut channel, Bytes::from_static(b"after")).await;
    assert_eq!(echoed, Bytes::from_static(b"after"));
    // Callers that remember what a peer told them can see that it may have changed.
    let second = channel.generation().expect("connected again");
    assert!(second > first, "{first} -> {second}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_is_unavailable() {
    // A port that was just free: nothing listens on it.
    let listener = bind("127.0.0.1:0").await.expect("bind");
    let url = url_of(listener.local_addr().expect("addr"));
    drop(listener);
    let mut health = HealthClient::new(channel(&url).expect("channel"));
    let error = health
        .check(HealthCheckRequest::default())
        .await
        .expect_err("nothing listens");
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_grpc_timeout_ends_a_call_that_gets_no_answer() {
    // Accepts connections and never speaks HTTP/2.
    let listener = bind("127.0.0.1:0").await.expect("bind");
    let url = url_of(listener.local_addr().expect("addr"));
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut health = HealthClient::new(channel(&url).expect("channel"));
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    request.set_timeout(Duration::from_millis(200));
    let error = health.check(request).await.expect_err("no answer");
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_resets_drops_the_servers_handler() {
    let server = Server::start("127.0.0.1:0").await;
    let mut channel = H2Channel::new(&server.url).expect("channel");
    let response = call(&mut channel, "/test.Echo/Endless", Bytes::new()).await;
    let mut body = response.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert_eq!(
        first.into_data().expect("data"),
        Bytes::from_static(b"tick")
    );
    assert_eq!(ENDLESS_DROPPED.load(Ordering::SeqCst), 0, "still streaming");
    // Dropping the response resets the stream; the server must drop the body it was sending.
    drop(body);
    let dropped = tokio::time::timeout(Duration::from_secs(10), async {
        while ENDLESS_DROPPED.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        dropped.is_ok(),
        "the server kept streaming to a reset stream"
    );
    // And the connection still serves calls.
    let (echoed, trailers) = echo(&mut channel, Bytes::from_static(b"after")).await;
    assert_eq!(echoed, Bytes::from_static(b"after"));
    assert_eq!(trailers.get("grpc-status").expect("status"), "0");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_grpc_timeout_cancels_a_handler_that_does_not_answer() {
    let server = Server::start("127.0.0.1:0").await;
    // A bare h2 client: no client-side timer, so the answer can only come from the server.
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (mut sender, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let driver = tokio::spawn(connection);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("{}/test.Echo/Never", server.url))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "100m")
        .body(())
        .expect("request");
    let (response, _stream) = sender.send_request(request, true).expect("send");
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("the server answered")
        .expect("response");
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(
        response.headers().get("grpc-status").expect("grpc-status"),
        "1",
        "CANCELLED, as tonic's server answers an expired grpc-timeout"
    );
    assert!(response.body().is_end_stream(), "a headers-only answer");
    drop(sender);
    driver.abort();
    server.stop().await;
}

/// Records the `otel.name` of every `grpc.server` span opened in this process.
#[derive(Clone, Default)]
struct ServerSpans(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ServerSpans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Name(String);
        impl tracing::field::Visit for Name {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "otel.name" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        if attrs.metadata().name() == "grpc.server" {
            let mut name = Name(String::new());
            attrs.record(&mut name);
            self.0.lock().expect("spans").push(name.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_get_a_server_span_and_health_checks_do_not() {
    use tracing_subscriber::layer::SubscriberExt;
    let spans = ServerSpans::default();
    // nextest runs each test in its own process, so the global subscriber is this test's alone.
    let _ =
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()));
    let server = Server::start("127.0.0.1:0").await;
    let mut health = HealthClient::new(channel(&server.url).expect("channel"));
    for _ in 0..3 {
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("check");
    }
    let mut echo_channel = H2Channel::new(&server.url).expect("channel");
    let (body, _) = echo(&mut echo_channel, Bytes::from_static(b"traced")).await;
    assert_eq!(body, Bytes::from_static(b"traced"));
    server.stop().await;
    let names = spans.0.lock().expect("spans").clone();
    assert_eq!(
        names,
        vec!["test.Echo/Call".to_owned()],
        "one span for the call, none for the three health checks"
    );
}
