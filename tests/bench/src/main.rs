//! `switchboard-bench`: the load benchmark of the mesh (issue 3's instrument).
//!
//! Starts the fake provider and the five services from `target/release/` as separate processes
//! (tracing export on, into a span-counting receiver in this process; the ledger on a fresh
//! database), drives open-loop load at fixed rates, and reports latency percentiles measured from
//! each request's scheduled time, overhead against the provider alone, CPU per request and memory
//! per process, and whether the ledger holds exactly one row per successful request.
//! See docs/BENCHMARKS.md.

mod dispatch;
mod load;
mod mesh;
mod otlp;
mod procfs;
mod report;
mod stats;
mod yardstick;

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http::{HeaderName, HeaderValue};
use switchboard_proto::{
    chat::v1::{ChatRequest, Message, Role},
    gateway::v1::{CacheControl, CreateChatCompletionRequest, StreamChatCompletionRequest},
    guard::v1::CheckPromptRequest,
};

use crate::{
    load::{RunSpec, Target},
    mesh::{MODEL, Mesh, MeshOptions, SEMANTIC_MODEL},
    report::{LedgerCheck, MemoryUse, RunReport, ScenarioReport, Settle},
};

#[derive(Parser, Debug)]
#[command(
    about = "Open-loop load benchmark of the Switchboard mesh (release binaries as processes)"
)]
struct Args {
    /// A ~1-minute smoke run: the same scenarios with short periods.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (repeat or comma-separate); a gateway scenario brings its direct
    /// baseline. `--list` prints the names.
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<String>,
    /// Print the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Measure the machine's yardstick (see `yardstick.rs`), print it as JSON and exit: how a run
    /// measures it, in a process of its own so that its 64 MiB do not count in the bench's RSS.
    #[arg(long, hide = true)]
    yardstick: bool,
    /// Keep only the runs at these target rates (repeat or comma-separate; e.g. `--rate 1000` for a
    /// quicker A/B comparison at the budget's rate). The max-rate search is not affected.
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Run each selected scenario once at this rate instead of its own rates (with its first
    /// run's connections), for measurements away from the budget's rates (the instruction counts
    /// of `scripts/instructions.sh`, at rates a process under valgrind keeps up with).
    #[arg(long, conflicts_with = "rate")]
    at_rate: Option<f64>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// Measured period per run, seconds (default 10, quick 1).
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Warm-up per run, excluded from statistics, seconds (default 1, quick 0.5).
    #[arg(long)]
    warmup_secs: Option<f64>,
    /// Measured period of each max-rate step, seconds (default 3, quick 1).
    #[arg(long)]
    step_secs: Option<f64>,
    /// Highest rate the max-rate search tries.
    #[arg(long, default_value_t = 10_000.0)]
    max_rate_limit: f64,
    /// Directory of the release binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Directory for the services' logs.
    #[arg(long, default_value = "target/bench/logs")]
    log_dir: PathBuf,
    /// Postgres server (trust auth); a database `sbbench_<uuid>` is created and dropped.
    #[arg(
        long,
        env = "SWITCHBOARD_TEST_PG",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pg: String,
    /// NATS server with JetStream; a private prefix and stream are used and deleted.
    #[arg(
        long,
        env = "SWITCHBOARD_TEST_NATS",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats: String,
    /// Seconds the ledger check waits without progress before giving up.
    #[arg(long, default_value_t = 30)]
    ledger_wait_secs: u64,
    /// `RUST_LOG` of the services: their logs only (span export has its own `trace_filter`, so
    /// tracing stays on whatever this says).
    #[arg(long, default_value = "warn")]
    rust_log: String,
    /// Client-side timeout per request, seconds (from its scheduled time).
    #[arg(long, default_value_t = 30)]
    request_timeout_secs: u64,
    /// Content chunks of every streamed answer of the fake provider (the scenario: 20).
    #[arg(long, default_value_t = report::STREAM_CHUNKS)]
    stream_chunks: usize,
}

/// How a scenario reaches the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The fake provider directly over HTTP (the baseline of the HTTP scenarios).
    Direct,
    /// The fake provider's own server of the gateway's gRPC API (`fake-provider --grpc-addr`),
    /// called like the gateway: the baseline of the gRPC scenarios, so that their overhead is what
    /// the mesh adds, not what a gRPC client and server cost.
    DirectGrpc,
    /// The gateway's OpenAI-compatible HTTP API.
    GatewayHttp,
    /// The gateway's gRPC API.
    GatewayGrpc,
    /// The guard service's `CheckPrompt` alone (guard latency; no provider, no ledger row).
    Guard,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::DirectGrpc => "direct-grpc",
            Via::GatewayHttp => "gateway-http",
            Via::GatewayGrpc => "gateway-grpc",
            Via::Guard => "guard",
        }
    }
}

