//! The balancer-wide counters the proxy bumps on its hot path and the admin
//! endpoints read: kept apart from both so that neither imports the other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Time from a request's arrival to its upstream's response head.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative); the last slot is `+Inf`.
    pub(super) counts: [AtomicU64; BUCKETS.len() + 1],
    pub(super) sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation (a few relaxed atomic adds).
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Balancer-wide counters (per-upstream ones live in `LiveState`).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Upstream latency.
    pub latency: Histogram,
    /// Answers the balancer made itself: 400, 502, 504.
    pub(super) local_400: AtomicU64,
    pub(super) local_502: AtomicU64,
    pub(super) local_504: AtomicU64,
}

impl Metrics {
    /// Counts an answer the balancer made itself.
    pub fn count_local(&self, status: u16) {
        let c = match status {
            400 => &self.local_400,
            504 => &self.local_504,
            _ => &self.local_502,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}
