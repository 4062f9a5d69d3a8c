//! Usage events: built once per request and handed to a background publisher that delivers them to
//! JetStream (message id = request id, so a retried publish is de-duplicated by the server).
//!
//! The request path never waits on NATS: events go into a bounded queue. When NATS is down the
//! publisher keeps retrying; when the queue is full the event is logged loudly and counted
//! (`usage_events_dropped`). A durable local outbox replaces this queue in issue 5.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream;
use futures::future::join_all;
use switchboard_bus::{NatsConfig, UsageEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Counters of the publisher.
#[derive(Debug, Default)]
pub struct UsageStats {
    /// Events acknowledged by JetStream.
    pub published: AtomicU64,
    /// Events that could not be queued because the queue was full.
    pub dropped: AtomicU64,
    /// Publish attempts that failed and were retried.
    pub retries: AtomicU64,
}

struct Queued {
    event: UsageEvent,
    parent: opentelemetry::Context,
}

/// The request path's handle: queue an event.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<Queued>,
    stats: Arc<UsageStats>,
}

impl UsageSink {
    /// Queues `event`; the ledger's span will be parented to the current (request) span.
    pub fn record(&self, event: UsageEvent) {
        let parent = tracing::Span::current().context();
        let request_id = event.request_id.clone();
        if self.tx.try_send(Queued { event, parent }).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(request.id = %request_id, "usage queue full or closed: usage event dropped");
        }
    }

    /// Publisher counters.
    pub fn stats(&self) -> &UsageStats {
        &self.stats
    }
}

/// The background publisher.
pub struct UsagePublisher {
    rx: mpsc::Receiver<Queued>,
    nats: NatsConfig,
    stats: Arc<UsageStats>,
}

/// Builds the sink and its publisher.
pub fn channel(nats: NatsConfig, capacity: usize) -> (UsageSink, UsagePublisher) {
    let (tx, rx) = mpsc::channel(capacity);
    let stats = Arc::new(UsageStats::default());
    (
        UsageSink {
            tx,
            stats: stats.clone(),
        },
        UsagePublisher { rx, nats, stats },
    )
}

const BATCH: usize = 256;

impl UsagePublisher {
    /// Publishes until `cancel` fires, then drains what is queued (bounded by `drain_timeout`).
    pub async fn run(
        mut self,
        client: async_nats::Client,
        cancel: CancellationToken,
        drain_timeout: Duration,
    ) {
        let js = jetstream::new(client);
        let mut stream_ready = false;
        let mut pending: Vec<Queued> = Vec::new();
        let mut backoff = Duration::from_millis(50);
        loop {
            if pending.is_empty() {
                tokio::select! {
                    received = self.rx.recv() => match received {
                        Some(item) => pending.push(item),
                        None => break,
                    },
                    () = cancel.cancelled() => break,
                }
            }
            while pending.len() < BATCH {
                match self.rx.try_recv() {
                    Ok(item) => pending.push(item),
                    Err(_) => break,
                }
            }
            if !stream_ready {
                match self.nats.ensure_usage_stream(&js).await {
                    Ok(_) => stream_ready = true,
                    Err(error) => {
                        tracing::warn!(%error, "usage stream not ready; retrying");
                        if wait_or_cancel(&cancel, backoff).await {
                            break;
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            pending = self.publish_batch(&js, pending).await;
            if pending.is_empty() {
                backoff = Duration::from_millis(50);
            } else {
                self.stats
                    .retries
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
                if wait_or_cancel(&cancel, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        // Drain: everything still queued gets a bounded chance to reach JetStream.
        self.rx.close();
        while let Some(item) = self.rx.recv().await {
            pending.push(item);
        }
        let deadline = tokio::time::Instant::now() + drain_timeout;
        while !pending.is_empty() && tokio::time::Instant::now() < deadline {
            if !stream_ready {
                stream_ready = self.nats.ensure_usage_stream(&js).await.is_ok();
            }
            pending = self.publish_batch(&js, pending).await;
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if !pending.is_empty() {
            tracing::error!(
                events = pending.len(),
                "shutting down with unpublished usage events"
            );
        }
    }

    /// Publishes a batch; returns the events that must be retried.
    async fn publish_batch(&self, js: &jetstream::Context, batch: Vec<Queued>) -> Vec<Queued> {
        let mut acks = Vec::with_capacity(batch.len());
        let mut items = Vec::with_capacity(batch.len());
        let mut failed = Vec::new();
        for item in batch {
            let sent =
                switchboard_bus::publish_usage_in(js, &self.nats, &item.event, &item.parent).await;
            match sent {
                Ok(ack) => {
                    acks.push(ack.into_future());
                    items.push(item);
                }
                Err(error) => {
                    tracing::warn!(%error, request.id = %item.event.request_id, "usage publish failed; will retry");
                    failed.push(item);
                }
            }
        }
        for (item, ack) in items.into_iter().zip(join_all(acks).await) {
            match ack {
                Ok(_) => {
                    self.stats.published.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    tracing::warn!(%error, request.id = %item.event.request_id, "usage publish not acknowledged; will retry");
                    failed.push(item);
                }
            }
        }
        failed
    }
}

async fn wait_or_cancel(cancel: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = cancel.cancelled() => true,
    }
}
