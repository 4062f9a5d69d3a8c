//! Cache administration over the cache's gRPC API (`CacheService`): `switchboard cache purge
//! --app X` removes every cached answer of an app from every replica and the shared stream (an
//! erasure request).

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;
use switchboard_config::Source;
use switchboard_proto::cache::v1::{PurgeRequest, Scope, cache_service_client::CacheServiceClient};

/// `switchboard cache …`.
#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Remove every cached answer of an app, on every replica and in the shared stream.
    Purge {
        /// The app (tenant) whose entries are removed.
        #[arg(long)]
        app: String,
        /// Cache gRPC URL (default: `http://` + `[cache] grpc_addr` of the configuration).
        #[arg(long)]
        cache: Option<String>,
        /// Configuration file (default: $SWITCHBOARD_CONFIG).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Runs `switchboard cache …`; exit 64 for bad arguments or configuration, 69 when the cache is
/// unreachable, 1 when it refuses.
pub async fn run(command: CacheCommand) -> ExitCode {
    let CacheCommand::Purge { app, cache, config } = command;
    match purge(app, cache, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("switchboard cache purge: {message}");
            ExitCode::from(code)
        }
    }
}

async fn purge(
    app: String,
    cache: Option<String>,
    config: Option<PathBuf>,
) -> Result<(), (u8, String)> {
    let app = app.trim().to_owned();
    if app.is_empty() {
        return Err((64, "--app must not be empty".to_owned()));
    }
    let url = match cache {
        Some(url) => url,
        None => {
            let config = Source::load(config.as_deref())
                .and_then(|source| source.section::<switchboard_cache::Config>("cache"))
                .map_err(|e| (64, format!("invalid configuration: {e}")))?;
            format!("http://{}", config.grpc_addr)
        }
    };
    let mut client = CacheServiceClient::connect(url.clone())
        .await
        .map_err(|e| (69, format!("cannot reach the cache at {url}: {e}")))?;
    let purged = client
        .purge(PurgeRequest {
            scope: Some(Scope {
                app: app.clone(),
                ..Default::default()
            }),
        })
        .await
        .map_err(|status| (1, format!("the cache refused: {}", status.message())))?
        .into_inner();
    println!("purged {} cached answers of app {app}", purged.removed);
    Ok(())
}