/// One scenario: a request shape and the (rate, connections) runs.
#[derive(Debug, Clone)]
pub struct Scenario {
    name: &'static str,
    via: Via,
    prompt_bytes: usize,
    stream: bool,
    use_cache: bool,
    email: bool,
    runs: Vec<(f64, usize)>,
    baseline: Option<&'static str>,
    max_rate: bool,
    /// Hard budgets on the scenario's app and key (every request reserves and settles).
    budget: bool,
    /// Semantic-cache hits: one request stores [`SEMANTIC_QUESTION`], then every request asks it in
    /// lower case (an exact-key miss, a semantic hit) on [`SEMANTIC_MODEL`].
    semantic: bool,
}

fn scenarios() -> Vec<Scenario> {
    let s = |name, via, prompt_bytes, stream, runs: &[(f64, usize)], baseline| Scenario {
        name,
        via,
        prompt_bytes,
        stream,
        use_cache: false,
        email: false,
        runs: runs.to_vec(),
        baseline,
        max_rate: false,
        budget: false,
        semantic: false,
    };
    let three = [(200.0, 100), (1000.0, 100), (2000.0, 100)];
    let two = [(200.0, 100), (1000.0, 100)];
    vec![
        s("direct-http-1k", Via::Direct, 1024, false, &three, None),
        s(
            "gateway-http-1k",
            Via::GatewayHttp,
            1024,
            false,
            &three,
            Some("direct-http-1k"),
        ),
        s("direct-grpc-1k", Via::DirectGrpc, 1024, false, &three, None),
        s(
            "gateway-grpc-1k",
            Via::GatewayGrpc,
            1024,
            false,
            &three,
            Some("direct-grpc-1k"),
        ),
        s("direct-http-50k", Via::Direct, 50 * 1024, false, &two, None),
        s(
            "gateway-http-50k",
            Via::GatewayHttp,
            50 * 1024,
            false,
            &two,
            Some("direct-http-50k"),
        ),
        s("direct-stream-http", Via::Direct, 1024, true, &two, None),
        s(
            "stream-http",
            Via::GatewayHttp,
            1024,
            true,
            &two,
            Some("direct-stream-http"),
        ),
        s(
            "direct-stream-grpc",
            Via::DirectGrpc,
            1024,
            true,
            &two,
            None,
        ),
        s(
            "stream-grpc",
            Via::GatewayGrpc,
            1024,
            true,
            &two,
            Some("direct-stream-grpc"),
        ),
        Scenario {
            budget: true,
            ..s(
                "budget-http-1k",
                Via::GatewayHttp,
                1024,
                false,
                &two,
                Some("direct-http-1k"),
            )
        },
        Scenario {
            use_cache: true,
            semantic: true,
            ..s(
                "semantic-hit-http",
                Via::GatewayHttp,
                SEMANTIC_QUESTION.len(),
                false,
                &[(100.0, 100)],
                Some("direct-http-1k"),
            )
        },
        Scenario {
            use_cache: true,
            ..s(
                "cache-hit-http",
                Via::GatewayHttp,
                1024,
                false,
                &[(1000.0, 100), (2000.0, 100)],
                Some("direct-http-1k"),
            )
        },
        Scenario {
            email: true,
            ..s(
                "guard-redact-http",
                Via::GatewayHttp,
                1024,
                false,
                &[(1000.0, 100)],
                Some("direct-http-1k"),
            )
        },
        s(
            "connections",
            Via::GatewayHttp,
            1024,
            false,
            &[(1000.0, 1), (1000.0, 100), (1000.0, 1000)],
            Some("direct-http-1k"),
        ),
        Scenario {
            email: true,
            ..s("guard-2k", Via::Guard, 2048, false, &two, None)
        },
        Scenario {
            email: true,
            ..s("guard-50k", Via::Guard, 50 * 1024, false, &two, None)
        },
        Scenario {
            max_rate: true,
            ..s("max-rate", Via::GatewayHttp, 1024, false, &[], None)
        },
    ]
}

