//! Switchboard ledger: consumes usage events from JetStream, prices them with integer money, records
//! exactly one Postgres row per request, and answers finance over gRPC (`LedgerService`).

mod app;
mod audit;
mod budget;
mod budget_grpc;
mod config;
mod config_reload;
mod consumer;
mod error;
mod grpc;
mod health;
mod litellm;
mod metrics;
mod money;
mod partitions;
pub mod prices;
mod pricing;
mod record;
mod reload;
mod repo;
mod spend;
mod unpriced;

pub use app::{App, SERVICE_NAME};
pub use config::{BudgetConfig, Config, PriceConfig};
pub use error::StartupError;

/// Building blocks exposed for tests and tooling (price parsing, cost maths, the repository).
pub mod internals {
    pub use crate::{
        audit::{AuditRow, insert as insert_audit, row_of as audit_row_of},
        budget::{Applied, BudgetError, DECLARED_ID_PREFIX, declared_id},
        consumer::{ConsumerSettings, consumer_config},
        litellm::{Note, Parsed, parse as parse_litellm},
        money::{
            CostOverflow, PerTokenRate, PriceParseError, Pricing, Rate, Rates, Tier, Tokens,
            cost_nanos, parse_usd_per_token,
        },
        partitions::{ANALYZE_FIRST_ROWS, Maintenance, Partitions, analyze_due, month_start},
        pricing::{ANY_PROVIDER, Price, PriceBook, PriceSource},
        record::{AttemptUsage, Rejected, UsageRow, price_event},
        repo::{ImportMeta, RepoError, Repository, Spend, Unpriced},
        spend::{
            Dimension, Filter, Group, Measures, Plan, Source, SpendAnswer, SpendQuery,
            plan as spend_plan, query as query_spend,
        },
    };
}
