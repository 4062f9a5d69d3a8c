//! The JetStream consumer: fetch a batch of usage events, price them, insert them in one
//! transaction, and acknowledge only after the commit.
//!
//! Pipelined: while one batch commits (on its own pool connection, in its own task), the next is
//! fetched and priced, and may start committing on a second connection; at most
//! [`IN_FLIGHT`] batches are held unacknowledged at a time (bounded memory). Each batch is
//! acknowledged strictly after its own commit. The order in which batches commit does not matter:
//! a request id is recorded once whichever batch carries it.
//!
//! Failure handling:
//! - NATS errors (fetch, consumer lookup): log, back off, set the consumer up again. A fetch that
//!   gets no answer in time counts as one: a pull request lost in a NATS restart is never answered,
//!   and a no-wait fetch has no expiry of its own, so without the bound the consumer would wait
//!   forever (seen in `tests/e2e/tests/faults.rs`).
//! - Postgres connection errors: retry the same batch with backoff until it commits or the ledger
//!   stops; nothing is acknowledged before the commit, so a crash means redelivery, and redelivery
//!   is harmless (the insert skips recorded request ids and adds only inserted rows to the rollups).
//! - Data errors (a row Postgres refuses): the batch is retried row by row and only the refused
//!   rows' messages are terminated.
//! - Undecodable payloads and request ids that are not UUIDs: terminated (`AckKind::Term`) with an
//!   error log; they never block the consumer.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinSet;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use futures::StreamExt as _;
use prost::Message as _;
use switchboard_bus::{NatsConfig, UsageEvent};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, Span, field};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{
    error::StartupError,
    metrics::Metrics,
    record::{Rejected, UsageRow, price_event},
    reload::SharedPrices,
    repo::{Repository, is_data_error},
};

/// How long an idle fetch waits for the first message.
const IDLE_WAIT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a fetch may take beyond its own waits (`IDLE_WAIT` and the linger) before it is given up.
const FETCH_SLACK: Duration = Duration::from_secs(5);
/// Batches fetched and not yet acknowledged, at most (the one being fetched and priced included).
const IN_FLIGHT: usize = 2;

/// Settings of the durable pull consumer.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Durable name.
    pub name: String,
    /// Messages per batch.
    pub batch_size: usize,
    /// Wait for more messages after the first of a batch.
    pub linger: Duration,
    /// Redelivery delay of unacknowledged messages.
    pub ack_wait: Duration,
}

/// The JetStream consumer configuration the ledger uses.
pub fn consumer_config(settings: &ConsumerSettings, nats: &NatsConfig) -> pull::Config {
    pull::Config {
        durable_name: Some(settings.name.clone()),
        description: Some("switchboard ledger: usage events to Postgres".to_owned()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        filter_subject: nats.usage_wildcard(),
        max_ack_pending: i64::try_from(settings.batch_size.saturating_mul(4).max(1000))
            .unwrap_or(i64::MAX),
        ..Default::default()
    }
}

/// Creates the usage stream (if missing) and the durable consumer (if missing).
pub async fn set_up(
    js: &jetstream::Context,
    nats: &NatsConfig,
    settings: &ConsumerSettings,
) -> Result<PullConsumer, StartupError> {
    let stream = nats.ensure_usage_stream(js).await?;
    stream
        .get_or_create_consumer(&settings.name, consumer_config(settings, nats))
        .await
        .map_err(|e| StartupError::Consumer {
            consumer: settings.name.clone(),
            stream: nats.usage_stream.clone(),
            message: e.to_string(),
        })
}

/// The consumer loop's state.
pub struct UsageConsumer {
    pub(crate) js: jetstream::Context,
    pub(crate) nats: NatsConfig,
    pub(crate) settings: ConsumerSettings,
    pub(crate) repo: Repository,
    pub(crate) prices: SharedPrices,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) partitions: Arc<crate::partitions::Partitions>,
}

/// Exponential backoff between retries.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(BACKOFF_MIN)
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
    /// Sleeps; false when cancelled first.
    async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

/// A decoded message waiting for its row to be committed.
struct Pending {
    message: jetstream::Message,
    row: UsageRow,
    span: Span,
}

enum Commit {
    /// Committed; the request ids actually inserted (not those already recorded).
    Done(Vec<uuid::Uuid>),
    DataError(sqlx::Error),
    Cancelled,
}

impl UsageConsumer {
    /// Runs until `cancel` fires; batches still committing then finish (or give up their retries)
    /// before it returns.
    pub async fn run(self, consumer: PullConsumer, cancel: CancellationToken) {
        let this = Arc::new(self);
        let mut committing = JoinSet::new();
        this.fetch_loop(consumer, &mut committing, &cancel).await;
        while let Some(done) = committing.join_next().await {
            log_join(done);
        }
        tracing::info!(consumer = %this.settings.name, "usage consumer stopped");
    }

