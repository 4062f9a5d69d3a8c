//! Results: per-run and per-scenario records (serialised to JSON as they are), overhead against the
//! direct baseline, the budget, and the terminal tables.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{
    load::RunResult,
    stats::{self, Overhead, Percentiles},
};

/// The shared servers whose CPU is counted too (every process of that name: Postgres has one per
/// connection). Their work per request is the ledger's inserts and the usage stream.
pub const SHARED: [&str; 2] = ["postgres", "nats-server"];

/// Processes in table order.
const PROCS: [&str; 7] = [
    "gateway",
    "guard",
    "cache",
    "router",
    "ledger",
    "fake-provider",
    "bench",
];

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub scenario: String,
    pub via: String,
    pub target_rps: f64,
    pub connections: usize,
    pub achieved_rps: f64,
    /// Requests scheduled in the measured period.
    pub requests: u64,
    /// Failed requests of the measured period (non-2xx, transport, timeout).
    pub errors: u64,
    /// Everything, warm-up included.
    pub sent_total: u64,
    pub ok_total: u64,
    pub errors_total: u64,
    pub ambiguous_total: u64,
    pub cache_hits_total: u64,
    pub latency: Option<Percentiles>,
    pub ttft: Option<Percentiles>,
    pub overhead: Option<Overhead>,
    pub ttft_overhead: Option<Overhead>,
    pub cpu_seconds: BTreeMap<String, f64>,
    pub cpu_seconds_per_request: BTreeMap<String, f64>,
    /// Context switches (all threads) per measured request, by process: its wake-ups.
    pub switches_per_request: BTreeMap<String, f64>,
    /// read/write-type system calls per measured request, by process.
    pub io_calls_per_request: BTreeMap<String, f64>,
    pub error_samples: Vec<String>,
    /// Max-rate steps only.
    pub sustained: Option<bool>,
    /// Durations of the spans the services exported during the run (warm-up included), by
    /// `service: span name`.
    pub spans: BTreeMap<String, Percentiles>,
    /// How late the load generator released the measured requests (its clock's own error).
    pub dispatch_lateness: Option<crate::dispatch::Lateness>,
    /// How long the run waited for a quiet machine before it started.
    pub settle: Option<Settle>,
}

/// The machine counts as quiet when at most this share of its CPU time was busy over one
/// settle window (an idle mesh reads 0–2 %).
pub const QUIET_BUSY: f64 = 0.05;

/// The wait for a quiet machine before a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Settle {
    /// Seconds waited.
    pub waited_s: f64,
    /// Busy share of the machine's CPU in the last window before the run (0–1).
    pub busy_at_start: f64,
}

