//! The ledger re-reads its configuration file on SIGHUP (in-process: the signal is sent to this
//! test process only after the ledger installed its handler; alone in its test binary, so that no
//! other test's ledger reloads on it).

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(unix)]

#[path = "support/reload.rs"]
mod support;

use support::{Env, TEAM_ID, USD, ledger_toml, price, team_budget, write_file};

#[tokio::test]
async fn sighup_reloads_the_configuration_file() {
    let env = Env::new().await;
    // config_poll_ms = 0: only the signal reloads.
    let file = |limit: &str, prices: String| {
        ledger_toml(
            &env.pg.url,
            0,
            "",
            &format!("{prices}{}", team_budget(limit)),
        )
    };
    let first_price = price("1", "2", "2024-01-01");
    write_file(&env.path, &file("100", first_price.clone()), 0);
    // Installs the SIGHUP handler.
    let running = env.start().await;
    let ledger = &running;
    assert_eq!(ledger.limit(TEAM_ID).await, Some(100 * USD));

    write_file(
        &env.path,
        &file(
            "150",
            format!("{first_price}{}", price("3", "4", "2025-01-01")),
        ),
        1,
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    // Counted once the reload is done.
    ledger
        .wait_for(
            "the reload after SIGHUP",
            "switchboard_ledger_config_reloads_total",
            1,
        )
        .await;
    assert_eq!(ledger.limit(TEAM_ID).await, Some(150 * USD));
    assert_eq!(ledger.input_rate().await, Some(3 * USD));

    running.stop().await;
    env.cleanup().await;
}