    /// Fetches and prices batches and starts their commits in `committing` until `cancel` fires.
    async fn fetch_loop(
        self: &Arc<Self>,
        consumer: PullConsumer,
        committing: &mut JoinSet<()>,
        cancel: &CancellationToken,
    ) {
        let mut consumer = Some(consumer);
        let mut backoff = Backoff::new();
        tracing::info!(consumer = %self.settings.name, stream = %self.nats.usage_stream, "usage consumer started");
        while !cancel.is_cancelled() {
            // Bounded memory: the batch about to be fetched and those committing are at most
            // `IN_FLIGHT`.
            while let Some(done) = committing.try_join_next() {
                log_join(done);
            }
            while committing.len() >= IN_FLIGHT {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    done = committing.join_next() => {
                        if let Some(done) = done {
                            log_join(done);
                        }
                    }
                }
            }
            let current = match &consumer {
                Some(current) => current.clone(),
                None => match set_up(&self.js, &self.nats, &self.settings).await {
                    Ok(current) => {
                        tracing::info!(consumer = %self.settings.name, "usage consumer set up again");
                        consumer = Some(current.clone());
                        current
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot set up the usage consumer; retrying");
                        if !backoff.wait(cancel).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            let fetched = tokio::select! {
                () = cancel.cancelled() => return,
                fetched = fetch(&current, self.settings.batch_size, self.settings.linger) => fetched,
            };
            match fetched {
                Ok(messages) => {
                    backoff.reset();
                    let pending = self.price(messages).await;
                    if !pending.is_empty() {
                        let this = Arc::clone(self);
                        let cancel = cancel.clone();
                        committing.spawn(async move { this.process(pending, &cancel).await });
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "fetching usage events failed; retrying");
                    consumer = None;
                    if !backoff.wait(cancel).await {
                        return;
                    }
                }
            }
        }
    }

    /// Decodes and prices a fetched batch; messages that can never be recorded are terminated.
    async fn price(&self, messages: Vec<jetstream::Message>) -> Vec<Pending> {
        let now = OffsetDateTime::now_utc();
        let prices = self.prices.current();
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let parent = switchboard_telemetry::extract_nats(message.headers.as_ref());
            let span = tracing::info_span!(
                "ledger.record",
                otel.kind = "consumer",
                request.id = field::Empty,
                messaging.system = "nats",
                messaging.destination.name = %message.subject,
            );
            let _ = span.set_parent(parent);
            let priced = span.in_scope(|| {
                let event = UsageEvent::decode(message.payload.clone())
                    .map_err(|e| Rejected::Decode(e.to_string()))?;
                let shown: String = event.request_id.chars().take(64).collect();
                Span::current().record("request.id", shown.as_str());
                price_event(event, now, &prices)
            });
            match priced {
                Ok(row) => pending.push(Pending { message, row, span }),
                Err(rejected) => {
                    terminate(&message, &rejected.to_string())
                        .instrument(span)
                        .await
                }
            }
        }
        pending
    }

    /// Commits and acknowledges one priced batch.
    async fn process(&self, pending: Vec<Pending>, cancel: &CancellationToken) {
        let rows: Vec<UsageRow> = pending.iter().map(|p| p.row.clone()).collect();
        match self.commit(&rows, cancel).await {
            Commit::Done(inserted) => {
                self.count(&rows, &inserted);
                ack_all(&pending).await
            }
            Commit::Cancelled => {}
            Commit::DataError(error) => {
                tracing::warn!(%error, rows = rows.len(), "batch refused by the database; inserting row by row");
                for item in &pending {
                    match self.commit(std::slice::from_ref(&item.row), cancel).await {
                        Commit::Done(inserted) => {
                            self.count(std::slice::from_ref(&item.row), &inserted);
                            ack_all(std::slice::from_ref(item)).await
                        }
                        Commit::Cancelled => return,
                        Commit::DataError(error) => {
                            terminate(&item.message, &format!("database refused the row: {error}"))
                                .instrument(item.span.clone())
                                .await;
                        }
                    }
                }
            }
        }
    }

    /// Counts the rows this commit inserted, unpriced ones by model (a redelivered row that was
    /// already recorded is not counted again).
    fn count(&self, rows: &[UsageRow], inserted: &[uuid::Uuid]) {
        let inserted: std::collections::HashSet<&uuid::Uuid> = inserted.iter().collect();
        for row in rows.iter().filter(|row| inserted.contains(&row.request_id)) {
            self.metrics
                .recorded(&row.provider, &row.model, row.cost_usd_nanos.is_none());
        }
    }

    /// Inserts rows in one transaction, retrying connection failures until it commits or `cancel` fires.
    async fn commit(&self, rows: &[UsageRow], cancel: &CancellationToken) -> Commit {
        let mut backoff = Backoff::new();
        loop {
            // The rows' months get their partitions first (one query per month not seen before).
            // A failure only means the rows wait in the default partition (the month is tried
            // again with its next batch; creating it moves them): never a reason to hold back or
            // refuse the rows.
            if let Err(error) = self
                .partitions
                .ensure_for(rows.iter().map(|row| row.time), OffsetDateTime::now_utc())
                .await
            {
                tracing::warn!(%error, "cannot create a usage partition; rows go to the default partition");
            }
            let recorded = self.repo.record_batch(rows).await;
            match recorded {
                Ok(inserted) => {
                    tracing::debug!(
                        rows = rows.len(),
                        inserted = inserted.len(),
                        "usage batch committed"
                    );
                    self.partitions
                        .note_inserted(rows.iter().map(|row| row.time))
                        .await;
                    return Commit::Done(inserted);
                }
                Err(error) if is_data_error(&error) => return Commit::DataError(error),
                Err(error) => {
                    tracing::warn!(%error, rows = rows.len(), "cannot commit usage batch; retrying");
                    if !backoff.wait(cancel).await {
                        return Commit::Cancelled;
                    }
                }
            }
        }
    }
}

/// Fetches up to `max` messages: whatever is available now, or else waits up to [`IDLE_WAIT`] for
/// the first one and then takes whatever else is available; a batch smaller than `max` then waits
/// `linger` once for more. Bounded: a pull request that is never answered is an error (messages
/// already received are then redelivered after the ack wait).
async fn fetch(
    consumer: &PullConsumer,
    max: usize,
    linger: Duration,
) -> Result<Vec<jetstream::Message>, async_nats::Error> {
    let bound = IDLE_WAIT + linger + FETCH_SLACK;
    match tokio::time::timeout(bound, fetch_unbounded(consumer, max, linger)).await {
        Ok(fetched) => fetched,
        Err(_) => Err(format!(
            "no answer to a pull request within {} ms",
            bound.as_millis()
        )
        .into()),
    }
}

async fn fetch_unbounded(
    consumer: &PullConsumer,
    max: usize,
    linger: Duration,
) -> Result<Vec<jetstream::Message>, async_nats::Error> {
    let mut messages = fetch_now(consumer, max).await?;
    if !messages.is_empty() && messages.len() < max && !linger.is_zero() {
        tokio::time::sleep(linger).await;
        let more = consumer
            .fetch()
            .max_messages(max - messages.len())
            .messages()
            .await?;
        messages.extend(drain(more).await.unwrap_or_default());
    }
    Ok(messages)
}

async fn fetch_now(
    consumer: &PullConsumer,
    max: usize,
) -> Result<Vec<jetstream::Message>, async_nats::Error> {
    let mut messages = drain(consumer.fetch().max_messages(max).messages().await?).await?;
    if messages.is_empty() {
        messages = drain(
            consumer
                .batch()
                .max_messages(1)
                .expires(IDLE_WAIT)
                .messages()
                .await?,
        )
        .await?;
        if !messages.is_empty() && max > 1 {
            let more = consumer.fetch().max_messages(max - 1).messages().await?;
            messages.extend(drain(more).await.unwrap_or_default());
        }
    }
    Ok(messages)
}

/// Collects a batch; an error after some messages keeps those (the rest will be redelivered).
async fn drain(mut batch: pull::Batch) -> Result<Vec<jetstream::Message>, async_nats::Error> {
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        match message {
            Ok(message) => messages.push(message),
            Err(error) if messages.is_empty() => return Err(error),
            Err(error) => {
                tracing::debug!(%error, "batch ended early");
                break;
            }
        }
    }
    Ok(messages)
}

/// Logs a commit task that panicked (its messages were not acknowledged: they are redelivered).
fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(error) = done {
        tracing::error!(%error, "usage batch task failed; its events will be redelivered");
    }
}

/// Acknowledges committed messages. A plain ack (one publish, no reply awaited) is enough: a lost
/// ack only means a redelivery, which inserts nothing and adds nothing to the rollups.
async fn ack_all(items: &[Pending]) {
    let acks = items.iter().map(|item| {
        async move {
            match item.message.ack().await {
                Ok(()) => tracing::debug!(request.id = %item.row.request_id, "usage recorded"),
                Err(error) => {
                    tracing::warn!(request.id = %item.row.request_id, %error, "ack failed; the event will be redelivered")
                }
            }
        }
        .instrument(item.span.clone())
    });
    futures::future::join_all(acks).await;
}

/// Terminates a message that can never be recorded.
async fn terminate(message: &jetstream::Message, reason: &str) {
    tracing::error!(subject = %message.subject, reason, "usage event cannot be recorded; terminating it");
    if let Err(error) = message.ack_with(AckKind::Term).await {
        tracing::warn!(%error, "terminating the message failed");
    }
}
