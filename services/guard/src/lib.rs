//! Switchboard guard: finds personal data and secrets in prompts and answers (email, phone, card,
//! SSN, IBAN, IP address, URL credentials, cloud/API keys, private keys, JWTs) on a normalised
//! view of the text, and allows, redacts, masks, hashes, pseudonymises or blocks them per app,
//! entity type and direction (`switchboard.guard.v1.GuardService`).
//!
//! Recognisers implement [`recognizer::Recognizer`]; findings never carry the matched value, and
//! nothing here logs prompt text. [`pseudonym::restore`] and [`pseudonym::Restorer`] put
//! pseudonymised values back into an answer (whole or streamed).

mod app;
mod config;
mod error;
mod grpc;
mod guard;
pub mod normalize;
mod policy;
pub mod pseudonym;
pub mod recognizer;
mod transform;

pub use app::App;
pub use config::{AppPolicyConfig, Config, HashSecret, MaskConfig};
pub use error::StartupError;
pub use guard::{Decision, Finding, Guard, Outcome};
pub use policy::{Action, Direction};