/// The selected scenarios, in run order, with the baselines the selection needs.
fn select(all: &[Scenario], names: &[String]) -> anyhow::Result<Vec<Scenario>> {
    if names.is_empty() {
        return Ok(all.to_vec());
    }
    for name in names {
        anyhow::ensure!(
            all.iter().any(|s| s.name == name),
            "unknown scenario `{name}` (see --list)"
        );
    }
    let wanted: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .chain(
            all.iter()
                .filter(|s| names.iter().any(|n| n == s.name))
                .filter_map(|s| s.baseline),
        )
        .collect();
    Ok(all
        .iter()
        .filter(|s| wanted.contains(&s.name))
        .cloned()
        .collect())
}

fn prompt(bytes: usize, email: bool) -> String {
    let mut text = String::with_capacity(bytes + 64);
    if email {
        text.push_str("Please forward this to jane.doe@example.com before noon. ");
    }
    const FILLER: &str =
        "The quick brown fox jumps over the lazy dog while the gateway measures it. ";
    while text.len() < bytes {
        text.push_str(FILLER);
    }
    text.truncate(bytes);
    text
}

/// The semantic scenario's question (stored as is, asked in lower case).
const SEMANTIC_QUESTION: &str =
    "How do I rotate the API keys of our staging environment without any downtime for the apps?";

/// The request of a scenario; `seed`: the semantic scenario's storing request instead.
fn target(scenario: &Scenario, mesh: &Mesh, seed: bool) -> anyhow::Result<Target> {
    let key = mesh::api_key(scenario.name);
    let (text, model) = if scenario.semantic {
        // A typical cached question (embedding cost grows with the text, up to 256 tokens); asked
        // in lower case: the same tokens for the uncased embedding model, another exact key.
        let text = if seed {
            SEMANTIC_QUESTION.to_owned()
        } else {
            SEMANTIC_QUESTION.to_lowercase()
        };
        (text, SEMANTIC_MODEL)
    } else {
        (prompt(scenario.prompt_bytes, scenario.email), MODEL)
    };
    match scenario.via {
        Via::Direct | Via::GatewayHttp => {
            let mut body = serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "stream": scenario.stream,
            });
            if scenario.stream {
                body["stream_options"] = serde_json::json!({"include_usage": true});
            }
            let addr = if scenario.via == Via::Direct {
                mesh.fake_addr
            } else {
                mesh.http_addr
            }
            .context("mesh not started")?;
            let mut headers = vec![
                (
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    http::header::AUTHORIZATION,
                    HeaderValue::from_str(&format!("Bearer {key}"))?,
                ),
            ];
            if !scenario.use_cache {
                headers.push((
                    http::header::CACHE_CONTROL,
                    HeaderValue::from_static("no-cache, no-store"),
                ));
            }
            let headers: Vec<(HeaderName, HeaderValue)> = headers;
            Ok(Target::Http {
                addr,
                path: "/v1/chat/completions".to_owned(),
                headers,
                body: Bytes::from(serde_json::to_vec(&body)?),
                stream: scenario.stream,
                require_hit: scenario.semantic && !seed,
            })
        }
        Via::GatewayGrpc | Via::DirectGrpc => {
            let addr = if scenario.via == Via::DirectGrpc {
                mesh.fake_grpc_addr
            } else {
                mesh.grpc_addr
            };
            let url = format!("http://{}", addr.context("mesh not started")?);
            let authorization = format!("Bearer {key}").parse()?;
            let request = ChatRequest {
                model: model.to_owned(),
                messages: vec![Message::text(Role::User, text)],
                ..Default::default()
            };
            let cache = Some(CacheControl {
                no_cache: !scenario.use_cache,
                no_store: !scenario.use_cache,
                ..Default::default()
            });
            Ok(if scenario.stream {
                Target::GrpcStream {
                    url,
                    authorization,
                    request: StreamChatCompletionRequest {
                        request: Some(request),
                        cache,
                    },
                }
            } else {
                Target::GrpcUnary {
                    url,
                    authorization,
                    request: CreateChatCompletionRequest {
                        request: Some(request),
                        cache,
                    },
                }
            })
        }
        Via::Guard => Ok(Target::GuardCheck {
            url: format!("http://{}", mesh.guard_addr.context("mesh not started")?),
            request: CheckPromptRequest {
                request_id: String::new(),
                app: mesh::app_name(scenario.name),
                team: String::new(),
                messages: vec![Message::text(Role::User, text)],
                route: MODEL.to_owned(),
            },
        }),
    }
}

