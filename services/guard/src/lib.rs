//! Switchboard guard: finds personal data and secrets in prompts and answers (email, phone, card,
//! SSN, IBAN, IP address, URL credentials, cloud/API keys, private keys, JWTs, and by dictionaries
//! and rules names, street addresses and locations) on a normalised view of the text, and allows,
//! redacts, masks, hashes, pseudonymises or blocks them per app, entity type and direction; scores
//! prompt injection ([`injection`]) and matches content-filter topics ([`content`]), flagged or
//! blocked per route (`switchboard.guard.v1.GuardService`). [`eval`] measures it on labelled data.
//!
//! Recognisers implement [`recognizer::Recognizer`]; findings never carry the matched value, and
//! nothing here logs prompt text. [`pseudonym::restore`] and [`pseudonym::Restorer`] put
//! pseudonymised values back into an answer (whole or streamed).

pub mod admission;
mod app;
pub mod audit;
mod config;
pub mod content;
mod error;
pub mod eval;
mod grpc;
mod guard;
pub mod injection;
mod metrics;
pub mod normalize;
mod policy;
pub mod pseudonym;
pub mod recognizer;
mod route;
mod transform;

pub use app::App;
pub use audit::AuditConfig;
pub use config::{AppPolicyConfig, Config, DEFAULT_INJECTION_THRESHOLD, HashSecret, MaskConfig};
pub use content::TopicConfig;
pub use error::StartupError;
pub use guard::{DETECTOR_VERSION_PREFIX, Decision, Finding, FindingKind, Guard, Outcome};
pub use policy::{Action, Direction};
pub use route::RoutePolicyConfig;