impl RunReport {
    pub fn from_result(
        scenario: &str,
        via: &str,
        target_rps: f64,
        connections: usize,
        r: &RunResult,
    ) -> RunReport {
        let requests = r.measured_ok + r.measured_errors;
        // Summed by name: Postgres runs one process per connection.
        let mut cpu_seconds: BTreeMap<String, f64> = BTreeMap::new();
        let mut switches: BTreeMap<String, f64> = BTreeMap::new();
        let mut io_calls: BTreeMap<String, f64> = BTreeMap::new();
        for c in &r.cpu {
            *cpu_seconds.entry(c.name.clone()).or_default() += c.seconds;
            if let Some(k) = c.kernel {
                *switches.entry(c.name.clone()).or_default() += k.switches as f64;
                *io_calls.entry(c.name.clone()).or_default() += k.io_calls as f64;
            }
        }
        let per_request = |totals: BTreeMap<String, f64>| -> BTreeMap<String, f64> {
            totals
                .into_iter()
                .filter(|_| requests > 0)
                .map(|(k, v)| (k, v / requests as f64))
                .collect()
        };
        let cpu_seconds_per_request = cpu_seconds
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    if requests > 0 {
                        v / requests as f64
                    } else {
                        0.0
                    },
                )
            })
            .collect();
        RunReport {
            scenario: scenario.to_owned(),
            via: via.to_owned(),
            target_rps,
            connections,
            achieved_rps: r.achieved_rps,
            requests,
            errors: r.measured_errors,
            sent_total: r.sent,
            ok_total: r.ok_total,
            errors_total: r.errors_total,
            ambiguous_total: r.ambiguous_total,
            cache_hits_total: r.cache_hits,
            latency: stats::percentiles(&r.latency),
            ttft: stats::percentiles(&r.ttft),
            overhead: None,
            ttft_overhead: None,
            cpu_seconds,
            cpu_seconds_per_request,
            switches_per_request: per_request(switches),
            io_calls_per_request: per_request(io_calls),
            error_samples: r.error_samples.clone(),
            sustained: None,
            spans: BTreeMap::new(),
            dispatch_lateness: r.dispatch_lateness,
            settle: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LedgerCheck {
    pub app: String,
    pub expected_rows: u64,
    pub ambiguous_requests: u64,
    pub ledger_rows: u64,
    pub lost_rows: u64,
    pub extra_rows: u64,
    pub wait_seconds: f64,
    pub query_error: Option<String>,
    pub passed: bool,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemoryUse {
    /// VmHWM: the process's peak resident set since it started.
    pub peak_rss_mb: f64,
    /// VmRSS at the end of the scenario.
    pub rss_mb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub via: String,
    pub baseline: Option<String>,
    pub runs: Vec<RunReport>,
    pub ok_total: u64,
    pub ambiguous_total: u64,
    pub ledger: Option<LedgerCheck>,
    pub usage_events_dropped: Option<u64>,
    pub memory: BTreeMap<String, MemoryUse>,
    /// Spans the receiver got while the scenario ran (export is batched, so this lags a little).
    pub spans_received: u64,
    pub max_sustained_rps: Option<f64>,
    pub loadavg_1m: f64,
}

impl ScenarioReport {
    pub fn new(name: &str, via: &str, baseline: Option<&str>) -> ScenarioReport {
        ScenarioReport {
            name: name.to_owned(),
            via: via.to_owned(),
            baseline: baseline.map(str::to_owned),
            runs: Vec::new(),
            ok_total: 0,
            ambiguous_total: 0,
            ledger: None,
            usage_events_dropped: None,
            memory: BTreeMap::new(),
            spans_received: 0,
            max_sustained_rps: None,
            loadavg_1m: 0.0,
        }
    }

    /// Adds a run's whole-run counts (warm-up included) to the ledger expectation.
    pub fn totals(&mut self, run: &RunReport) {
        self.ok_total += run.ok_total;
        self.ambiguous_total += run.ambiguous_total;
    }

    pub fn failed(&self) -> bool {
        self.ledger.as_ref().is_some_and(|l| !l.passed)
    }
}

/// Fills overhead = run − baseline run at the same target rate (the baseline's 100-connection run).
pub fn apply_baselines(reports: &mut [ScenarioReport]) {
    let baselines: BTreeMap<String, Vec<RunReport>> = reports
        .iter()
        .map(|r| (r.name.clone(), r.runs.clone()))
        .collect();
    for report in reports.iter_mut() {
        let Some(base) = report.baseline.as_ref().and_then(|b| baselines.get(b)) else {
            continue;
        };
        for run in &mut report.runs {
            let Some(direct) = base.iter().find(|d| d.target_rps == run.target_rps) else {
                continue;
            };
            if let (Some(gw), Some(d)) = (&run.latency, &direct.latency) {
                run.overhead = Some(stats::overhead(gw, d));
            }
            if let (Some(gw), Some(d)) = (&run.ttft, &direct.ttft) {
                run.ttft_overhead = Some(stats::overhead(gw, d));
            }
        }
    }
}

/// One budget line of the issue.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetLine {
    pub item: String,
    pub limit: String,
    pub measured: String,
    /// None: not measured in this run.
    pub pass: Option<bool>,
}

fn run_at<'a>(reports: &'a [ScenarioReport], name: &str, rate: f64) -> Option<&'a RunReport> {
    reports
        .iter()
        .find(|r| r.name == name)?
        .runs
        .iter()
        .find(|r| r.target_rps == rate && r.connections == 100)
}

/// Content chunks of a streamed answer in issue 3's streaming scenario (`--stream-chunks`).
pub const STREAM_CHUNKS: usize = 20;

/// The reference reading of the machine's loopback path: the direct 1 KB HTTP baseline at 1,000 rps
/// on run 20's machine of normal speed (p50 ms, fake provider µs of CPU per request).
pub const LOOPBACK_REFERENCE: (f64, f64) = (0.12, 43.0);

