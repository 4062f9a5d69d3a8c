//! The shared cache: every entry lives in one NATS JetStream stream, and every replica keeps its
//! local index ([`MemoryStore`]) in sync from it. Lookups only read the local index (they never
//! wait on NATS); a store writes locally, then publishes and waits for JetStream's ack; a purge
//! deletes an app's entries from the stream and tells every replica to drop them.
//!
//! Subjects (under `<nats.subject_prefix>.cache`), all captured by one stream
//! ([`stream_name`], file storage, `max_msgs_per_subject = 1`, `max_age = cache.max_ttl_secs`):
//! - `.entry.<app>.<key hex>`: one [`WireEntry`] per key (a newer store of the same key replaces
//!   the older one in the stream).
//! - `.tag.<app>.<key hex>`: a [`WireTag`], the semantic tag of an entry (scope, embedding and
//!   final user message), so that every replica's semantic index holds it without embedding again.
//! - `.purge.<app>`: a [`WirePurge`] notice; replicas drop the app's local entries (and semantic
//!   index) when they read it.
//!
//! `<app>` is the app itself when it is made of `[A-Za-z0-9_-]`, else `%` + its hex (injective, so
//! a purge of one app never touches another's subjects).
//!
//! NATS 2.9 has no per-message TTL: an entry carries its `expires_at` (wall clock), is never served
//! after it (the local index expires it then), is skipped when it is read already expired, and the
//! stream drops it after `max_age`.
//!
//! Sync: an ordered push consumer over `<prefix>.cache.>` with `DeliverPolicy::LastPerSubject`
//! (the live entries and the last notice of each app, in stream order), then live. Applying every
//! message in stream order, this replica's own publications included, keeps all replicas equal:
//! a notice published at sequence N is applied after every entry before N and before every entry
//! after it, and the purge deletes exactly the app's entries before N from the stream (message
//! by message: a filtered stream purge moves every consumer past the stream's end on NATS before
//! 2.9.15, so a replica could miss the notice). A starting replica
//! reads everything up to the stream's end before [`crate::App::build`] returns, so it answers
//! nothing (its gRPC port, health included, is not yet served) until it is in sync.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, push},
    stream,
};
use futures::{
    StreamExt,
    future::{BoxFuture, FutureExt},
};
use prost::Message as _;
use switchboard_bus::NatsConfig;
use switchboard_proto::chat::v1::{ChatResponse, RouteInfo};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    key::{CacheKey, ScopeKey},
    semantic::{Semantic, SemanticTag},
    store::{CacheStore, Entry, MemoryStore, ReplicationSnapshot, StoreError, StoreStats},
};

/// An entry as it travels between replicas (protobuf).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireEntry {
    /// The app (tenant).
    #[prost(string, tag = "1")]
    pub app: String,
    /// The 32-byte cache key.
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    /// The answer.
    #[prost(message, optional, tag = "3")]
    pub response: Option<ChatResponse>,
    /// The route that produced it.
    #[prost(message, optional, tag = "4")]
    pub route: Option<RouteInfo>,
    /// When it was stored, Unix milliseconds.
    #[prost(int64, tag = "5")]
    pub stored_at_unix_ms: i64,
    /// When it stops being served, Unix milliseconds.
    #[prost(int64, tag = "6")]
    pub expires_at_unix_ms: i64,
    /// The guard policy the answer was checked under (empty in entries written before it
    /// existed: such an entry matches no checked request, see `LookupResponse.guard_policy`).
    #[prost(string, tag = "7")]
    pub guard_policy: String,
}

/// The semantic tag of an entry as it travels between replicas (protobuf).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireTag {
    /// The app (tenant).
    #[prost(string, tag = "1")]
    pub app: String,
    /// The entry's 32-byte cache key.
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    /// The 32-byte compatibility scope.
    #[prost(bytes = "vec", tag = "3")]
    pub scope: Vec<u8>,
    /// The embedding of the final user message.
    #[prost(float, repeated, tag = "4")]
    pub vector: Vec<f32>,
    /// The final user message (what the guard let through; the near-miss guard compares it).
    #[prost(string, tag = "5")]
    pub text: String,
    /// When the entry stops being served, Unix milliseconds.
    #[prost(int64, tag = "6")]
    pub expires_at_unix_ms: i64,
}

