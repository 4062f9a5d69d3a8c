//! Switchboard ledger: consumes usage events from JetStream, prices them with integer money, records
//! exactly one Postgres row per request, and answers finance over gRPC (`LedgerService`).

mod app;
mod config;
mod consumer;
mod error;
mod grpc;
mod money;
mod pricing;
mod record;
mod repo;

pub use app::{App, SERVICE_NAME};
pub use config::{Config, PriceConfig};
pub use error::StartupError;

/// Building blocks exposed for tests and tooling (price parsing, cost maths, the repository).
pub mod internals {
    pub use crate::{
        consumer::{ConsumerSettings, consumer_config},
        money::{CostOverflow, PriceParseError, Rate, Rates, Tokens, cost_nanos},
        pricing::{ANY_PROVIDER, Price, PriceBook},
        record::{Rejected, UsageRow, price_event},
        repo::{RepoError, Repository, Spend},
    };
}
