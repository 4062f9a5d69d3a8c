//! The Switchboard gateway: the front door. It authenticates virtual keys, runs every request through
//! guard → cache → router over gRPC, and publishes one usage event per request to NATS JetStream.
//! It serves `switchboard.gateway.v1.GatewayService` over gRPC and an OpenAI-compatible HTTP API.

mod answer;
mod anthropic;
mod app;
mod auth;
mod budget;
mod config;
mod detach;
mod embeddings;
mod error;
mod grpc;
mod http;
mod metrics;
mod openai;
mod outbox;
mod overlap;
mod pipeline;
mod ratelimit;
mod ready;
mod reload;
mod restore;
mod tool_id;
mod usage;

pub use answer::GuardConfig;
pub use app::{App, StartupError, hash_api_key};
pub use budget::BudgetsConfig;
pub use config::{AbandonedRequests, Config, KeyConfig};
pub use outbox::OutboxError;
pub use ratelimit::RateLimitConfig;