/// Waits until the app's ledger rows equal the successful requests (bounded), then compares.
async fn check_ledger(
    mesh: &Mesh,
    scenario: &str,
    expected: u64,
    ambiguous: u64,
    wait: Duration,
) -> LedgerCheck {
    let app = mesh::app_name(scenario);
    let started = std::time::Instant::now();
    let hard_limit = wait * 4;
    let mut last = -1i64;
    let mut last_progress = std::time::Instant::now();
    let mut rows = 0i64;
    let mut query_error: Option<String>;
    loop {
        match mesh.ledger_rows(&app).await {
            Ok(n) => {
                rows = n;
                query_error = None;
            }
            Err(e) => query_error = Some(e.to_string()),
        }
        if rows as u64 >= expected && query_error.is_none() {
            // Give stragglers (extra rows) a moment to show.
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(n) = mesh.ledger_rows(&app).await {
                rows = n;
            }
            break;
        }
        if rows != last {
            last = rows;
            last_progress = std::time::Instant::now();
        }
        if last_progress.elapsed() >= wait || started.elapsed() >= hard_limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = rows.max(0) as u64;
    let lost = expected.saturating_sub(rows);
    let extra = rows.saturating_sub(expected + ambiguous);
    LedgerCheck {
        app,
        expected_rows: expected,
        ambiguous_requests: ambiguous,
        ledger_rows: rows,
        lost_rows: lost,
        extra_rows: extra,
        wait_seconds: started.elapsed().as_secs_f64(),
        query_error,
        passed: lost == 0 && extra == 0,
    }
}

/// The gateway's `switchboard_usage_events_dropped_total`, if it answers.
async fn usage_events_dropped(mesh: &Mesh) -> Option<u64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = mesh.http_addr?;
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text))
        .await
        .ok()?
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("switchboard_usage_events_dropped_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn memory(mesh: &Mesh) -> BTreeMap<String, MemoryUse> {
    mesh.pids()
        .into_iter()
        .map(|(name, pid)| (name, pid.to_string()))
        .chain(std::iter::once(("bench".to_owned(), "self".to_owned())))
        .filter_map(|(name, pid)| {
            procfs::memory_kb(&pid).map(|(hwm, rss)| {
                (
                    name,
                    MemoryUse {
                        peak_rss_mb: hwm as f64 / 1024.0,
                        rss_mb: rss as f64 / 1024.0,
                    },
                )
            })
        })
        .collect()
}

struct Periods {
    warmup: Duration,
    duration: Duration,
    step: Duration,
    timeout: Duration,
}

/// How long after a run its last spans arrive (a few export periods of the services).
const SPAN_EXPORT_LAG: Duration = Duration::from_millis(600);

