//! The ledger re-reads its configuration file when the file changes (the real `App`, real Postgres
//! and NATS): configured prices and declared budgets are applied again as at start, an invalid
//! edit is refused as a whole and the running configuration stays.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/reload.rs"]
mod support;

use support::{Env, ORG_ID, TEAM_ID, USD, ledger_toml, org_budget, price, team_budget, write_file};

const RELOADS: &str = "switchboard_ledger_config_reloads_total";
const FAILURES: &str = "switchboard_ledger_config_reload_failures_total";

#[tokio::test]
async fn an_edited_file_is_applied_and_an_invalid_edit_keeps_the_running_configuration() {
    let env = Env::new().await;
    let url = env.pg.url.clone();
    let file = |settings: &str, body: String| ledger_toml(&url, 20, settings, &body);
    let first_price = price("1", "2", "2024-01-01");
    let second_price = price("3", "4", "2025-01-01");

    write_file(
        &env.path,
        &file("", format!("{first_price}{}", team_budget("100"))),
        0,
    );
    let running = env.start().await;
    let ledger = &running;
    assert_eq!(ledger.limit(TEAM_ID).await, Some(100 * USD));
    assert_eq!(ledger.limit(ORG_ID).await, None);
    assert_eq!(ledger.input_rate().await, Some(USD));

    // A changed budget, a new one and a new price version: applied without a restart.
    write_file(
        &env.path,
        &file(
            "",
            format!(
                "{first_price}{second_price}{}{}",
                team_budget("150"),
                org_budget()
            ),
        ),
        1,
    );
    // Counted once the reload is done (one reload per change of the modification time).
    ledger.wait_for("the reload", RELOADS, 1).await;
    assert_eq!(ledger.limit(TEAM_ID).await, Some(150 * USD));
    assert_eq!(ledger.limit(ORG_ID).await, Some(1000 * USD));
    assert_eq!(ledger.input_rate().await, Some(3 * USD));
    assert_eq!(ledger.counter(FAILURES).await, 0);

    // An invalid edit (a negative limit) is refused: nothing changes, the failure is counted.
    write_file(
        &env.path,
        &file(
            "",
            format!(
                "{first_price}{second_price}{}{}",
                team_budget("-5"),
                org_budget()
            ),
        ),
        2,
    );
    ledger.wait_for("the refused reload", FAILURES, 1).await;
    assert_eq!(ledger.limit(TEAM_ID).await, Some(150 * USD));
    assert_eq!(ledger.input_rate().await, Some(3 * USD));
    assert_eq!(ledger.counter(RELOADS).await, 1);

    // Rewriting a recorded price is refused as at start, and the whole reload with it: the budget
    // change in the same edit is not applied either.
    let rewritten = price("5", "4", "2025-01-01");
    write_file(
        &env.path,
        &file(
            "",
            format!(
                "{first_price}{rewritten}{}{}",
                team_budget("175"),
                org_budget()
            ),
        ),
        3,
    );
    ledger
        .wait_for("the refused price rewrite", FAILURES, 2)
        .await;
    assert_eq!(ledger.limit(TEAM_ID).await, Some(150 * USD));
    assert_eq!(ledger.input_rate().await, Some(3 * USD));
    assert_eq!(ledger.counter(RELOADS).await, 1);

    // A valid file applies again. A restart-only setting that changed (batch_size) is only
    // warned about; a budget removed from the file is kept, as at start.
    write_file(
        &env.path,
        &file(
            "batch_size = 10",
            format!("{first_price}{second_price}{}", team_budget("175")),
        ),
        4,
    );
    ledger
        .wait_for("the valid file after refused ones", RELOADS, 2)
        .await;
    assert_eq!(ledger.limit(TEAM_ID).await, Some(175 * USD));
    assert_eq!(
        ledger.limit(ORG_ID).await,
        Some(1000 * USD),
        "an undeclared budget is kept"
    );
    assert_eq!(ledger.input_rate().await, Some(3 * USD));
    assert_eq!(ledger.counter(FAILURES).await, 2);

    running.stop().await;
    env.cleanup().await;
}
