//! The ledger's Prometheus counters (`/metrics` on `ledger.metrics_addr`).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// Counters since start.
#[derive(Debug, Default)]
pub struct Metrics {
    recorded: AtomicU64,
    unpriced: Mutex<BTreeMap<(String, String), u64>>,
    price_versions: AtomicU64,
    price_reloads: AtomicU64,
    price_reload_failures: AtomicU64,
    config_reloads: AtomicU64,
    config_reload_failures: AtomicU64,
}

impl Metrics {
    /// A committed row.
    pub fn recorded(&self) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
    }

    /// A committed row without a cost because (provider, model) has no price (a row can lack
    /// several: it counts under each).
    pub fn unpriced_row(&self, provider: &str, model: &str) {
        let mut counts = self
            .unpriced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *counts
            .entry((provider.to_owned(), model.to_owned()))
            .or_default() += 1;
    }

    /// Unpriced rows committed for (provider, model) since start.
    #[cfg(test)]
    pub fn unpriced(&self, provider: &str, model: &str) -> u64 {
        let counts = self
            .unpriced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts
            .get(&(provider.to_owned(), model.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// The price book was (re)loaded with `versions` versions.
    pub fn prices_loaded(&self, versions: usize) {
        self.price_versions.store(
            u64::try_from(versions).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.price_reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// Re-reading the price table failed (the previous prices stay in use).
    pub fn price_reload_failed(&self) {
        self.price_reload_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A configuration reload was applied.
    pub fn config_reloaded(&self) {
        self.config_reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// A configuration reload was refused (the running configuration stays).
    pub fn config_reload_failed(&self) {
        self.config_reload_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP switchboard_ledger_rows_recorded_total Usage rows inserted (a redelivery of a recorded row is not counted).\n\
             # TYPE switchboard_ledger_rows_recorded_total counter\n\
             switchboard_ledger_rows_recorded_total {}",
            self.recorded.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP switchboard_ledger_unpriced_rows_total Usage rows committed with tokens but no known price (cost NULL), by the provider and model without a price (the serving attempt's or an earlier attempt's that consumed tokens; a row lacking several counts under each).\n\
             # TYPE switchboard_ledger_unpriced_rows_total counter"
        );
        {
            let counts = self
                .unpriced
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for ((provider, model), count) in counts.iter() {
                let _ = writeln!(
                    out,
                    "switchboard_ledger_unpriced_rows_total{{provider=\"{}\",model=\"{}\"}} {count}",
                    escape(provider),
                    escape(model)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP switchboard_ledger_price_versions Price versions loaded (configured and imported).\n\
             # TYPE switchboard_ledger_price_versions gauge\n\
             switchboard_ledger_price_versions {}\n\
             # HELP switchboard_ledger_price_reloads_total Price table (re)loads.\n\
             # TYPE switchboard_ledger_price_reloads_total counter\n\
             switchboard_ledger_price_reloads_total {}\n\
             # HELP switchboard_ledger_price_reload_failures_total Failed price table re-reads (previous prices kept).\n\
             # TYPE switchboard_ledger_price_reload_failures_total counter\n\
             switchboard_ledger_price_reload_failures_total {}",
            self.price_versions.load(Ordering::Relaxed),
            self.price_reloads.load(Ordering::Relaxed),
            self.price_reload_failures.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP switchboard_ledger_config_reloads_total Configuration reloads applied (SIGHUP or a changed file).\n\
             # TYPE switchboard_ledger_config_reloads_total counter\n\
             switchboard_ledger_config_reloads_total {}\n\
             # HELP switchboard_ledger_config_reload_failures_total Configuration reloads refused (invalid file, rewritten price history, database failure; the running configuration stays).\n\
             # TYPE switchboard_ledger_config_reload_failures_total counter\n\
             switchboard_ledger_config_reload_failures_total {}",
            self.config_reloads.load(Ordering::Relaxed),
            self.config_reload_failures.load(Ordering::Relaxed),
        );
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpriced_rows_are_counted_by_model() {
        let metrics = Metrics::default();
        metrics.recorded();
        metrics.recorded();
        metrics.unpriced_row("openai", "mystery\"x");
        metrics.recorded();
        metrics.unpriced_row("openai", "mystery\"x");
        metrics.prices_loaded(3);
        let text = metrics.render();
        assert!(
            text.contains("switchboard_ledger_rows_recorded_total 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "switchboard_ledger_unpriced_rows_total{provider=\"openai\",model=\"mystery\\\"x\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("switchboard_ledger_price_versions 3"),
            "{text}"
        );
        assert_eq!(metrics.unpriced("openai", "gpt-4o-mini"), 0);
        metrics.config_reloaded();
        metrics.config_reload_failed();
        metrics.config_reload_failed();
        let text = metrics.render();
        assert!(
            text.contains("switchboard_ledger_config_reloads_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("switchboard_ledger_config_reload_failures_total 2\n"),
            "{text}"
        );
    }
}
