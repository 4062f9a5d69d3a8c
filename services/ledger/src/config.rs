//! The `[ledger]` configuration section.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use serde::Deserialize;
use switchboard_config::ConfigError;
use time::{Date, OffsetDateTime};

use crate::{
    budget::{Budget, BudgetError, Period, ScopeKind, declared_id},
    money::{MAX_USD_PER_MTOK, PriceParseError, Rate, Rates},
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
    /// one committing while the next is fetched and priced, or both committing). A gateway's
    /// message holds many events (ADR 009); a fetch is also bounded to ~`batch_size` × 512 bytes.
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
    /// How often the database is checked (`SELECT 1`) for the ledger's gRPC health (milliseconds):
    /// NOT_SERVING while Postgres cannot be reached, so the gateways' `/readyz` sees the ledger down.
    pub db_check_ms: u64,
    /// How often the configuration file's modification time is checked for a reload (milliseconds;
    /// SIGHUP always reloads); 0: only on SIGHUP. A reload applies `prices` and `budgets`; the
    /// other settings of `[ledger]`, this one included, take effect at the next start.
    pub config_poll_ms: u64,
    /// Months of raw usage rows kept: monthly partitions that ended before the first day of the
    /// month `retention_months` months ago are dropped (0: keep forever). Rollups are kept.
    pub retention_months: u32,
    /// Monthly partitions created ahead of the current month.
    pub partitions_ahead: u32,
    /// How often partitions are created ahead and retention runs (seconds).
    pub partition_maintenance_secs: u64,
    /// Prices, USD per million tokens, versioned by `effective_from`. They override imported prices.
    pub prices: Vec<PriceConfig>,
    /// Budgets declared in configuration, at most one per scope, upserted at every start and
    /// every configuration reload (see [`BudgetConfig`]). Budgets created through `BudgetService`
    /// are not affected.
    pub budgets: Vec<BudgetConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_addr: "127.0.0.1:50055".to_owned(),
            database_url: "postgres://postgres@127.0.0.1:5432/switchboard".to_owned(),
            max_connections: 8,
            consumer_name: "ledger".to_owned(),
            batch_size: 2_000,
            linger_ms: 100,
            ack_wait_secs: 30,
            price_reload_secs: 30,
            metrics_addr: None,
            db_check_ms: 5_000,
            config_poll_ms: 5_000,
            retention_months: 0,
            partitions_ahead: 3,
            partition_maintenance_secs: 3600,
            prices: Vec::new(),
            budgets: Vec::new(),
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

/// `[[ledger.budgets]]`: a budget declared in configuration, identified by its scope (`scope` and
/// `id`). Its budget id is derived from the scope (`config.team.team-1`, `config.org`; see
/// `budget::declared_id`). Its settings are owned by the configuration: at every ledger start and
/// configuration reload the budget is created when missing and updated when its stored limit,
/// period, time zone, enforcement or thresholds differ, so an `UpdateBudget` of it lasts only
/// until the next start or reload.
/// The rules are those of `CreateBudget` (`Budget::validate`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// `key`, `app`, `team` or `org`.
    pub scope: String,
    /// The key id, app or team; empty (omitted) for `org`.
    #[serde(default)]
    pub id: String,
    /// Limit per period in USD, an exact decimal string (`"250"`, `"0.50"`; at most 9 decimals and
    /// at most 1,000,000 USD). Exactly one of `limit_usd` and `limit_usd_nanos`.
    #[serde(default)]
    pub limit_usd: Option<String>,
    /// Limit per period in nano-USD, an integer (for limits above 1,000,000 USD).
    #[serde(default)]
    pub limit_usd_nanos: Option<i64>,
    /// `day`, `week` (Monday first), `month` or `lifetime`.
    pub period: String,
    /// IANA time zone of the calendar periods (e.g. `Europe/Berlin`); empty or omitted: UTC.
    #[serde(default)]
    pub time_zone: String,
    /// `hard` (requests that do not fit are refused; the default) or `soft` (alerts only).
    #[serde(default = "hard_enforcement")]
    pub enforcement: String,
    /// Alert thresholds, percent of the limit (1–1000), each published once per period.
    #[serde(default)]
    pub alert_thresholds_pct: Vec<u32>,
}

fn hard_enforcement() -> String {
    "hard".to_owned()
}

