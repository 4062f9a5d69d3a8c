//! One approximate nearest-neighbour index (HNSW, `hnsw_rs`) per compatibility scope.
//!
//! A scope's index holds the vectors of its entries' last user messages; each point's id is a
//! slot number, and the slot says which cache key it stands for, when it expires and what the
//! near-miss guard needs. Replaced, removed and expired entries become tombstones that searches
//! filter out; a scope is rebuilt from its live slots when tombstones outnumber them, and dropped
//! when none is left. Searches never cross scopes: there is no global index.
//!
//! Memory stays bounded by what is live: a key whose slot dies (replaced, removed, pushed out of a
//! full scope, expired) leaves the key map at once, and [`SemanticIndex::sweep`] (run every
//! [`SWEEP_INTERVAL`] by the cache's background task, `sweep_periodically`) kills the expired
//! slots of every scope, so a scope nobody stores into again (one multi-turn history) is dropped
//! once its entries expire. Entries the store evicts leave the index through its eviction hook
//! (`crate::store::EvictHook`).

use std::{
    collections::HashMap,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::{Duration, SystemTime},
};

use hnsw_rs::{anndists::dist::Distance, hnsw::Hnsw};

use super::guard::Features;
use crate::key::{CacheKey, ScopeKey};

/// HNSW links per node (M).
const MAX_CONNECTIONS: usize = 16;
/// Layers of the graph (more than enough for millions of points at M = 16).
const MAX_LAYERS: usize = 16;
/// Candidate list size while building.
const EF_CONSTRUCTION: usize = 100;
/// Candidate list size while searching (at least `k`).
const EF_SEARCH: usize = 64;
/// Below this many tombstones a scope is never rebuilt.
const MIN_TOMBSTONES_TO_REBUILD: usize = 32;
/// Every this many inserts into a scope, its expired slots are swept.
const SWEEP_EVERY: usize = 64;
/// How often every scope's expired slots are swept, and emptied scopes dropped.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// A nearest neighbour of a query within one scope.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The entry's exact key in the store.
    pub key: CacheKey,
    /// Cosine similarity to the query, in [-1, 1].
    pub similarity: f32,
    /// The guard features of the entry's text.
    pub features: Arc<Features>,
}

/// `1 - a·b` for L2-normalised vectors, clamped at 0. (`anndists`' `DistDot` asserts `a·b <= 1`,
/// which float rounding breaks for identical vectors: a panic is not an option on the request path.)
#[derive(Debug, Clone, Copy, Default)]
pub struct CosineDistance;

impl Distance<f32> for CosineDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - switchboard_embed::cosine(a, b)).max(0.0)
    }
}

struct Slot {
    key: CacheKey,
    vector: Arc<[f32]>,
    features: Arc<Features>,
    expires_at: SystemTime,
    live: bool,
}

struct Scope {
    app: String,
    graph: Hnsw<'static, f32, CosineDistance>,
    slots: Vec<Slot>,
    by_key: HashMap<CacheKey, usize>,
    live: usize,
    inserts: usize,
    /// Keys whose slot was killed and that the key map may still point here (drained by every
    /// operation that kills, [`SemanticIndex::forget`]).
    orphans: Vec<CacheKey>,
}

fn graph(expected: usize) -> Hnsw<'static, f32, CosineDistance> {
    Hnsw::new(
        MAX_CONNECTIONS,
        expected.max(16),
        MAX_LAYERS,
        EF_CONSTRUCTION,
        CosineDistance,
    )
}

impl Scope {
    fn new(app: &str) -> Self {
        Scope {
            app: app.to_owned(),
            graph: graph(16),
            slots: Vec::new(),
            by_key: HashMap::new(),
            live: 0,
            inserts: 0,
            orphans: Vec::new(),
        }
    }

