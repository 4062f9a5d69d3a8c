//! Switchboard cache: an exact-match response cache (`switchboard.cache.v1.CacheService`).
//!
//! Keys are computed here from everything that changes the answer ([`key`]); entries live in a
//! [`store::CacheStore`] (bounded in memory by default) with a per-entry TTL. Only complete answers
//! are stored. Prompt text is never logged: only the key prefix, the app and the model.

mod app;
mod cache;
mod config;
mod error;
mod grpc;
pub mod key;
mod metrics;
pub mod replication;
pub mod semantic;
pub mod store;

pub use app::App;
pub use config::Config;
pub use error::StartupError;
