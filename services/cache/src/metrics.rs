//! The cache's Prometheus metrics, on `GET /metrics` at `cache.metrics_addr` (unset: not served).
//!
//! On the request path, a lookup or a store adds one relaxed atomic for its outcome (`grpc.rs`);
//! the store's own figures (entries held, evictions) and the replication's (messages applied by
//! kind, messages still to apply, restarts) are read at scrape time ([`StoreStats`]). Labels are
//! fixed names only: never an app, a team, a model or a key.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use crate::{
    cache::{Refusal, Stored},
    error::CacheError,
    store::StoreStats,
};

/// How a lookup ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The exact key was there.
    ExactHit = 0,
    /// A semantically equivalent entry was served.
    SemanticHit = 1,
    /// Nothing to serve.
    Miss = 2,
    /// An invalid request or a store failure.
    Error = 3,
}

const LOOKUPS: [&str; 4] = ["exact_hit", "semantic_hit", "miss", "error"];

/// `(outcome, reason)` of each store slot.
const STORES: [(&str, &str); 9] = [
    ("stored", "none"),
    ("refused", "missing_response"),
    ("refused", "no_choices"),
    ("refused", "unfinished"),
    ("refused", "no_message"),
    ("refused", "tool_calls"),
    ("refused", "missing_usage"),
    ("error", "invalid_request"),
    ("error", "unavailable"),
];

fn stored_slot(outcome: &Stored) -> usize {
    match outcome {
        Stored::Yes { .. } => 0,
        Stored::No(refusal) => match refusal {
            Refusal::MissingResponse => 1,
            Refusal::NoChoices => 2,
            Refusal::Unfinished { .. } => 3,
            Refusal::NoMessage { .. } => 4,
            Refusal::ToolCalls { .. } => 5,
            Refusal::MissingUsage => 6,
        },
    }
}

fn failed_slot(error: &CacheError) -> usize {
    match error {
        CacheError::Missing { .. } => 7,
        CacheError::Store(_) => 8,
    }
}

/// The request counters of one cache.
#[derive(Debug, Default)]
pub struct Metrics {
    lookups: [AtomicU64; LOOKUPS.len()],
    stores: [AtomicU64; STORES.len()],
    purges: AtomicU64,
    purged: AtomicU64,
}

impl Metrics {
    /// A lookup ended as `outcome`.
    pub fn lookup(&self, outcome: Lookup) {
        self.lookups[outcome as usize].fetch_add(1, Relaxed);
    }

    /// A store was answered: stored, or refused (not a complete answer).
    pub fn stored(&self, outcome: &Stored) {
        self.stores[stored_slot(outcome)].fetch_add(1, Relaxed);
    }

    /// A store failed: an invalid request, or the store unavailable.
    pub fn store_failed(&self, error: &CacheError) {
        self.stores[failed_slot(error)].fetch_add(1, Relaxed);
    }

    /// A purge removed `removed` entries.
    pub fn purge(&self, removed: u64) {
        self.purges.fetch_add(1, Relaxed);
        self.purged.fetch_add(removed, Relaxed);
    }

