//! The `cache` binary: see `switchboard_cache`.

use std::process::ExitCode;

use switchboard_cache::{App, Config};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    switchboard_grpc::run_service(
        "cache",
        |source| {
            let config: Config = source.section("cache")?;
            config.validate()?;
            Ok((
                config,
                source.section::<switchboard_bus::NatsConfig>("nats")?,
            ))
        },
        |(config, nats), shutdown| async move {
            App::build(config, nats).await?.run_until(shutdown).await
        },
    )
}
