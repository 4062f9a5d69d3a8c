//! The price book in use, replaced without a restart when the `prices` table changes (an import,
//! another replica's configuration).

use std::{
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::{metrics::Metrics, pricing::PriceBook, repo::Repository};

/// The current price book, shared by the consumer and the reload task.
#[derive(Debug, Clone, Default)]
pub struct SharedPrices(Arc<RwLock<Arc<PriceBook>>>);

impl SharedPrices {
    /// Starts with `book`.
    pub fn new(book: PriceBook) -> Self {
        SharedPrices(Arc::new(RwLock::new(Arc::new(book))))
    }

    /// The book in use now (cheap: an `Arc` clone).
    pub fn current(&self) -> Arc<PriceBook> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the book.
    pub fn replace(&self, book: PriceBook) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(book);
    }
}

/// What identifies the table's content (rows are only ever inserted).
pub type Fingerprint = (i64, Option<OffsetDateTime>);

/// Every `every`, re-reads the price table when its fingerprint changed; a failure keeps the
/// previous book (logged and counted) and is retried at the next tick.
pub async fn reload_loop(
    repo: Repository,
    prices: SharedPrices,
    metrics: Arc<Metrics>,
    every: Duration,
    mut last: Fingerprint,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match reload_if_changed(&repo, &prices, &metrics, last).await {
            Ok(now) => last = now,
            Err(error) => {
                metrics.price_reload_failed();
                tracing::warn!(%error, "cannot re-read prices; keeping the current ones");
            }
        }
    }
}

/// One reload step: returns the fingerprint the book now reflects.
pub async fn reload_if_changed(
    repo: &Repository,
    prices: &SharedPrices,
    metrics: &Metrics,
    last: Fingerprint,
) -> Result<Fingerprint, crate::repo::RepoError> {
    let now = repo.prices_fingerprint().await?;
    if now == last {
        return Ok(last);
    }
    let book = repo.load_prices().await?;
    tracing::info!(prices = book.len(), "price table changed; prices reloaded");
    metrics.prices_loaded(book.len());
    prices.replace(book);
    Ok(now)
}
