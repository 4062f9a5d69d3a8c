//! The ledger's gRPC health follows its database: a cheap `SELECT 1` every `ledger.db_check_ms`,
//! NOT_SERVING while it fails (the gateways' `/readyz` then sees the ledger down), SERVING again
//! as soon as one succeeds.

use std::time::Duration;

use sqlx::PgPool;
use switchboard_grpc::Health;
use tokio_util::sync::CancellationToken;

/// How long one check may take before the database counts as unreachable.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the database answers `SELECT 1` within [`CHECK_TIMEOUT`].
async fn reachable(pool: &PgPool) -> bool {
    let check = sqlx::query("SELECT 1").execute(pool);
    matches!(tokio::time::timeout(CHECK_TIMEOUT, check).await, Ok(Ok(_)))
}

/// Checks `pool` every `every` and reports the outcome to `health` until `cancel`.
pub(crate) async fn follow_database(
    pool: PgPool,
    health: Health,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut up = true;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = cancel.cancelled() => return,
        }
        let now = tokio::select! {
            now = reachable(&pool) => now,
            () = cancel.cancelled() => return,
        };
        if now != up {
            if now {
                tracing::info!("database reachable again; health is serving");
            } else {
                tracing::warn!("database unreachable; health is not serving");
            }
            up = now;
        }
        health.set_serving(now).await;
    }
}
