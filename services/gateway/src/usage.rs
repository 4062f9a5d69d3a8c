//! Usage events: built once per request and handed to a background publisher that delivers them to
//! JetStream in batch messages (ADR 009; message id = first request id and count, so a retried
//! publish of the same batch is de-duplicated by the server, and the ledger records a request id
//! once whatever message carries it).
//!
//! The request path never waits on NATS: events go into a bounded in-memory queue. The publisher
//! task sends them to JetStream; what JetStream does not acknowledge (or everything, while the usage
//! stream cannot be reached) is appended to the durable local outbox (`outbox.rs`, ADR 005) and
//! replayed from there in order once NATS answers. While the outbox holds events, new events go behind
//! them in the outbox so the order is kept. When the outbox is full its refusals are counted
//! (`outbox_full`), the events wait in memory, and once the in-memory queue is full too new events are
//! logged loudly and counted (`dropped`).

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

use crate::outbox::Outbox;
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
    /// Times events could not be appended to the outbox because it was full.
    pub outbox_full: AtomicU64,
    /// Bytes in the outbox (gauge).
    pub outbox_bytes: AtomicU64,
}

#[derive(Clone)]
struct Queued {
    event: UsageEvent,
    parent: opentelemetry::Context,
}

/// The request path's handle: queue an event (and count it in `/metrics`, `metrics.rs`).
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<Queued>,
    stats: Arc<UsageStats>,
}

impl UsageSink {
    /// Queues `event`; the ledger's span will be parented to the current (request) span.
    pub fn record(&self, event: UsageEvent) {
        crate::metrics::served(&event);
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
    outbox: Outbox,
    /// Replay position: (segment, events of it already acknowledged). Segments start at 1.
    cursor: (u64, usize),
    /// How long the first event of a batch waits for company.
    linger: Duration,
}

/// Builds the sink and its publisher with an outbox that is never opened (tests that do not run the
/// publisher).
#[cfg(test)]
pub fn channel(nats: NatsConfig, capacity: usize) -> (UsageSink, UsagePublisher) {
    let dir = std::env::temp_dir().join(format!(
        "switchboard-outbox-{}",
        uuid::Uuid::now_v7().simple()
    ));
    channel_with_outbox(nats, capacity, Outbox::unopened(dir, 1024 * 1024))
}

#[cfg(test)]
impl UsagePublisher {
    /// The next queued event, if any (tests that do not run the publisher).
    pub(crate) fn try_next(&mut self) -> Option<UsageEvent> {
        self.rx.try_recv().ok().map(|queued| queued.event)
    }
}

/// Builds the sink and its publisher; `outbox` keeps what JetStream cannot take.
pub fn channel_with_outbox(
    nats: NatsConfig,
    capacity: usize,
    outbox: Outbox,
) -> (UsageSink, UsagePublisher) {
    let (tx, rx) = mpsc::channel(capacity);
    let stats = Arc::new(UsageStats::default());
    stats.outbox_bytes.store(outbox.bytes(), Ordering::Relaxed);
    (
        UsageSink {
            tx,
            stats: stats.clone(),
        },
        UsagePublisher {
            rx,
            nats,
            stats,
            outbox,
            cursor: (0, 0),
            linger: Duration::ZERO,
        },
    )
}

const BATCH: usize = 256;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where the publisher sends events: JetStream, or a fake in tests.
pub(crate) trait Transport {
    /// Whether the usage stream is ready (it is set up on first success).
    async fn ready(&mut self) -> bool;
    /// Publishes `batch` in order and awaits the acks: `true` for each acknowledged event.
    async fn publish(&mut self, batch: &[(&UsageEvent, &opentelemetry::Context)]) -> Vec<bool>;
}

struct JetStream {
    js: jetstream::Context,
    nats: NatsConfig,
    stream_ready: bool,
}

impl Transport for JetStream {
    async fn ready(&mut self) -> bool {
        if !self.stream_ready {
            match self.nats.ensure_usage_stream(&self.js).await {
                Ok(_) => self.stream_ready = true,
                Err(error) => tracing::warn!(%error, "usage stream not ready; retrying"),
            }
        }
        self.stream_ready
    }

