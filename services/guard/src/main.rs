//! The `guard` binary: see `switchboard_guard`.

use std::process::ExitCode;

use switchboard_guard::{App, Config};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    switchboard_grpc::run_service(
        "guard",
        |source| {
            let config: Config = source.section("guard")?;
            config.validate()?;
            let nats: switchboard_bus::NatsConfig = source.section("nats")?;
            Ok((config, nats))
        },
        |(config, nats), shutdown| async move {
            App::build_with_audit(config, Some(nats))
                .await?
                .run_until(shutdown)
                .await
        },
    )
}
