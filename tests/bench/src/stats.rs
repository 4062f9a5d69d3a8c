//! Pure maths: the open-loop schedule, latency histograms and their summaries, overhead.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest recordable latency, microseconds (5 minutes); larger values are clamped.
const MAX_MICROS: u64 = 300_000_000;

/// Offset of request `index` from the start of the schedule at `rate` requests per second.
pub fn schedule_offset(index: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(index as f64 / rate)
}

/// How many requests a run of `seconds` at `rate` schedules (at least one).
pub fn scheduled_count(seconds: f64, rate: f64) -> u64 {
    ((seconds * rate).round() as u64).max(1)
}

/// A latency histogram in microseconds.
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, MAX_MICROS, 3)?)
}

/// Records `latency` (clamped into the histogram's range).
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
    histogram.saturating_record(micros);
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// Summarises a histogram; `None` when it is empty.
pub fn percentiles(histogram: &Histogram<u64>) -> Option<Percentiles> {
    if histogram.is_empty() {
        return None;
    }
    Some(Percentiles {
        count: histogram.len(),
        p50_ms: ms(histogram.value_at_quantile(0.50)),
        p90_ms: ms(histogram.value_at_quantile(0.90)),
        p99_ms: ms(histogram.value_at_quantile(0.99)),
        p999_ms: ms(histogram.value_at_quantile(0.999)),
        max_ms: ms(histogram.max()),
        mean_ms: histogram.mean() / 1000.0,
    })
}

/// Gateway minus direct, at the same rate.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Overhead {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The overhead of `through` (the gateway) over `direct` (the provider alone).
pub fn overhead(through: &Percentiles, direct: &Percentiles) -> Overhead {
    Overhead {
        p50_ms: through.p50_ms - direct.p50_ms,
        p99_ms: through.p99_ms - direct.p99_ms,
    }
}

/// Achieved rate: measured requests over the measured window, or over the time it really took when
/// the responses came later than the window (the system could not keep up).
pub fn achieved_rate(
    completed: u64,
    window: Duration,
    last_completion_after_start: Duration,
) -> f64 {
    let elapsed = window.max(last_completion_after_start).as_secs_f64();
    if elapsed <= 0.0 {
        return 0.0;
    }
    completed as f64 / elapsed
}

/// The max-rate criterion: achieved ≥ 98 % of target, zero errors, p99 < 100 ms.
pub fn sustained(target: f64, achieved: f64, errors: u64, p99_ms: f64) -> bool {
    achieved >= 0.98 * target && errors == 0 && p99_ms < 100.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_schedule_is_evenly_spaced_at_the_rate() {
        assert_eq!(schedule_offset(0, 1000.0), Duration::ZERO);
        assert_eq!(schedule_offset(1, 1000.0), Duration::from_millis(1));
        assert_eq!(schedule_offset(2000, 1000.0), Duration::from_secs(2));
        assert_eq!(schedule_offset(3, 200.0), Duration::from_millis(15));
        assert_eq!(scheduled_count(11.0, 1000.0), 11_000);
        assert_eq!(scheduled_count(0.0001, 1.0), 1);
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = new_histogram().unwrap();
        for ms in 1..=1000u64 {
            record(&mut h, Duration::from_millis(ms));
        }
        let p = percentiles(&h).unwrap();
        assert_eq!(p.count, 1000);
        assert!((p.p50_ms - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p90_ms - 900.0).abs() < 1.0, "{p:?}");
        assert!((p.p99_ms - 990.0).abs() < 1.0, "{p:?}");
        assert!((p.max_ms - 1000.0).abs() < 1.0, "{p:?}");
        assert!(percentiles(&new_histogram().unwrap()).is_none());
    }

    #[test]
    fn overhead_is_gateway_minus_direct() {
        let direct = Percentiles {
            p50_ms: 0.4,
            p99_ms: 1.0,
            ..Default::default()
        };
        let gateway = Percentiles {
            p50_ms: 1.1,
            p99_ms: 4.5,
            ..Default::default()
        };
        let o = overhead(&gateway, &direct);
        assert!((o.p50_ms - 0.7).abs() < 1e-9);
        assert!((o.p99_ms - 3.5).abs() < 1e-9);
    }

    #[test]
    fn achieved_rate_counts_late_completions() {
        let window = Duration::from_secs(10);
        assert_eq!(
            achieved_rate(10_000, window, Duration::from_secs(9)),
            1000.0
        );
        assert_eq!(
            achieved_rate(10_000, window, Duration::from_secs(20)),
            500.0
        );
        assert!(sustained(1000.0, 990.0, 0, 5.0));
        assert!(!sustained(1000.0, 970.0, 0, 5.0));
        assert!(!sustained(1000.0, 1000.0, 1, 5.0));
        assert!(!sustained(1000.0, 1000.0, 0, 150.0));
    }
}
