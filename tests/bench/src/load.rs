//! The open-loop load generator.
//!
//! Request `i` is due at `t0 + i / rate`. A dispatcher releases requests at their due time whatever
//! happened to earlier ones; latency is measured from the due time, so time spent waiting for a free
//! connection (queueing) is part of it and coordinated omission cannot hide a stall.
//!
//! - HTTP/1.1: `C` persistent connections (one hyper handshake each), each sending one request at a
//!   time, all fed from one shared queue of due requests.
//! - gRPC: `C` channels from `switchboard_grpc::client` (h2 from the calling task, corked: one
//!   write per call; ADR 010); each
//!   due request is sent at once on channel `i mod C` (HTTP/2 multiplexes), as its own task.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use switchboard_grpc::ClientChannel as Channel;
use switchboard_proto::gateway::v1::{
    CreateChatCompletionRequest, StreamChatCompletionRequest,
    gateway_service_client::GatewayServiceClient, stream_chat_completion_response::Event,
};
use switchboard_proto::guard::v1::{
    CheckPromptRequest, Decision, guard_service_client::GuardServiceClient,
};
use tokio::sync::{Mutex, mpsc};
use tonic::metadata::MetadataValue;

use crate::{dispatch, procfs, stats};

/// What one request is.
#[derive(Clone)]
pub enum Target {
    Http {
        addr: SocketAddr,
        path: String,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
        stream: bool,
        /// Every answer must be a cache hit (`x-switchboard-cache: hit`), else it is an error.
        require_hit: bool,
    },
    GrpcUnary {
        url: String,
        authorization: MetadataValue<tonic::metadata::Ascii>,
        request: CreateChatCompletionRequest,
    },
    GrpcStream {
        url: String,
        authorization: MetadataValue<tonic::metadata::Ascii>,
        request: StreamChatCompletionRequest,
    },
    /// The guard service's `CheckPrompt` directly (guard latency, issue 7).
    GuardCheck {
        url: String,
        request: CheckPromptRequest,
    },
}

impl Target {
    fn is_stream(&self) -> bool {
        match self {
            Target::Http { stream, .. } => *stream,
            Target::GrpcUnary { .. } => false,
            Target::GrpcStream { .. } => true,
            Target::GuardCheck { .. } => false,
        }
    }
}

/// Shape of one run.
#[derive(Debug, Clone, Copy)]
pub struct RunSpec {
    pub rate: f64,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Client-side limit per request (from its due time to its last byte).
    pub timeout: Duration,
}

/// CPU time of one process over the measured period.
#[derive(Debug, Clone)]
pub struct CpuDelta {
    pub name: String,
    pub seconds: f64,
    /// Context switches and read/write system calls over the period (`procfs::KernelCounts`);
    /// `None` where /proc could not tell.
    pub kernel: Option<procfs::KernelCounts>,
}

/// Everything a run measured.
pub struct RunResult {
    /// All requests sent (warm-up included).
    pub sent: u64,
    /// All successful requests (warm-up included): what the ledger must hold.
    pub ok_total: u64,
    /// Failures after the request may have reached the server (timeouts, broken connections): the
    /// ledger may or may not have a row for them.
    pub ambiguous_total: u64,
    pub errors_total: u64,
    pub measured_ok: u64,
    pub measured_errors: u64,
    pub latency: Histogram<u64>,
    pub ttft: Histogram<u64>,
    pub achieved_rps: f64,
    pub cache_hits: u64,
    pub error_samples: Vec<String>,
    pub cpu: Vec<CpuDelta>,
    /// How late the dispatcher released the measured period's requests.
    pub dispatch_lateness: Option<dispatch::Lateness>,
}

struct Job {
    index: u64,
    due: Instant,
}

struct Outcome {
    due: Instant,
    done: Instant,
    first_token: Option<Instant>,
    measured: bool,
    result: Result<bool, Failure>,
}

struct Failure {
    message: String,
    /// The request may have been processed by the server.
    ambiguous: bool,
}

fn fail(message: impl Into<String>, ambiguous: bool) -> Failure {
    Failure {
        message: message.into(),
        ambiguous,
    }
}

type HttpSender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn http_connect(addr: SocketAddr) -> anyhow::Result<HttpSender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection task ends when the sender is dropped or the peer closes.
    tokio::spawn(connection);
    Ok(sender)
}

/// `"content":"` followed by something other than the closing quote: the first real token.
fn has_content(buffer: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"\"content\":\"";
    buffer
        .windows(NEEDLE.len() + 1)
        .any(|w| &w[..NEEDLE.len()] == NEEDLE && w[NEEDLE.len()] != b'"')
}

