//! The open-loop schedule's clock: a dedicated thread that releases request `i` at
//! `t0 + i / rate` with microsecond precision.
//!
//! tokio's timer has a 1 ms resolution and rounds a deadline up to its next tick, so a dispatcher
//! sleeping on it sends every request 0–1 ms late. At 1,000 rps all requests of a run then share
//! the same lateness, set by where `t0` falls between two ticks, which is random per run: two runs
//! of the same server read p50s up to ~0.5 ms apart, and an overhead (gateway p50 − direct p50,
//! two runs) inherited that error. This thread sleeps with `nanosleep` on a timer slack of 1 ns and
//! measures how late each release actually was, so the report shows the clock's own error.
//!
//! The thread also asks for a real-time scheduling priority (`SCHED_FIFO` 1, through `chrt`;
//! else nice -15; both need root or `CAP_SYS_NICE`, otherwise it keeps the default): it works a
//! few microseconds per request, but with the mesh keeping both cores busy its wake-ups otherwise
//! wait for the running service's time slice, and that wait (0.5–1 ms at p99 with the default
//! priority, still ~0.5 ms at nice -15) was counted as the mesh's latency. Only this thread is
//! raised; the connections' tasks, which do the client's real work, keep the default priority.

use std::time::Instant;

use hdrhistogram::Histogram;

use crate::stats;

/// The nice value the dispatcher thread asks for when it cannot have `SCHED_FIFO`.
const DISPATCH_NICE: i32 = -15;

/// Raises the calling thread's priority: `SCHED_FIFO` 1 (via `chrt`, the workspace forbids
/// `unsafe`), else nice [`DISPATCH_NICE`]; what it got, or `None`.
#[cfg(target_os = "linux")]
fn raise_priority() -> Option<&'static str> {
    let tid = nix::unistd::gettid().to_string();
    let fifo = std::process::Command::new("chrt")
        .args(["--fifo", "--pid", "1", &tid])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if fifo {
        return Some("SCHED_FIFO 1");
    }
    // PRIO_PROCESS with pid 0 sets the calling thread's nice value only (Linux).
    rustix::process::setpriority_process(None, DISPATCH_NICE)
        .is_ok()
        .then_some("nice -15")
}

/// What the dispatcher thread measured.
pub struct Released {
    /// How late the releases of the measured period were (µs).
    pub lateness: Histogram<u64>,
    /// The higher priority the thread got, if any.
    pub raised: Option<&'static str>,
}

/// Releases `total` requests at `t0 + schedule_offset(i, rate)` on a dedicated thread, calling
/// `release(i, due)` for each; returns the thread, whose result says how late the releases of the
/// measured period (`due >= measure_start`) were.
pub fn spawn(
    total: u64,
    rate: f64,
    t0: Instant,
    measure_start: Instant,
    mut release: impl FnMut(u64, Instant) + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<Released>> {
    let mut lateness = stats::new_histogram()?;
    let handle = std::thread::Builder::new()
        .name("bench-dispatch".to_owned())
        .spawn(move || {
            // The default slack (50 µs) would let the kernel defer each wake-up to batch timers.
            #[cfg(target_os = "linux")]
            let _ = nix::sys::prctl::set_timerslack(1);
            #[cfg(target_os = "linux")]
            let raised = raise_priority();
            #[cfg(not(target_os = "linux"))]
            let raised = None;
            for index in 0..total {
                let due = t0 + stats::schedule_offset(index, rate);
                let wait = due.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                let late = Instant::now().saturating_duration_since(due);
                release(index, due);
                if due >= measure_start {
                    stats::record(&mut lateness, late);
                }
            }
            Released { lateness, raised }
        })?;
    Ok(handle)
}

/// The lateness summary of a run: p50, p99 and max in microseconds, and whether the dispatcher ran
/// at its raised priority.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, PartialEq)]
pub struct Lateness {
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// The dispatcher's raised priority (`SCHED_FIFO 1`, `nice -15`), if it got one.
    pub priority: Option<&'static str>,
}

impl Lateness {
    /// Summarises what the thread measured; `None` when nothing was measured.
    pub fn of(released: &Released) -> Option<Lateness> {
        let histogram = &released.lateness;
        (!histogram.is_empty()).then(|| Lateness {
            p50_us: histogram.value_at_quantile(0.5),
            p99_us: histogram.value_at_quantile(0.99),
            max_us: histogram.max(),
            priority: released.raised,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    #[test]
    fn every_request_is_released_once_in_order_and_not_before_it_is_due() {
        let t0 = Instant::now() + Duration::from_millis(5);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let thread = spawn(50, 5_000.0, t0, t0, move |index, due| {
            record
                .lock()
                .expect("lock")
                .push((index, due, Instant::now()));
        })
        .expect("spawn");
        let released = thread.join().expect("join");
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), 50);
        for (i, (index, due, at)) in seen.iter().enumerate() {
            assert_eq!(*index, i as u64);
            assert_eq!(*due, t0 + stats::schedule_offset(i as u64, 5_000.0));
            assert!(at >= due, "request {i} released before it was due");
        }
        assert_eq!(
            released.lateness.len(),
            50,
            "every measured release is counted"
        );
    }

    #[test]
    fn releases_before_the_measured_period_are_not_counted() {
        let t0 = Instant::now();
        let measure_start = t0 + Duration::from_millis(2);
        // 10 requests 0.5 ms apart: 4 due before the measured period starts.
        let thread = spawn(10, 2_000.0, t0, measure_start, |_, _| {}).expect("spawn");
        let released = thread.join().expect("join");
        assert_eq!(released.lateness.len(), 6);
        let summary = Lateness::of(&released).expect("non-empty");
        assert!(summary.p50_us <= summary.p99_us && summary.p99_us <= summary.max_us);
    }
}
