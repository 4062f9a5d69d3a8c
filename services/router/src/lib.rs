//! Switchboard router: owns provider connections and secrets, and serves each chat request through
//! its route's ordered fallback chain of provider targets, with retries, timeouts and failover.

mod app;
mod balance;
mod breaker;
mod config;
mod error;
mod grpc;
mod metrics;
mod provider;
mod reload;
mod route_config;
mod routing;
mod strategy;

pub use app::{App, StartupError};
pub use config::{
    BreakerConfig, Config, KeyConfig, ProviderConfig, ProviderKind, RouteConfig, RuleConfig,
    Strategy, TargetConfig,
};
pub use error::RouterError;
pub use provider::ProviderError;
pub use reload::Reloader;