    fn kill(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot)
            && s.live
        {
            s.live = false;
            self.live -= 1;
            self.by_key.remove(&s.key);
            self.orphans.push(s.key);
        }
    }

    fn insert(
        &mut self,
        key: CacheKey,
        vector: Arc<[f32]>,
        features: Arc<Features>,
        expires_at: SystemTime,
        max_live: usize,
    ) {
        if let Some(&old) = self.by_key.get(&key) {
            self.kill(old);
        }
        self.inserts += 1;
        if self.inserts.is_multiple_of(SWEEP_EVERY) {
            self.sweep(SystemTime::now());
        }
        // The oldest live entries go first when a scope is full.
        let mut oldest = 0;
        while self.live >= max_live.max(1) && oldest < self.slots.len() {
            self.kill(oldest);
            oldest += 1;
        }
        let id = self.slots.len();
        self.graph.insert_slice((&vector, id));
        self.slots.push(Slot {
            key,
            vector,
            features,
            expires_at,
            live: true,
        });
        self.by_key.insert(key, id);
        self.live += 1;
        self.maybe_rebuild();
    }

    /// Kills the expired slots; returns how many.
    fn sweep(&mut self, now: SystemTime) -> usize {
        let expired: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live && s.expires_at <= now)
            .map(|(i, _)| i)
            .collect();
        for &slot in &expired {
            self.kill(slot);
        }
        expired.len()
    }

    fn maybe_rebuild(&mut self) {
        let dead = self.slots.len() - self.live;
        if dead < MIN_TOMBSTONES_TO_REBUILD || dead <= self.live {
            return;
        }
        let live: Vec<Slot> = std::mem::take(&mut self.slots)
            .into_iter()
            .filter(|s| s.live)
            .collect();
        self.graph = graph(live.len());
        self.by_key.clear();
        for (id, slot) in live.iter().enumerate() {
            self.graph.insert_slice((&slot.vector, id));
            self.by_key.insert(slot.key, id);
        }
        self.live = live.len();
        self.slots = live;
    }

    fn search(&self, vector: &[f32], k: usize, now: SystemTime) -> Vec<Candidate> {
        if self.live == 0 {
            return Vec::new();
        }
        let slots = &self.slots;
        let alive = |id: &usize| slots.get(*id).is_some_and(|s| s.live && s.expires_at > now);
        let found = self
            .graph
            .search_filter(vector, k, EF_SEARCH.max(k), Some(&alive));
        found
            .into_iter()
            .filter_map(|n| {
                let slot = slots.get(n.d_id)?;
                Some(Candidate {
                    key: slot.key,
                    // The distance is 1 - a·b (clamped), and the vectors are L2-normalised.
                    similarity: 1.0 - n.distance,
                    features: Arc::clone(&slot.features),
                })
            })
            .collect()
    }
}

/// What one [`SemanticIndex::sweep`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Expired entries.
    pub entries: usize,
    /// Scopes dropped because nothing live was left in them.
    pub scopes: usize,
}

