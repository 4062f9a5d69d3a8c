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

/// For `benches/`: what a provider's streamed answer goes through in the router before it is
/// routed on (SSE parsing, then the provider format's decoder), without the network. Not API.
#[doc(hidden)]
pub mod bench_support {
    /// Decodes one streamed answer delivered in `reads`; returns how many chunks it made.
    pub fn decode_stream(kind: crate::ProviderKind, reads: &[&[u8]]) -> usize {
        let mut parser = crate::provider::sse::SseParser::new();
        let mut decoder = crate::provider::decoder(kind, 0, "");
        let mut chunks = 0;
        for read in reads {
            for event in parser.push(read) {
                let decoded = decoder.event(&event).expect("a well-formed stream");
                chunks += decoded.chunks.len();
                if decoded.done {
                    return chunks;
                }
            }
        }
        chunks
    }
}
