//! What a node has done, counted on the hot path with relaxed atomics and
//! read by `/stats` and `/metrics`.

use std::sync::atomic::AtomicU64;

/// Counters for `/stats`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Tickets this node sold.
    pub sold: AtomicU64,
    /// Sold-out answers (from the store or from memory).
    pub sold_out: AtomicU64,
    /// Answers to buyers at their limit (or whom the purchase would take
    /// over it).
    pub already_bought: AtomicU64,
    /// 409 answers to purchases of more tickets than were left (nothing
    /// sold; not sold out).
    pub too_few_left: AtomicU64,
    /// Answers that repeated a key's first answer.
    pub replayed: AtomicU64,
    /// Store calls that failed (each a 503).
    pub store_errors: AtomicU64,
    /// Purchases sent to the store (several go out in one call, see
    /// `redis_calls`).
    pub store_calls: AtomicU64,
    /// Lease requests sent to the store (polls included).
    pub lease_calls: AtomicU64,
    /// Requests refused as malformed.
    pub bad_requests: AtomicU64,
    /// 503 busy answers: every unit left is held by purchases in flight.
    pub busy: AtomicU64,
    /// 503 answers because the sale was never initialised (not a store
    /// error: the store answered).
    pub not_initialised: AtomicU64,
    /// 409 answers while the sale does not sell: not open yet, closed, or
    /// paused (from memory before the opening, else the store's word).
    pub not_selling: AtomicU64,
    /// 503 answers for sales made on the primary that fewer than
    /// `[redis] replicas` acknowledged in time (ambiguous: the order exists).
    pub not_replicated: AtomicU64,
    /// How long purchases and lease requests waited for the store.
    pub store_latency: crate::prometheus::Histogram,
    /// Reservations this node's sweeps expired.
    pub expired: AtomicU64,
    /// Order calls (pay, cancel, read) this node answered from the store.
    pub order_calls: AtomicU64,
    /// 401 answers: with `[auth]`, a purchase or an order call without a
    /// valid buyer token or payment signature.
    pub unauthorized: AtomicU64,
    /// Full reads of the holders that landed: one per sold-out epoch, plus
    /// one each time the events since the last were gone. What issue 26
    /// watches: it grew with every returned ticket.
    pub holder_reads: AtomicU64,
    /// Reads of what changed among the holders since the last (a returned
    /// ticket or a sale costs one of these, not a full read).
    pub holder_changes: AtomicU64,
}
