//! The `router` binary: see `switchboard_router`.

use std::process::ExitCode;

use switchboard_router::{App, Config};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    switchboard_grpc::run_reloadable_service(
        "router",
        |source| {
            let config: Config = source.section("router")?;
            config.validate()?;
            Ok(config)
        },
        |mut config: Config, shutdown, file| async move {
            for provider in config.resolve_api_keys(|var| std::env::var(var).ok()) {
                tracing::warn!(%provider, "api key environment variable is unset, calling the provider without a key");
            }
            let mut app = App::build(config).await?;
            app.watch_config(&file);
            app.run_until(shutdown).await
        },
    )
}
