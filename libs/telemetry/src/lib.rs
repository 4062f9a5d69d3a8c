//! Tracing and OpenTelemetry for every Switchboard process.
//!
//! - [`init`] installs a `tracing` subscriber with an OpenTelemetry layer. The layer is installed
//!   whether or not spans are exported, so W3C trace context always propagates; OTLP export is on
//!   only when [`TelemetryConfig::otlp_endpoint`] is set.
//! - [`TracePropagation`] is the tonic client interceptor that writes `traceparent` into gRPC
//!   metadata; [`grpc_server_span`] is the `trace_fn` that reads it back on the server.
//! - [`inject_nats`] / [`extract_nats`] do the same for NATS message headers.
//!
//! Never put a prompt, a completion, an API key or any PII in a span or a log line
//! (`docs/LOGGING.md`).

use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider},
};
use serde::Deserialize;
use tonic::metadata::{MetadataKey, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt, util::SubscriberInitExt};

/// The `[telemetry]` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`. Unset: spans are not exported.
    pub otlp_endpoint: Option<String>,
    /// Log filter directives (`RUST_LOG` syntax) used when `RUST_LOG` is unset. Logs only: spans
    /// are filtered by `trace_filter`, so quieter logs never turn tracing off.
    pub log_filter: String,
    /// Filter directives for the spans exported over OTLP and propagated.
    pub trace_filter: String,
    /// Fraction of new traces that are recorded and exported (parent-based: a request that arrives
    /// with a sampled `traceparent` is always recorded). 1.0 records every request.
    pub sample_ratio: f64,
    /// Spans buffered for export; beyond this, new spans are dropped (and counted by the SDK).
    pub export_queue_size: usize,
    /// Spans sent in one OTLP export. Smaller batches spread the exporter's CPU evenly instead of
    /// in bursts that stall the request path on a small machine.
    pub export_batch_size: usize,
    /// Longest time a span waits in the queue before it is exported, milliseconds.
    pub export_delay_ms: u64,
    /// Log as JSON lines instead of human-readable text.
    pub json_logs: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            log_filter: "info".to_owned(),
            trace_filter: "info".to_owned(),
            sample_ratio: 1.0,
            export_queue_size: 16_384,
            export_batch_size: 256,
            export_delay_ms: 200,
            json_logs: false,
        }
    }
}

/// Errors while installing telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Flushes and shuts the tracer provider down; call [`Telemetry::shutdown`] last in `main`.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes pending spans. Safe to call more than once.
    pub fn shutdown(mut self) {
        self.flush_and_stop();
    }

    fn flush_and_stop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("telemetry shutdown: {error}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.flush_and_stop();
    }
}

/// Installs the global subscriber and tracer provider for a process named `service`.
/// Call it from inside a tokio runtime (the OTLP exporter's channel lives there).
pub fn init(service: &'static str, config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let log_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_filter));
    let trace_filter = EnvFilter::new(&config.trace_filter);
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
        config.sample_ratio.clamp(0.0, 1.0),
    )));
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(Resource::builder().with_service_name(service).build());
    if let Some(endpoint) = config.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|source| TelemetryError::Exporter {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.export_queue_size.max(512))
            .with_max_export_batch_size(config.export_batch_size.clamp(1, 8192))
            .with_scheduled_delay(std::time::Duration::from_millis(
                config.export_delay_ms.max(10),
            ))
            .build();
        builder = builder.with_span_processor(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build(),
        );
    }
    let provider = builder.build();
    let tracer = provider.tracer(service);
    global::set_tracer_provider(provider.clone());
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_filter(trace_filter);
    let registry = tracing_subscriber::registry().with(otel);
    let installed = if config.json_logs {
        let logs = tracing_subscriber::fmt::layer().json().with_target(false);
        registry.with(logs.with_filter(log_filter)).try_init()
    } else {
        let logs = tracing_subscriber::fmt::layer().with_target(false);
        registry.with(logs.with_filter(log_filter)).try_init()
    };
    installed.map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// Installs only the W3C propagator (for tests and embedders that bring their own subscriber).
pub fn install_propagator() {
    global::set_text_map_propagator(TraceContextPropagator::new());
}

// === gRPC: client side ===

/// tonic client interceptor that writes the current span's W3C context into the request metadata.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracePropagation;

impl tonic::service::Interceptor for TracePropagation {
    /// Writes what the W3C propagator writes (the one every service installs), without its
    /// string formatting and header-name parsing on every internal call: `traceparent`, and
    /// `tracestate` when there is one.
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let cx = tracing::Span::current().context();
        let span = cx.span();
        let context = span.span_context();
        if let Some(value) =
            traceparent(context).and_then(|bytes| MetadataValue::try_from(&bytes[..]).ok())
        {
            let metadata = request.metadata_mut();
            metadata.insert(MetadataKey::from_static("traceparent"), value);
            let state = context.trace_state().header();
            if !state.is_empty()
                && let Ok(value) = MetadataValue::try_from(state.as_str())
            {
                metadata.insert(MetadataKey::from_static("tracestate"), value);
            }
        }
        Ok(request)
    }
}

/// The W3C `traceparent` of `context` (`00-<trace id>-<span id>-<flags>`, only the sampled flag
/// kept, as `TraceContextPropagator` writes it); `None` for an invalid context.
fn traceparent(context: &opentelemetry::trace::SpanContext) -> Option<[u8; 55]> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    fn hex(out: &mut [u8], bytes: &[u8]) {
        for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0x0f)];
        }
    }
    if !context.is_valid() {
        return None;
    }
    let mut out = [b'-'; 55];
    out[..2].copy_from_slice(b"00");
    hex(&mut out[3..35], &context.trace_id().to_bytes());
    hex(&mut out[36..52], &context.span_id().to_bytes());
    let flags = context.trace_flags() & opentelemetry::trace::TraceFlags::SAMPLED;
    hex(&mut out[53..55], &[flags.to_u8()]);
    Some(out)
}