/// Every scope's index.
pub struct SemanticIndex {
    scopes: RwLock<HashMap<ScopeKey, Arc<RwLock<Scope>>>>,
    /// Which scope each indexed key is in.
    keys: RwLock<HashMap<CacheKey, ScopeKey>>,
    max_per_scope: usize,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SemanticIndex {
    /// An empty index keeping at most `max_per_scope` live entries per scope.
    pub fn new(max_per_scope: usize) -> Self {
        SemanticIndex {
            scopes: RwLock::new(HashMap::new()),
            keys: RwLock::new(HashMap::new()),
            max_per_scope: max_per_scope.max(1),
        }
    }

    /// Indexes `key` (of `app`) in `scope`, replacing any previous point of the same key.
    pub fn insert(
        &self,
        app: &str,
        scope: ScopeKey,
        key: CacheKey,
        vector: Arc<[f32]>,
        features: Arc<Features>,
        expires_at: SystemTime,
    ) {
        let previous = write(&self.keys).insert(key, scope);
        if let Some(previous) = previous.filter(|p| *p != scope) {
            self.remove_from(previous, key);
        }
        let index = {
            let mut scopes = write(&self.scopes);
            Arc::clone(
                scopes
                    .entry(scope)
                    .or_insert_with(|| Arc::new(RwLock::new(Scope::new(app)))),
            )
        };
        let orphans = {
            let mut index = write(&index);
            index.insert(key, vector, features, expires_at, self.max_per_scope);
            std::mem::take(&mut index.orphans)
        };
        self.forget(scope, &index, orphans);
    }

    /// Drops from the key map the `orphans` (keys whose slot in `scope` was killed), unless the
    /// key has been indexed again meanwhile (here or in another scope). Lock order everywhere:
    /// the scope map, then the key map, then one scope.
    fn forget(&self, scope: ScopeKey, index: &RwLock<Scope>, orphans: Vec<CacheKey>) {
        if orphans.is_empty() {
            return;
        }
        let mut keys = write(&self.keys);
        let index = read(index);
        for key in orphans {
            if keys.get(&key) == Some(&scope) && !index.by_key.contains_key(&key) {
                keys.remove(&key);
            }
        }
    }

    /// Kills every expired slot of every scope (`now`: the wall clock, or a later time in tests),
    /// forgets their keys, and drops the scopes left empty; also drops any key whose scope is
    /// gone. Run periodically ([`SWEEP_INTERVAL`]): without it a scope that no store touches
    /// again would keep its expired entries forever.
    pub fn sweep(&self, now: SystemTime) -> Swept {
        let scopes: Vec<(ScopeKey, Arc<RwLock<Scope>>)> = read(&self.scopes)
            .iter()
            .map(|(key, index)| (*key, Arc::clone(index)))
            .collect();
        let mut swept = Swept::default();
        let mut emptied = Vec::new();
        for (scope, index) in scopes {
            let (orphans, empty) = {
                let mut index = write(&index);
                swept.entries += index.sweep(now);
                index.maybe_rebuild();
                (std::mem::take(&mut index.orphans), index.live == 0)
            };
            self.forget(scope, &index, orphans);
            if empty {
                emptied.push(scope);
            }
        }
        {
            let mut scopes = write(&self.scopes);
            let before = scopes.len();
            for scope in emptied {
                if scopes.get(&scope).is_some_and(|i| read(i).live == 0) {
                    scopes.remove(&scope);
                }
            }
            swept.scopes = before - scopes.len();
            // A key whose scope was dropped (a race between a kill and a store) goes too.
            write(&self.keys).retain(|_, scope| scopes.contains_key(scope));
        }
        swept
    }

    /// The `k` nearest live entries to `vector` in `scope`, most similar first.
    pub fn search(&self, scope: ScopeKey, vector: &[f32], k: usize) -> Vec<Candidate> {
        let Some(index) = read(&self.scopes).get(&scope).cloned() else {
            return Vec::new();
        };
        let mut found = read(&index).search(vector, k.max(1), SystemTime::now());
        found.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        found
    }

    /// Forgets `key` (its entry was removed, replaced without a semantic tag, or has expired).
    pub fn remove(&self, key: CacheKey) {
        let scope = write(&self.keys).remove(&key);
        if let Some(scope) = scope {
            self.remove_from(scope, key);
        }
    }

    fn remove_from(&self, scope: ScopeKey, key: CacheKey) {
        let Some(index) = read(&self.scopes).get(&scope).cloned() else {
            return;
        };
        let (orphans, empty) = {
            let mut index = write(&index);
            if let Some(&slot) = index.by_key.get(&key) {
                index.kill(slot);
                index.maybe_rebuild();
            }
            (std::mem::take(&mut index.orphans), index.live == 0)
        };
        self.forget(scope, &index, orphans);
        if empty {
            self.drop_if_empty(scope);
        }
    }

    fn drop_if_empty(&self, scope: ScopeKey) {
        let mut scopes = write(&self.scopes);
        if scopes.get(&scope).is_some_and(|i| read(i).live == 0) {
            scopes.remove(&scope);
        }
    }

    /// Forgets every entry of `app`; returns how many there were.
    pub fn purge_app(&self, app: &str) -> usize {
        let mut scopes = write(&self.scopes);
        let mut keys = write(&self.keys);
        let mut removed = 0;
        scopes.retain(|_, index| {
            let index = read(index);
            if index.app != app {
                return true;
            }
            removed += index.live;
            for key in index.by_key.keys().chain(&index.orphans) {
                keys.remove(key);
            }
            false
        });
        removed
    }

    /// How many keys the key map holds (each live entry once; dead ones never stay).
    pub fn key_count(&self) -> usize {
        read(&self.keys).len()
    }

    /// Live entries over every scope, and the number of scopes.
    pub fn len(&self) -> (usize, usize) {
        let scopes = read(&self.scopes);
        let live = scopes.values().map(|i| read(i).live).sum();
        (live, scopes.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn unit(seed: u32, dim: usize) -> Arc<[f32]> {
        // A deterministic pseudo-random unit vector.
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let mut v: Vec<f32> = (0..dim)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) - 0.5
            })
            .collect();
        let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        v.iter_mut().for_each(|a| *a /= norm);
        v.into()
    }

    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    fn features() -> Arc<Features> {
        Arc::new(Features::default())
    }