/// A budget limit in USD as an exact decimal string → nano-USD, with the price parser
/// (`Rate::parse`: same digits, same nano-USD precision, same upper bound).
fn limit_nanos(text: &str) -> Result<i64, String> {
    Rate::parse(text)
        .map(|rate| rate.0)
        .map_err(|error| match error {
            PriceParseError::Negative => "must not be negative".to_owned(),
            PriceParseError::TooPrecise => {
                format!("{text:?} has more than 9 decimals (finer than a nano-USD)")
            }
            PriceParseError::TooLarge => format!(
                "{text:?} exceeds {MAX_USD_PER_MTOK} USD; give larger limits as limit_usd_nanos"
            ),
            PriceParseError::Empty | PriceParseError::Malformed => format!(
                "{text:?} is not a decimal string of USD like \"250\" or \"0.50\" (never a float)"
            ),
        })
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
        if !(100..=600_000).contains(&self.db_check_ms) {
            return Err(ConfigError::invalid(
                "ledger.db_check_ms",
                "must be between 100 and 600000 (milliseconds)",
            ));
        }
        if self.config_poll_ms > 86_400_000 {
            return Err(ConfigError::invalid(
                "ledger.config_poll_ms",
                "must be at most 86400000 (milliseconds; 0: only on SIGHUP)",
            ));
        }
        if let Some(addr) = &self.metrics_addr {
            addr.parse::<SocketAddr>().map_err(|e| {
                ConfigError::invalid("ledger.metrics_addr", format!("not a socket address: {e}"))
            })?;
        }
        self.parsed_prices()?;
        self.parsed_budgets()?;
        Ok(())
    }

    /// The settings that differ between `self` (the running configuration) and `new` and take
    /// effect only at the next start: every field but `prices` and `budgets`, by dotted path.
    pub(crate) fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        // Destructured, so that a new field must be classified here.
        let Config {
            grpc_addr,
            database_url,
            max_connections,
            consumer_name,
            batch_size,
            linger_ms,
            ack_wait_secs,
            price_reload_secs,
            metrics_addr,
            db_check_ms,
            config_poll_ms,
            retention_months,
            partitions_ahead,
            partition_maintenance_secs,
            prices: _,
            budgets: _,
        } = self;
        [
            ("ledger.grpc_addr", *grpc_addr != new.grpc_addr),
            ("ledger.database_url", *database_url != new.database_url),
            (
                "ledger.max_connections",
                *max_connections != new.max_connections,
            ),
            ("ledger.consumer_name", *consumer_name != new.consumer_name),
            ("ledger.batch_size", *batch_size != new.batch_size),
            ("ledger.linger_ms", *linger_ms != new.linger_ms),
            ("ledger.ack_wait_secs", *ack_wait_secs != new.ack_wait_secs),
            (
                "ledger.price_reload_secs",
                *price_reload_secs != new.price_reload_secs,
            ),
            ("ledger.metrics_addr", *metrics_addr != new.metrics_addr),
            ("ledger.db_check_ms", *db_check_ms != new.db_check_ms),
            (
                "ledger.config_poll_ms",
                *config_poll_ms != new.config_poll_ms,
            ),
            (
                "ledger.retention_months",
                *retention_months != new.retention_months,
            ),
            (
                "ledger.partitions_ahead",
                *partitions_ahead != new.partitions_ahead,
            ),
            (
                "ledger.partition_maintenance_secs",
                *partition_maintenance_secs != new.partition_maintenance_secs,
            ),
        ]
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect()
    }

    /// The declared budgets (`[[ledger.budgets]]`), checked by `Budget::validate` (the rules of
    /// `CreateBudget`) with errors at the entry's field, and no scope declared twice.
    pub(crate) fn parsed_budgets(&self) -> Result<Vec<Budget>, ConfigError> {
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        let mut budgets = Vec::with_capacity(self.budgets.len());
        for (i, entry) in self.budgets.iter().enumerate() {
            let path = |field: &str| format!("ledger.budgets[{i}].{field}");
            let kind = ScopeKind::parse(&entry.scope).ok_or_else(|| {
                ConfigError::invalid(
                    path("scope"),
                    format!(
                        "unknown scope {:?}: must be key, app, team or org",
                        entry.scope
                    ),
                )
            })?;
            let period = Period::parse(&entry.period).ok_or_else(|| {
                ConfigError::invalid(
                    path("period"),
                    format!(
                        "unknown period {:?}: must be day, week, month or lifetime",
                        entry.period
                    ),
                )
            })?;
            let hard = match entry.enforcement.as_str() {
                "hard" => true,
                "soft" => false,
                other => {
                    return Err(ConfigError::invalid(
                        path("enforcement"),
                        format!("unknown enforcement {other:?}: must be hard or soft"),
                    ));
                }
            };
            let (limit, limit_field) = match (&entry.limit_usd, entry.limit_usd_nanos) {
                (Some(text), None) => (
                    limit_nanos(text).map_err(|m| ConfigError::invalid(path("limit_usd"), m))?,
                    "limit_usd",
                ),
                (None, Some(nanos)) => (nanos, "limit_usd_nanos"),
                (None, None) => {
                    return Err(ConfigError::invalid(
                        path("limit_usd"),
                        "required (or limit_usd_nanos)",
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        path("limit_usd_nanos"),
                        "give either limit_usd or limit_usd_nanos, not both",
                    ));
                }
            };
            let mut budget = Budget {
                id: declared_id(kind, &entry.id),
                kind,
                scope_id: entry.id.clone(),
                period,
                time_zone: entry.time_zone.clone(),
                limit,
                hard,
                thresholds: entry.alert_thresholds_pct.clone(),
                created_at: OffsetDateTime::UNIX_EPOCH,
                updated_at: OffsetDateTime::UNIX_EPOCH,
            };
            budget.validate().map_err(|error| match error {
                BudgetError::InvalidArgument { field, message } => {
                    let field = match field {
                        "budget.time_zone" => "time_zone",
                        "budget.limit_usd_nanos" => limit_field,
                        "budget.alert_thresholds_pct" => "alert_thresholds_pct",
                        // The scope id and the budget id derived from it.
                        _ => "id",
                    };
                    ConfigError::invalid(path(field), message)
                }
                other => ConfigError::invalid(format!("ledger.budgets[{i}]"), other.to_string()),
            })?;
            if let Some(first) = seen.insert((kind.as_str(), entry.id.as_str()), i) {
                let field = if entry.id.is_empty() { "scope" } else { "id" };
                return Err(ConfigError::invalid(
                    path(field),
                    format!(
                        "duplicate budget for scope {}:{} (also ledger.budgets[{first}]); \
                         declare at most one budget per scope",
                        kind.as_str(),
                        entry.id
                    ),
                ));
            }
            budgets.push(budget);
        }
        Ok(budgets)
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
            ("db_check_ms = 0", "ledger.db_check_ms"),
            ("config_poll_ms = 100000000", "ledger.config_poll_ms"),
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

    #[test]
    fn only_prices_and_budgets_change_without_a_restart() {
        let running = Config::default();
        let mut new = parse(&format!(
            "[ledger]\nbatch_size = 10\ndatabase_url = \"postgres://elsewhere/x\"\n\
             [[ledger.prices]]\nmodel = \"m\"\ninput = \"1\"\noutput = \"1\"\n{TEAM}limit_usd = \"1\"\n"
        ))
        .unwrap();
        assert_eq!(
            running.restart_only_changes(&new),
            vec!["ledger.database_url", "ledger.batch_size"]
        );
        new.batch_size = running.batch_size;
        new.database_url = running.database_url.clone();
        assert!(running.restart_only_changes(&new).is_empty());
    }

    const TEAM: &str =
        "[[ledger.budgets]]\nscope = \"team\"\nid = \"team-1\"\nperiod = \"month\"\n";

    #[test]
    fn declared_budgets_parse_exactly() {
        let config = parse(
            r#"
            [[ledger.budgets]]
            scope = "team"
            id = "team-1"
            limit_usd = "250.75"
            period = "month"
            time_zone = "Europe/Berlin"
            enforcement = "hard"
            alert_thresholds_pct = [80, 50, 100]

            [[ledger.budgets]]
            scope = "org"
            limit_usd_nanos = 5000000000000000
            period = "lifetime"
            enforcement = "soft"

            [[ledger.budgets]]
            scope = "app"
            id = "chat app"
            limit_usd = "0.000000001"
            period = "day"
            "#,
        )
        .unwrap();
        let budgets = config.parsed_budgets().unwrap();
        assert_eq!(budgets.len(), 3);
        let team = &budgets[0];
        assert_eq!(team.id, "config.team.team-1");
        assert_eq!(
            (team.kind, team.scope_id.as_str()),
            (ScopeKind::Team, "team-1")
        );
        assert_eq!(team.limit, 250_750_000_000);
        assert_eq!(team.period, Period::Month);
        assert_eq!(team.time_zone, "Europe/Berlin");
        assert!(team.hard);
        assert_eq!(team.thresholds, vec![50, 80, 100]);
        let org = &budgets[1];
        assert_eq!(org.id, "config.org");
        assert_eq!((org.kind, org.scope_id.as_str()), (ScopeKind::Org, ""));
        assert_eq!(org.limit, 5_000_000_000_000_000);
        assert_eq!(org.period, Period::Lifetime);
        assert!(!org.hard);
        let app = &budgets[2];
        assert!(app.id.starts_with("config.app.sha256."), "{}", app.id);
        assert_eq!(app.limit, 1);
        assert_eq!(app.time_zone, "UTC", "empty time zone means UTC");
        assert!(app.hard, "enforcement defaults to hard");
        assert!(app.thresholds.is_empty());
    }

    #[test]
    fn bad_budgets_name_their_field() {
        let cases = [
            (
                "[[ledger.budgets]]\nscope = \"teams\"\nid = \"t\"\nperiod = \"day\"\nlimit_usd = \"1\"\n",
                "ledger.budgets[0].scope",
            ),
            (
                "[[ledger.budgets]]\nscope = \"org\"\nid = \"acme\"\nperiod = \"day\"\nlimit_usd = \"1\"\n",
                "ledger.budgets[0].id",
            ),
            (
                "[[ledger.budgets]]\nscope = \"team\"\nperiod = \"day\"\nlimit_usd = \"1\"\n",
                "ledger.budgets[0].id",
            ),
            (
                &format!("{TEAM}limit_usd = 250.5\n"),
                "ledger.budgets[0].limit_usd",
            ),
            (
                &format!("{TEAM}limit_usd = \"25O\"\n"),
                "ledger.budgets[0].limit_usd",
            ),
            (
                &format!("{TEAM}limit_usd = \"-1\"\n"),
                "ledger.budgets[0].limit_usd",
            ),
            (
                &format!("{TEAM}limit_usd = \"0.0000000001\"\n"),
                "ledger.budgets[0].limit_usd",
            ),
            (
                &format!("{TEAM}limit_usd = \"1000000.01\"\n"),
                "ledger.budgets[0].limit_usd",
            ),
            (&format!("{TEAM}\n"), "ledger.budgets[0].limit_usd"),
            (
                &format!("{TEAM}limit_usd_nanos = -5\n"),
                "ledger.budgets[0].limit_usd_nanos",
            ),
            (
                &format!("{TEAM}limit_usd = \"1\"\nlimit_usd_nanos = 1\n"),
                "ledger.budgets[0].limit_usd_nanos",
            ),
            (
                "[[ledger.budgets]]\nscope = \"team\"\nid = \"t\"\nperiod = \"quarter\"\nlimit_usd = \"1\"\n",
                "ledger.budgets[0].period",
            ),
            (
                &format!("{TEAM}limit_usd = \"1\"\ntime_zone = \"Mars/Olympus\"\n"),
                "ledger.budgets[0].time_zone",
            ),
            (
                &format!("{TEAM}limit_usd = \"1\"\nenforcement = \"strict\"\n"),
                "ledger.budgets[0].enforcement",
            ),
            (
                &format!("{TEAM}limit_usd = \"1\"\nalert_thresholds_pct = [50, 0]\n"),
                "ledger.budgets[0].alert_thresholds_pct",
            ),
            (
                &format!("{TEAM}limit_usd = \"1\"\nmax_budget = 3\n"),
                "ledger.budgets[0].max_budget",
            ),
            (
                "[[ledger.budgets]]\nscope = \"org\"\nlimit_usd = \"1\"\n",
                "missing field `period`",
            ),
        ];
        for (toml, path) in cases {
            let error = parse(toml).unwrap_err().to_string();
            assert!(error.contains(path), "{toml}: {error}");
        }
    }

    #[test]
    fn a_scope_is_declared_at_most_once() {
        let ok = "[[ledger.budgets]]\nscope = \"app\"\nid = \"team-1\"\nperiod = \"day\"\nlimit_usd = \"1\"\n";
        let team = format!("{TEAM}limit_usd = \"1\"\n");
        // The same id in another scope is another budget.
        parse(&format!("{team}{ok}")).unwrap();
        let error = parse(&format!("{team}{ok}{team}")).unwrap_err().to_string();
        assert!(error.contains("ledger.budgets[2].id"), "{error}");
        assert!(error.contains("ledger.budgets[0]"), "{error}");
        let org = "[[ledger.budgets]]\nscope = \"org\"\nperiod = \"day\"\nlimit_usd = \"1\"\n";
        let error = parse(&format!("{org}{org}")).unwrap_err().to_string();
        assert!(error.contains("ledger.budgets[1].scope"), "{error}");
    }

    #[test]
    fn the_commented_example_budgets_are_valid() {
        let example = include_str!("../../../deploy/switchboard.example.toml");
        let start = example.find("# [[ledger.budgets]]").unwrap();
        let text: Vec<&str> = example[start..]
            .lines()
            .take_while(|line| line.starts_with('#'))
            .map(|line| line.trim_start_matches('#').trim_start())
            .collect();
        let budgets = parse(&text.join("\n")).unwrap().parsed_budgets().unwrap();
        assert_eq!(budgets.len(), 2);
        assert_eq!(budgets[0].id, "config.team.team-1");
        assert_eq!(budgets[1].limit, 20_000_000_000_000);
    }
}