    /// Everything in the Prometheus text format, with `store`'s figures.
    pub fn render(&self, store: &StoreStats) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP switchboard_cache_lookups_total Lookups by outcome (exact_hit, semantic_hit, miss, error).\n\
             # TYPE switchboard_cache_lookups_total counter\n",
        );
        for (outcome, count) in LOOKUPS.iter().zip(&self.lookups) {
            let _ = writeln!(
                out,
                "switchboard_cache_lookups_total{{outcome=\"{outcome}\"}} {}",
                count.load(Relaxed)
            );
        }
        out.push_str(
            "# HELP switchboard_cache_stores_total Stores by outcome (stored, refused: not a complete answer, error) and reason.\n\
             # TYPE switchboard_cache_stores_total counter\n",
        );
        for ((outcome, reason), count) in STORES.iter().zip(&self.stores) {
            let _ = writeln!(
                out,
                "switchboard_cache_stores_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} {}",
                count.load(Relaxed)
            );
        }
        let _ = write!(
            out,
            "# HELP switchboard_cache_purges_total Purges (erasure requests) answered.\n\
             # TYPE switchboard_cache_purges_total counter\n\
             switchboard_cache_purges_total {}\n\
             # HELP switchboard_cache_purged_entries_total Entries the purges removed.\n\
             # TYPE switchboard_cache_purged_entries_total counter\n\
             switchboard_cache_purged_entries_total {}\n\
             # HELP switchboard_cache_entries Entries held in this replica's store (approximate: the bounded store's count).\n\
             # TYPE switchboard_cache_entries gauge\n\
             switchboard_cache_entries {}\n\
             # HELP switchboard_cache_evictions_total Entries the store dropped on its own, by cause (size: beyond max_entries; expired).\n\
             # TYPE switchboard_cache_evictions_total counter\n\
             switchboard_cache_evictions_total{{cause=\"size\"}} {}\n\
             switchboard_cache_evictions_total{{cause=\"expired\"}} {}\n",
            self.purges.load(Relaxed),
            self.purged.load(Relaxed),
            store.entries,
            store.evicted_size,
            store.expired,
        );
        if let Some(replication) = &store.replication {
            let _ = write!(
                out,
                "# HELP switchboard_cache_replication_applied_total Messages of the shared stream applied to this replica, by kind (its own publications included; skipped: malformed or unknown).\n\
                 # TYPE switchboard_cache_replication_applied_total counter\n\
                 switchboard_cache_replication_applied_total{{kind=\"entry\"}} {}\n\
                 switchboard_cache_replication_applied_total{{kind=\"tag\"}} {}\n\
                 switchboard_cache_replication_applied_total{{kind=\"purge\"}} {}\n\
                 switchboard_cache_replication_applied_total{{kind=\"skipped\"}} {}\n\
                 # HELP switchboard_cache_replication_pending Messages of the shared stream not yet applied here, as of the last one applied (replication lag).\n\
                 # TYPE switchboard_cache_replication_pending gauge\n\
                 switchboard_cache_replication_pending {}\n\
                 # HELP switchboard_cache_replication_restarts_total Times the sync consumer failed and started over.\n\
                 # TYPE switchboard_cache_replication_restarts_total counter\n\
                 switchboard_cache_replication_restarts_total {}\n",
                replication.entries,
                replication.tags,
                replication.purges,
                replication.skipped,
                replication.pending,
                replication.restarts,
            );
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::{ReplicationSnapshot, StoreError};

    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn renders_outcomes_store_figures_and_replication() {
        let metrics = Metrics::default();
        metrics.lookup(Lookup::SemanticHit);
        metrics.lookup(Lookup::Miss);
        metrics.lookup(Lookup::Miss);
        metrics.stored(&Stored::Yes {
            ttl: std::time::Duration::from_secs(1),
        });
        metrics.stored(&Stored::No(Refusal::ToolCalls { index: 0 }));
        metrics.store_failed(&CacheError::Store(StoreError::Unavailable("x".into())));
        metrics.purge(4);
        let stats = StoreStats {
            entries: 12,
            evicted_size: 3,
            expired: 1,
            replication: Some(ReplicationSnapshot {
                entries: 5,
                pending: 2,
                ..ReplicationSnapshot::default()
            }),
        };
        let text = metrics.render(&stats);
        for (series, expected) in [
            (
                "switchboard_cache_lookups_total{outcome=\"semantic_hit\"}",
                1,
            ),
            ("switchboard_cache_lookups_total{outcome=\"miss\"}", 2),
            ("switchboard_cache_lookups_total{outcome=\"exact_hit\"}", 0),
            (
                "switchboard_cache_stores_total{outcome=\"stored\",reason=\"none\"}",
                1,
            ),
            (
                "switchboard_cache_stores_total{outcome=\"refused\",reason=\"tool_calls\"}",
                1,
            ),
            (
                "switchboard_cache_stores_total{outcome=\"error\",reason=\"unavailable\"}",
                1,
            ),
            ("switchboard_cache_purges_total", 1),
            ("switchboard_cache_purged_entries_total", 4),
            ("switchboard_cache_entries", 12),
            ("switchboard_cache_evictions_total{cause=\"size\"}", 3),
            ("switchboard_cache_evictions_total{cause=\"expired\"}", 1),
            (
                "switchboard_cache_replication_applied_total{kind=\"entry\"}",
                5,
            ),
            ("switchboard_cache_replication_pending", 2),
        ] {
            assert_eq!(value(&text, series), Some(expected), "{series}:\n{text}");
        }
        let local = metrics.render(&StoreStats::default());
        assert!(!local.contains("replication"), "{local}");
    }
}