/// The machine's loopback path as this run read it: the direct 1 KB HTTP baseline at 1,000 rps,
/// its p50 (ms) and the fake provider's CPU per request (µs). Every overhead line moves with it,
/// and the yardstick does not see it (docs/BENCHMARKS.md, session 15), so it is printed next to
/// the budget.
pub fn loopback(reports: &[ScenarioReport]) -> Option<(f64, f64)> {
    let run = run_at(reports, "direct-http-1k", 1000.0)?;
    let p50 = run.latency.as_ref()?.p50_ms;
    let fake = run.cpu_seconds_per_request.get("fake-provider").copied()?;
    Some((p50, fake * 1e6))
}

/// The line that puts [`loopback`] next to [`LOOPBACK_REFERENCE`].
pub fn loopback_line(reading: Option<(f64, f64)>) -> String {
    let (p50, fake) = LOOPBACK_REFERENCE;
    match reading {
        Some((p50_now, fake_now)) => format!(
            "Machine's loopback path (direct-http-1k @1000 rps): p50 {p50_now:.3} ms, fake provider \
             {fake_now:.0} µs CPU per request; reference machine {p50:.2} ms, {fake:.0} µs ({:.1}× its \
             CPU)",
            fake_now / fake
        ),
        None => format!(
            "Machine's loopback path: not measured (run direct-http-1k at 1000 rps; reference \
             machine {p50:.2} ms, {fake:.0} µs)"
        ),
    }
}

/// How the runs' waits for a quiet machine went (one line under the latency table).
pub fn settle_line(settles: &[Settle]) -> String {
    let longest = settles.iter().map(|s| s.waited_s).fold(0.0, f64::max);
    let busy: Vec<&Settle> = settles
        .iter()
        .filter(|s| s.busy_at_start > QUIET_BUSY)
        .collect();
    if busy.is_empty() {
        format!(
            "Every run started on a quiet machine (at most {:.0} % busy; waited at most {longest:.1} s)",
            QUIET_BUSY * 100.0
        )
    } else {
        let worst = busy.iter().map(|s| s.busy_at_start).fold(0.0, f64::max);
        format!(
            "{} of {} runs started on a busy machine after the wait's limit (up to {:.0} % busy)",
            busy.len(),
            settles.len(),
            worst * 100.0
        )
    }
}

/// The budget against this run's numbers.
pub fn budget(reports: &[ScenarioReport]) -> Vec<BudgetLine> {
    let mut lines = Vec::new();
    // The two main lines always show (`-` when not run); the variants only when their scenario ran.
    for (name, label, always) in [
        ("gateway-http-1k", "HTTP", true),
        ("gateway-grpc-1k", "gRPC", true),
        ("budget-http-1k", "HTTP, budgets on", false),
        ("guard-redact-http", "HTTP, guard redacting", false),
    ] {
        if !always && !reports.iter().any(|r| r.name == name) {
            continue;
        }
        let o = run_at(reports, name, 1000.0).and_then(|r| r.overhead);
        lines.push(BudgetLine {
            item: format!("overhead p50 @1000 rps, {label}"),
            limit: "<= 0.5 ms".into(),
            // Three decimals: at two, a 0.503 ms miss would read "0.50 ms MISS".
            measured: o.map_or("-".into(), |o| format!("{:.3} ms", o.p50_ms)),
            pass: o.map(|o| o.p50_ms <= 0.5),
        });
        lines.push(BudgetLine {
            item: format!("overhead p99 @1000 rps, {label}"),
            limit: "<= 3 ms".into(),
            measured: o.map_or("-".into(), |o| format!("{:.2} ms", o.p99_ms)),
            pass: o.map(|o| o.p99_ms <= 3.0),
        });
    }
    let max_rate = reports.iter().find(|r| r.name == "max-rate");
    let sustained = max_rate.and_then(|r| r.max_sustained_rps);
    let ledger_ok = reports
        .iter()
        .all(|r| r.ledger.as_ref().is_none_or(|l| l.passed));
    lines.push(BudgetLine {
        item: "max sustained rate, 0 errors, 0 lost rows".into(),
        limit: ">= 3000 rps".into(),
        measured: match (max_rate, sustained) {
            (None, _) => "-".into(),
            (Some(_), None) => "< 1000 rps".into(),
            (Some(_), Some(s)) => format!(
                "{s:.0} rps{}",
                if ledger_ok {
                    ""
                } else {
                    " (ledger lost/extra rows)"
                }
            ),
        },
        pass: max_rate.map(|_| sustained.unwrap_or(0.0) >= 3000.0 && ledger_ok),
    });
    for name in ["stream-http", "stream-grpc"] {
        for rate in [200.0, 1000.0] {
            let o = run_at(reports, name, rate).and_then(|r| r.ttft_overhead);
            lines.push(BudgetLine {
                item: format!("TTFT overhead p50 @{rate:.0} rps, {name}"),
                limit: "<= 1 ms".into(),
                measured: o.map_or("-".into(), |o| format!("{:.2} ms", o.p50_ms)),
                pass: o.map(|o| o.p50_ms <= 1.0),
            });
        }
    }
    // Steady state: RSS at the end of the last scenario, per service. The cache is excepted while it
    // holds the embedding model (a semantic scenario ran).
    let model_loaded = reports.iter().any(|r| r.name == "semantic-hit-http");
    if let Some(last) = reports.last() {
        for name in ["gateway", "guard", "cache", "router", "ledger"] {
            if let Some(m) = last.memory.get(name) {
                let excepted = name == "cache" && model_loaded;
                lines.push(BudgetLine {
                    item: format!(
                        "RSS {name} (end of run; peak){}",
                        if excepted {
                            ", embedding model loaded: excepted"
                        } else {
                            ""
                        }
                    ),
                    limit: "<= 100 MB".into(),
                    measured: format!("{:.1} MB; peak {:.1} MB", m.rss_mb, m.peak_rss_mb),
                    pass: if excepted {
                        None
                    } else {
                        Some(m.rss_mb <= 100.0)
                    },
                });
            }
        }
    }
    lines
}

