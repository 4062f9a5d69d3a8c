//! The `[ledger]` configuration section.

use std::{collections::HashSet, net::SocketAddr};

use serde::Deserialize;
use switchboard_config::ConfigError;
use time::Date;

use crate::{
    money::{Rate, Rates},
    pricing::Price,
};

/// `[ledger]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC listen address (`127.0.0.1:0` picks a free port).
    pub grpc_addr: String,
    /// Postgres URL; the database is created when it does not exist.
    pub database_url: String,
    /// Pool size.
    pub max_connections: u32,
    /// Durable JetStream pull consumer name.
    pub consumer_name: String,
    /// Messages fetched and inserted per transaction, at most (two batches are in flight at a time:
    /// one committing while the next is fetched and priced, or both committing).
    pub batch_size: usize,
    /// After the first message of a batch arrives, how long to wait for more before inserting
    /// (milliseconds; 0: insert at once). A short linger turns a trickle of events into batches,
    /// so that a moderate rate does not cost a fetch, a transaction and an ack round per event.
    pub linger_ms: u64,
    /// JetStream ack wait: an unacknowledged message is redelivered after this long.
    pub ack_wait_secs: u64,
    /// How often the price table is re-read (seconds; 0: only at start), so that an import or
    /// another replica's configuration takes effect without a restart.
    pub price_reload_secs: u64,
    /// Prometheus `/metrics` listen address (unpriced usage, price reloads); none when unset.
    pub metrics_addr: Option<String>,
    /// Months of raw usage rows kept: monthly partitions that ended before the first day of the
    /// month `retention_months` months ago are dropped (0: keep forever). Rollups are kept.
    pub retention_months: u32,
    /// Monthly partitions created ahead of the current month.
    pub partitions_ahead: u32,
    /// How often partitions are created ahead and retention runs (seconds).
    pub partition_maintenance_secs: u64,
    /// Prices, USD per million tokens, versioned by `effective_from`. They override imported prices.
    pub prices: Vec<PriceConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_addr: "127.0.0.1:50055".to_owned(),
            database_url: "postgres://postgres@127.0.0.1:5432/switchboard".to_owned(),
            max_connections: 8,
            consumer_name: "ledger".to_owned(),
            batch_size: 2_000,
            linger_ms: 20,
            ack_wait_secs: 30,
            price_reload_secs: 30,
            metrics_addr: None,
            retention_months: 0,
            partitions_ahead: 3,
            partition_maintenance_secs: 3600,
            prices: Vec::new(),
        }
    }
}

/// `[[ledger.prices]]`: decimal strings, never floats.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Provider model name as served (`RouteInfo.model`).
    pub model: String,
    /// A provider name, or `*` for any.
    #[serde(default = "any_provider")]
    pub provider: String,
    /// USD per million uncached input tokens.
    pub input: String,
    /// USD per million cached input tokens (default: `input`).
    #[serde(default)]
    pub cached_input: Option<String>,
    /// USD per million input tokens written to the provider's prompt cache (default: `input`).
    #[serde(default)]
    pub cache_write: Option<String>,
    /// USD per million output tokens.
    pub output: String,
    /// USD per million reasoning tokens (default: `output`).
    #[serde(default)]
    pub reasoning: Option<String>,
    /// First day (UTC) the price applies, `YYYY-MM-DD` (default 1970-01-01).
    #[serde(default)]
    pub effective_from: Option<String>,
}

fn any_provider() -> String {
    crate::pricing::ANY_PROVIDER.to_owned()
}

const DATE_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

