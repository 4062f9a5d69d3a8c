//! Where entries live. [`CacheStore`] is the seam for other backends (a shared store, a semantic
//! index); [`MemoryStore`] is the bounded in-process one.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use futures::future::{BoxFuture, FutureExt};
use moka::{Expiry, notification::RemovalCause, sync::Cache};
use switchboard_proto::chat::v1::{ChatResponse, RouteInfo};

use crate::{key::CacheKey, semantic::SemanticTag};

/// A cached answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The scope (tenant) it belongs to: what a purge removes.
    pub app: String,
    /// The answer.
    pub response: ChatResponse,
    /// The route that produced it.
    pub route: Option<RouteInfo>,
    /// The guard policy the answer was checked under (opaque here; empty when none was given).
    /// The caller compares it with the policy of the request it would serve.
    pub guard_policy: String,
    /// When it was stored.
    pub inserted_at: SystemTime,
    /// How long it may be served.
    pub ttl: Duration,
}

impl Entry {
    /// Time since the entry was stored (zero if the clock went backwards).
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.inserted_at)
            .unwrap_or(Duration::ZERO)
    }

    /// When it stops being served (wall clock, so that every replica expires it at the same time).
    pub fn expires_at(&self) -> SystemTime {
        self.inserted_at
            .checked_add(self.ttl)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// How long it may still be served (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at()
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }

    /// Whether it must no longer be served.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.remaining(now).is_zero()
    }
}

/// A store failure (never a prompt in the message).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or failed.
    #[error("cache store unavailable: {0}")]
    Unavailable(String),
}

/// Called with the key of every entry a store drops on its own (evicted for room, expired, or
/// removed), so that an index over the store (the semantic one) forgets it too. Never called for
/// an entry replaced under the same key (the key is still there).
pub type EvictHook = Arc<dyn Fn(CacheKey) + Send + Sync>;

/// What a store reports on `/metrics` (read at scrape time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Entries held (approximate for the bounded in-memory store).
    pub entries: u64,
    /// Entries dropped for room (beyond `max_entries`).
    pub evicted_size: u64,
    /// Entries dropped at their expiry.
    pub expired: u64,
    /// A shared store's replication (`None`: not shared).
    pub replication: Option<ReplicationSnapshot>,
}

/// A shared store's replication figures (see `crate::replication`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationSnapshot {
    /// Entries applied from the stream (this replica's own included).
    pub entries: u64,
    /// Semantic tags applied.
    pub tags: u64,
    /// Purge notices applied.
    pub purges: u64,
    /// Messages skipped (malformed, undecodable, unknown subject).
    pub skipped: u64,
    /// Messages not yet applied, as of the last one applied.
    pub pending: u64,
    /// Times the sync consumer failed and started over.
    pub restarts: u64,
}

/// A key-value store of entries with per-entry expiry. Expired entries are never returned.
pub trait CacheStore: Send + Sync + 'static {
    /// The live entry under `key`, if any.
    fn get(&self, key: CacheKey) -> BoxFuture<'_, Result<Option<Entry>, StoreError>>;
    /// Stores `entry` under `key` (replacing any previous one) until `entry.expires_at()`.
    fn put(&self, key: CacheKey, entry: Entry) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Removes every entry of `app`; returns how many were removed.
    fn purge_app<'a>(&'a self, app: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// Shares the semantic tag of the entry under `key` with the other replicas, which index it
    /// without embedding again. A no-op unless the store is shared.
    fn put_tag<'a>(
        &'a self,
        _app: &'a str,
        _key: CacheKey,
        _tag: &'a SemanticTag,
        _expires_at: SystemTime,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        futures::future::ready(Ok(())).boxed()
    }
    /// Calls `hook` with every key this store drops from now on (set once; later calls are
    /// ignored). A no-op for a store that never drops entries on its own.
    fn on_evict(&self, _hook: EvictHook) {}
    /// Its figures for `/metrics` (all zero unless the store keeps them).
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}

/// Bounded in-memory store (moka; least-recently/frequently used entries are evicted beyond
/// `max_entries`, and each entry expires at its own `expires_at`). It is also the local index of
/// a shared store (`crate::replication`).
pub struct MemoryStore {
    entries: Cache<CacheKey, Arc<Entry>>,
    evicted: Arc<std::sync::OnceLock<EvictHook>>,
    /// Entries dropped for room, and at their expiry (counted by moka's eviction listener).
    dropped: Arc<[AtomicU64; 2]>,
}

struct PerEntryTtl;

impl Expiry<CacheKey, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.remaining(SystemTime::now()))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.remaining(SystemTime::now()))
    }
}

