//! Sold out at the edge: once the nodes say the sale is sold out, the
//! balancer answers the flood of late buyers itself (`409 sold_out`, and
//! `409 already_bought` with the order for a buyer at the limit) instead of
//! sending each of them to a node.
//!
//! The balancer has no store; what it knows comes from the nodes: a
//! `Spike-Sold-Out` header on their sold-out answers (the traffic it
//! carries anyway) or its poll of a node's `/sale`, then one read of a
//! node's `/holders`. It lets go as soon as the sale may have stock again:
//! its poll of `/sale` (a few times a second while it answers) sees the
//! epoch change (a reset), tickets come back (`released` grew, a cancel or
//! an expiry) or `sold < total`, and the next request goes to a node, which
//! stays the authority for every purchase it is sent. Only what a node
//! would answer from memory is answered here; a purchase that carries the
//! client's own `Idempotency-Key` (a retry that may own an order) always
//! goes to a node.
//!
//! This module holds the state only; the polling is in [`super::sale`].

use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

use crate::node::store::holders::{HashKeyed, IdHasher};
use crate::node::store::{HolderSeed, Lookup};
use crate::protocol::HoldersView;

/// What the balancer knows of a sold-out sale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoldOut {
    /// The sale's epoch the holders belong to.
    pub epoch: u64,
    /// Tickets that had come back when the holders were read.
    pub released: u64,
    /// The stored per-user limit (0: no buyer is ever at a limit).
    pub per_user_limit: u64,
    /// The keys of the buyer hashes, the node's that listed them.
    pub seed: HolderSeed,
    /// Buyer hash → last order's sequence, of the buyers at the limit:
    /// about 20 bytes a holder, where names and order ids took about 500.
    pub buyers: HashKeyed<u64>,
    /// Buyer hashes two holders share: a node answers for them.
    pub ask: HashSet<u64, BuildHasherDefault<IdHasher>>,
    /// `EVENT:` before the order ids, in a fleet of several sales (where
    /// an order id names its sale); empty with one.
    pub order_prefix: String,
}

impl SoldOut {
    /// What the edge knows of `buyer`: their last order's sequence when
    /// at the limit.
    pub fn holder(&self, buyer: &str) -> Lookup<u64> {
        let h = self.seed.hash(buyer);
        if self.ask.contains(&h) {
            return Lookup::AskStore;
        }
        match self.buyers.get(&h) {
            Some(&seq) => Lookup::Found(seq),
            None => Lookup::Absent,
        }
    }

    /// The order id of sequence `seq` in this sale.
    pub fn order_id(&self, seq: u64) -> String {
        let mut e = itoa::Buffer::new();
        let mut n = itoa::Buffer::new();
        let (e, n) = (e.format(self.epoch), n.format(seq));
        let mut id = String::with_capacity(self.order_prefix.len() + e.len() + 1 + n.len());
        id.push_str(&self.order_prefix);
        id.push_str(e);
        id.push('-');
        id.push_str(n);
        id
    }

    /// The edge's view from a node's `/holders`.
    pub fn from_view(v: HoldersView) -> SoldOut {
        let mut buyers = HashKeyed::default();
        buyers.reserve(v.buyers.len());
        buyers.extend(v.buyers.into_iter().map(|[h, seq]| (h, seq)));
        SoldOut {
            epoch: v.epoch,
            released: v.released,
            per_user_limit: v.per_user_limit,
            seed: HolderSeed(v.seed[0], v.seed[1]),
            buyers,
            ask: v.ask.into_iter().collect(),
            order_prefix: String::new(),
        }
    }
}

/// The edge's state, shared by every worker.
#[derive(Debug, Default)]
pub struct Edge {
    sold_out: ArcSwapOption<SoldOut>,
    /// A read of `/holders` is under way.
    learning: AtomicBool,
    /// Answers made here, for `/status` and `/metrics`.
    pub sold_out_answers: AtomicU64,
    /// `already_bought` answers made here.
    pub already_bought_answers: AtomicU64,
    /// `not_open` and `closed` answers made here (before the opening,
    /// after the closing).
    pub not_selling_answers: AtomicU64,
    /// The sale's moments as a node last gave them (its store's), which
    /// the edge answers by; the file's until a node has answered.
    pub moments: crate::protocol::MomentsCell,
    /// The store's clock as a node last gave it: what those moments are
    /// read against.
    pub store_time: StoreTime,
    /// A node just said `sold_out`: the watcher should read the holders now
    /// rather than at its next poll.
    hint: Notify,
    hinted: AtomicBool,
    /// In front of several sales, the edge of each sold-out sale (the
    /// fields above but the counters are the single sale's).
    pub sales: super::sale_edges::SaleEdges,
}

/// The store's clock as the nodes last told it (`/sold_out`), carried on
/// this host's monotonic clock: what the edge reads the sale's moments
/// against. A balancer host whose wall clock is wrong, or is stepped (NTP,
/// `date`), then neither answers `closed` to a crowd in the middle of the
/// sale nor `not_open` after the opening. This host's wall clock only
/// until a node has answered. Read without a lock by every purchase the
/// edge answers before the opening.
#[derive(Debug)]
pub struct StoreTime {
    /// The local moment `origin_ms` is pinned to.
    epoch: std::time::Instant,
    /// The store's time at `epoch`, Unix ms ([`StoreTime::UNHEARD`]
    /// before a node's answer).
    origin_ms: AtomicI64,
}

