//! `fake-provider`: serves the fake provider (OpenAI, Azure OpenAI, Anthropic and Gemini formats) until interrupted.

use clap::Parser;
use switchboard_fake_provider::{FakeConfig, FakeProvider, grpc::GatewayApi};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    about = "A fake LLM provider speaking the OpenAI, Azure OpenAI, Anthropic and Gemini wire formats"
)]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:9090")]
    addr: String,
    /// Latency added before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Also serve the gateway's gRPC API here, answered by the fake itself (the benchmark's gRPC
    /// baseline; see `docs/BENCHMARKS.md`).
    #[arg(long)]
    grpc_addr: Option<String>,
    /// Number of content pieces of a streamed answer.
    #[arg(long, default_value_t = 5)]
    stream_chunks: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = FakeConfig {
        addr: args.addr,
        latency_ms: args.latency_ms,
        stream_chunks: args.stream_chunks,
    };
    let fake = FakeProvider::start(config).await?;
    eprintln!("fake provider listening on {}", fake.addr());
    let grpc = match &args.grpc_addr {
        Some(addr) => {
            let api = GatewayApi::start(addr, args.latency_ms, args.stream_chunks).await?;
            eprintln!("fake gateway API (gRPC) listening on {}", api.addr());
            Some(api)
        }
        None => None,
    };
    tokio::signal::ctrl_c().await?;
    if let Some(api) = grpc {
        api.shutdown().await;
    }
    fake.shutdown().await;
    Ok(())
}
