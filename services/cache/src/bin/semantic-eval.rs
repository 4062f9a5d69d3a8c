//! `semantic-eval`: precision of the semantic cache on the labelled paraphrase pairs of
//! `../shared/eval` (see docs/SEMANTIC_CACHE.md). Skipped, with a message, when the data is absent.
//!
//! Usage: `semantic-eval [--pairs FILE] [--limit N] [--seed S] [--dump FILE]`
//! (`--dump` writes one line per pair, without the texts: source:id, label, hard negative,
//! similarity, guard verdict, and in the shared scope the nearest A's similarity, whether the guard
//! passes it, whether it is the pair's own, and its pair's source:id.)

use std::{io::Write as _, path::PathBuf, process::ExitCode, time::Instant};

use switchboard_cache::semantic::{SemanticConfig, eval};
use switchboard_embed::Embedder;

struct Args {
    pairs: Option<PathBuf>,
    limit: usize,
    seed: u64,
    dump: Option<PathBuf>,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        pairs: None,
        limit: 6000,
        seed: 42,
        dump: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--pairs" => args.pairs = Some(PathBuf::from(value()?)),
            "--limit" => args.limit = value()?.parse().map_err(|e| format!("--limit: {e}"))?,
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--dump" => args.dump = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                return Err(
                    "usage: semantic-eval [--pairs FILE] [--limit N] [--seed S] [--dump FILE]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(64);
        }
    };
    let Some(path) = args.pairs.or_else(eval::default_pairs_path) else {
        println!(
            "semantic cache evaluation SKIPPED: no {} found next to this directory or its parents \
             (set SWITCHBOARD_EVAL_DIR or --pairs; the data is not part of the repository)",
            eval::PAIRS
        );
        return ExitCode::SUCCESS;
    };
    let pairs = match eval::read_pairs(&path) {
        Ok(pairs) => pairs,
        Err(error) => {
            eprintln!("cannot read {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let total = pairs.len();
    let pairs = eval::sample(pairs, args.limit, args.seed);
    println!(
        "semantic cache evaluation: {} of {total} labelled pairs from {} (seed {})",
        pairs.len(),
        path.display(),
        args.seed
    );
    let mut options = SemanticConfig::default().embed_options();
    options.max_batch = 64;
    let embedder = match Embedder::load(&options) {
        Ok(embedder) => embedder,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let scored = match eval::score(&embedder, pairs).await {
        Ok(scored) => scored,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "embedded {} texts in {:.1} s\n",
        2 * scored.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(dump) = args.dump {
        let written = std::fs::File::create(&dump).and_then(|mut file| {
            for s in &scored {
                writeln!(
                    file,
                    "{}\t{}\t{}\t{:.5}\t{}\t{:.5}\t{}\t{}\t{}",
                    s.pair.id,
                    u8::from(s.pair.paraphrase),
                    u8::from(s.pair.hard_negative),
                    s.similarity,
                    s.near_miss.map_or("-", |r| r.as_str()),
                    s.shared_best.0,
                    u8::from(s.shared_best.1),
                    u8::from(s.shared_nearest_is_own),
                    s.shared_nearest_id
                )?;
            }
            Ok(())
        });
        if let Err(error) = written {
            eprintln!("cannot write {}: {error}", dump.display());
            return ExitCode::FAILURE;
        }
    }
    print!("{}", eval::report(&scored));
    ExitCode::SUCCESS
}
