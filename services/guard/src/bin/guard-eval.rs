//! `guard-eval`: measures the guard on labelled data, and trains the injection classifier.
//!
//! ```text
//! guard-eval [--pii FILE] [--injection FILE] [--format table|json]
//!            [--errors FILE [--errors-entity TYPE]...]
//! guard-eval train-injection [--data FILE] [--out FILE] [--epochs N]
//! ```
//! Without `--pii`/`--injection` it reads the shared development sets under `../shared/eval/`
//! (or `$EVALDATA`) and says so when they are absent (the evaluation is then skipped, not failed).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use switchboard_guard::{
    DEFAULT_INJECTION_THRESHOLD,
    eval::{self, InjectionRow, PiiRow},
};

#[derive(Parser)]
#[command(about = "Evaluate the guard on labelled data")]
struct Args {
    /// PII set (JSON lines with character-offset spans).
    #[arg(long)]
    pii: Option<PathBuf>,
    /// Prompt-injection set (JSON lines with label 1 attack / 0 benign).
    #[arg(long)]
    injection: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Also write the PII spans missed and found wrongly (exact match) to FILE as JSON lines, with
    /// the text around them. The file holds evaluation data: write it outside the repository.
    #[arg(long)]
    errors: Option<PathBuf>,
    /// Restrict `--errors` to these entity types (repeatable; all types when absent).
    #[arg(long = "errors-entity")]
    errors_entities: Vec<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train the injection classifier on the non-held-out rows and write the weight file.
    TrainInjection {
        /// Prompt-injection set.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Weight file to write.
        #[arg(long, default_value = "services/guard/src/injection/injection.model")]
        out: PathBuf,
        /// Passes over the training rows.
        #[arg(long, default_value_t = 6)]
        epochs: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

fn shared(relative: &str) -> PathBuf {
    let root =
        std::env::var_os("EVALDATA").map_or_else(|| PathBuf::from("../shared/eval"), PathBuf::from);
    root.join(relative)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("guard-eval: {error}");
            ExitCode::FAILURE
        }
    }
}

fn present(path: &Path, what: &str) -> bool {
    if path.exists() {
        true
    } else {
        println!("{what}: skipped, {} not found", path.display());
        false
    }
}

fn run(args: Args) -> Result<(), eval::EvalError> {
    if let Some(Command::TrainInjection { data, out, epochs }) = args.command {
        let data = data.unwrap_or_else(|| shared("prompt_injection/normalized/prompts_dev.jsonl"));
        if !present(&data, "train-injection") {
            return Ok(());
        }
        let rows: Vec<InjectionRow> = eval::read_jsonl(&data)?;
        let bytes = eval::train_injection(&rows, epochs);
        std::fs::write(&out, &bytes).map_err(|source| eval::EvalError::Read {
            path: out.display().to_string(),
            source,
        })?;
        println!(
            "wrote {} ({} bytes) from {} rows",
            out.display(),
            bytes.len(),
            rows.len()
        );
        return Ok(());
    }
    let pii = args
        .pii
        .unwrap_or_else(|| shared("pii/normalized/pii_dev.jsonl"));
    let injection = args
        .injection
        .unwrap_or_else(|| shared("prompt_injection/normalized/prompts_dev.jsonl"));
    let mut json = serde_json::Map::new();
    if present(&pii, "pii") {
        let rows: Vec<PiiRow> = eval::read_jsonl(&pii)?;
        let report = eval::evaluate_pii(&rows)?;
        if let Some(path) = &args.errors {
            let errors = eval::pii_errors(&rows, &args.errors_entities)?;
            let mut lines = String::new();
            for error in &errors {
                lines.push_str(&serde_json::to_string(error).unwrap_or_default());
                lines.push('\n');
            }
            std::fs::write(path, lines).map_err(|source| eval::EvalError::Write {
                path: path.display().to_string(),
                source,
            })?;
            println!("wrote {} errors to {}", errors.len(), path.display());
        }
        match args.format {
            Format::Table => println!("{}", eval::pii_table(&report)),
            Format::Json => {
                json.insert(
                    "pii".into(),
                    serde_json::to_value(&report).unwrap_or_default(),
                );
            }
        }
    }
    if present(&injection, "injection") {
        let rows: Vec<InjectionRow> = eval::read_jsonl(&injection)?;
        #[allow(clippy::cast_possible_truncation)]
        let report = eval::evaluate_injection(&rows, DEFAULT_INJECTION_THRESHOLD as f32)?;
        match args.format {
            Format::Table => println!("{}", eval::injection_table(&report)),
            Format::Json => {
                json.insert(
                    "injection".into(),
                    serde_json::to_value(&report).unwrap_or_default(),
                );
            }
        }
    }
    if args.format == Format::Json {
        println!("{}", serde_json::Value::Object(json));
    }
    Ok(())
}