impl Config {
    /// Checks every field; errors name the field by its dotted path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.grpc_addr.parse::<SocketAddr>().map_err(|e| {
            ConfigError::invalid("ledger.grpc_addr", format!("not a socket address: {e}"))
        })?;
        if !(self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return Err(ConfigError::invalid(
                "ledger.database_url",
                "must be a postgres:// URL",
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "ledger.max_connections",
                "must be at least 1",
            ));
        }
        if self.consumer_name.is_empty()
            || !self
                .consumer_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::invalid(
                "ledger.consumer_name",
                "must be non-empty and contain only letters, digits, '-' and '_'",
            ));
        }
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(ConfigError::invalid(
                "ledger.batch_size",
                "must be between 1 and 10000",
            ));
        }
        if self.linger_ms > 5_000 {
            return Err(ConfigError::invalid(
                "ledger.linger_ms",
                "must be at most 5000 (milliseconds)",
            ));
        }
        if self.ack_wait_secs == 0 {
            return Err(ConfigError::invalid(
                "ledger.ack_wait_secs",
                "must be at least 1",
            ));
        }
        if self.price_reload_secs > 86_400 {
            return Err(ConfigError::invalid(
                "ledger.price_reload_secs",
                "must be at most 86400 (seconds; 0: only at start)",
            ));
        }
        if self.retention_months > 1200 {
            return Err(ConfigError::invalid(
                "ledger.retention_months",
                "must be at most 1200 (months; 0: keep forever)",
            ));
        }
        if self.partitions_ahead > 24 {
            return Err(ConfigError::invalid(
                "ledger.partitions_ahead",
                "must be at most 24",
            ));
        }
        if self.partition_maintenance_secs == 0 || self.partition_maintenance_secs > 86_400 {
            return Err(ConfigError::invalid(
                "ledger.partition_maintenance_secs",
                "must be between 1 and 86400 (seconds)",
            ));
        }
        if let Some(addr) = &self.metrics_addr {
            addr.parse::<SocketAddr>().map_err(|e| {
                ConfigError::invalid("ledger.metrics_addr", format!("not a socket address: {e}"))
            })?;
        }
        self.parsed_prices().map(|_| ())
    }

    /// The configured prices, parsed and checked (no duplicate provider/model/effective_from).
    pub(crate) fn parsed_prices(&self) -> Result<Vec<Price>, ConfigError> {
        let mut seen = HashSet::new();
        let mut prices = Vec::with_capacity(self.prices.len());
        for (i, price) in self.prices.iter().enumerate() {
            let path = |field: &str| format!("ledger.prices[{i}].{field}");
            if price.model.trim().is_empty() {
                return Err(ConfigError::invalid(path("model"), "must not be empty"));
            }
            if price.provider.trim().is_empty() {
                return Err(ConfigError::invalid(
                    path("provider"),
                    "must not be empty (use \"*\" for any)",
                ));
            }
            let rate = |field: &str, text: &str| {
                Rate::parse(text)
                    .map_err(|e| ConfigError::invalid(path(field), format!("{e}: {text:?}")))
            };
            let input = rate("input", &price.input)?;
            let cached_input = match &price.cached_input {
                Some(text) => rate("cached_input", text)?,
                None => input,
            };
            let cache_write = match &price.cache_write {
                Some(text) => rate("cache_write", text)?,
                None => input,
            };
            let output = rate("output", &price.output)?;
            let reasoning = match &price.reasoning {
                Some(text) => rate("reasoning", text)?,
                None => output,
            };
            let effective_from = match &price.effective_from {
                Some(text) => Date::parse(text, DATE_FORMAT).map_err(|e| {
                    ConfigError::invalid(
                        path("effective_from"),
                        format!("not a YYYY-MM-DD date: {e}"),
                    )
                })?,
                None => Date::from_calendar_date(1970, time::Month::January, 1)
                    .map_err(|e| ConfigError::invalid(path("effective_from"), e.to_string()))?,
            };
            if !seen.insert((price.provider.clone(), price.model.clone(), effective_from)) {
                return Err(ConfigError::invalid(
                    path("effective_from"),
                    format!(
                        "duplicate price for provider {:?} model {:?} effective {effective_from}",
                        price.provider, price.model
                    ),
                ));
            }
            prices.push(Price::configured(
                &price.provider,
                &price.model,
                effective_from,
                Rates {
                    input,
                    cached_input,
                    cache_write,
                    output,
                    reasoning,
                },
            ));
        }
        Ok(prices)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use switchboard_config::Source;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = Source::from_toml(text)?.section("ledger")?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn parses_the_documented_example() {
        let config = parse(
            r#"
            [ledger]
            grpc_addr = "127.0.0.1:50055"
            database_url = "postgres://postgres@127.0.0.1:5432/switchboard"
            max_connections = 8
            consumer_name = "ledger"
            batch_size = 200
            ack_wait_secs = 30
            [[ledger.prices]]
            model = "gpt-4o-mini"
            provider = "*"
            input = "0.15"
            cached_input = "0.075"
            output = "0.60"
            effective_from = "2024-01-01"
            [[ledger.prices]]
            model = "claude"
            input = "3"
            output = "15"
            [[ledger.prices]]
            model = "claude-sonnet-4-5"
            provider = "anthropic"
            input = "3"
            cached_input = "0.30"
            cache_write = "3.75"
            output = "15"
            reasoning = "15"
            "#,
        )
        .unwrap();
        let prices = config.parsed_prices().unwrap();
        assert_eq!(prices[0].rates.input, Rate(150_000_000));
        assert_eq!(prices[0].rates.cached_input, Rate(75_000_000));
        assert_eq!(prices[0].effective_from.to_string(), "2024-01-01");
        assert_eq!(prices[1].provider, "*");
        assert_eq!(prices[1].rates.cached_input, prices[1].rates.input);
        assert_eq!(prices[1].effective_from.to_string(), "1970-01-01");
        assert_eq!(prices[1].rates.cache_write, prices[1].rates.input);
        assert_eq!(prices[1].rates.reasoning, prices[1].rates.output);
        assert_eq!(prices[2].rates.cache_write, Rate(3_750_000_000));
        assert_eq!(prices[2].rates.reasoning, Rate(15_000_000_000));
    }

    #[test]
    fn floats_are_rejected_with_the_field_path() {
        let error = parse("[[ledger.prices]]\nmodel = \"m\"\ninput = 0.15\noutput = \"1\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("ledger.prices[0].input"), "{error}");
    }

    #[test]
    fn bad_prices_name_their_field() {
        let cases = [
            ("input = \"-1\"\noutput = \"1\"", "ledger.prices[0].input"),
            (
                "input = \"1\"\noutput = \"0.0000000001\"",
                "ledger.prices[0].output",
            ),
            (
                "input = \"1\"\noutput = \"1\"\ncached_input = \"x\"",
                "ledger.prices[0].cached_input",
            ),
            (
                "input = \"1\"\noutput = \"1\"\ncache_write = \"-1\"",
                "ledger.prices[0].cache_write",
            ),
            (
                "input = \"1\"\noutput = \"1\"\nreasoning = \"1e-6\"",
                "ledger.prices[0].reasoning",
            ),
            (
                "input = \"1\"\noutput = \"1\"\neffective_from = \"2024-13-01\"",
                "ledger.prices[0].effective_from",
            ),
        ];
        for (body, path) in cases {
            let error = parse(&format!("[[ledger.prices]]\nmodel = \"m\"\n{body}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(path), "{body}: {error}");
        }
    }

    #[test]
    fn duplicate_versions_are_rejected() {
        let one = "[[ledger.prices]]\nmodel = \"m\"\ninput = \"1\"\noutput = \"1\"\neffective_from = \"2024-01-01\"\n";
        let error = parse(&format!("{one}{one}")).unwrap_err().to_string();
        assert!(error.contains("ledger.prices[1]"), "{error}");
    }

    #[test]
    fn other_fields_are_checked() {
        for (toml, path) in [
            ("grpc_addr = \"nope\"", "ledger.grpc_addr"),
            ("database_url = \"mysql://x\"", "ledger.database_url"),
            ("max_connections = 0", "ledger.max_connections"),
            ("consumer_name = \"a.b\"", "ledger.consumer_name"),
            ("batch_size = 0", "ledger.batch_size"),
            ("linger_ms = 60000", "ledger.linger_ms"),
            ("ack_wait_secs = 0", "ledger.ack_wait_secs"),
            ("price_reload_secs = 100000", "ledger.price_reload_secs"),
            ("metrics_addr = \"nope\"", "ledger.metrics_addr"),
            ("retention_months = 5000", "ledger.retention_months"),
            ("partitions_ahead = 100", "ledger.partitions_ahead"),
            (
                "partition_maintenance_secs = 0",
                "ledger.partition_maintenance_secs",
            ),
            ("unknown = 1", "unknown"),
        ] {
            let error = parse(&format!("[ledger]\n{toml}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(path), "{toml}: {error}");
        }
    }
}
