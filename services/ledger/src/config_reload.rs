//! Configuration reload. At start, and again on SIGHUP or when the configuration file's
//! modification time changes (`ledger.config_poll_ms`, the watcher of
//! `switchboard_grpc::ConfigFile`), the configured prices (`[[ledger.prices]]`) and the declared
//! budgets (`[[ledger.budgets]]`) are applied in one transaction by [`apply_configured`].
//!
//! A reload reads and validates `[ledger]` again. An invalid section, a configured price that
//! would rewrite the recorded history, or a failing database refuses the whole reload: nothing is
//! written, the price book in use stays, the error is logged with the field it names and counted
//! (`switchboard_ledger_config_reload_failures_total`). The other settings of `[ledger]` (addresses,
//! database URL, consumer, batching, intervals) are read at start only: a reload that changes them
//! logs a warning naming each, and they take effect at the next start.

use std::sync::Arc;

use switchboard_grpc::{ConfigFile, ConfigWatch};
use tokio_util::sync::CancellationToken;

use crate::{
    budget::{Applied, Budget, BudgetStore},
    config::Config,
    error::{ApplyError, ReloadError},
    metrics::Metrics,
    pricing::Price,
    reload::SharedPrices,
    repo::{RepoError, Repository, sync_prices_in},
};

/// What [`apply_configured`] did.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    /// Configured price versions that were not recorded yet (inserted now).
    pub added_prices: Vec<Price>,
    /// What happened to the declared budgets ([`BudgetStore::apply_declared_in`]).
    pub budgets: Applied,
}

/// Records the configured prices (a version already stored with other rates is refused: history is
/// never rewritten) and upserts the declared budgets (created when missing, updated when they
/// differ; budgets no longer declared are kept, see [`BudgetStore::apply_declared_in`]) in one
/// transaction: on error nothing is written.
pub(crate) async fn apply_configured(
    repo: &Repository,
    prices: &[Price],
    budgets: &[Budget],
) -> Result<Outcome, ApplyError> {
    let database = |e: sqlx::Error| ApplyError::Database(RepoError::Database(e));
    let mut tx = repo.pool().begin().await.map_err(database)?;
    let added_prices = sync_prices_in(&mut tx, prices).await?;
    let budgets = BudgetStore::apply_declared_in(&mut tx, budgets)
        .await
        .map_err(ApplyError::Budgets)?;
    tx.commit().await.map_err(database)?;
    Ok(Outcome {
        added_prices,
        budgets,
    })
}

/// Logs what [`apply_configured`] changed (ids only).
pub(crate) fn log_outcome(outcome: &Outcome) {
    for price in &outcome.added_prices {
        tracing::info!(
            price.provider = %price.provider,
            price.model = %price.model,
            price.effective_from = %price.effective_from,
            "configured price version recorded"
        );
    }
    let applied = &outcome.budgets;
    for id in &applied.created {
        tracing::info!(budget.id = %id, "declared budget created");
    }
    for id in &applied.updated {
        tracing::info!(budget.id = %id, "declared budget updated from the configuration");
    }
    for id in &applied.undeclared {
        tracing::warn!(
            budget.id = %id,
            "budget no longer declared in ledger.budgets; left as it is and still enforced"
        );
    }
    tracing::info!(
        prices_added = outcome.added_prices.len(),
        created = applied.created.len(),
        updated = applied.updated.len(),
        unchanged = applied.unchanged.len(),
        "configured prices and declared budgets applied"
    );
}

/// Applies a reloaded `[ledger]` section to the running ledger.
pub(crate) struct ConfigReloader {
    repo: Repository,
    prices: SharedPrices,
    metrics: Arc<Metrics>,
    /// The configuration the process started with: its restart-only settings stay in force.
    running: Config,
}

impl ConfigReloader {
    pub(crate) fn new(
        repo: Repository,
        prices: SharedPrices,
        metrics: Arc<Metrics>,
        running: Config,
    ) -> Self {
        ConfigReloader {
            repo,
            prices,
            metrics,
            running,
        }
    }

    /// Reads `[ledger]` from `file` (and the environment) again and applies it; on error nothing
    /// changes. Counted in the metrics and logged either way.
    pub(crate) async fn reload(&self, file: &ConfigFile) -> Result<Outcome, ReloadError> {
        let outcome = match file.load() {
            Ok(source) => match source.section::<Config>("ledger") {
                Ok(config) => self.apply(config).await,
                Err(error) => Err(error.into()),
            },
            Err(error) => Err(error.into()),
        };
        match &outcome {
            Ok(_) => {
                self.metrics.config_reloaded();
                tracing::info!("ledger configuration reloaded");
            }
            Err(error) => {
                self.metrics.config_reload_failed();
                tracing::error!(
                    %error,
                    field = error.field().unwrap_or(""),
                    "ledger configuration reload refused; the previous configuration stays"
                );
            }
        }
        outcome
    }

    /// Validates `config`, warns about restart-only settings that differ, applies its prices and
    /// budgets, and puts the new price versions in use.
    async fn apply(&self, config: Config) -> Result<Outcome, ReloadError> {
        config.validate()?;
        let prices = config.parsed_prices()?;
        let budgets = config.parsed_budgets()?;
        for field in self.running.restart_only_changes(&config) {
            tracing::warn!(
                field,
                "configuration setting changed; it takes effect after a restart"
            );
        }
        let outcome = apply_configured(&self.repo, &prices, &budgets).await?;
        log_outcome(&outcome);
        if !outcome.added_prices.is_empty() {
            // Recorded already: a failure here only delays them to the next price reload.
            match self.repo.load_prices().await {
                Ok(book) => {
                    tracing::info!(prices = book.len(), "prices reloaded");
                    self.metrics.prices_loaded(book.len());
                    self.prices.replace(book);
                }
                Err(error) => {
                    self.metrics.price_reload_failed();
                    tracing::warn!(
                        %error,
                        "cannot re-read prices after recording the configured ones; \
                         the next price reload picks them up"
                    );
                }
            }
        }
        Ok(outcome)
    }
}

/// Reloads on every SIGHUP or change of the configuration file until `cancel`.
pub(crate) async fn watch(
    mut watch: ConfigWatch,
    reloader: ConfigReloader,
    cancel: CancellationToken,
) {
    loop {
        let cause = tokio::select! {
            () = cancel.cancelled() => return,
            cause = watch.changed() => cause,
        };
        tracing::info!(cause, "reloading the ledger configuration");
        tokio::select! {
            // A reload cut short rolls its transaction back.
            () = cancel.cancelled() => return,
            // Logged and counted by `reload`.
            _ = reloader.reload(watch.file()) => {}
        }
    }
}
