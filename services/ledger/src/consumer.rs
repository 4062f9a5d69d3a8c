//! The JetStream consumer: fetch a batch of messages, price their usage events, insert them in one
//! transaction, and acknowledge only after the commit. A message is a batch of events from the
//! gateway (ADR 009) or a single event; it is acknowledged once every event of it is recorded.
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
//! - Data errors (a row Postgres refuses): the batch is retried row by row; a refused row is logged
//!   as an error with its request id and dropped, and a message none of whose rows could be
//!   recorded is terminated.
//! - Undecodable payloads: terminated (`AckKind::Term`) with an error log. Events that can never
//!   be recorded (a request id that is not a UUID) are logged and dropped, the rest of their
//!   message recorded. Neither ever blocks the consumer.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinSet;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use futures::StreamExt as _;
use switchboard_bus::NatsConfig;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{Span, field};
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

/// Bytes one fetch may bring, at most: `batch_size` counts messages, and a gateway's message holds
/// many events (ADR 009), so the bytes bound what a batch holds in memory and in one transaction
/// (~`batch_size` events of ~500 bytes), and always admit the largest message NATS takes by default
/// (1 MiB payload and headers): a message larger than a fetch's bound is refused, not delivered.
pub(crate) fn fetch_max_bytes(batch_size: usize) -> usize {
    batch_size.saturating_mul(512).max(FETCH_MIN_BYTES)
}

/// NATS's default `max_payload` and room for headers.
const FETCH_MIN_BYTES: usize = (1 << 20) + (64 << 10);

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

/// A decoded message waiting for its rows to be committed.
struct Pending {
    message: jetstream::Message,
    /// Its events' rows, each with the event's span (a child of its request's span).
    rows: Vec<(UsageRow, Span)>,
    /// Events of it that could never be recorded (logged when priced).
    rejected: usize,
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
            let decoded = switchboard_bus::decode_usage(
                &self.nats,
                &message.subject,
                message.headers.as_ref(),
                &message.payload,
            );
            let events = match decoded {
                Ok(events) => events,
                Err(error) => {
                    terminate(&message, &Rejected::Decode(error.message).to_string()).await;
                    continue;
                }
            };
            let mut rows = Vec::with_capacity(events.len());
            let mut rejected = 0;
            for (event, parent) in events {
                let span = tracing::info_span!(
                    "ledger.record",
                    otel.kind = "consumer",
                    request.id = field::Empty,
                    messaging.system = "nats",
                    messaging.destination.name = %message.subject,
                );
                let _ = span.set_parent(parent);
                let priced = span.in_scope(|| {
                    let shown: String = event.request_id.chars().take(64).collect();
                    Span::current().record("request.id", shown.as_str());
                    price_event(event, now, &prices)
                });
                match priced {
                    Ok(row) => rows.push((row, span)),
                    Err(rejected_event) => {
                        rejected += 1;
                        span.in_scope(|| {
                            tracing::error!(subject = %message.subject, reason = %rejected_event, "usage event cannot be recorded; dropping it");
                        });
                    }
                }
            }
            if rows.is_empty() {
                terminate(&message, "no event of the message can be recorded").await;
            } else {
                pending.push(Pending {
                    message,
                    rows,
                    rejected,
                });
            }
        }
        pending
    }

    /// Commits and acknowledges one priced batch.
    async fn process(&self, pending: Vec<Pending>, cancel: &CancellationToken) {
        let rows: Vec<UsageRow> = pending
            .iter()
            .flat_map(|p| p.rows.iter().map(|(row, _)| row.clone()))
            .collect();
        match self.commit(&rows, cancel).await {
            Commit::Done(inserted) => {
                self.count(&rows, &inserted);
                ack_all(&pending).await
            }
            Commit::Cancelled => {}
            Commit::DataError(error) => {
                tracing::warn!(%error, rows = rows.len(), "batch refused by the database; inserting row by row");
                for item in &pending {
                    let mut recorded = 0usize;
                    for (row, span) in &item.rows {
                        match self.commit(std::slice::from_ref(row), cancel).await {
                            Commit::Done(inserted) => {
                                self.count(std::slice::from_ref(row), &inserted);
                                recorded += 1;
                            }
                            Commit::Cancelled => return,
                            Commit::DataError(error) => span.in_scope(|| {
                                tracing::error!(%error, request.id = %row.request_id, "database refused the usage row; dropping it");
                            }),
                        }
                    }
                    if recorded == 0 {
                        terminate(&item.message, "database refused every row of the message").await;
                    } else {
                        ack_all(std::slice::from_ref(item)).await
                    }
                }
            }
        }
    }

    /// Counts the rows this commit inserted, unpriced ones under each model that has no price (an
    /// earlier attempt's that consumed tokens, not only the serving one: the rule of
    /// `ListUnpriced`, [`crate::unpriced::pairs_of_unpriced_row`]); a redelivered row that was
    /// already recorded is not counted again.
    fn count(&self, rows: &[UsageRow], inserted: &[uuid::Uuid]) {
        let inserted: std::collections::HashSet<&uuid::Uuid> = inserted.iter().collect();
        let prices = self.prices.current();
        for row in rows.iter().filter(|row| inserted.contains(&row.request_id)) {
            self.metrics.recorded();
            if row.cost_usd_nanos.is_some() {
                continue;
            }
            for (provider, model) in crate::unpriced::pairs_of_unpriced_row(row, &prices) {
                self.metrics.unpriced_row(provider, model);
            }
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
    let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
    let room = fetch_max_bytes(max).saturating_sub(bytes);
    if !messages.is_empty() && messages.len() < max && room > 0 && !linger.is_zero() {
        tokio::time::sleep(linger).await;
        let more = consumer
            .fetch()
            .max_messages(max - messages.len())
            .max_bytes(room)
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
    let max_bytes = fetch_max_bytes(max);
    let mut messages = drain(
        consumer
            .fetch()
            .max_messages(max)
            .max_bytes(max_bytes)
            .messages()
            .await?,
    )
    .await?;
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
            let more = consumer
                .fetch()
                .max_messages(max - 1)
                .max_bytes(max_bytes)
                .messages()
                .await?;
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
    let acks = items.iter().map(|item| async move {
        let rows = item.rows.len();
        match item.message.ack().await {
            Ok(()) => tracing::debug!(rows, rejected = item.rejected, "usage message recorded"),
            Err(error) => {
                tracing::warn!(rows, %error, "ack failed; the message will be redelivered")
            }
        }
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