/// One reading of the machine's busy share (see [`report::QUIET_BUSY`]).
const SETTLE_WINDOW: Duration = Duration::from_millis(500);
/// A run starts after this at the latest, quiet or not.
const SETTLE_LIMIT: Duration = Duration::from_secs(20);

/// Waits until the machine is quiet, so that a run does not measure the previous one's aftermath
/// (the ledger's inserts, Postgres's autovacuum and checkpoints, page-cache writeback after a
/// heavy scenario). Returns how long it waited and the busy share of the last window.
async fn settle() -> (Duration, f64) {
    let started = std::time::Instant::now();
    let mut last = procfs::machine_ticks();
    loop {
        tokio::time::sleep(SETTLE_WINDOW).await;
        let now = procfs::machine_ticks();
        let busy = match (last, now) {
            (Some((t0, i0)), Some((t1, i1))) if t1 > t0 => {
                let total = (t1 - t0) as f64;
                (total - i1.saturating_sub(i0) as f64).max(0.0) / total
            }
            // No /proc/stat: nothing to wait for.
            _ => return (started.elapsed(), 0.0),
        };
        if busy <= report::QUIET_BUSY || started.elapsed() >= SETTLE_LIMIT {
            return (started.elapsed(), busy);
        }
        last = now;
    }
}

async fn run_once(
    scenario: &Scenario,
    target: &Target,
    mesh: &mut Mesh,
    rate: f64,
    connections: usize,
    duration: Duration,
    periods: &Periods,
) -> anyhow::Result<RunReport> {
    let (settled, busy) = settle().await;
    eprintln!(
        "  {} at {rate} rps, {connections} connections, {:.1}+{:.1} s (machine quiet after {:.1} s, {:.0} % busy) …",
        scenario.name,
        periods.warmup.as_secs_f64(),
        duration.as_secs_f64(),
        settled.as_secs_f64(),
        busy * 100.0
    );
    let spec = RunSpec {
        rate,
        connections,
        warmup: periods.warmup,
        duration,
        timeout: periods.timeout,
    };
    let mut pids = mesh.pids();
    for name in report::SHARED {
        pids.extend(
            procfs::pids_named(name)
                .into_iter()
                .map(|p| (name.to_owned(), p)),
        );
    }
    if let Some(otlp) = &mesh.otlp {
        otlp.take_durations();
    }
    let result = load::run(target, spec, &pids).await?;
    if let Some(late) = result.dispatch_lateness {
        eprintln!(
            "    released {} µs late at p50, {} µs at p99",
            late.p50_us, late.p99_us
        );
    }
    let dead = mesh.dead();
    anyhow::ensure!(
        dead.is_empty(),
        "processes exited during the run: {dead:?} (see their logs)"
    );
    let mut report = RunReport::from_result(
        scenario.name,
        scenario.via.label(),
        rate,
        connections,
        &result,
    );
    report.settle = Some(Settle {
        waited_s: settled.as_secs_f64(),
        busy_at_start: busy,
    });
    if let Some(otlp) = &mesh.otlp {
        // The services export every 200 ms (`telemetry.export_delay_ms`): wait for the run's last.
        tokio::time::sleep(SPAN_EXPORT_LAG).await;
        report.spans = otlp.take_durations();
    }
    Ok(report)
}