/// Returns (cache hit, first token time).
async fn http_request(
    sender: &mut HttpSender,
    target: &Target,
) -> Result<(bool, Option<Instant>), Failure> {
    let Target::Http {
        addr,
        path,
        headers,
        body,
        stream,
        require_hit,
    } = target
    else {
        return Err(fail("not an HTTP target", false));
    };
    sender
        .ready()
        .await
        .map_err(|e| fail(format!("connection: {e}"), false))?;
    let mut builder = Request::post(path.as_str()).header(http::header::HOST, addr.to_string());
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    let request = builder
        .body(Full::new(body.clone()))
        .map_err(|e| fail(format!("request: {e}"), false))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| fail(format!("send: {e}"), true))?;
    let status = response.status();
    let cache_hit = response
        .headers()
        .get("x-switchboard-cache")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"hit"));
    let mut body = response.into_body();
    let mut first_token = None;
    let mut search = Vec::new();
    let mut tail: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| fail(format!("body: {e}"), true))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if *stream {
            if first_token.is_none() {
                search.extend_from_slice(&data);
                if has_content(&search) {
                    first_token = Some(Instant::now());
                    search = Vec::new();
                }
            }
            tail.extend_from_slice(&data);
            if tail.len() > 64 {
                tail.drain(..tail.len() - 64);
            }
        }
    }
    if !status.is_success() {
        return Err(fail(format!("HTTP {status}"), false));
    }
    if *require_hit && !cache_hit {
        return Err(fail("answered, but not from the cache", false));
    }
    if *stream {
        let done = tail.windows(6).any(|w| w == b"[DONE]");
        if !done {
            return Err(fail("stream ended without [DONE]", true));
        }
        if first_token.is_none() {
            return Err(fail("stream without content", true));
        }
    }
    Ok((cache_hit, first_token))
}

async fn grpc_request(
    channel: Channel,
    target: &Target,
) -> Result<(bool, Option<Instant>), Failure> {
    let status_failure = |s: tonic::Status| {
        let ambiguous = matches!(
            s.code(),
            tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Internal
                | tonic::Code::ResourceExhausted
                | tonic::Code::Unavailable
        );
        fail(format!("gRPC {:?}: {}", s.code(), s.message()), ambiguous)
    };
    match target {
        Target::GrpcUnary {
            authorization,
            request,
            ..
        } => {
            let mut req = tonic::Request::new(request.clone());
            req.metadata_mut()
                .insert("authorization", authorization.clone());
            let response = GatewayServiceClient::new(channel)
                .create_chat_completion(req)
                .await
                .map_err(status_failure)?;
            let hit = response.get_ref().cache == 2;
            Ok((hit, None))
        }
        Target::GrpcStream {
            authorization,
            request,
            ..
        } => {
            let mut req = tonic::Request::new(request.clone());
            req.metadata_mut()
                .insert("authorization", authorization.clone());
            let mut stream = GatewayServiceClient::new(channel)
                .stream_chat_completion(req)
                .await
                .map_err(status_failure)?
                .into_inner();
            let mut first_token = None;
            let mut summary = false;
            // A failure after the stream started: the gateway has seen the request.
            let mid_stream = |s: tonic::Status| {
                fail(
                    format!("gRPC {:?} mid-stream: {}", s.code(), s.message()),
                    true,
                )
            };
            while let Some(message) = stream.message().await.map_err(mid_stream)? {
                match message.event {
                    Some(Event::Chunk(chunk))
                        if first_token.is_none()
                            && chunk.choices.iter().any(|c| !c.content.is_empty()) =>
                    {
                        first_token = Some(Instant::now());
                    }
                    Some(Event::Chunk(_)) => {}
                    Some(Event::Summary(_)) => summary = true,
                    None => {}
                }
            }
            if !summary {
                return Err(fail("stream ended without a summary", true));
            }
            if first_token.is_none() {
                return Err(fail("stream without content", true));
            }
            Ok((false, first_token))
        }
        Target::GuardCheck { request, .. } => {
            let response = GuardServiceClient::new(channel)
                .check_prompt(request.clone())
                .await
                .map_err(status_failure)?;
            // Every guard scenario's prompt holds an address the redact policy must rewrite.
            if response.get_ref().decision != Decision::Transform as i32 {
                return Err(fail("the guard did not redact the planted address", false));
            }
            Ok((false, None))
        }
        Target::Http { .. } => Err(fail("not a gRPC target", false)),
    }
}

