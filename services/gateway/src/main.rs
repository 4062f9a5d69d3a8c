//! The `gateway` binary: see `switchboard_gateway`.

use std::process::ExitCode;

use switchboard_gateway::{App, Config};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    switchboard_grpc::run_service(
        "gateway",
        |source| {
            let config: Config = source.section("gateway")?;
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