/// Stores the semantic scenario's prompt (one request, counted for the ledger check) and waits for
/// the cache to index it.
async fn seed_semantic(
    scenario: &Scenario,
    mesh: &mut Mesh,
    periods: &Periods,
    report: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let seed = target(scenario, mesh, true)?;
    let spec = RunSpec {
        rate: 1.0,
        connections: 1,
        warmup: Duration::ZERO,
        duration: Duration::from_secs(1),
        timeout: periods.timeout,
    };
    let result = load::run(&seed, spec, &mesh.pids()).await?;
    anyhow::ensure!(
        result.ok_total >= 1 && result.errors_total == 0,
        "the semantic scenario's seed request failed: {:?}",
        result.error_samples
    );
    report.totals(&RunReport::from_result(
        scenario.name,
        scenario.via.label(),
        1.0,
        1,
        &result,
    ));
    // The gateway stores after answering; the cache embeds and indexes the entry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

async fn run_all(
    args: &Args,
    selected: &[Scenario],
    mesh: &mut Mesh,
    reports: &mut Vec<ScenarioReport>,
) -> anyhow::Result<()> {
    let periods = Periods {
        warmup: Duration::from_secs_f64(args.warmup_secs.unwrap_or(if args.quick {
            0.5
        } else {
            1.0
        })),
        duration: Duration::from_secs_f64(args.duration_secs.unwrap_or(if args.quick {
            1.0
        } else {
            10.0
        })),
        step: Duration::from_secs_f64(args.step_secs.unwrap_or(if args.quick { 1.0 } else { 3.0 })),
        timeout: Duration::from_secs(args.request_timeout_secs),
    };
    let names: Vec<String> = scenarios().iter().map(|s| s.name.to_owned()).collect();
    let opts = MeshOptions {
        bin_dir: args.bin_dir.clone(),
        log_dir: args.log_dir.clone(),
        pg_server: args.pg.clone(),
        nats_url: args.nats.clone(),
        stream_chunks: args.stream_chunks,
        apps: names,
        redact_apps: vec![
            "guard-redact-http".to_owned(),
            "guard-2k".to_owned(),
            "guard-50k".to_owned(),
        ],
        rust_log: args.rust_log.clone(),
        budget_apps: selected
            .iter()
            .filter(|s| s.budget)
            .map(|s| s.name.to_owned())
            .collect(),
        semantic: selected.iter().any(|s| s.semantic),
    };
    eprintln!("starting the mesh from {} …", args.bin_dir.display());
    mesh.start(&opts).await?;
    eprintln!(
        "mesh up: gateway http {} grpc {}, fake provider {}; logs in {}",
        mesh.http_addr.map(|a| a.to_string()).unwrap_or_default(),
        mesh.grpc_addr.map(|a| a.to_string()).unwrap_or_default(),
        mesh.fake_addr.map(|a| a.to_string()).unwrap_or_default(),
        args.log_dir.display()
    );

    for scenario in selected {
        eprintln!("scenario {}", scenario.name);
        let target = target(scenario, mesh, false)?;
        let spans_before = mesh.otlp.as_ref().map_or(0, |c| c.spans());
        let mut report =
            ScenarioReport::new(scenario.name, scenario.via.label(), scenario.baseline);
        if scenario.semantic {
            seed_semantic(scenario, mesh, &periods, &mut report).await?;
        }
        if scenario.max_rate {
            let mut rate = 1000.0;
            while rate <= args.max_rate_limit {
                let mut run =
                    run_once(scenario, &target, mesh, rate, 100, periods.step, &periods).await?;
                let passed = stats::sustained(
                    rate,
                    run.achieved_rps,
                    run.errors,
                    run.latency.map_or(f64::INFINITY, |l| l.p99_ms),
                );
                run.sustained = Some(passed);
                report.totals(&run);
                report.runs.push(run);
                if !passed {
                    break;
                }
                report.max_sustained_rps = Some(rate);
                rate += 1000.0;
            }
        } else {
            for &(rate, connections) in &scenario.runs {
                let run = run_once(
                    scenario,
                    &target,
                    mesh,
                    rate,
                    connections,
                    periods.duration,
                    &periods,
                )
                .await?;
                report.totals(&run);
                report.runs.push(run);
            }
        }
        if matches!(scenario.via, Via::GatewayHttp | Via::GatewayGrpc) {
            eprintln!(
                "  checking the ledger ({} successful requests) …",
                report.ok_total
            );
            let check = check_ledger(
                mesh,
                scenario.name,
                report.ok_total,
                report.ambiguous_total,
                Duration::from_secs(args.ledger_wait_secs),
            )
            .await;
            if !check.passed {
                eprintln!(
                    "  LEDGER MISMATCH: {} rows for {} successful requests",
                    check.ledger_rows, check.expected_rows
                );
            }
            report.ledger = Some(check);
            report.usage_events_dropped = usage_events_dropped(mesh).await;
        }
        report.memory = memory(mesh);
        report.spans_received = mesh
            .otlp
            .as_ref()
            .map_or(0, |c| c.spans())
            .saturating_sub(spans_before);
        report.loadavg_1m = procfs::loadavg();
        reports.push(report);
    }
    Ok(())
}

async fn interrupted() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// Replaces each rate scenario's runs by one at `rate` (with its first run's connections).
fn at_rate(mut scenarios: Vec<Scenario>, rate: Option<f64>) -> Vec<Scenario> {
    if let Some(rate) = rate {
        for s in &mut scenarios {
            if let Some(&(_, connections)) = s.runs.first() {
                s.runs = vec![(rate, connections)];
            }
        }
        scenarios.retain(|s| !s.max_rate);
    }
    scenarios
}

/// Drops the runs whose rate is not in `rates` (all kept when `rates` is empty).
fn keep_rates(mut scenarios: Vec<Scenario>, rates: &[f64]) -> Vec<Scenario> {
    if !rates.is_empty() {
        for s in &mut scenarios {
            if !s.max_rate {
                s.runs.retain(|(rate, _)| rates.contains(rate));
            }
        }
        scenarios.retain(|s| s.max_rate || !s.runs.is_empty());
    }
    scenarios
}

/// The machine's yardstick, measured by this binary in a child process (`--yardstick`) while no
/// scenario runs; `None` (and a warning) when it cannot be.
async fn yardstick_reading() -> Option<yardstick::Yardstick> {
    let exe = std::env::current_exe().ok()?;
    let output = tokio::process::Command::new(exe)
        .arg("--yardstick")
        .output()
        .await;
    match output {
        Ok(output) if output.status.success() => serde_json::from_slice(&output.stdout)
            .map_err(|e| eprintln!("warning: unreadable yardstick: {e}"))
            .ok(),
        Ok(output) => {
            eprintln!("warning: the yardstick failed: {}", output.status);
            None
        }
        Err(e) => {
            eprintln!("warning: cannot run the yardstick: {e}");
            None
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.yardstick {
        return match serde_json::to_string(&yardstick::measure()) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let all = scenarios();
    if args.list {
        for s in &all {
            println!(
                "{:<20} {:<13} {:>6} B  runs {:?}",
                s.name,
                s.via.label(),
                s.prompt_bytes,
                s.runs
            );
        }
        return ExitCode::SUCCESS;
    }
    let selected = match select(&all, &args.scenario) {
        Ok(s) => at_rate(keep_rates(s, &args.rate), args.at_rate),
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(64);
        }
    };
    let machine = procfs::machine_info();
    let load_before = procfs::loadavg();
    let yardstick_before = yardstick_reading().await;
    let started = std::time::Instant::now();
    let mut mesh = Mesh::new();
    let mut reports = Vec::new();
    let outcome = tokio::select! {
        r = run_all(&args, &selected, &mut mesh, &mut reports) => r,
        _ = interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    eprintln!("stopping the mesh …");
    mesh.shutdown().await;

    report::apply_baselines(&mut reports);
    let budget = report::budget(&reports);
    let failed = reports.iter().any(|r| r.failed());
    let yardstick_after = yardstick_reading().await;
    print!("{}", report::tables(&reports, &budget));
    let loopback = report::loopback(&reports);
    println!("{}", report::loopback_line(loopback));
    if args.stream_chunks != report::STREAM_CHUNKS {
        println!(
            "Streamed answers had {} content chunks (--stream-chunks), not the issue's {}: stream lines are not the budget's",
            args.stream_chunks,
            report::STREAM_CHUNKS
        );
    }
    for (when, reading) in [("before", &yardstick_before), ("after", &yardstick_after)] {
        match reading {
            Some(reading) => println!("Machine yardstick {when} the scenarios: {}", reading.line()),
            None => println!("Machine yardstick {when} the scenarios: not measured"),
        }
    }
    let json = serde_json::json!({
        "machine": machine,
        "yardstick": { "before": yardstick_before, "after": yardstick_after },
        "loopback": loopback.map(|(p50_ms, fake_cpu_us)| serde_json::json!({
            "p50_ms": p50_ms,
            "fake_cpu_us_per_request": fake_cpu_us,
            "reference": {
                "p50_ms": report::LOOPBACK_REFERENCE.0,
                "fake_cpu_us_per_request": report::LOOPBACK_REFERENCE.1,
            },
        })),
        "loadavg_1m_at_start": load_before,
        "loadavg_1m_at_end": procfs::loadavg(),
        "quick": args.quick,
        "stream_chunks": args.stream_chunks,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "complete": outcome.is_ok(),
        "error": outcome.as_ref().err().map(|e| format!("{e:#}")),
        "scenarios": reports,
        "budget": budget,
    });
    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match serde_json::to_vec_pretty(&json)
        .map_err(anyhow::Error::from)
        .and_then(|b| std::fs::write(&args.out, b).map_err(anyhow::Error::from))
    {
        Ok(()) => eprintln!("results: {}", args.out.display()),
        Err(e) => eprintln!("could not write {}: {e}", args.out.display()),
    }
    match outcome {
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Ok(()) if failed => {
            eprintln!("FAILED: a scenario lost or duplicated ledger rows");
            ExitCode::from(1)
        }
        Ok(()) => ExitCode::SUCCESS,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn at_rate_runs_each_scenario_once_at_that_rate() {
        let all = scenarios();
        let kept = at_rate(all.clone(), Some(40.0));
        assert!(kept.iter().all(|s| !s.max_rate), "no max-rate search");
        assert_eq!(kept.len(), all.iter().filter(|s| !s.max_rate).count());
        for s in &kept {
            let first = all.iter().find(|a| a.name == s.name).unwrap().runs[0];
            assert_eq!(s.runs, vec![(40.0, first.1)], "{}", s.name);
        }
        assert_eq!(at_rate(all.clone(), None).len(), all.len());
    }

    #[test]
    fn a_rate_filter_keeps_only_those_runs_and_the_max_rate_search() {
        let kept = keep_rates(scenarios(), &[1000.0]);
        assert!(
            kept.iter().any(|s| s.max_rate),
            "max-rate is not a rate run"
        );
        for s in kept.iter().filter(|s| !s.max_rate) {
            assert!(!s.runs.is_empty(), "{} kept with no run", s.name);
            assert!(s.runs.iter().all(|(rate, _)| *rate == 1000.0), "{}", s.name);
        }
        assert!(
            !kept.iter().any(|s| s.name == "semantic-hit-http"),
            "a scenario with no run at 1000 rps is dropped"
        );
        assert_eq!(keep_rates(scenarios(), &[]).len(), scenarios().len());
    }

    #[test]
    fn selecting_a_gateway_scenario_brings_its_baseline() {
        let all = scenarios();
        let picked = select(&all, &["stream-grpc".to_owned()]).unwrap();
        let names: Vec<&str> = picked.iter().map(|s| s.name).collect();
        assert_eq!(names, ["direct-stream-grpc", "stream-grpc"]);
        let http = select(&all, &["stream-http".to_owned()]).unwrap();
        let names: Vec<&str> = http.iter().map(|s| s.name).collect();
        assert_eq!(names, ["direct-stream-http", "stream-http"]);
        assert!(select(&all, &["nope".to_owned()]).is_err());
        assert_eq!(select(&all, &[]).unwrap().len(), all.len());
    }

    #[test]
    fn prompts_have_the_requested_size_and_the_email() {
        assert_eq!(prompt(1024, false).len(), 1024);
        let p = prompt(1024, true);
        assert_eq!(p.len(), 1024);
        assert!(p.contains("jane.doe@example.com"));
    }
}