type Snapshot = (Option<u64>, Option<procfs::KernelCounts>);

fn cpu_snapshot(pids: &[(String, u32)]) -> Vec<(String, Snapshot)> {
    let of = |pid: &str| (procfs::cpu_ticks(pid), procfs::kernel_counts(pid));
    let mut out: Vec<(String, Snapshot)> = pids
        .iter()
        .map(|(name, pid)| (name.clone(), of(&pid.to_string())))
        .collect();
    out.push(("bench".to_owned(), of("self")));
    out
}

/// Runs one open-loop load: warm-up, then the measured period, then waits for every request.
pub async fn run(
    target: &Target,
    spec: RunSpec,
    pids: &[(String, u32)],
) -> anyhow::Result<RunResult> {
    let total = stats::scheduled_count((spec.warmup + spec.duration).as_secs_f64(), spec.rate);
    let (outcome_tx, mut outcome_rx) = mpsc::unbounded_channel::<Outcome>();
    let stream = target.is_stream();

    // Connections first, so handshakes are not measured.
    enum Conns {
        Http(Vec<HttpSender>),
        Grpc(Vec<Channel>),
    }
    let conns = match target {
        Target::Http { addr, .. } => {
            let mut senders = Vec::with_capacity(spec.connections);
            for _ in 0..spec.connections {
                senders.push(http_connect(*addr).await?);
            }
            Conns::Http(senders)
        }
        Target::GrpcUnary { url, .. }
        | Target::GrpcStream { url, .. }
        | Target::GuardCheck { url, .. } => {
            let mut channels = Vec::with_capacity(spec.connections);
            for _ in 0..spec.connections {
                // The client a Rust caller of the generated stubs gets from switchboard-grpc:
                // one write per call (ADR 008), like the HTTP/1.1 client's one write per request.
                channels.push(switchboard_grpc::client(url).await?);
            }
            Conns::Grpc(channels)
        }
    };

    let t0 = Instant::now() + Duration::from_millis(50);
    let measure_start = t0 + spec.warmup;
    let clk = procfs::clock_ticks();
    let pids_owned = pids.to_vec();
    let cpu_before = tokio::spawn(async move {
        tokio::time::sleep_until(measure_start.into()).await;
        cpu_snapshot(&pids_owned)
    });

    let timeout = spec.timeout;
    let mut workers = tokio::task::JoinSet::new();
    let (job_tx, job_rx) = mpsc::unbounded_channel::<Job>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let grpc_channels = match conns {
        Conns::Http(senders) => {
            for mut sender in senders {
                let job_rx = job_rx.clone();
                let outcome_tx = outcome_tx.clone();
                let target = target.clone();
                let Target::Http { addr, .. } = &target else {
                    anyhow::bail!("unreachable: HTTP connections for a gRPC target");
                };
                let addr = *addr;
                workers.spawn(async move {
                    let mut broken = false;
                    loop {
                        let job = { job_rx.lock().await.recv().await };
                        let Some(job) = job else { break };
                        if broken {
                            match http_connect(addr).await {
                                Ok(s) => {
                                    sender = s;
                                    broken = false;
                                }
                                Err(e) => {
                                    let _ = outcome_tx.send(Outcome {
                                        due: job.due,
                                        done: Instant::now(),
                                        first_token: None,
                                        measured: job.due >= measure_start,
                                        result: Err(fail(format!("connect: {e}"), false)),
                                    });
                                    continue;
                                }
                            }
                        }
                        let left = (job.due + timeout).saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            // Expired while queued for a connection: never sent.
                            let _ = outcome_tx.send(Outcome {
                                due: job.due,
                                done: Instant::now(),
                                first_token: None,
                                measured: job.due >= measure_start,
                                result: Err(fail("expired in the queue", false)),
                            });
                            continue;
                        }
                        let result =
                            match tokio::time::timeout(left, http_request(&mut sender, &target))
                                .await
                            {
                                Ok(r) => r,
                                Err(_) => Err(fail("timeout", true)),
                            };
                        if result.is_err() {
                            // A failed exchange may leave the connection unusable: start afresh.
                            broken = true;
                        }
                        let _ = outcome_tx.send(Outcome {
                            due: job.due,
                            done: Instant::now(),
                            first_token: result.as_ref().ok().and_then(|r| r.1),
                            measured: job.due >= measure_start,
                            result: result.map(|r| r.0),
                        });
                        let _ = job.index;
                    }
                });
            }
            None
        }
        Conns::Grpc(channels) => Some(channels),
    };

    // The dispatcher: a thread of its own (tokio's 1 ms timer would send requests late, see
    // `dispatch`); HTTP jobs go to the connections' queue, gRPC calls start as tasks at once.
    let runtime = tokio::runtime::Handle::current();
    let dispatcher = match grpc_channels {
        None => {
            let job_tx = job_tx.clone();
            dispatch::spawn(total, spec.rate, t0, measure_start, move |index, due| {
                let _ = job_tx.send(Job { index, due });
            })?
        }
        Some(channels) => {
            let target = target.clone();
            let outcome_tx = outcome_tx.clone();
            dispatch::spawn(total, spec.rate, t0, measure_start, move |index, due| {
                let channel = channels[(index as usize) % channels.len()].clone();
                let target = target.clone();
                let outcome_tx = outcome_tx.clone();
                runtime.spawn(async move {
                    let left = (due + timeout).saturating_duration_since(Instant::now());
                    let result =
                        match tokio::time::timeout(left, grpc_request(channel, &target)).await {
                            Ok(r) => r,
                            Err(_) => Err(fail("timeout", true)),
                        };
                    let _ = outcome_tx.send(Outcome {
                        due,
                        done: Instant::now(),
                        first_token: result.as_ref().ok().and_then(|r| r.1),
                        measured: due >= measure_start,
                        result: result.map(|r| r.0),
                    });
                });
            })?
        }
    };
    drop(job_tx);
    drop(outcome_tx);

    // Collect until every worker / task has reported (each is bounded by the timeout).
    let mut result = RunResult {
        sent: 0,
        ok_total: 0,
        ambiguous_total: 0,
        errors_total: 0,
        measured_ok: 0,
        measured_errors: 0,
        latency: stats::new_histogram()?,
        ttft: stats::new_histogram()?,
        achieved_rps: 0.0,
        cache_hits: 0,
        error_samples: Vec::new(),
        cpu: Vec::new(),
        dispatch_lateness: None,
    };
    let mut last_measured_done = measure_start;
    while let Some(outcome) = outcome_rx.recv().await {
        result.sent += 1;
        match &outcome.result {
            Ok(hit) => {
                result.ok_total += 1;
                if *hit {
                    result.cache_hits += 1;
                }
            }
            Err(f) => {
                result.errors_total += 1;
                if f.ambiguous {
                    result.ambiguous_total += 1;
                }
                if result.error_samples.len() < 5 {
                    result.error_samples.push(f.message.clone());
                }
            }
        }
        if outcome.measured {
            last_measured_done = last_measured_done.max(outcome.done);
            match outcome.result {
                Ok(_) => {
                    result.measured_ok += 1;
                    stats::record(&mut result.latency, outcome.done - outcome.due);
                    if let Some(first) = outcome.first_token {
                        stats::record(
                            &mut result.ttft,
                            first.saturating_duration_since(outcome.due),
                        );
                    }
                }
                Err(_) => result.measured_errors += 1,
            }
        }
    }
    while workers.join_next().await.is_some() {}
    // The thread has released everything (its senders are gone, so the loop above ended).
    let released = tokio::task::spawn_blocking(move || dispatcher.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the dispatcher thread panicked"))?;
    result.dispatch_lateness = dispatch::Lateness::of(&released);
    let cpu_after = cpu_snapshot(pids);
    let cpu_before = cpu_before.await?;
    result.cpu = cpu_before
        .iter()
        .zip(cpu_after.iter())
        .map(|((name, before), (_, after))| CpuDelta {
            name: name.clone(),
            seconds: match (before.0, after.0) {
                (Some(b), Some(a)) => a.saturating_sub(b) as f64 / clk,
                _ => f64::NAN,
            },
            kernel: match (before.1, after.1) {
                (Some(b), Some(a)) => Some(procfs::KernelCounts {
                    switches: a.switches.saturating_sub(b.switches),
                    io_calls: a.io_calls.saturating_sub(b.io_calls),
                }),
                _ => None,
            },
        })
        .collect();
    result.achieved_rps = stats::achieved_rate(
        result.measured_ok,
        spec.duration,
        last_measured_done.saturating_duration_since(measure_start),
    );
    let _ = stream;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::has_content;

    #[test]
    fn the_first_token_is_a_non_empty_content_field() {
        assert!(!has_content(
            br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(has_content(
            br#"data: {"choices":[{"delta":{"content":"echo"}}]}"#
        ));
        assert!(!has_content(br#"data: {"choices":[{"delta":{"content":"#));
    }
}