    #[test]
    fn finds_the_nearest_within_its_scope_only() {
        let index = SemanticIndex::new(1000);
        let (a, b) = (ScopeKey([1; 32]), ScopeKey([2; 32]));
        for i in 0..300u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            index.insert("app", a, CacheKey(key), unit(i, 32), features(), later());
        }
        let found = index.search(a, &unit(123, 32), 3);
        assert_eq!(found[0].key.0[..4], 123u32.to_le_bytes());
        assert!((found[0].similarity - 1.0).abs() < 1e-4);
        assert!(found.windows(2).all(|w| w[0].similarity >= w[1].similarity));
        assert!(index.search(b, &unit(123, 32), 3).is_empty());
        assert_eq!(index.len(), (300, 1));
    }

    #[test]
    fn removed_replaced_and_expired_entries_are_never_found() {
        let index = SemanticIndex::new(1000);
        let scope = ScopeKey([1; 32]);
        let (k1, k2, k3) = (CacheKey([1; 32]), CacheKey([2; 32]), CacheKey([3; 32]));
        index.insert("app", scope, k1, unit(1, 16), features(), later());
        index.insert("app", scope, k2, unit(2, 16), features(), later());
        index.insert(
            "app",
            scope,
            k3,
            unit(3, 16),
            features(),
            SystemTime::now() - Duration::from_secs(1),
        );
        index.remove(k1);
        let found: Vec<CacheKey> = index
            .search(scope, &unit(1, 16), 5)
            .iter()
            .map(|c| c.key)
            .collect();
        assert_eq!(found, [k2]);
        // Replacing k2 with another vector moves it.
        index.insert("app", scope, k2, unit(9, 16), features(), later());
        let best = &index.search(scope, &unit(9, 16), 1)[0];
        assert_eq!(best.key, k2);
        assert!(best.similarity > 0.999);
        assert_eq!(index.search(scope, &unit(2, 16), 5).len(), 1);
    }

    #[test]
    fn tombstones_trigger_a_rebuild_and_scopes_are_bounded() {
        let index = SemanticIndex::new(10);
        let scope = ScopeKey([7; 32]);
        for i in 0..200u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            index.insert("app", scope, CacheKey(key), unit(i, 8), features(), later());
        }
        assert_eq!(index.len(), (10, 1));
        let scopes = read(&index.scopes);
        let inner = read(scopes.get(&scope).unwrap());
        assert!(
            inner.slots.len() < 10 + MIN_TOMBSTONES_TO_REBUILD + 1,
            "{}",
            inner.slots.len()
        );
        // The newest survive.
        assert!(inner.by_key.contains_key(&{
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&199u32.to_le_bytes());
            CacheKey(key)
        }));
    }

    fn key_of(i: u32) -> CacheKey {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_le_bytes());
        CacheKey(key)
    }

    fn scope_of(i: u32) -> ScopeKey {
        let mut scope = [0u8; 32];
        scope[..4].copy_from_slice(&i.to_le_bytes());
        ScopeKey(scope)
    }

    #[test]
    fn a_sweep_drops_expired_entries_their_keys_and_the_scopes_they_leave_empty() {
        // One scope per multi-turn history, each stored into once: the per-scope sweep (every
        // 64 inserts into a scope) never runs for them.
        let index = SemanticIndex::new(100);
        let now = SystemTime::now();
        let soon = now + Duration::from_secs(60);
        for i in 0..500u32 {
            index.insert("app", scope_of(i), key_of(i), unit(i, 8), features(), soon);
        }
        // A long-lived scope, and a scope with one entry of each kind.
        index.insert(
            "app",
            scope_of(1000),
            key_of(1000),
            unit(7, 8),
            features(),
            later(),
        );
        index.insert(
            "app",
            scope_of(1001),
            key_of(1001),
            unit(8, 8),
            features(),
            later(),
        );
        index.insert(
            "app",
            scope_of(1001),
            key_of(1002),
            unit(9, 8),
            features(),
            soon,
        );
        assert_eq!(index.len(), (503, 502));
        assert_eq!(index.key_count(), 503);

        // Nothing has expired yet: nothing goes.
        assert_eq!(index.sweep(now), Swept::default());
        assert_eq!(index.len(), (503, 502));

        let swept = index.sweep(soon + Duration::from_secs(1));
        assert_eq!(
            swept,
            Swept {
                entries: 501,
                scopes: 500
            }
        );
        assert_eq!(index.len(), (2, 2));
        assert_eq!(index.key_count(), 2);
        assert_eq!(
            index.search(scope_of(1001), &unit(8, 8), 5)[0].key,
            key_of(1001)
        );
        assert!(index.search(scope_of(3), &unit(3, 8), 5).is_empty());
        // A key swept away and stored again is indexed afresh.
        index.insert(
            "app",
            scope_of(3),
            key_of(3),
            unit(3, 8),
            features(),
            later(),
        );
        assert_eq!(index.len(), (3, 3));
        assert_eq!(index.key_count(), 3);
    }

    #[test]
    fn keys_pushed_out_of_a_full_scope_or_replaced_leave_the_key_map() {
        let index = SemanticIndex::new(10);
        let scope = ScopeKey([7; 32]);
        for i in 0..200u32 {
            index.insert("app", scope, key_of(i), unit(i, 8), features(), later());
        }
        assert_eq!(index.len(), (10, 1));
        assert_eq!(index.key_count(), 10, "one key per live entry");
        // Moving a key to another scope and removing it leave nothing behind either.
        index.insert(
            "app",
            ScopeKey([8; 32]),
            key_of(199),
            unit(1, 8),
            features(),
            later(),
        );
        assert_eq!(index.key_count(), 10);
        index.remove(key_of(199));
        assert_eq!(index.key_count(), 9);
        assert_eq!(index.len(), (9, 1));
    }

    #[test]
    fn entries_the_store_evicts_leave_the_index() {
        use crate::store::{CacheStore, Entry, MemoryStore};
        let index = Arc::new(SemanticIndex::new(1000));
        let store = MemoryStore::new(5);
        let forget = Arc::clone(&index);
        store.on_evict(Arc::new(move |key| forget.remove(key)));
        let entry = || Entry {
            app: "app".into(),
            response: Default::default(),
            route: None,
            guard_policy: String::new(),
            inserted_at: SystemTime::now(),
            ttl: Duration::from_secs(3600),
        };
        for i in 0..50u32 {
            store.insert(key_of(i), entry());
            index.insert(
                "app",
                scope_of(i),
                key_of(i),
                unit(i, 8),
                features(),
                later(),
            );
        }
        store.run_pending_tasks();
        let (live, scopes) = index.len();
        assert!(
            live <= 5 && scopes <= 5,
            "{live} entries in {scopes} scopes"
        );
        assert_eq!(index.key_count(), live);
        // Replacing an entry under the same key keeps its index entry.
        let kept = (0..50u32)
            .map(key_of)
            .find(|key| store.get_now(key).is_some())
            .unwrap();
        store.insert(kept, entry());
        store.run_pending_tasks();
        assert_eq!(index.len().0, live);
        // An explicit removal (a purge of the store) takes it out too.
        store.remove_app("app");
        store.run_pending_tasks();
        assert_eq!(index.len(), (0, 0));
        assert_eq!(index.key_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_periodic_sweep_runs_until_cancelled() {
        let index = Arc::new(SemanticIndex::new(100));
        let past = SystemTime::now() - Duration::from_secs(1);
        for i in 0..100u32 {
            index.insert("app", scope_of(i), key_of(i), unit(i, 8), features(), past);
        }
        assert_eq!(index.len(), (100, 100));
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let (index, cancel) = (Arc::clone(&index), cancel.clone());
            async move { super::super::sweep_periodically(&index, SWEEP_INTERVAL, cancel).await }
        });
        tokio::task::yield_now().await;
        // Not before its interval (the expired entries are only filtered out of searches).
        assert_eq!(index.len(), (100, 100));
        tokio::time::sleep(SWEEP_INTERVAL + Duration::from_millis(1)).await;
        assert_eq!(index.len(), (0, 0));
        assert_eq!(index.key_count(), 0);
        cancel.cancel();
        task.await.unwrap();
    }

    #[test]
    fn purge_drops_every_scope_of_an_app() {
        let index = SemanticIndex::new(100);
        index.insert(
            "a",
            ScopeKey([1; 32]),
            CacheKey([1; 32]),
            unit(1, 8),
            features(),
            later(),
        );
        index.insert(
            "a",
            ScopeKey([2; 32]),
            CacheKey([2; 32]),
            unit(2, 8),
            features(),
            later(),
        );
        index.insert(
            "b",
            ScopeKey([3; 32]),
            CacheKey([3; 32]),
            unit(3, 8),
            features(),
            later(),
        );
        assert_eq!(index.purge_app("a"), 2);
        assert_eq!(index.len(), (1, 1));
        assert!(index.search(ScopeKey([1; 32]), &unit(1, 8), 1).is_empty());
        // A removed key of a purged app is a no-op.
        index.remove(CacheKey([1; 32]));
        assert_eq!(index.len(), (1, 1));
    }
}
