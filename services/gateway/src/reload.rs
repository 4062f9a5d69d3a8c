//! Configuration reload while serving: on SIGHUP and when the configuration file changes
//! (`gateway.config_poll_ms`), `[gateway]` is read and validated again and its `keys` replace the
//! live set, so a key is added or revoked without a restart. An invalid configuration is rejected
//! (logged with the field it names) and the previous keys stay. Other settings (listeners,
//! dependencies, limits) take effect after a restart; a reload that changes them says so.

use switchboard_grpc::ConfigWatch;
use tokio_util::sync::CancellationToken;

use crate::{auth::KeyStore, config::Config};

/// Reloads the keys on every reason `watch` gives until `cancel`. `started`: the configuration
/// the gateway runs with (to tell which changes wait for a restart).
pub(crate) async fn watch_keys(
    mut watch: ConfigWatch,
    keys: KeyStore,
    started: Config,
    cancel: CancellationToken,
) {
    let without_keys = |config: &Config| Config {
        keys: Vec::new(),
        ..config.clone()
    };
    let fixed = without_keys(&started);
    loop {
        let cause = tokio::select! {
            () = cancel.cancelled() => return,
            cause = watch.changed() => cause,
        };
        let loaded = watch
            .file()
            .load()
            .and_then(|source| source.section::<Config>("gateway"))
            .and_then(|config| config.validate().map(|()| config));
        match loaded {
            Ok(config) => {
                let count = keys.replace(&config.keys);
                tracing::info!(cause, keys = count, "gateway keys reloaded");
                if without_keys(&config) != fixed {
                    tracing::warn!(
                        "gateway settings other than keys changed; they take effect after a restart"
                    );
                }
            }
            Err(error) => {
                tracing::error!(cause, %error, "gateway configuration reload rejected; the previous keys stay");
            }
        }
    }
}
