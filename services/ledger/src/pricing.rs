//! Price selection: the latest price effective on the event's (UTC) date for the serving provider
//! and model, a provider-specific price winning over the `*` wildcard.

use std::collections::HashMap;

use time::{Date, OffsetDateTime};

use crate::money::Rates;

/// Provider wildcard.
pub const ANY_PROVIDER: &str = "*";

/// One price version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    /// Provider name or `*`.
    pub provider: String,
    /// Provider model name as served.
    pub model: String,
    /// First UTC day the price applies.
    pub effective_from: Date,
    /// The rates.
    pub rates: Rates,
}

/// Every known price version, indexed by (provider, model), each list sorted by date.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    by_key: HashMap<(String, String), Vec<(Date, Rates)>>,
}

impl PriceBook {
    /// Builds the book from price versions.
    pub fn new(prices: impl IntoIterator<Item = Price>) -> Self {
        let mut by_key: HashMap<(String, String), Vec<(Date, Rates)>> = HashMap::new();
        for price in prices {
            by_key
                .entry((price.provider, price.model))
                .or_default()
                .push((price.effective_from, price.rates));
        }
        for versions in by_key.values_mut() {
            versions.sort_by_key(|(date, _)| *date);
        }
        PriceBook { by_key }
    }

    /// The rates for `model` served by `provider` at `at`, if any.
    pub fn lookup(&self, provider: &str, model: &str, at: OffsetDateTime) -> Option<Rates> {
        let day = at.to_offset(time::UtcOffset::UTC).date();
        self.latest(provider, model, day)
            .or_else(|| self.latest(ANY_PROVIDER, model, day))
    }

    fn latest(&self, provider: &str, model: &str, day: Date) -> Option<Rates> {
        let versions = self.by_key.get(&(provider.to_owned(), model.to_owned()))?;
        versions
            .iter()
            .rev()
            .find(|(from, _)| *from <= day)
            .map(|(_, rates)| *rates)
    }

    /// Number of price versions.
    pub fn len(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }

    /// Whether there is no price at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::money::Rate;
    use time::macros::{date, datetime};

    fn price(provider: &str, model: &str, from: Date, input: i64) -> Price {
        let rate = Rate(input);
        Price {
            provider: provider.into(),
            model: model.into(),
            effective_from: from,
            rates: Rates {
                input: rate,
                cached_input: rate,
                output: rate,
            },
        }
    }

    #[test]
    fn latest_effective_version_wins_and_provider_beats_wildcard() {
        let book = PriceBook::new([
            price("*", "m", date!(2024 - 01 - 01), 1),
            price("*", "m", date!(2024 - 06 - 01), 2),
            price("azure", "m", date!(2024 - 03 - 01), 10),
        ]);
        let input = |provider: &str, at| book.lookup(provider, "m", at).map(|r| r.input.0);
        assert_eq!(input("openai", datetime!(2023-12-31 23:59:59 UTC)), None);
        assert_eq!(input("openai", datetime!(2024-01-01 00:00 UTC)), Some(1));
        assert_eq!(input("openai", datetime!(2024-06-01 00:00 UTC)), Some(2));
        assert_eq!(input("azure", datetime!(2024-02-01 00:00 UTC)), Some(1));
        assert_eq!(input("azure", datetime!(2024-03-01 00:00 UTC)), Some(10));
        assert_eq!(input("azure", datetime!(2024-07-01 00:00 UTC)), Some(10));
        // Dates are UTC days: 2024-05-31 23:30 -02:00 is 2024-06-01 01:30 UTC.
        assert_eq!(input("openai", datetime!(2024-05-31 23:30 -2)), Some(2));
        assert_eq!(
            book.lookup("openai", "other", datetime!(2024-07-01 00:00 UTC)),
            None
        );
    }
}