    /// One [`switchboard_bus::UsageBatch`] message per run of events (ADR 009): JetStream stores,
    /// acknowledges and delivers a message, not an event, so its cost per event falls with the
    /// batch; each message's ack stands for all of its events.
    async fn publish(&mut self, batch: &[(&UsageEvent, &opentelemetry::Context)]) -> Vec<bool> {
        let mut acked = vec![false; batch.len()];
        let events: Vec<&UsageEvent> = batch.iter().map(|(event, _)| *event).collect();
        let mut acks = Vec::new();
        let mut runs = Vec::new();
        let mut failures = 0usize;
        let mut first_error = None;
        let mut start = 0usize;
        for run in
            switchboard_bus::usage_batch_runs(&events, switchboard_bus::MAX_USAGE_BATCH_BYTES)
        {
            let range = start..start + run;
            start += run;
            match switchboard_bus::publish_usage_batch(&self.js, &self.nats, &batch[range.clone()])
                .await
            {
                Ok(ack) => {
                    acks.push(ack.into_future());
                    runs.push(range);
                }
                Err(error) => {
                    failures += run;
                    first_error.get_or_insert((
                        error.to_string(),
                        batch[range.start].0.request_id.clone(),
                    ));
                }
            }
        }
        for (range, ack) in runs.into_iter().zip(join_all(acks).await) {
            match ack {
                Ok(_) => acked[range].fill(true),
                Err(error) => {
                    failures += range.len();
                    first_error.get_or_insert((
                        error.to_string(),
                        batch[range.start].0.request_id.clone(),
                    ));
                }
            }
        }
        if let Some((error, request_id)) = first_error {
            tracing::warn!(%error, request.id = %request_id, events = failures, "usage publish failed or not acknowledged");
        }
        acked
    }
}

impl UsagePublisher {
    /// Lets the first event of a batch wait up to `linger` for more (`[gateway] usage_linger_ms`):
    /// a batch is one write to NATS and one burst of acks, where single events cost a write and a
    /// wake-up each. Usage reaches the ledger that much later; the request never waits for it.
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Publishes until `cancel` fires, then drains what is queued (bounded by `drain_timeout`):
    /// what cannot reach JetStream in time stays in the outbox for the next start.
    pub async fn run(
        self,
        client: async_nats::Client,
        cancel: CancellationToken,
        drain_timeout: Duration,
    ) {
        let transport = JetStream {
            js: jetstream::new(client),
            nats: self.nats.clone(),
            stream_ready: false,
        };
        self.run_with(transport, cancel, drain_timeout).await;
    }

