//! Switchboard router: owns provider connections and secrets, and serves each chat request through
//! its route's ordered fallback chain of provider targets, with retries, timeouts and failover.

mod app;
mod config;
mod error;
mod grpc;
mod provider;
mod routing;

pub use app::{App, StartupError};
pub use config::{Config, ProviderConfig, ProviderKind, RouteConfig, TargetConfig};
pub use error::RouterError;
pub use provider::ProviderError;
