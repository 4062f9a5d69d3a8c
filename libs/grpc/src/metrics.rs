//! The Prometheus `/metrics` endpoint of a service with a `metrics_addr` (router, ledger, guard,
//! cache; the gateway serves `/metrics` on its own HTTP port): plain HTTP, `GET /metrics` only,
//! the text the service renders at scrape time. Nothing is rendered between scrapes: the request
//! path only bumps the service's atomics.

use std::{
    fmt::Write as _,
    future::Future,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use tokio::net::TcpListener;

/// A latency histogram in relaxed atomics: one count per bucket of `N` upper bounds in
/// milliseconds (`+Inf` after them), and the sum in microseconds. The bounds are the caller's
/// constant, passed to [`observe`](Self::observe) and [`render`](Self::render) (so that the
/// histogram stays `const`-constructible and `Default`).
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    /// Per bucket, not cumulative (summed when rendered).
    buckets: [AtomicU64; N],
    /// Beyond the last bound.
    over: AtomicU64,
    sum_us: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Histogram<N> {
    /// An empty histogram.
    pub const fn new() -> Self {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; N],
            over: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Counts one observation of `elapsed` in the first bucket whose bound it does not exceed.
    pub fn observe(&self, bounds_ms: &[u64; N], elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let index = bounds_ms.partition_point(|bound| bound.saturating_mul(1_000) < us);
        self.buckets
            .get(index)
            .unwrap_or(&self.over)
            .fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Observations in bucket `index` alone (`N`: beyond the last bound).
    pub fn bucket(&self, index: usize) -> u64 {
        self.buckets.get(index).unwrap_or(&self.over).load(Relaxed)
    }

    /// Appends the series `name_bucket`, `name_sum` and `name_count` with `labels` (already
    /// formatted: `kind="unary"`, or several separated by commas).
    pub fn render(&self, out: &mut String, bounds_ms: &[u64; N], name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, count) in bounds_ms.iter().zip(&self.buckets) {
            cumulative += count.load(Relaxed);
            let le = *bound as f64 / 1000.0;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.over.load(Relaxed);
        let sum_us = self.sum_us.load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}\n\
             {name}_sum{{{labels}}} {}.{:06}\n\
             {name}_count{{{labels}}} {cumulative}",
            sum_us / 1_000_000,
            sum_us % 1_000_000
        );
    }
}

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind the metrics address {addr}: {source}")]
pub struct MetricsBindError {
    /// The configured address.
    pub addr: String,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// A bound `/metrics` listener, not yet serving (bind at build time, serve in `run_until`).
#[derive(Debug)]
pub struct MetricsEndpoint {
    service: &'static str,
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsEndpoint {
    /// Binds `addr` (`127.0.0.1:0` picks a free port) for `service` (named in logs).
    pub async fn bind(service: &'static str, addr: &str) -> Result<Self, MetricsBindError> {
        let bind_error = |source| MetricsBindError {
            addr: addr.to_owned(),
            source,
        };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        tracing::info!(metrics.addr = %addr, "{service} metrics endpoint bound");
        Ok(MetricsEndpoint {
            service,
            listener,
            addr,
        })
    }

    /// [`MetricsEndpoint::bind`] when a `metrics_addr` is configured; `None` when it is not.
    pub async fn bind_configured(
        service: &'static str,
        addr: Option<&str>,
    ) -> Result<Option<Self>, MetricsBindError> {
        match addr {
            None => Ok(None),
            Some(addr) => Self::bind(service, addr).await.map(Some),
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `GET /metrics` with what `render` returns until `shutdown` resolves (run it on the
    /// service's task tracker). A failure is logged, not returned: metrics never stop a service.
    pub async fn serve<R>(self, render: R, shutdown: impl Future<Output = ()> + Send + 'static)
    where
        R: Fn() -> String + Clone + Send + Sync + 'static,
    {
        let MetricsEndpoint {
            service, listener, ..
        } = self;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let body = render();
                async move { ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], body) }
            }),
        );
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "{service} metrics endpoint failed");
        }
    }
}

/// `GET /metrics` on `addr` with a bare HTTP/1.0 request: the response body (for tests and
/// tools; no HTTP client needed).
pub async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_owned())
        }
        _ => Err(std::io::Error::other(format!(
            "unexpected /metrics response: {}",
            response.lines().next().unwrap_or_default()
        ))),
    }
}

/// The value of the sample `series` (name and labels exactly as rendered) in `text`; 0 when it
/// is absent (a counter not yet rendered).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_buckets_by_its_bounds_and_sums_microseconds() {
        const BOUNDS: [u64; 2] = [5, 10];
        let histogram = Histogram::<2>::new();
        histogram.observe(&BOUNDS, Duration::from_micros(400));
        histogram.observe(&BOUNDS, Duration::from_millis(5));
        histogram.observe(&BOUNDS, Duration::from_micros(5_001));
        histogram.observe(&BOUNDS, Duration::from_secs(1));
        assert_eq!(
            [
                histogram.bucket(0),
                histogram.bucket(1),
                histogram.bucket(2)
            ],
            [2, 1, 1]
        );
        let mut text = String::new();
        histogram.render(&mut text, &BOUNDS, "t_seconds", "k=\"v\"");
        assert_eq!(
            text,
            "t_seconds_bucket{k=\"v\",le=\"0.005\"} 2\n\
             t_seconds_bucket{k=\"v\",le=\"0.01\"} 3\n\
             t_seconds_bucket{k=\"v\",le=\"+Inf\"} 4\n\
             t_seconds_sum{k=\"v\"} 1.010401\n\
             t_seconds_count{k=\"v\"} 4\n"
        );
    }

    #[tokio::test]
    async fn serves_what_render_returns_until_shutdown() {
        let endpoint = MetricsEndpoint::bind("test", "127.0.0.1:0").await.unwrap();
        let addr = endpoint.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = calls.clone();
        let task = tokio::spawn(endpoint.serve(
            move || {
                let n = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                format!("# TYPE x_total counter\nx_total{{a=\"b\"}} {n}\n")
            },
            async {
                let _ = stopped.await;
            },
        ));
        let text = scrape(addr).await.unwrap();
        assert_eq!(sample(&text, "x_total{a=\"b\"}"), 1.0);
        let text = scrape(addr).await.unwrap();
        assert_eq!(sample(&text, "x_total{a=\"b\"}"), 2.0);
        assert_eq!(sample(&text, "absent"), 0.0);
        stop.send(()).unwrap();
        task.await.unwrap();
        assert!(scrape(addr).await.is_err());
    }

    #[tokio::test]
    async fn an_address_in_use_is_a_bind_error_naming_it() {
        let endpoint = MetricsEndpoint::bind("test", "127.0.0.1:0").await.unwrap();
        let addr = endpoint.local_addr().to_string();
        let error = MetricsEndpoint::bind("test", &addr).await.unwrap_err();
        assert!(error.to_string().contains(&addr), "{error}");
        assert!(
            MetricsEndpoint::bind_configured("test", None)
                .await
                .unwrap()
                .is_none()
        );
    }
}
