//! The balancer-wide counters the proxy bumps on its hot path and the admin
//! endpoints read: kept apart from both so that neither imports the other.

use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::prometheus::Histogram;

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
