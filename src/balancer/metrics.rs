//! The balancer-wide counters the proxy bumps on its hot path and the admin
//! endpoints read: kept apart from both so that neither imports the other.

use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::prometheus::Histogram;

use super::answer::{LOCAL_LABELS, LocalAnswer};

/// Balancer-wide counters (per-upstream ones live in `LiveState`).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Upstream latency.
    pub latency: Histogram,
    /// Answers the balancer made itself, by status code (see
    /// [`LocalAnswer::slot`]): 400, 404, 405, 413, 429, 502, 503 (no upstream,
    /// or no descriptor for an upstream connection),
    /// 504 (the queue's 503s
    /// are in [`QueueCounters`], the edge's 409s in [`super::edge::Edge`]).
    pub(super) local: [AtomicU64; LOCAL_LABELS.len()],
    /// The admission queue (requests waiting for an upstream below its
    /// `max_conns`).
    pub queue: QueueCounters,
    /// Client connections the fast path ([`super::h1`]) handed to hyper's
    /// server for a request it does not take (they stay there).
    pub general_connections: AtomicU64,
    /// Idle client connections that gave their buffers back when a crowd
    /// formed after they went idle (see `server::reuse::crowd_formed`).
    pub buffers_given_back: AtomicU64,
    /// Upgraded connections (WebSockets) tunnelled to an upstream now.
    pub tunnels_open: AtomicU64,
    /// Upgraded connections tunnelled since start.
    pub tunnels: AtomicU64,
}

/// What the admission queue holds and has done.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Requests waiting now.
    pub waiting: std::sync::atomic::AtomicUsize,
    /// Requests that waited, ever (and then got an upstream or a 503).
    pub queued: AtomicU64,
    /// 503s because the queue was full.
    pub full: AtomicU64,
    /// 503s because the wait passed `queue_timeout`.
    pub timed_out: AtomicU64,
    /// How long the requests that waited waited.
    pub wait: Histogram,
}

impl Metrics {
    /// Counts an answer the balancer made itself (the admission 503s are
    /// counted by the queue instead).
    pub fn count_local(&self, answer: LocalAnswer) {
        if let Some(i) = answer.slot() {
            self.local[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The answers the balancer made itself, by status code (every status
    /// it makes, zeros included): for `/status`, `/metrics` and the page.
    pub fn local_counts(&self) -> impl Iterator<Item = (&'static str, &AtomicU64)> {
        LOCAL_LABELS.into_iter().zip(&self.local)
    }
}
