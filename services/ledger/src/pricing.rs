//! Price selection: the latest price effective on the event's (UTC) date for the serving provider
//! and model. Configured prices (`[[ledger.prices]]`) win over imported ones (LiteLLM's map), and
//! within each source a provider-specific price wins over the `*` wildcard.

use std::collections::HashMap;

use time::{Date, OffsetDateTime};

use crate::money::{Pricing, Rates, Tier};

/// Provider wildcard.
pub const ANY_PROVIDER: &str = "*";

/// Where a price version comes from; configured prices override imported ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PriceSource {
    /// `[[ledger.prices]]`.
    Config,
    /// `switchboard prices import` of LiteLLM's `model_prices_and_context_window.json`.
    Litellm,
}

impl PriceSource {
    /// Database text.
    pub fn as_str(self) -> &'static str {
        match self {
            PriceSource::Config => "config",
            PriceSource::Litellm => "litellm",
        }
    }

    /// From database text.
    pub fn from_db(text: &str) -> Option<PriceSource> {
        match text {
            "config" => Some(PriceSource::Config),
            "litellm" => Some(PriceSource::Litellm),
            _ => None,
        }
    }
}

/// One price version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    /// Provider name or `*`.
    pub provider: String,
    /// Provider model name as served.
    pub model: String,
    /// First UTC day the price applies.
    pub effective_from: Date,
    /// Where it comes from.
    pub source: PriceSource,
    /// The base rates.
    pub rates: Rates,
    /// The large-prompt tier, if any.
    pub tier: Option<Tier>,
}

impl Price {
    /// A configured, untiered price.
    pub fn configured(provider: &str, model: &str, effective_from: Date, rates: Rates) -> Price {
        Price {
            provider: provider.to_owned(),
            model: model.to_owned(),
            effective_from,
            source: PriceSource::Config,
            rates,
            tier: None,
        }
    }

    /// The pricing of this version.
    pub fn pricing(&self) -> Pricing {
        Pricing {
            base: self.rates,
            tier: self.tier,
        }
    }
}

type Key = (PriceSource, String, String);

/// Every known price version, indexed by (source, provider, model), each list sorted by date.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    by_key: HashMap<Key, Vec<(Date, Pricing)>>,
}

impl PriceBook {
    /// Builds the book from price versions.
    pub fn new(prices: impl IntoIterator<Item = Price>) -> Self {
        let mut by_key: HashMap<Key, Vec<(Date, Pricing)>> = HashMap::new();
        for price in prices {
            let pricing = price.pricing();
            by_key
                .entry((price.source, price.provider, price.model))
                .or_default()
                .push((price.effective_from, pricing));
        }
        for versions in by_key.values_mut() {
            versions.sort_by_key(|(date, _)| *date);
        }
        PriceBook { by_key }
    }

    /// The pricing of `model` served by `provider` at `at`, if any: configured (provider, then
    /// `*`), else imported (provider, then `*`).
    pub fn lookup(&self, provider: &str, model: &str, at: OffsetDateTime) -> Option<Pricing> {
        let day = at.to_offset(time::UtcOffset::UTC).date();
        [PriceSource::Config, PriceSource::Litellm]
            .into_iter()
            .find_map(|source| {
                self.latest(source, provider, model, day)
                    .or_else(|| self.latest(source, ANY_PROVIDER, model, day))
            })
    }

    fn latest(
        &self,
        source: PriceSource,
        provider: &str,
        model: &str,
        day: Date,
    ) -> Option<Pricing> {
        let versions = self
            .by_key
            .get(&(source, provider.to_owned(), model.to_owned()))?;
        versions
            .iter()
            .rev()
            .find(|(from, _)| *from <= day)
            .map(|(_, pricing)| *pricing)
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
        Price::configured(provider, model, from, Rates::flat(rate, rate, rate))
    }

    #[test]
    fn latest_effective_version_wins_and_provider_beats_wildcard() {
        let book = PriceBook::new([
            price("*", "m", date!(2024 - 01 - 01), 1),
            price("*", "m", date!(2024 - 06 - 01), 2),
            price("azure", "m", date!(2024 - 03 - 01), 10),
        ]);
        let input = |provider: &str, at| book.lookup(provider, "m", at).map(|p| p.base.input.0);
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

    #[test]
    fn configured_prices_override_imported_ones() {
        let imported = |provider: &str, input: i64| Price {
            source: PriceSource::Litellm,
            ..price(provider, "m", date!(2025 - 01 - 01), input)
        };
        let book = PriceBook::new([
            imported("*", 1),
            imported("anthropic", 2),
            price("*", "m", date!(2024 - 01 - 01), 10),
        ]);
        let input = |provider: &str| {
            book.lookup(provider, "m", datetime!(2025-06-01 00:00 UTC))
                .map(|p| p.base.input.0)
        };
        // The configured wildcard wins over an imported provider-specific price.
        assert_eq!(input("anthropic"), Some(10));
        assert_eq!(input("openai"), Some(10));
        let only_imported = PriceBook::new([imported("*", 1), imported("anthropic", 2)]);
        let input = |provider: &str| {
            only_imported
                .lookup(provider, "m", datetime!(2025-06-01 00:00 UTC))
                .map(|p| p.base.input.0)
        };
        assert_eq!(input("anthropic"), Some(2));
        assert_eq!(input("openai"), Some(1));
        assert_eq!(
            only_imported.lookup("openai", "m", datetime!(2024-12-31 23:59 UTC)),
            None
        );
    }
}