impl MemoryStore {
    /// A store holding at most `max_entries` entries.
    pub fn new(max_entries: u64) -> Self {
        let evicted: Arc<std::sync::OnceLock<EvictHook>> = Arc::default();
        let hook = Arc::clone(&evicted);
        let dropped: Arc<[AtomicU64; 2]> = Arc::default();
        let counted = Arc::clone(&dropped);
        MemoryStore {
            entries: Cache::builder()
                .max_capacity(max_entries)
                .expire_after(PerEntryTtl)
                .eviction_listener(move |key: Arc<CacheKey>, _, cause| {
                    match cause {
                        RemovalCause::Size => counted[0].fetch_add(1, Ordering::Relaxed),
                        RemovalCause::Expired => counted[1].fetch_add(1, Ordering::Relaxed),
                        RemovalCause::Explicit | RemovalCause::Replaced => 0,
                    };
                    // A replaced entry's key is still stored (with the new entry).
                    if cause != RemovalCause::Replaced
                        && let Some(hook) = hook.get()
                    {
                        hook(*key);
                    }
                })
                .build(),
            evicted,
            dropped,
        }
    }

    /// Entries held and dropped so far. Runs moka's pending maintenance first (at scrape time,
    /// not on the request path), so that the count includes the latest inserts.
    pub fn local_stats(&self) -> StoreStats {
        self.entries.run_pending_tasks();
        StoreStats {
            entries: self.entries.entry_count(),
            evicted_size: self.dropped[0].load(Ordering::Relaxed),
            expired: self.dropped[1].load(Ordering::Relaxed),
            replication: None,
        }
    }

    /// Runs moka's pending maintenance now (evictions beyond the bound, expirations), calling
    /// the eviction hook for what it drops.
    pub fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks();
    }
}

impl MemoryStore {
    /// The live entry under `key` (an expired one is never returned, whatever moka's timers say).
    pub fn get_now(&self, key: &CacheKey) -> Option<Entry> {
        self.entries
            .get(key)
            .filter(|entry| !entry.is_expired(SystemTime::now()))
            .map(|entry| Entry::clone(&entry))
    }

    /// Stores `entry` under `key` unless it has already expired; returns whether it was stored.
    pub fn insert(&self, key: CacheKey, entry: Entry) -> bool {
        if entry.is_expired(SystemTime::now()) {
            self.entries.invalidate(&key);
            return false;
        }
        self.entries.insert(key, Arc::new(entry));
        true
    }

    /// Removes every entry of `app`; returns how many there were.
    pub fn remove_app(&self, app: &str) -> u64 {
        let keys: Vec<CacheKey> = self
            .entries
            .iter()
            .filter(|(_, entry)| entry.app == app)
            .map(|(key, _)| *key)
            .collect();
        for key in &keys {
            self.entries.invalidate(key);
        }
        keys.len() as u64
    }
}

impl CacheStore for MemoryStore {
    fn get(&self, key: CacheKey) -> BoxFuture<'_, Result<Option<Entry>, StoreError>> {
        futures::future::ready(Ok(self.get_now(&key))).boxed()
    }

    fn put(&self, key: CacheKey, entry: Entry) -> BoxFuture<'_, Result<(), StoreError>> {
        self.insert(key, entry);
        futures::future::ready(Ok(())).boxed()
    }

    fn purge_app<'a>(&'a self, app: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        futures::future::ready(Ok(self.remove_app(app))).boxed()
    }

    fn on_evict(&self, hook: EvictHook) {
        let _ = self.evicted.set(hook);
    }

    fn stats(&self) -> StoreStats {
        self.local_stats()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(ttl: Duration) -> Entry {
        Entry {
            app: "a".into(),
            response: ChatResponse {
                id: "r".into(),
                ..Default::default()
            },
            route: None,
            guard_policy: String::new(),
            inserted_at: SystemTime::now(),
            ttl,
        }
    }

    #[tokio::test]
    async fn entries_expire_after_their_own_ttl() {
        let store = MemoryStore::new(10);
        let short = CacheKey([1; 32]);
        let long = CacheKey([2; 32]);
        store
            .put(short, entry(Duration::from_millis(50)))
            .await
            .unwrap();
        store
            .put(long, entry(Duration::from_secs(3600)))
            .await
            .unwrap();
        assert!(store.get(short).await.unwrap().is_some());
        // Bounded polling: no assertion on how long expiry takes, only that it happens.
        let mut expired = false;
        for _ in 0..200 {
            if store.get(short).await.unwrap().is_none() {
                expired = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(expired, "entry with a 50ms TTL never expired");
        assert!(store.get(long).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn replacing_an_entry_takes_the_new_ttl() {
        let store = MemoryStore::new(10);
        let key = CacheKey([3; 32]);
        store
            .put(key, entry(Duration::from_millis(1)))
            .await
            .unwrap();
        store
            .put(key, entry(Duration::from_secs(3600)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(store.get(key).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn the_store_is_bounded() {
        let store = MemoryStore::new(5);
        for i in 0..50u8 {
            store
                .put(CacheKey([i; 32]), entry(Duration::from_secs(60)))
                .await
                .unwrap();
        }
        store.entries.run_pending_tasks();
        assert!(
            store.entries.entry_count() <= 5,
            "{}",
            store.entries.entry_count()
        );
        // What `/metrics` shows: what is held, and what was dropped for room.
        let stats = store.stats();
        assert_eq!(stats.entries, store.entries.entry_count());
        assert_eq!(stats.entries + stats.evicted_size, 50, "{stats:?}");
        assert_eq!(stats.expired, 0);
    }
}
