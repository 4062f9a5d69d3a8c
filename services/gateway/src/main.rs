//! The `gateway` binary: see `switchboard_gateway`.

use std::process::ExitCode;

use switchboard_gateway::{App, Config};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    switchboard_grpc::run_reloadable_service(
        "gateway",
        |source| {
            let config: Config = source.section("gateway")?;
            config.validate()?;
            Ok((
                config,
                source.section::<switchboard_bus::NatsConfig>("nats")?,
            ))
        },
        |(config, nats), shutdown, file| async move {
            let mut app = App::build(config, nats).await?;
            app.watch_config(&file);
            app.run_until(shutdown).await
        },
    )
}
