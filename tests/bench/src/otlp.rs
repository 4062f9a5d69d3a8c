//! An OTLP/gRPC trace receiver that counts what it receives and keeps a duration histogram per
//! span (service and span name), so exporting stays on during the benchmark without Jaeger and
//! without the receiver holding spans in memory. The durations break a request's latency down by
//! hop (`docs/BENCHMARKS.md`, "Span durations").

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use opentelemetry_proto::tonic::common::v1::any_value::Value;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tonic::{Request, Response, Status};

use crate::stats::{self, Percentiles};

/// The span counter.
#[derive(Clone, Default)]
pub struct Counter {
    spans: Arc<AtomicU64>,
    /// Durations since the last [`Counter::take_durations`], by `service: span name`.
    durations: Arc<Mutex<HashMap<String, Histogram<u64>>>>,
}

impl Counter {
    /// Spans received so far.
    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }

    /// The span durations received since the last call, by `service: span name` (and forgets them).
    pub fn take_durations(&self) -> BTreeMap<String, Percentiles> {
        let taken = std::mem::take(&mut *self.durations.lock().unwrap_or_else(|e| e.into_inner()));
        taken
            .into_iter()
            .filter_map(|(name, h)| Some((name, stats::percentiles(&h)?)))
            .collect()
    }

    fn record(&self, request: &ExportTraceServiceRequest) {
        let mut durations = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        for resource in &request.resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.as_str()),
                    _ => None,
                })
                .unwrap_or("?");
            for span in resource.scope_spans.iter().flat_map(|s| s.spans.iter()) {
                let nanos = span
                    .end_time_unix_nano
                    .saturating_sub(span.start_time_unix_nano);
                let key = format!("{service}: {}", span.name);
                let histogram = match durations.get_mut(&key) {
                    Some(h) => h,
                    None => match stats::new_histogram() {
                        Ok(h) => durations.entry(key).or_insert(h),
                        Err(_) => continue,
                    },
                };
                stats::record(histogram, Duration::from_nanos(nanos));
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Counter {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| r.scope_spans.iter())
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::Relaxed);
        self.record(request.get_ref());
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The receiver's server: its own thread and single-threaded runtime, so that decoding the spans
/// never runs on (and delays) the load generator's workers, as with an external collector.
pub struct Receiver {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Stops the server and waits for its thread.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves the receiver on `127.0.0.1:0` until [`Receiver::stop`].
pub fn spawn() -> anyhow::Result<(SocketAddr, Counter, Receiver)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let counter = Counter::default();
    let service =
        TraceServiceServer::new(counter.clone()).max_decoding_message_size(64 * 1024 * 1024);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("otlp-receiver".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    eprintln!("OTLP receiver: cannot register its listener");
                    return;
                };
                let server = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
                // Stopping drops the server and, with the runtime, its connections (the services'
                // exporters may still hold theirs): no graceful wait.
                tokio::select! {
                    _ = server => {}
                    _ = stopped => {}
                }
            });
        })?;
    Ok((
        addr,
        counter,
        Receiver {
            stop: Some(stop),
            thread: Some(thread),
        },
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use opentelemetry_proto::tonic::{
        common::v1::{AnyValue, KeyValue},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span},
    };

    use super::*;

    fn span(name: &str, micros: u64) -> Span {
        Span {
            name: name.to_owned(),
            start_time_unix_nano: 1_000_000_000,
            end_time_unix_nano: 1_000_000_000 + micros * 1000,
            ..Span::default()
        }
    }

    #[test]
    fn durations_are_kept_per_service_and_span_name_until_taken() {
        let resource = Resource {
            attributes: vec![KeyValue {
                key: "service.name".to_owned(),
                value: Some(AnyValue {
                    value: Some(Value::StringValue("router".to_owned())),
                }),
                ..KeyValue::default()
            }],
            ..Resource::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span("route", 200), span("route", 400), span("call", 100)],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        };
        let counter = Counter::default();
        counter.record(&request);
        let taken = counter.take_durations();
        assert_eq!(taken.len(), 2, "{taken:?}");
        let route = taken["router: route"];
        assert_eq!(route.count, 2);
        assert!((route.max_ms - 0.4).abs() < 0.01, "{route:?}");
        assert_eq!(taken["router: call"].count, 1);
        assert!(counter.take_durations().is_empty(), "taking resets");
    }
}