// === gRPC / HTTP: server side ===

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// `trace_fn` for tonic servers: the one span of an RPC, parented to the caller's W3C context.
///
/// Handlers do not open a span of their own (a second span per RPC costs as much as the first):
/// they record into this one with `Span::current().record(..)`, so every field a handler records
/// is declared here, empty until recorded.
pub fn grpc_server_span(request: &http::Request<()>) -> tracing::Span {
    use tracing::field::Empty;
    let parent = extract_http(request.headers());
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %request.uri().path().trim_start_matches('/'),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        request.id = Empty,
        app.id = Empty,
        model = Empty,
        route = Empty,
        target = Empty,
        attempts = Empty,
        decision = Empty,
        findings = Empty,
        key = Empty,
        hit = Empty,
        stored = Empty,
        error.type = Empty,
    );
    let _ = span.set_parent(parent);
    span
}

/// The W3C context carried by HTTP headers (or an empty context).
pub fn extract_http(headers: &http::HeaderMap) -> opentelemetry::Context {
    global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

// === NATS ===

struct NatsInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct NatsExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// The OpenTelemetry context of the current `tracing` span.
pub fn current_context() -> opentelemetry::Context {
    tracing::Span::current().context()
}

/// Writes the current span's W3C context into NATS headers.
pub fn inject_nats(headers: &mut async_nats::HeaderMap) {
    inject_nats_context(&tracing::Span::current().context(), headers);
}

/// Writes `cx` (for example a request span's context captured earlier) into NATS headers.
pub fn inject_nats_context(cx: &opentelemetry::Context, headers: &mut async_nats::HeaderMap) {
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut NatsInjector(headers)));
}

/// The W3C context carried by NATS headers (or an empty context).
pub fn extract_nats(headers: Option<&async_nats::HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(headers) => global::get_text_map_propagator(|p| p.extract(&NatsExtractor(headers))),
        None => opentelemetry::Context::new(),
    }
}

/// `cx`'s W3C context as plain fields (`traceparent`, `tracestate`), for carriers that are not
/// headers: a usage event inside a batch message carries its own request's context this way.
pub fn context_fields(cx: &opentelemetry::Context) -> std::collections::HashMap<String, String> {
    let mut fields = std::collections::HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut fields));
    fields
}

/// The W3C context carried by plain fields (see [`context_fields`]), or an empty context.
pub fn context_from_fields(
    fields: &std::collections::HashMap<String, String>,
) -> opentelemetry::Context {
    if fields.is_empty() {
        return opentelemetry::Context::new();
    }
    global::get_text_map_propagator(|p| p.extract(fields))
}

/// Hex trace id of the current span ("" when there is none).
pub fn current_trace_id() -> String {
    let cx = tracing::Span::current().context();
    let span_context = cx.span().span_context().clone();
    if span_context.is_valid() {
        span_context.trace_id().to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use opentelemetry::{
        propagation::TextMapPropagator,
        trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState},
    };

    use super::*;
    use std::collections::HashMap;

    /// What the SDK's W3C propagator writes for `context`.
    fn by_the_propagator(context: &SpanContext) -> HashMap<String, String> {
        let cx = opentelemetry::Context::new().with_remote_span_context(context.clone());
        let mut fields = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut fields);
        fields
    }

    #[test]
    fn traceparent_is_what_the_w3c_propagator_writes() {
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let span_id = SpanId::from_hex("00f067aa0ba902b7").unwrap();
        for flags in [
            TraceFlags::SAMPLED,
            TraceFlags::default(),
            TraceFlags::new(0xff),
        ] {
            let context = SpanContext::new(trace_id, span_id, flags, true, TraceState::NONE);
            let ours = traceparent(&context).unwrap();
            assert_eq!(
                std::str::from_utf8(&ours).unwrap(),
                by_the_propagator(&context)["traceparent"],
                "{flags:?}"
            );
        }
        assert_eq!(traceparent(&SpanContext::empty_context()), None);
    }

    #[test]
    fn the_interceptor_writes_traceparent_and_a_tracestate_only_when_there_is_one() {
        use tonic::service::Interceptor as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let subscriber = tracing_subscriber::registry().with(tracing_opentelemetry::layer());
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let span_id = SpanId::from_hex("00f067aa0ba902b7").unwrap();
        let vendor = TraceState::from_key_value([("vendor", "value")]).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            for (state, header) in [(TraceState::NONE, ""), (vendor, "vendor=value")] {
                let parent = SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, true, state);
                let span = tracing::info_span!("call");
                let _ = span.set_parent(
                    opentelemetry::Context::new().with_remote_span_context(parent.clone()),
                );
                let _entered = span.enter();
                let context = tracing::Span::current()
                    .context()
                    .span()
                    .span_context()
                    .clone();
                assert_eq!(context.trace_id(), trace_id, "the request's trace");
                let expected = by_the_propagator(&context);
                assert_eq!(expected["tracestate"], header, "the parent's trace state");
                let request = TracePropagation.call(tonic::Request::new(())).unwrap();
                let metadata = request.metadata();
                assert_eq!(
                    metadata.get("traceparent").unwrap().to_str().unwrap(),
                    expected["traceparent"]
                );
                match expected.get("tracestate").filter(|s| !s.is_empty()) {
                    Some(state) => {
                        assert_eq!(metadata.get("tracestate").unwrap().to_str().unwrap(), state)
                    }
                    None => assert!(metadata.get("tracestate").is_none()),
                }
            }
        });
    }
}