fn f(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

/// The terminal tables (also what docs/BENCHMARKS.md shows).
pub fn tables(reports: &[ScenarioReport], budget: &[BudgetLine]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nLatency (ms, from the scheduled time; overhead = gateway - direct at the same rate)"
    );
    let _ = writeln!(
        out,
        "{:<18} {:>6} {:>5} {:>8} {:>7} {:>5} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "scenario",
        "rate",
        "conn",
        "achieved",
        "reqs",
        "err",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "ovh50",
        "ovh99",
        "ttft50",
        "ttft99",
        "tovh50",
        "tovh99"
    );
    for report in reports {
        for run in &report.runs {
            let l = run.latency;
            let t = run.ttft;
            let mut name = run.scenario.clone();
            if let Some(s) = run.sustained {
                name = format!("{name}{}", if s { " ok" } else { " X" });
            }
            let _ = writeln!(
                out,
                "{:<18} {:>6.0} {:>5} {:>8.0} {:>7} {:>5} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
                name,
                run.target_rps,
                run.connections,
                run.achieved_rps,
                run.requests,
                run.errors,
                f(l.map(|l| l.p50_ms)),
                f(l.map(|l| l.p90_ms)),
                f(l.map(|l| l.p99_ms)),
                f(l.map(|l| l.p999_ms)),
                f(l.map(|l| l.max_ms)),
                f(run.overhead.map(|o| o.p50_ms)),
                f(run.overhead.map(|o| o.p99_ms)),
                f(t.map(|t| t.p50_ms)),
                f(t.map(|t| t.p99_ms)),
                f(run.ttft_overhead.map(|o| o.p50_ms)),
                f(run.ttft_overhead.map(|o| o.p99_ms)),
            );
        }
    }

    let late = reports
        .iter()
        .flat_map(|r| &r.runs)
        .filter_map(|run| run.dispatch_lateness)
        .fold(None, |worst: Option<crate::dispatch::Lateness>, l| {
            Some(worst.map_or(l, |w| crate::dispatch::Lateness {
                p50_us: w.p50_us.max(l.p50_us),
                p99_us: w.p99_us.max(l.p99_us),
                max_us: w.max_us.max(l.max_us),
                priority: w.priority.and(l.priority),
            }))
        });
    if let Some(late) = late {
        let _ = writeln!(
            out,
            "Requests left the load generator at most {} µs (p50) / {} µs (p99) / {} µs (max) after their scheduled time (worst run; dispatcher thread at {})",
            late.p50_us,
            late.p99_us,
            late.max_us,
            late.priority
                .unwrap_or("the default priority: no permission to raise it")
        );
    }
    let settles: Vec<Settle> = reports
        .iter()
        .flat_map(|r| &r.runs)
        .filter_map(|run| run.settle)
        .collect();
    if !settles.is_empty() {
        let _ = writeln!(out, "{}", settle_line(&settles));
    }

    let _ = writeln!(
        out,
        "\nLedger (rows of the scenario's app vs successful gateway requests, warm-up included)"
    );
    let _ = writeln!(
        out,
        "{:<18} {:>9} {:>9} {:>6} {:>6} {:>6} {:>8} {:>8} {:>9}  status",
        "scenario", "expected", "rows", "lost", "extra", "ambig", "wait s", "dropped", "spans"
    );
    for report in reports {
        let Some(l) = &report.ledger else { continue };
        let _ = writeln!(
            out,
            "{:<18} {:>9} {:>9} {:>6} {:>6} {:>6} {:>8.1} {:>8} {:>9}  {}",
            report.name,
            l.expected_rows,
            l.ledger_rows,
            l.lost_rows,
            l.extra_rows,
            l.ambiguous_requests,
            l.wait_seconds,
            report
                .usage_events_dropped
                .map_or("-".into(), |d| d.to_string()),
            report.spans_received,
            if l.passed { "ok" } else { "FAILED" },
        );
    }

    per_process_table(
        &mut out,
        "CPU per request (µs of CPU time per measured request, by process)",
        9,
        reports,
        |run, p| {
            run.cpu_seconds_per_request
                .get(p)
                .filter(|v| v.is_finite())
                .map_or("-".into(), |v| format!("{:.1}", v * 1e6))
        },
    );
    per_process_table(
        &mut out,
        "Kernel work per request (context switches of all threads / read+write system calls, \
         per measured request, by process: wake-ups and socket operations, which do not depend \
         on the machine's speed)",
        11,
        reports,
        |run, p| match (
            run.switches_per_request.get(p),
            run.io_calls_per_request.get(p),
        ) {
            (Some(s), Some(c)) if s.is_finite() && c.is_finite() => format!("{s:.1}/{c:.1}"),
            _ => "-".into(),
        },
    );

    let _ = writeln!(
        out,
        "\nSpan durations (ms p50 / p99 of the services' own spans during the run, warm-up included)"
    );
    for report in reports {
        for run in report.runs.iter().filter(|r| !r.spans.is_empty()) {
            let _ = writeln!(
                out,
                "{:<18} {:>6.0} {:>5}",
                run.scenario, run.target_rps, run.connections
            );
            for (name, p) in &run.spans {
                let _ = writeln!(
                    out,
                    "    {name:<60} {:>8.3} {:>8.3}   ({} spans)",
                    p.p50_ms, p.p99_ms, p.count
                );
            }
        }
    }

    let _ = writeln!(
        out,
        "\nMemory (MB: VmRSS at the end of the scenario / VmHWM peak since start)"
    );
    let mut header = format!("{:<18}", "scenario");
    for p in PROCS {
        let _ = write!(header, " {:>13}", short(p));
    }
    let _ = writeln!(out, "{header}");
    for report in reports {
        let mut line = format!("{:<18}", report.name);
        for p in PROCS {
            let v = report.memory.get(p);
            let _ = write!(
                line,
                " {:>13}",
                v.map_or("-".into(), |m| format!(
                    "{:.0}/{:.0}",
                    m.rss_mb, m.peak_rss_mb
                ))
            );
        }
        let _ = writeln!(out, "{line}");
    }

    if let Some(m) = reports.iter().find(|r| r.name == "max-rate") {
        let _ = writeln!(
            out,
            "\nMax sustained rate (achieved >= 98% of target, 0 errors, p99 < 100 ms): {}",
            m.max_sustained_rps
                .map_or("none of the steps passed".into(), |r| format!("{r:.0} rps"))
        );
    }

    let _ = writeln!(out, "\nBudget (issue 3)");
    for line in budget {
        let _ = writeln!(
            out,
            "  {:<44} {:<10} {:<28} {}",
            line.item,
            line.limit,
            line.measured,
            match line.pass {
                Some(true) => "pass",
                Some(false) => "MISS",
                None => "not measured",
            }
        );
    }
    let failures: Vec<String> = reports
        .iter()
        .flat_map(|r| r.runs.iter())
        .filter(|r| !r.error_samples.is_empty())
        .map(|r| {
            format!(
                "  {} @{:.0}/{}: {}",
                r.scenario,
                r.target_rps,
                r.connections,
                r.error_samples.join(" | ")
            )
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\nError samples");
        for f in failures {
            let _ = writeln!(out, "{f}");
        }
    }
    out
}

fn short(p: &str) -> &str {
    match p {
        "fake-provider" => "fake",
        "nats-server" => "nats",
        other => other,
    }
}

/// A table of one figure per run and process (the services, then the shared servers).
fn per_process_table(
    out: &mut String,
    title: &str,
    width: usize,
    reports: &[ScenarioReport],
    cell: impl Fn(&RunReport, &str) -> String,
) {
    let _ = writeln!(out, "\n{title}");
    let mut header = format!("{:<18} {:>6} {:>5}", "scenario", "rate", "conn");
    for p in PROCS.iter().chain(&SHARED) {
        let _ = write!(header, " {:>width$}", short(p));
    }
    let _ = writeln!(out, "{header}");
    for report in reports {
        for run in &report.runs {
            let mut line = format!(
                "{:<18} {:>6.0} {:>5}",
                run.scenario, run.target_rps, run.connections
            );
            for p in PROCS.iter().chain(&SHARED) {
                let _ = write!(line, " {:>width$}", cell(run, p));
            }
            let _ = writeln!(out, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_settle_line_names_runs_that_started_busy() {
        let quiet = Settle {
            waited_s: 1.5,
            busy_at_start: 0.02,
        };
        let line = settle_line(&[quiet, quiet]);
        assert!(
            line.starts_with("Every run started on a quiet machine"),
            "{line}"
        );
        assert!(line.contains("1.5 s"), "{line}");
        let busy = Settle {
            waited_s: 20.0,
            busy_at_start: 0.4,
        };
        let line = settle_line(&[quiet, busy]);
        assert!(
            line.starts_with("1 of 2 runs started on a busy machine"),
            "{line}"
        );
        assert!(line.contains("40 % busy"), "{line}");
    }

    #[test]
    fn kernel_work_is_summed_by_process_name_and_divided_by_the_measured_requests() {
        use crate::{load::CpuDelta, procfs::KernelCounts};
        let delta = |name: &str, switches, io_calls| CpuDelta {
            name: name.to_owned(),
            seconds: 0.5,
            kernel: Some(KernelCounts { switches, io_calls }),
        };
        let result = RunResult {
            sent: 120,
            ok_total: 120,
            ambiguous_total: 0,
            errors_total: 0,
            measured_ok: 95,
            measured_errors: 5,
            latency: stats::new_histogram().unwrap(),
            ttft: stats::new_histogram().unwrap(),
            achieved_rps: 100.0,
            cache_hits: 0,
            error_samples: Vec::new(),
            cpu: vec![
                delta("gateway", 250, 110),
                // Postgres runs one process per connection: summed.
                delta("postgres", 20, 4),
                delta("postgres", 10, 6),
                CpuDelta {
                    name: "router".to_owned(),
                    seconds: 0.1,
                    kernel: None,
                },
            ],
            dispatch_lateness: None,
        };
        let run = RunReport::from_result("gateway-http-1k", "http", 100.0, 100, &result);
        assert_eq!(run.switches_per_request.get("gateway"), Some(&2.5));
        assert_eq!(run.io_calls_per_request.get("gateway"), Some(&1.1));
        assert_eq!(run.switches_per_request.get("postgres"), Some(&0.3));
        assert_eq!(run.io_calls_per_request.get("postgres"), Some(&0.1));
        // No reading is no figure, not zero.
        assert_eq!(run.switches_per_request.get("router"), None);
        let mut scenario = ScenarioReport::new("gateway-http-1k", "http", Some("direct-http-1k"));
        scenario.runs.push(run);
        let table = tables(&[scenario], &[]);
        assert!(table.contains("Kernel work per request"), "{table}");
        assert!(table.contains("2.5/1.1"), "{table}");
    }

    #[test]
    fn the_loopback_line_compares_with_the_reference_machine() {
        let line = loopback_line(Some((0.14, 86.0)));
        assert!(line.contains("p50 0.140 ms"), "{line}");
        assert!(line.contains("86 µs"), "{line}");
        assert!(line.contains("2.0× its"), "{line}");
        let missing = loopback_line(None);
        assert!(missing.contains("not measured"), "{missing}");
    }
}