impl WireTag {
    fn into_tag(self) -> Option<(String, CacheKey, SemanticTag, SystemTime)> {
        let key = CacheKey(self.key.try_into().ok()?);
        let scope = ScopeKey(self.scope.try_into().ok()?);
        let expires_at = from_unix_ms(self.expires_at_unix_ms);
        let tag = SemanticTag {
            scope,
            vector: self.vector.into(),
            text: self.text,
        };
        Some((self.app, key, tag, expires_at))
    }
}

/// A purge notice (protobuf).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WirePurge {
    /// The app whose entries are dropped.
    #[prost(string, tag = "1")]
    pub app: String,
}

/// Why the shared store could not be set up or kept in sync.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// NATS or JetStream failed.
    #[error("shared cache: {0}")]
    Nats(String),
    /// The initial sync did not finish in time.
    #[error("shared cache: not in sync with stream {stream} after {seconds} s")]
    SyncTimeout { stream: String, seconds: u64 },
}

/// A subject token for `app`: itself when made of `[A-Za-z0-9_-]`, else `%` + hex (injective).
pub fn app_token(app: &str) -> String {
    if !app.is_empty()
        && app
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        app.to_owned()
    } else {
        format!("%{}", hex::encode(app.as_bytes()))
    }
}

/// The stream name: `cache.stream`, or derived from the subject prefix (`SWITCHBOARD_CACHE` for
/// the default prefix `switchboard`).
pub fn stream_name(config: &Config, nats: &NatsConfig) -> String {
    if !config.stream.is_empty() {
        return config.stream.clone();
    }
    nats.cache_stream()
}

/// The cache's subjects under one NATS prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    root: String,
}

impl Subjects {
    /// Subjects under `<prefix>.cache`.
    pub fn new(prefix: &str) -> Self {
        Subjects {
            root: format!("{prefix}.cache"),
        }
    }

    /// Every cache subject (the stream's and the consumer's filter).
    pub fn all(&self) -> String {
        format!("{}.>", self.root)
    }

    /// The subject of one entry.
    pub fn entry(&self, app: &str, key: &CacheKey) -> String {
        format!("{}.entry.{}.{}", self.root, app_token(app), key.hex())
    }

    /// Every entry of `app`.
    pub fn entries_of(&self, app: &str) -> String {
        format!("{}.entry.{}.>", self.root, app_token(app))
    }

    /// The semantic tag of one entry.
    pub fn tag(&self, app: &str, key: &CacheKey) -> String {
        format!("{}.tag.{}.{}", self.root, app_token(app), key.hex())
    }

    /// Every semantic tag of `app`.
    pub fn tags_of(&self, app: &str) -> String {
        format!("{}.tag.{}.>", self.root, app_token(app))
    }

    /// The purge notice subject of `app`.
    pub fn purge(&self, app: &str) -> String {
        format!("{}.purge.{}", self.root, app_token(app))
    }

    fn kind<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.root.as_str())?
            .strip_prefix('.')?
            .split('.')
            .next()
    }
}

fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_unix_ms(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl WireEntry {
    fn of(key: &CacheKey, entry: &Entry) -> Self {
        WireEntry {
            app: entry.app.clone(),
            key: key.0.to_vec(),
            response: Some(entry.response.clone()),
            route: entry.route.clone(),
            stored_at_unix_ms: unix_ms(entry.inserted_at),
            expires_at_unix_ms: unix_ms(entry.expires_at()),
            guard_policy: entry.guard_policy.clone(),
        }
    }

    fn into_entry(self) -> Option<(CacheKey, Entry)> {
        let key = CacheKey(self.key.try_into().ok()?);
        let inserted_at = from_unix_ms(self.stored_at_unix_ms);
        let expires_at = from_unix_ms(self.expires_at_unix_ms);
        let ttl = expires_at.duration_since(inserted_at).unwrap_or_default();
        Some((
            key,
            Entry {
                app: self.app,
                response: self.response?,
                route: self.route,
                guard_policy: self.guard_policy,
                inserted_at,
                ttl,
            },
        ))
    }
}

/// How many deletions a purge keeps in flight.
const PURGE_CONCURRENCY: usize = 64;
/// How many message headers a purge reads per fetch.
const PURGE_LIST_BATCH: usize = 1024;
/// The least time a purge gets to list an app's messages (the publish timeout when larger).
const PURGE_LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// A [`CacheStore`] shared by every replica through JetStream, over a local index.
pub struct SharedStore {
    local: Arc<MemoryStore>,
    js: jetstream::Context,
    client: async_nats::Client,
    stream: stream::Stream,
    stream_name: String,
    subjects: Subjects,
    timeout: Duration,
    semantic: OnceLock<Arc<Semantic>>,
    stats: ReplicationStats,
}

/// The sync's counters (`/metrics`, see [`ReplicationSnapshot`]).
#[derive(Debug, Default)]
struct ReplicationStats {
    entries: AtomicU64,
    tags: AtomicU64,
    purges: AtomicU64,
    skipped: AtomicU64,
    pending: AtomicU64,
    restarts: AtomicU64,
}

impl ReplicationStats {
    fn snapshot(&self) -> ReplicationSnapshot {
        ReplicationSnapshot {
            entries: self.entries.load(Relaxed),
            tags: self.tags.load(Relaxed),
            purges: self.purges.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            pending: self.pending.load(Relaxed),
            restarts: self.restarts.load(Relaxed),
        }
    }
}

impl SharedStore {
    /// Connects, and creates (or updates) the stream. The local index starts empty: run
    /// [`SharedStore::sync`] to fill it and keep it in sync.
    pub async fn connect(
        config: &Config,
        nats: &NatsConfig,
        local: Arc<MemoryStore>,
    ) -> Result<SharedStore, ReplicationError> {
        let timeout = Duration::from_secs(config.sync_timeout_secs);
        let client = tokio::time::timeout(timeout, nats.connect())
            .await
            .map_err(|_| ReplicationError::Nats(format!("cannot connect to {}", nats.url)))?
            .map_err(|e| ReplicationError::Nats(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let stream_name = stream_name(config, nats);
        let subjects = Subjects::new(&nats.subject_prefix);
        let stream_config = stream::Config {
            name: stream_name.clone(),
            subjects: vec![subjects.all()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_messages_per_subject: 1,
            max_age: Duration::from_secs(config.max_ttl_secs),
            max_bytes: if config.stream_max_bytes == 0 {
                -1
            } else {
                i64::try_from(config.stream_max_bytes).unwrap_or(i64::MAX)
            },
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        let nats_error = |e: &dyn std::fmt::Display| {
            ReplicationError::Nats(format!("stream {stream_name}: {e}"))
        };
        tokio::time::timeout(timeout, js.create_or_update_stream(stream_config))
            .await
            .map_err(|_| nats_error(&"no answer from JetStream"))?
            .map_err(|e| nats_error(&e))?;
        let stream = js
            .get_stream(&stream_name)
            .await
            .map_err(|e| nats_error(&e))?;
        Ok(SharedStore {
            local,
            js,
            client,
            stream,
            stream_name,
            subjects,
            timeout: Duration::from_millis(config.publish_timeout_ms),
            semantic: OnceLock::new(),
            stats: ReplicationStats::default(),
        })
    }

    /// The semantic layer that replicated tags and purge notices are applied to (set before
    /// [`SharedStore::sync`] starts, or tags read before are not indexed).
    pub fn attach_semantic(&self, semantic: Arc<Semantic>) {
        let _ = self.semantic.set(semantic);
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    /// Keeps the local index in sync until `cancel`: reads the stream from its live entries on,
    /// sets `ready` once it has read everything that was there, then applies what comes. Starts
    /// over (idempotently) if the consumer fails.
    pub async fn sync(self: Arc<Self>, ready: watch::Sender<bool>, cancel: CancellationToken) {
        loop {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = self.consume(&ready) => outcome,
            };
            if let Err(error) = outcome {
                self.stats.restarts.fetch_add(1, Relaxed);
                tracing::warn!(stream = %self.stream_name, %error, "cache sync interrupted; restarting");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn consume(&self, ready: &watch::Sender<bool>) -> Result<(), String> {
        let last_at_start = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| e.to_string())?
            .cached_info()
            .state
            .last_sequence;
        let consumer = self
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: self.subjects.all(),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if consumer.cached_info().num_pending == 0 {
            ready.send_replace(true);
        }
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| e.to_string())?;
            self.apply(&message);
            if let Ok(info) = message.info() {
                self.stats.pending.store(info.pending, Relaxed);
                if info.pending == 0 || info.stream_sequence >= last_at_start {
                    ready.send_replace(true);
                }
            }
        }
        Err("consumer ended".to_owned())
    }

    /// Applies one message of the stream to the local index (and counts it).
    fn apply(&self, message: &jetstream::Message) {
        let counter = if self.apply_message(message) {
            match self.subjects.kind(message.subject.as_str()) {
                Some("entry") => &self.stats.entries,
                Some("tag") => &self.stats.tags,
                _ => &self.stats.purges,
            }
        } else {
            &self.stats.skipped
        };
        counter.fetch_add(1, Relaxed);
    }

    /// Applies one message of the stream to the local index; false: skipped (malformed,
    /// undecodable, or of an unknown kind).
    fn apply_message(&self, message: &jetstream::Message) -> bool {
        match self.subjects.kind(message.subject.as_str()) {
            Some("entry") => match WireEntry::decode(message.payload.as_ref()) {
                Ok(wire) => match wire.into_entry() {
                    // `insert` drops an entry that has already expired (and any older copy).
                    Some((key, entry)) => {
                        self.local.insert(key, entry);
                        true
                    }
                    None => {
                        tracing::warn!("malformed shared cache entry skipped");
                        false
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "undecodable shared cache entry skipped");
                    false
                }
            },
            Some("tag") => match WireTag::decode(message.payload.as_ref()).map(WireTag::into_tag) {
                Ok(Some((app, key, tag, expires_at))) => {
                    if let Some(semantic) = self.semantic.get()
                        && expires_at > SystemTime::now()
                    {
                        semantic.on_insert(&app, key, &tag, expires_at);
                    }
                    true
                }
                Ok(None) => {
                    tracing::warn!("malformed semantic tag skipped");
                    false
                }
                Err(error) => {
                    tracing::warn!(%error, "undecodable semantic tag skipped");
                    false
                }
            },
            Some("purge") => match WirePurge::decode(message.payload.as_ref()) {
                Ok(notice) => {
                    let removed = self.local.remove_app(&notice.app);
                    if let Some(semantic) = self.semantic.get() {
                        semantic.on_purge(&notice.app);
                    }
                    tracing::info!(app.id = %notice.app, removed, "cache purge notice applied");
                    true
                }
                Err(error) => {
                    tracing::warn!(%error, "undecodable cache purge notice skipped");
                    false
                }
            },
            _ => {
                tracing::debug!("unknown cache subject skipped");
                false
            }
        }
    }

    /// NATS failed at `what` on this store's stream.
    fn unavailable(&self, what: &str, error: &dyn std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("{what} on stream {}: {error}", self.stream_name))
    }

    async fn publish(&self, subject: String, payload: Vec<u8>) -> Result<u64, StoreError> {
        let acked = tokio::time::timeout(self.timeout, async {
            self.js
                .publish(subject, payload.into())
                .await
                .map_err(|e| self.unavailable("publish", &e))?
                .await
                .map_err(|e| self.unavailable("publish ack", &e))
        })
        .await
        .map_err(|_| self.unavailable("publish", &"timed out"))??;
        Ok(acked.sequence)
    }

    async fn put_shared(&self, key: CacheKey, entry: Entry) -> Result<(), StoreError> {
        let subject = self.subjects.entry(&entry.app, &key);
        let payload = WireEntry::of(&key, &entry).encode_to_vec();
        // Local first: this replica serves it at once, whatever NATS does.
        if !self.local.insert(key, entry) {
            return Ok(());
        }
        self.publish(subject, payload).await.map(|_| ())
    }

    async fn purge_shared(&self, app: &str) -> Result<u64, StoreError> {
        let notice = WirePurge {
            app: app.to_owned(),
        }
        .encode_to_vec();
        // The notice first: its sequence bounds the deletion, so that the stream and every
        // replica (which apply the notice in stream order) drop exactly the same entries.
        let notice_sequence = self.publish(self.subjects.purge(app), notice).await?;
        // The app's messages are deleted one by one, not with a filtered stream purge: before
        // nats-server 2.9.15 (nats-server#3838) a filtered purge moves *every* consumer of the
        // stream past its last message, so a replica that had not read the notice yet (or any
        // other message) never would.
        let purged = self
            .delete_before(self.subjects.entries_of(app), notice_sequence)
            .await?;
        self.delete_before(self.subjects.tags_of(app), notice_sequence)
            .await?;
        self.local.remove_app(app);
        if let Some(semantic) = self.semantic.get() {
            semantic.on_purge(app);
        }
        Ok(purged)
    }

    /// Deletes the messages of the stream on `filter` below sequence `before`; returns how many
    /// it deleted (a message replaced or expired meanwhile is not counted). JetStream's delete
    /// overwrites each message in the store file (no `no_erase`), so nothing of a purged answer
    /// stays on the server's disk.
    async fn delete_before(&self, filter: String, before: u64) -> Result<u64, StoreError> {
        let sequences = tokio::time::timeout(
            self.timeout.max(PURGE_LIST_TIMEOUT),
            self.sequences_before(filter, before),
        )
        .await
        .map_err(|_| self.unavailable("purge listing", &"timed out"))?
        .map_err(|e| self.unavailable("purge listing", &e))?;
        let mut deleted = 0;
        let mut results = futures::stream::iter(sequences)
            .map(|sequence| {
                tokio::time::timeout(self.timeout, self.stream.delete_message(sequence))
            })
            .buffer_unordered(PURGE_CONCURRENCY);
        while let Some(result) = results.next().await {
            match result {
                Ok(Ok(true)) => deleted += 1,
                Ok(Ok(false)) => {}
                // Replaced by a newer store of its key, or expired, since it was listed.
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        jetstream::stream::DeleteMessageErrorKind::JetStream(ref error)
                            if error.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND
                    ) => {}
                Ok(Err(e)) => return Err(self.unavailable("purge", &e)),
                Err(_) => return Err(self.unavailable("purge", &"timed out")),
            }
        }
        Ok(deleted)
    }

    /// The sequences of the stream's messages on `filter` below `before`, read through a
    /// short-lived headers-only consumer.
    async fn sequences_before(&self, filter: String, before: u64) -> Result<Vec<u64>, String> {
        let consumer = self
            .stream
            .create_consumer(jetstream::consumer::pull::Config {
                filter_subject: filter,
                deliver_policy: DeliverPolicy::All,
                ack_policy: jetstream::consumer::AckPolicy::None,
                headers_only: true,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let name = consumer.cached_info().name.clone();
        let mut remaining = consumer.cached_info().num_pending;
        let mut sequences = Vec::new();
        let listed = async {
            'reading: while remaining > 0 {
                let mut batch = consumer
                    .fetch()
                    .max_messages(PURGE_LIST_BATCH)
                    .messages()
                    .await
                    .map_err(|e| e.to_string())?;
                let mut read = 0;
                while let Some(message) = batch.next().await {
                    let message = message.map_err(|e| e.to_string())?;
                    let info = message.info().map_err(|e| e.to_string())?;
                    read += 1;
                    if info.stream_sequence >= before {
                        break 'reading;
                    }
                    sequences.push(info.stream_sequence);
                    remaining = info.pending;
                }
                if read == 0 {
                    // Deleted or expired since the consumer counted them.
                    break;
                }
            }
            Ok::<_, String>(())
        }
        .await;
        // Best effort: the consumer also goes away by itself once inactive.
        let _ = self.stream.delete_consumer(&name).await;
        listed.map(|()| sequences)
    }

    async fn put_tag_shared(
        &self,
        app: &str,
        key: CacheKey,
        tag: &SemanticTag,
        expires_at: SystemTime,
    ) -> Result<(), StoreError> {
        let wire = WireTag {
            app: app.to_owned(),
            key: key.0.to_vec(),
            scope: tag.scope.0.to_vec(),
            vector: tag.vector.to_vec(),
            text: tag.text.clone(),
            expires_at_unix_ms: unix_ms(expires_at),
        };
        self.publish(self.subjects.tag(app, &key), wire.encode_to_vec())
            .await
            .map(|_| ())
    }
}

impl CacheStore for SharedStore {
    fn get(&self, key: CacheKey) -> BoxFuture<'_, Result<Option<Entry>, StoreError>> {
        futures::future::ready(Ok(self.local.get_now(&key))).boxed()
    }

    fn put(&self, key: CacheKey, entry: Entry) -> BoxFuture<'_, Result<(), StoreError>> {
        self.put_shared(key, entry).boxed()
    }

    fn purge_app<'a>(&'a self, app: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.purge_shared(app).boxed()
    }

    fn put_tag<'a>(
        &'a self,
        app: &'a str,
        key: CacheKey,
        tag: &'a SemanticTag,
        expires_at: SystemTime,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.put_tag_shared(app, key, tag, expires_at).boxed()
    }

    /// What the local index drops (evicted for room, expired): lookups only read it.
    fn on_evict(&self, hook: crate::store::EvictHook) {
        self.local.on_evict(hook);
    }

    /// The local index's figures and the sync's.
    fn stats(&self) -> StoreStats {
        StoreStats {
            replication: Some(self.stats.snapshot()),
            ..self.local.local_stats()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn app_tokens_are_plain_or_hex_and_never_collide() {
        assert_eq!(app_token("app-a_1"), "app-a_1");
        assert_eq!(app_token("a.b"), "%612e62");
        assert_eq!(app_token("a_b"), "a_b");
        assert_eq!(app_token(""), "%");
        assert_ne!(app_token("a b"), app_token("a_b"));
        assert_ne!(app_token("%61"), app_token("a"));
    }

    #[test]
    fn subjects_and_stream_names_follow_the_prefix() {
        let subjects = Subjects::new("test.x");
        let key = CacheKey([0xab; 32]);
        let entry = subjects.entry("app", &key);
        assert_eq!(entry, format!("test.x.cache.entry.app.{}", "ab".repeat(32)));
        assert_eq!(subjects.entries_of("app"), "test.x.cache.entry.app.>");
        assert_eq!(subjects.purge("a.b"), "test.x.cache.purge.%612e62");
        assert_eq!(subjects.all(), "test.x.cache.>");
        assert_eq!(subjects.kind(&entry), Some("entry"));
        assert_eq!(subjects.kind("test.x.cache.purge.app"), Some("purge"));
        assert_eq!(subjects.kind("test.y.cache.purge.app"), None);

        let nats = NatsConfig::default();
        assert_eq!(stream_name(&Config::default(), &nats), "SWITCHBOARD_CACHE");
        let nats = NatsConfig {
            subject_prefix: "test.0a1b".into(),
            ..NatsConfig::default()
        };
        assert_eq!(stream_name(&Config::default(), &nats), "TEST_0A1B_CACHE");
        let named = Config {
            stream: "MINE".into(),
            ..Config::default()
        };
        assert_eq!(stream_name(&named, &nats), "MINE");
    }

    #[test]
    fn entries_round_trip_through_the_wire_format() {
        let inserted_at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let entry = Entry {
            app: "a".into(),
            response: ChatResponse {
                id: "r".into(),
                ..Default::default()
            },
            route: Some(RouteInfo {
                provider: "p".into(),
                ..Default::default()
            }),
            guard_policy: "9f8e7d6c5b4a/d3-h1-x".into(),
            inserted_at,
            ttl: Duration::from_secs(60),
        };
        let key = CacheKey([7; 32]);
        let bytes = WireEntry::of(&key, &entry).encode_to_vec();
        let (back_key, back) = WireEntry::decode(bytes.as_slice())
            .unwrap()
            .into_entry()
            .unwrap();
        assert_eq!(back_key, key);
        assert_eq!(back, entry);
        assert_eq!(back.guard_policy, "9f8e7d6c5b4a/d3-h1-x");
        // A wrong key length is refused, not truncated.
        let mut bad = WireEntry::of(&key, &entry);
        bad.key.pop();
        assert!(bad.into_entry().is_none());
    }

    /// `WireEntry` as replicas wrote it before `guard_policy` (tag 7) existed.
    #[derive(Clone, PartialEq, prost::Message)]
    struct WireEntryV1 {
        #[prost(string, tag = "1")]
        app: String,
        #[prost(bytes = "vec", tag = "2")]
        key: Vec<u8>,
        #[prost(message, optional, tag = "3")]
        response: Option<ChatResponse>,
        #[prost(message, optional, tag = "4")]
        route: Option<RouteInfo>,
        #[prost(int64, tag = "5")]
        stored_at_unix_ms: i64,
        #[prost(int64, tag = "6")]
        expires_at_unix_ms: i64,
    }

    #[test]
    fn an_entry_written_before_the_guard_policy_reads_with_none() {
        let old = WireEntryV1 {
            app: "a".into(),
            key: vec![7; 32],
            response: Some(ChatResponse {
                id: "r".into(),
                ..Default::default()
            }),
            route: None,
            stored_at_unix_ms: 1_700_000_000_000,
            expires_at_unix_ms: 1_700_000_060_000,
        };
        let (_, entry) = WireEntry::decode(old.encode_to_vec().as_slice())
            .unwrap()
            .into_entry()
            .unwrap();
        assert_eq!(entry.guard_policy, "");
        assert_eq!(entry.response.id, "r");
        assert_eq!(entry.ttl, Duration::from_secs(60));
    }
}
