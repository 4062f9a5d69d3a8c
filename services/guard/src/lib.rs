//! Switchboard guard: finds PII (email addresses, payment cards) in prompts and allows, redacts or
//! blocks them per app policy (`switchboard.guard.v1.GuardService`).
//!
//! Recognisers implement [`recognizer::Recognizer`]; findings never carry the matched value, and
//! nothing here logs prompt text.

mod app;
mod config;
mod error;
mod grpc;
mod guard;
mod policy;
pub mod recognizer;

pub use app::App;
pub use config::{AppPolicyConfig, Config};
pub use error::StartupError;
