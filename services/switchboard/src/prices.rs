//! `switchboard prices …`: price administration against the ledger's Postgres database.
//!
//! These commands talk to Postgres directly (the `[ledger] database_url`), not through a ledger
//! RPC: they are operator actions on the ledger's own tables, done in one transaction, that must
//! work while the ledger is stopped and must not be reachable through the finance API. Running
//! ledgers pick imported prices up within `ledger.price_reload_secs`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};
use switchboard_config::Source;
use switchboard_ledger::{
    internals::{Note, Repository},
    prices::{self, Actor, AdminError, Reprice},
};

/// Where the ledger's database is.
#[derive(Args)]
pub struct Database {
    /// Configuration file whose `[ledger] database_url` is used (default: $SWITCHBOARD_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Postgres URL (overrides the configuration).
    #[arg(long)]
    database_url: Option<String>,
    /// Who runs the command, recorded in the audit rows (default: $USER).
    #[arg(long)]
    actor: Option<String>,
}

#[derive(Subcommand)]
pub enum PricesCommand {
    /// Import LiteLLM's model_prices_and_context_window.json: a new price version effective from
    /// the given date for every model whose price changed; history is never rewritten.
    Import {
        /// The JSON file.
        file: PathBuf,
        /// First day (UTC) the imported prices apply, YYYY-MM-DD.
        #[arg(long)]
        effective_from: String,
        /// Report what would change, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also list skipped entries and rounded values.
        #[arg(long)]
        verbose: bool,
        #[command(flatten)]
        database: Database,
    },
    /// Re-price the usage rows of [since, until) with the prices recorded now, every attempt
    /// that used tokens at its own price (as recording does); writes an audit row (who, when,
    /// what, old and new totals, rows skipped) and the old and new cost of every changed row.
    /// Rows with several attempts recorded before their earlier attempts' usage was kept are left
    /// as recorded and counted as skipped.
    Reprice {
        /// Inclusive start: RFC 3339 time or YYYY-MM-DD (midnight UTC).
        #[arg(long)]
        since: String,
        /// Exclusive end: RFC 3339 time or YYYY-MM-DD (midnight UTC).
        #[arg(long)]
        until: String,
        /// Only rows that used this model (`model` or `provider/model`): served by it, or with
        /// an earlier attempt on it.
        #[arg(long)]
        model: Option<String>,
        /// Why, recorded in the audit row.
        #[arg(long, default_value = "")]
        reason: String,
        /// Report what would change, write nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        database: Database,
    },
}

/// Runs a `prices` command; exit 64 for bad arguments or configuration, 65 for an unreadable
/// price file, 1 for a database failure.
pub async fn run(command: PricesCommand) -> ExitCode {
    match execute(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("switchboard prices: {message}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn admin_failure(error: AdminError) -> Failure {
    let code = match &error {
        AdminError::Invalid { .. } => 64,
        AdminError::File(_) => 65,
        AdminError::Database(_) => 1,
    };
    (code, error.to_string())
}

async fn connect(database: &Database) -> Result<Repository, Failure> {
    let url = match &database.database_url {
        Some(url) => url.clone(),
        None => {
            let config = Source::load(database.config.as_deref())
                .and_then(|source| source.section::<switchboard_ledger::Config>("ledger"))
                .and_then(|config| config.validate().map(|()| config))
                .map_err(|e| (64, format!("invalid configuration: {e}")))?;
            config.database_url
        }
    };
    Repository::connect(&url, 2)
        .await
        .map_err(|e| (1, format!("cannot open the ledger database: {e}")))
}

fn print_notes(title: &str, notes: &[Note]) {
    if notes.is_empty() {
        return;
    }
    println!("{title} ({}):", notes.len());
    for note in notes {
        println!("  {}: {}", note.path, note.message);
    }
}

async fn execute(command: PricesCommand) -> Result<(), Failure> {
    match command {
        PricesCommand::Import {
            file,
            effective_from,
            dry_run,
            verbose,
            database,
        } => {
            let effective_from =
                prices::parse_date("--effective-from", &effective_from).map_err(admin_failure)?;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| (66, format!("cannot read {}: {e}", file.display())))?;
            let repo = connect(&database).await?;
            let actor = Actor::resolve(database.actor.clone());
            let shown = file.display().to_string();
            let report =
                prices::import_litellm(&repo, &shown, &text, effective_from, &actor, dry_run)
                    .await
                    .map_err(admin_failure)?;
            repo.pool().close().await;
            print_notes("invalid", &report.invalid);
            if verbose {
                print_notes("rounded to 1e-15 USD per token", &report.rounded);
                print_notes("skipped", &report.skipped);
                for key in &report.inserted {
                    println!("  new version: {key}");
                }
            }
            let verb = if dry_run { "would import" } else { "imported" };
            println!(
                "{verb} {} new price versions effective {effective_from}: {} entries, {} unchanged, \
                 {} skipped (no per-token price), {} invalid, {} values rounded{}",
                report.inserted.len(),
                report.entries,
                report.unchanged,
                report.skipped.len(),
                report.invalid.len(),
                report.rounded.len(),
                report
                    .import_id
                    .map(|id| format!(" (price_imports.id {id})"))
                    .unwrap_or_else(|| " (dry run: nothing written)".to_owned()),
            );
            Ok(())
        }
        PricesCommand::Reprice {
            since,
            until,
            model,
            reason,
            dry_run,
            database,
        } => {
            let request = Reprice {
                since: prices::parse_instant("--since", &since).map_err(admin_failure)?,
                until: prices::parse_instant("--until", &until).map_err(admin_failure)?,
                model,
                reason,
                dry_run,
            };
            let repo = connect(&database).await?;
            let actor = Actor::resolve(database.actor.clone());
            let report = prices::reprice(&repo, &request, &actor)
                .await
                .map_err(admin_failure)?;
            repo.pool().close().await;
            let verb = if dry_run { "would change" } else { "changed" };
            println!(
                "{verb} {} of {} rows; total {} -> {} nano-USD; unpriced rows {} -> {}{}",
                report.rows_changed,
                report.rows_examined,
                report.old_total_usd_nanos,
                report.new_total_usd_nanos,
                report.old_unpriced,
                report.new_unpriced,
                report
                    .audit_id
                    .map(|id| format!(" (reprice_audits.id {id})"))
                    .unwrap_or_else(|| " (dry run: nothing written)".to_owned()),
            );
            if report.rows_skipped > 0 {
                println!(
                    "left as recorded: {} rows with more than one attempt, recorded before the \
                     usage of their earlier attempts was kept, so they cannot be re-priced (their \
                     recorded cost, or unpriced status, is kept and counted in both totals; list \
                     them with: SELECT * FROM v_usage WHERE attempts > 1 AND earlier_attempts IS \
                     NULL AND time >= '{}' AND time < '{}')",
                    report.rows_skipped,
                    sql_time(request.since),
                    sql_time(request.until),
                );
            }
            Ok(())
        }
    }
}

/// A time as an RFC 3339 SQL literal's text.
fn sql_time(time: time::OffsetDateTime) -> String {
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| time.to_string())
}
