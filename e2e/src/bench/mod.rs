//! Pieces the benchmark binaries share: percentiles, process figures from
//! /proc, Prometheus pages, and the Node-allocation benchmark itself.

use std::time::Duration;

pub mod datapath;
pub mod metrics;
pub mod nodes;
pub mod pods;
pub mod process;

pub use process::proc_status_mib;

/// The `p` quantile (0.0–1.0) of `sorted`, nearest rank; `sorted` must not be empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The median of `values` (the lower middle one for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_three_is_the_middle_one() {
        assert_eq!(median(&[52.6, 43.5, 50.8]), Some(50.8));
        assert_eq!(median(&[2.0, 1.0]), Some(1.0));
        assert_eq!(median(&[]), None);
    }
}
