//! How fast the machine is right now, measured the same way in every run.
//!
//! The VM's speed drifts between days and within a day (docs/BENCHMARKS.md runs 8 and 21: the same
//! binaries cost twice the CPU per request), and every latency the benchmark reports moves with
//! it. Three fixed workloads, timed before and after the scenarios, say how fast the machine was
//! while the numbers were taken, so that two runs can be told apart from two machines:
//! - `cpu`: integer arithmetic on data that stays in the L1 cache;
//! - `memory`: dependent random reads over 64 MiB (cache misses, TLB, memory bandwidth);
//! - `wake`: one thread waking another and being woken back (the futex wake-ups and, in a VM, the
//!   inter-processor interrupts that every loopback hop of the mesh pays).
//!
//! Each is run several times and reported as the best and the median: the best is what the machine
//! can do, the median what it did.

use std::{
    hint::black_box,
    sync::mpsc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// One reading of the three workloads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Yardstick {
    /// Integer work, ms per pass (best, median).
    pub cpu_ms: (f64, f64),
    /// Random reads over 64 MiB, ms per pass (best, median).
    pub memory_ms: (f64, f64),
    /// Thread-to-thread wake-up round trip, µs (best pass's median, median pass's median).
    pub wake_us: (f64, f64),
}

const PASSES: usize = 5;

/// Runs the three workloads ([`PASSES`] passes each); takes about a second on a normal day.
pub fn measure() -> Yardstick {
    Yardstick {
        cpu_ms: best_and_median(|| ms(time(cpu_pass))),
        memory_ms: {
            let table = permutation(64 * 1024 * 1024 / std::mem::size_of::<u32>());
            best_and_median(|| ms(time(|| memory_pass(&table))))
        },
        wake_us: best_and_median(wake_pass),
    }
}

impl Yardstick {
    /// One line for the report.
    pub fn line(&self) -> String {
        format!(
            "cpu {:.1} ms, memory {:.1} ms, wake-up round trip {:.1} µs (best; median {:.1} / {:.1} / {:.1})",
            self.cpu_ms.0,
            self.memory_ms.0,
            self.wake_us.0,
            self.cpu_ms.1,
            self.memory_ms.1,
            self.wake_us.1
        )
    }
}

fn best_and_median(mut pass: impl FnMut() -> f64) -> (f64, f64) {
    let mut readings: Vec<f64> = (0..PASSES).map(|_| pass()).collect();
    readings.sort_by(f64::total_cmp);
    (readings[0], readings[PASSES / 2])
}

fn time(work: impl FnOnce()) -> Duration {
    let started = Instant::now();
    work();
    started.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// xorshift over a small state: ~20 M dependent integer operations.
fn cpu_pass() {
    let mut state = [0x9E37_79B9_7F4A_7C15_u64; 64];
    for round in 0..300_000u64 {
        for (i, slot) in state.iter_mut().enumerate() {
            let mut x = *slot ^ round.wrapping_add(i as u64);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *slot = x;
        }
    }
    black_box(state);
}

/// A single cycle through `len` slots in a fixed pseudo-random order (Sattolo's algorithm).
fn permutation(len: usize) -> Vec<u32> {
    let mut table: Vec<u32> = (0..len as u32).collect();
    let mut seed = 0x2545_F491_4F6C_DD1D_u64;
    for i in (1..len).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let j = (seed % i as u64) as usize;
        table.swap(i, j);
    }
    table
}

/// 2 M dependent reads following the cycle.
fn memory_pass(table: &[u32]) {
    let mut at = 0u32;
    for _ in 0..2_000_000 {
        at = table[at as usize];
    }
    black_box(at);
}

/// The median of 1,000 wake-up round trips between two threads, µs.
fn wake_pass() -> f64 {
    const TRIPS: usize = 1_000;
    let (to_echo, echo_rx) = mpsc::channel::<Instant>();
    let (to_main, main_rx) = mpsc::channel::<Instant>();
    let echo = std::thread::spawn(move || {
        while let Ok(sent) = echo_rx.recv() {
            if to_main.send(sent).is_err() {
                break;
            }
        }
    });
    let mut trips = Vec::with_capacity(TRIPS);
    for _ in 0..TRIPS {
        // A pause long enough for the echo thread to go to sleep, as an idle service does.
        std::thread::sleep(Duration::from_micros(50));
        let _ = to_echo.send(Instant::now());
        if let Ok(sent) = main_rx.recv() {
            trips.push(sent.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(to_echo);
    let _ = echo.join();
    trips.sort_by(f64::total_cmp);
    trips.get(trips.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_permutation_is_one_cycle_through_every_slot() {
        let table = permutation(1000);
        let (mut at, mut seen) = (0u32, std::collections::HashSet::new());
        for _ in 0..1000 {
            assert!(
                seen.insert(at),
                "slot {at} visited twice before the cycle closed"
            );
            at = table[at as usize];
        }
        assert_eq!(at, 0, "the walk returns to its start after every slot");
        assert_eq!(seen.len(), 1000);
    }

    #[test]
    fn best_is_the_smallest_reading_and_median_the_middle_one() {
        let mut readings = [5.0, 1.0, 4.0, 2.0, 3.0].into_iter();
        let (best, median) = best_and_median(|| readings.next().unwrap_or(f64::NAN));
        assert_eq!(best, 1.0);
        assert_eq!(median, 3.0);
    }
}