impl Default for StoreTime {
    fn default() -> Self {
        StoreTime {
            epoch: std::time::Instant::now(),
            origin_ms: AtomicI64::new(StoreTime::UNHEARD),
        }
    }
}

impl StoreTime {
    const UNHEARD: i64 = i64::MIN;

    /// A node said the store's clock read `store_now_ms` as it answered,
    /// and the answer came in at `at`.
    pub fn heard(&self, store_now_ms: u64, at: std::time::Instant) {
        let since = at.saturating_duration_since(self.epoch).as_millis() as i64;
        let origin = i64::try_from(store_now_ms).unwrap_or(i64::MAX) - since;
        self.origin_ms.store(origin, Ordering::Relaxed);
    }

    /// The store's clock now, Unix ms: as last heard, moved on by this
    /// host's monotonic clock; this host's wall clock before any answer.
    pub fn now_ms(&self) -> u64 {
        self.heard_now_ms()
            .unwrap_or_else(crate::node::store::now_millis)
    }

    fn heard_now_ms(&self) -> Option<u64> {
        match self.origin_ms.load(Ordering::Relaxed) {
            StoreTime::UNHEARD => None,
            origin => {
                let since = self.epoch.elapsed().as_millis() as i64;
                Some(origin.saturating_add(since).max(0) as u64)
            }
        }
    }

    /// The store's clock minus this host's wall clock, in ms (None before
    /// a node's answer): for `/status`, where an operator sees a balancer
    /// host whose clock is off.
    pub fn offset_ms(&self) -> Option<i64> {
        let store = self.heard_now_ms()? as i64;
        Some(store - crate::node::store::now_millis() as i64)
    }
}

impl Edge {
    /// The sale's moments: a node's (its store's) once one has answered,
    /// the file's `[sale]` until then. What the edge answers purchases by,
    /// and `/ready` waits for the opening by.
    pub fn moments_or_file(
        &self,
        config: &crate::config::BalancerConfig,
    ) -> crate::protocol::Moments {
        self.moments.get().unwrap_or(crate::protocol::Moments {
            opens_at_ms: config.sale_opens_at_ms,
            closes_at_ms: config.sale_closes_at_ms,
            paused: false,
            closed: false,
        })
    }

    /// The sold-out sale, while the edge answers for it.
    pub fn current(&self) -> Option<Arc<SoldOut>> {
        self.sold_out.load_full()
    }

    /// Runs `f` on the sold-out sale while the edge answers for it, without
    /// taking a reference count: the flood path's read, which on every
    /// worker at once would otherwise bounce one counter between cores.
    pub fn with_current<R>(&self, f: impl FnOnce(Option<&SoldOut>) -> R) -> R {
        let guard = self.sold_out.load();
        f(guard.as_deref())
    }

    /// Whether the edge answers now, for the only sale or for any of
    /// several (`/status`, `/metrics`).
    pub fn active(&self) -> bool {
        self.one_active() || self.sales.answering()
    }

    /// Whether the edge answers for the only sale now (cheaper than
    /// [`Edge::current`] on the hot path's common, open case).
    pub fn one_active(&self) -> bool {
        self.sold_out.load().is_some()
    }

    /// Starts answering for `sale`.
    pub fn set(&self, sale: SoldOut) {
        tracing::info!(
            epoch = sale.epoch,
            holders = sale.buyers.len(),
            "sold out: the balancer answers late buyers itself"
        );
        self.sold_out.store(Some(Arc::new(sale)));
    }

    /// Stops answering: requests go to the nodes again.
    pub fn clear(&self, why: &str) {
        if self.sold_out.swap(None).is_some() {
            tracing::info!(why, "the sale may have stock again: buyers go to the nodes");
        }
    }

    /// A node answered `sold_out` (its header): wake the watcher, once.
    pub fn poke(&self) {
        // A load first: under a flood of forwarded sold-out answers most
        // pokes find it set, and a plain read shares the cache line.
        if !self.hinted.load(Ordering::Acquire) && !self.hinted.swap(true, Ordering::AcqRel) {
            self.hint.notify_one();
        }
    }

    /// Waits for a [`Edge::poke`] (the watcher's other wake-up is its timer).
    pub async fn poked(&self) {
        self.hint.notified().await;
        self.hinted.store(false, Ordering::Release);
    }

    /// Claims the one read of the holders; false when one is under way.
    pub fn start_learning(&self) -> bool {
        !self.learning.swap(true, Ordering::AcqRel)
    }

    /// The read of the holders ended (either way).
    pub fn done_learning(&self) {
        self.learning.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::StoreTime;

    /// This host's clock until a node speaks; then the node's reading of
    /// the store's, moved on by the monotonic clock, whatever this host's
    /// wall clock says.
    #[test]
    fn store_time_is_what_a_node_said_moved_on() {
        let t = StoreTime::default();
        let wall = crate::node::store::now_millis();
        assert!(t.now_ms() >= wall);
        assert_eq!(t.offset_ms(), None);
        let at = std::time::Instant::now();
        t.heard(1_000_000, at);
        let now = t.now_ms();
        let since = at.elapsed().as_millis() as u64;
        assert!((1_000_000..=1_000_001 + since).contains(&now), "{now}");
        let offset = t.offset_ms().expect("heard");
        assert!(offset < -(wall as i64) + 1_000_000 + 1_000, "{offset}");
    }
}