    async fn run_with<T: Transport>(
        mut self,
        mut transport: T,
        cancel: CancellationToken,
        drain_timeout: Duration,
    ) {
        let mut pending: Vec<Queued> = Vec::new();
        let mut backoff = MIN_BACKOFF;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            if pending.is_empty() && self.outbox.is_empty() {
                tokio::select! {
                    received = self.rx.recv() => match received {
                        Some(item) => pending.push(item),
                        None => break,
                    },
                    () = cancel.cancelled() => break,
                }
                if !self.linger.is_zero() {
                    let until = tokio::time::Instant::now() + self.linger;
                    while pending.len() < BATCH {
                        match tokio::time::timeout_at(until, self.rx.recv()).await {
                            Ok(Some(item)) => pending.push(item),
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
            }
            while pending.len() < BATCH {
                match self.rx.try_recv() {
                    Ok(item) => pending.push(item),
                    Err(_) => break,
                }
            }
            let progressed = if self.outbox.is_empty() {
                pending = self.publish_live(&mut transport, pending).await;
                if pending.is_empty() {
                    true
                } else {
                    self.stats
                        .retries
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    self.spill(&mut pending);
                    false
                }
            } else {
                // Events queue behind the outbox's to keep the order.
                self.spill(&mut pending);
                self.replay_segment(&mut transport).await
            };
            if progressed {
                backoff = MIN_BACKOFF;
            } else {
                if wait_or_cancel(&cancel, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        self.shutdown(transport, pending, drain_timeout).await;
    }

    /// Drain: what is queued gets a bounded chance to reach JetStream, the rest goes to the outbox.
    async fn shutdown<T: Transport>(
        mut self,
        mut transport: T,
        mut pending: Vec<Queued>,
        drain_timeout: Duration,
    ) {
        self.rx.close();
        while let Some(item) = self.rx.recv().await {
            pending.push(item);
        }
        let deadline = tokio::time::Instant::now() + drain_timeout;
        if self.outbox.is_empty() && !pending.is_empty() {
            let attempt = pending.clone();
            if let Ok(failed) =
                tokio::time::timeout_at(deadline, self.publish_live(&mut transport, attempt)).await
            {
                pending = failed;
            }
        }
        self.spill(&mut pending);
        if let Some(first) = pending.first() {
            tracing::error!(
                events = pending.len(),
                request.id = %first.event.request_id,
                "usage outbox full at shutdown: usage events lost"
            );
        }
        while !self.outbox.is_empty() {
            match tokio::time::timeout_at(deadline, self.replay_segment(&mut transport)).await {
                Ok(true) => {}
                Ok(false) => {
                    let pause = tokio::time::sleep(Duration::from_millis(100));
                    if tokio::time::timeout_at(deadline, pause).await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        if !self.outbox.is_empty() {
            tracing::warn!(
                outbox.bytes = self.outbox.bytes(),
                "shutting down with usage events in the outbox; they are replayed on the next start"
            );
        }
        self.outbox.close();
    }

    /// Publishes queued events; returns those JetStream did not acknowledge, in order.
    async fn publish_live<T: Transport>(
        &self,
        transport: &mut T,
        batch: Vec<Queued>,
    ) -> Vec<Queued> {
        if batch.is_empty() || !transport.ready().await {
            return batch;
        }
        let acked = {
            let refs: Vec<_> = batch.iter().map(|q| (&q.event, &q.parent)).collect();
            transport.publish(&refs).await
        };
        let mut failed = Vec::new();
        let mut published = 0u64;
        for (index, item) in batch.into_iter().enumerate() {
            if acked.get(index).copied().unwrap_or(false) {
                published += 1;
            } else {
                failed.push(item);
            }
        }
        self.stats.published.fetch_add(published, Ordering::Relaxed);
        failed
    }

    /// Appends what fits of `pending` to the outbox (removing it from `pending`).
    fn spill(&mut self, pending: &mut Vec<Queued>) {
        if pending.is_empty() {
            return;
        }
        let was_empty = self.outbox.is_empty();
        match self.outbox.append(pending.iter().map(|q| &q.event)) {
            Ok(written) => {
                if written > 0 && was_empty {
                    tracing::warn!(
                        events = written,
                        "usage events cannot reach JetStream: writing them to the outbox"
                    );
                }
                pending.drain(..written);
                if let Some(first) = pending.first() {
                    self.stats.outbox_full.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        events = pending.len(),
                        request.id = %first.event.request_id,
                        outbox.bytes = self.outbox.bytes(),
                        outbox.max_bytes = self.outbox.max_bytes(),
                        "usage outbox full: events wait in memory (new events are dropped once the queue is full)"
                    );
                }
            }
            Err(error) => {
                tracing::error!(%error, events = pending.len(), "cannot write the usage outbox: events wait in memory");
            }
        }
        self.stats
            .outbox_bytes
            .store(self.outbox.bytes(), Ordering::Relaxed);
    }

    /// Replays the oldest outbox segment in order; deletes it once every event is acknowledged.
    /// Returns whether it made progress without failure.
    async fn replay_segment<T: Transport>(&mut self, transport: &mut T) -> bool {
        if !transport.ready().await {
            return false;
        }
        let segment = match self.outbox.oldest() {
            Ok(Some(segment)) => segment,
            Ok(None) => return true,
            Err(error) => {
                tracing::error!(%error, "cannot read the usage outbox");
                return false;
            }
        };
        let total = segment.events.len();
        let mut done = if self.cursor.0 == segment.seq {
            self.cursor.1.min(total)
        } else {
            0
        };
        // Replayed events carry no trace context: their request spans are gone.
        let no_parent = opentelemetry::Context::new();
        while done < total {
            let end = (done + BATCH).min(total);
            let refs: Vec<_> = segment.events[done..end]
                .iter()
                .map(|event| (event, &no_parent))
                .collect();
            let acked = transport.publish(&refs).await;
            let leading = acked.iter().take_while(|ok| **ok).count().min(end - done);
            self.stats
                .published
                .fetch_add(leading as u64, Ordering::Relaxed);
            done += leading;
            if done < end {
                self.stats
                    .retries
                    .fetch_add((end - done) as u64, Ordering::Relaxed);
                self.cursor = (segment.seq, done);
                return false;
            }
        }
        self.cursor = (segment.seq, done);
        if let Err(error) = self.outbox.remove(segment.seq) {
            tracing::error!(%error, "cannot delete a replayed usage outbox segment");
            return false;
        }
        self.cursor = (0, 0);
        self.stats
            .outbox_bytes
            .store(self.outbox.bytes(), Ordering::Relaxed);
        tracing::info!(
            events = total,
            outbox.bytes = self.outbox.bytes(),
            "usage outbox segment replayed to JetStream"
        );
        true
    }
}

async fn wait_or_cancel(cancel: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = cancel.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize},
    };

    use super::*;

    /// A JetStream stand-in: down or up; when up, every third call loses the second half of its batch
    /// (a connection cut mid-batch).
    #[derive(Clone, Default)]
    struct Fake {
        up: Arc<AtomicBool>,
        calls: Arc<AtomicUsize>,
        delivered: Arc<Mutex<Vec<String>>>,
    }

    impl Transport for Fake {
        async fn ready(&mut self) -> bool {
            self.up.load(Ordering::SeqCst)
        }

        async fn publish(&mut self, batch: &[(&UsageEvent, &opentelemetry::Context)]) -> Vec<bool> {
            if !self.up.load(Ordering::SeqCst) {
                return vec![false; batch.len()];
            }
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            let cut = if call % 3 == 2 && batch.len() > 1 {
                batch.len() / 2
            } else {
                batch.len()
            };
            let mut delivered = self.delivered.lock().unwrap();
            (0..batch.len())
                .map(|index| {
                    if index < cut {
                        delivered.push(batch[index].0.request_id.clone());
                        true
                    } else {
                        false
                    }
                })
                .collect()
        }
    }

    fn event(n: usize) -> UsageEvent {
        UsageEvent {
            request_id: format!("req-{n:05}"),
            app: "app".to_owned(),
            ..Default::default()
        }
    }

    fn expected(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|n| event(n).request_id).collect()
    }

    async fn until(what: impl Fn() -> bool) {
        // Generous bound so a stuck publisher fails the test instead of hanging it.
        for _ in 0..2000 {
            if what() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }

    fn start(
        dir: &std::path::Path,
        max_bytes: u64,
        capacity: usize,
        fake: &Fake,
    ) -> (UsageSink, CancellationToken, tokio::task::JoinHandle<()>) {
        let outbox = Outbox::open(dir, max_bytes).unwrap();
        let (sink, publisher) = channel_with_outbox(NatsConfig::default(), capacity, outbox);
        let cancel = CancellationToken::new();
        let task =
            tokio::spawn(publisher.run_with(fake.clone(), cancel.clone(), Duration::from_secs(5)));
        (sink, cancel, task)
    }

    #[tokio::test]
    async fn lingering_publishes_events_that_arrive_together_in_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::default();
        fake.up.store(true, Ordering::SeqCst);
        let outbox = Outbox::open(dir.path(), 1024 * 1024).unwrap();
        let (sink, publisher) = channel_with_outbox(NatsConfig::default(), 100, outbox);
        // A long linger, so that the test does not depend on how fast this machine is.
        let publisher = publisher.with_linger(Duration::from_secs(1));
        let cancel = CancellationToken::new();
        let task =
            tokio::spawn(publisher.run_with(fake.clone(), cancel.clone(), Duration::from_secs(5)));
        sink.record(event(0));
        // The publisher has taken the first event and lingers.
        until(|| sink.tx.capacity() == 100).await;
        sink.record(event(1));
        sink.record(event(2));
        until(|| fake.delivered.lock().unwrap().len() == 3).await;
        // One transport call carried all three.
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        assert_eq!(*fake.delivered.lock().unwrap(), expected(0..3));
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn nats_down_then_up_delivers_every_event_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::default();
        let (sink, cancel, task) = start(dir.path(), 64 * 1024 * 1024, 10_000, &fake);
        for n in 0..700 {
            sink.record(event(n));
        }
        until(|| sink.stats().outbox_bytes.load(Ordering::Relaxed) > 0).await;
        fake.up.store(true, Ordering::SeqCst);
        for n in 700..1000 {
            sink.record(event(n));
        }
        until(|| fake.delivered.lock().unwrap().len() >= 1000).await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(*fake.delivered.lock().unwrap(), expected(0..1000));
        assert_eq!(sink.stats().published.load(Ordering::Relaxed), 1000);
        assert_eq!(sink.stats().outbox_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(sink.stats().dropped.load(Ordering::Relaxed), 0);
        // A clean shutdown with an empty outbox leaves no directory behind.
        assert!(!dir.path().exists());
    }

    #[tokio::test]
    async fn shutdown_while_down_keeps_events_for_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        let fake = Fake::default();
        let (sink, cancel, task) = start(&path, 64 * 1024 * 1024, 10_000, &fake);
        for n in 0..300 {
            sink.record(event(n));
        }
        cancel.cancel();
        task.await.unwrap();
        assert!(fake.delivered.lock().unwrap().is_empty());
        assert!(path.exists());

        fake.up.store(true, Ordering::SeqCst);
        let (sink, cancel, task) = start(&path, 64 * 1024 * 1024, 10_000, &fake);
        assert!(sink.stats().outbox_bytes.load(Ordering::Relaxed) > 0);
        sink.record(event(300));
        until(|| fake.delivered.lock().unwrap().len() >= 301).await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(*fake.delivered.lock().unwrap(), expected(0..301));
    }

    #[tokio::test]
    async fn full_outbox_is_counted_bounded_and_loses_nothing_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let one = (8 + prost::Message::encoded_len(&event(0))) as u64;
        let max = one * 10;
        let fake = Fake::default();
        let (sink, cancel, task) = start(dir.path(), max, 1_000, &fake);
        for n in 0..40 {
            sink.record(event(n));
        }
        until(|| sink.stats().outbox_full.load(Ordering::Relaxed) > 0).await;
        let bytes = sink.stats().outbox_bytes.load(Ordering::Relaxed);
        assert!(bytes <= max, "{bytes} > {max}");
        assert_eq!(bytes, one * 10);
        // Events the outbox refused waited in memory: nothing lost once NATS is back.
        fake.up.store(true, Ordering::SeqCst);
        until(|| fake.delivered.lock().unwrap().len() >= 40).await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(*fake.delivered.lock().unwrap(), expected(0..40));
        assert_eq!(sink.stats().dropped.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn full_outbox_and_full_queue_drop_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let one = (8 + prost::Message::encoded_len(&event(0))) as u64;
        let fake = Fake::default();
        let (sink, cancel, task) = start(dir.path(), one * 4, 4, &fake);
        for n in 0..4 {
            sink.record(event(n));
        }
        until(|| sink.stats().outbox_bytes.load(Ordering::Relaxed) == one * 4).await;
        for n in 4..(4 + BATCH + 50) {
            sink.record(event(n));
        }
        until(|| sink.stats().outbox_full.load(Ordering::Relaxed) > 0).await;
        assert!(sink.stats().dropped.load(Ordering::Relaxed) > 0);
        assert!(sink.stats().outbox_bytes.load(Ordering::Relaxed) <= one * 4);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn real_nats_replay_after_outage_is_in_order_and_loses_nothing() {
        let nats = switchboard_testkit::TestNats::create().await.unwrap();
        let config = nats.config();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        let client = config.connect().await.unwrap();
        let js = jetstream::new(client.clone());
        config.ensure_usage_stream(&js).await.unwrap();
        // Published before the outage but not known to be (a lost ack): the same batch sent again
        // is de-duplicated by JetStream (same message id).
        let early: Vec<UsageEvent> = (0..5).map(event).collect();
        let none = opentelemetry::Context::new();
        let refs: Vec<_> = early.iter().map(|e| (e, &none)).collect();
        for _ in 0..2 {
            switchboard_bus::publish_usage_batch(&js, &config, &refs)
                .await
                .unwrap()
                .await
                .unwrap();
        }

        // NATS unreachable: everything goes to the outbox, and stays there at shutdown.
        let down = NatsConfig {
            url: "nats://127.0.0.1:1".to_owned(),
            ..config.clone()
        };
        let down_client = down.connect().await.unwrap();
        let (sink, publisher) =
            channel_with_outbox(down, 1_000, Outbox::open(&path, 1024 * 1024).unwrap());
        let cancel = CancellationToken::new();
        let task =
            tokio::spawn(publisher.run(down_client, cancel.clone(), Duration::from_millis(200)));
        for n in 5..20 {
            sink.record(event(n));
        }
        until(|| sink.stats().outbox_bytes.load(Ordering::Relaxed) > 0).await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(sink.stats().published.load(Ordering::Relaxed), 0);

        // NATS back: the outbox replays first, then new events.
        let (sink, publisher) = channel_with_outbox(
            config.clone(),
            1_000,
            Outbox::open(&path, 1024 * 1024).unwrap(),
        );
        let cancel = CancellationToken::new();
        let task = tokio::spawn(publisher.run(client, cancel.clone(), Duration::from_secs(5)));
        for n in 20..25 {
            sink.record(event(n));
        }
        until(|| sink.stats().published.load(Ordering::Relaxed) >= 20).await;
        cancel.cancel();
        task.await.unwrap();
        assert!(!path.exists());

        let mut stream = js.get_stream(&nats.stream).await.unwrap();
        let messages = stream.info().await.unwrap().state.messages;
        let mut ids = Vec::new();
        for seq in 1..=messages {
            let message = stream.get_raw_message(seq).await.unwrap();
            assert_eq!(message.subject.as_str(), config.usage_batch_subject());
            let events =
                switchboard_bus::decode_usage(&config, &message.subject, None, &message.payload)
                    .unwrap();
            ids.extend(events.into_iter().map(|(event, _)| event.request_id));
        }
        nats.cleanup().await;
        // Batches, not one message per event; the repeated batch stored once.
        assert!(messages < 25, "{messages} messages");
        assert_eq!(ids, expected(0..25));
    }
}
