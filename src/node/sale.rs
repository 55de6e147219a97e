//! What a node knows of the sale, apart from HTTP: the sale's epoch, limit
//! and payment window as the last store answer gave them, whether the store
//! said it is sold out, how many tickets had come back, and, once sold out,
//! who holds what.
//!
//! None of it is the truth, only the last word of the store: every store
//! answer carries the sale's state ([`SaleView::observe`] takes it in), and
//! the node's poll refreshes it once a second when no purchase does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwapOption, Guard};
use tokio::time::Instant;

use super::lease::Lease;
use super::store::{Holders, SaleState};
use crate::protocol::SoldOutView;

/// How often a node that has not heard from the store asks for the sale's
/// state (and so renews its lease).
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// The holders of one epoch of the sale.
pub struct KnownHolders {
    /// The epoch they were read for.
    pub epoch: u64,
    /// The buyers at the limit and the keys that bought.
    pub holders: Holders,
}

/// The sale as this node last heard it from the store, shared by its
/// connections and its background tasks: the one place the node's view of
/// the sale is kept, so the purchase logic and the routes read it the same
/// way.
pub struct SaleView {
    /// The sale's epoch as last heard; 0 before the first answer.
    epoch: AtomicU64,
    /// The per-user limit as last heard (the file's until then).
    limit: AtomicU64,
    /// The epoch the store said is sold out (0: none).
    sold_out_epoch: AtomicU64,
    /// Tickets that came back so far, as last heard: when it grows, the
    /// holders read into memory are stale.
    released: AtomicU64,
    /// The sale's payment window in ms as last heard (0: final sales, and
    /// no sweep).
    pay_within: AtomicU64,
    /// Once sold out: the buyers at their limit and the keys that bought,
    /// read from the store, so that they are answered from memory as the
    /// script would answer them.
    holders: ArcSwapOption<KnownHolders>,
    /// The epoch whose holders are being read (0: none).
    learning: AtomicU64,
    /// Grows every time the holders are forgotten: a read that started
    /// before is stale and must not land.
    holders_gen: AtomicU64,
    /// Rung when what `/sold_out` says changes for the worse for a
    /// balancer answering from it (a reset, returned stock, open again):
    /// its long poll answers at once.
    changed: tokio::sync::Notify,
    /// Milliseconds since `born` of the last store answer that renewed
    /// this node's lease (a sale, a lease request or a poll).
    last_renewed: AtomicU64,
    born: Instant,
}

impl SaleView {
    /// Nothing heard yet; `per_user_limit` (the file's) holds until the
    /// store's is known.
    pub fn new(per_user_limit: u64) -> SaleView {
        SaleView {
            epoch: AtomicU64::new(0),
            limit: AtomicU64::new(per_user_limit),
            sold_out_epoch: AtomicU64::new(0),
            released: AtomicU64::new(0),
            pay_within: AtomicU64::new(0),
            holders: ArcSwapOption::empty(),
            learning: AtomicU64::new(0),
            holders_gen: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            last_renewed: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    /// The sale's epoch as this node last heard it (0 before any answer).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The per-user limit this node enforces (the store's once heard).
    pub fn per_user_limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// Tickets that had come back when the node last heard from the store.
    pub fn released(&self) -> u64 {
        self.released.load(Ordering::Acquire)
    }

    /// The sale's payment window as last heard (None: purchases are final).
    pub fn pay_within(&self) -> Option<Duration> {
        match self.pay_within.load(Ordering::Acquire) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The store has said this epoch of the sale is sold out.
    pub fn is_sold_out(&self) -> bool {
        let e = self.sold_out_epoch.load(Ordering::Acquire);
        e != 0 && e == self.epoch.load(Ordering::Acquire)
    }

    /// Takes in what a store answer says about the sale: a new epoch drops
    /// everything the node knew of the old sale (`reset` drops what the node
    /// keeps beside this view); the limit is the stored one; sold out or not
    /// is the store's word (`sold_out` starts reading the holders of the
    /// epoch). An answer about an older epoch than the node knows changes
    /// nothing (answers can be handled out of the store's order).
    pub fn observe(
        &self,
        sale: &SaleState,
        lease: &Lease,
        node: &str,
        reset: impl FnOnce(),
        sold_out: impl FnOnce(u64),
    ) {
        let known = self.epoch.load(Ordering::Acquire);
        if sale.epoch < known {
            return;
        }
        if sale.epoch > known
            && self
                .epoch
                .compare_exchange(known, sale.epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            if known != 0 {
                tracing::info!(node = %node, old = known, new = sale.epoch, "the sale was reset; lease, sold-out flag and holders dropped");
            }
            // What the node knew goes first, then the lease wakes its
            // waiters: none of them may see the old sale's flag.
            self.forget_holders();
            self.released.store(0, Ordering::Release);
            reset();
            lease.reset();
        }
        if sale.epoch != self.epoch() {
            // A newer epoch arrived meanwhile.
            return;
        }
        if self.limit.load(Ordering::Relaxed) != sale.limit {
            self.limit.store(sale.limit, Ordering::Release);
        }
        if self.pay_within.load(Ordering::Relaxed) != sale.pay_within_ms {
            self.pay_within.store(sale.pay_within_ms, Ordering::Release);
        }
        // A ticket came back: a buyer may be under the limit again, a key's
        // order released. What memory says of them is stale; it is read
        // again at the next sold out.
        if self.released.load(Ordering::Acquire) < sale.released
            && self.released.fetch_max(sale.released, Ordering::AcqRel) < sale.released
        {
            self.forget_holders();
        }
        // The flag carries the epoch it is about. A store answer with stock
        // free again (a ticket went back on sale) clears it, so the idle
        // poll reopens a node that answers `sold_out` from memory within
        // about a second. An older answer arriving late may clear it too:
        // that costs one store call, which sets it again.
        if !sale.sold_out() {
            if self
                .sold_out_epoch
                .compare_exchange(sale.epoch, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.forget_holders();
            }
        } else if self.sold_out_epoch.swap(sale.epoch, Ordering::AcqRel) != sale.epoch {
            // No lease holds a unit any more (`sold + leased <= total`).
            lease.clamp(lease.generation(), 0);
            sold_out(sale.epoch);
            lease.wake();
        }
    }

    /// Drops the holders read into memory (and any read in flight), so the
    /// next sold out reads them again.
    fn forget_holders(&self) {
        self.holders_gen.fetch_add(1, Ordering::AcqRel);
        self.holders.store(None);
        self.learning.store(0, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// The holders read into memory, of whatever epoch (the caller checks
    /// it against [`SaleView::epoch`]); a guard, not a clone, as the
    /// sold-out flood reads it on every request.
    pub fn holders(&self) -> Guard<Option<Arc<KnownHolders>>> {
        self.holders.load()
    }

    /// The buyers and keys read into memory once sold out, when read.
    pub fn holders_known(&self) -> Option<(usize, usize)> {
        let holders = self.holders.load();
        holders
            .as_deref()
            .filter(|h| h.epoch == self.epoch())
            .map(|h| (h.holders.buyers.len(), h.holders.keys.len()))
    }

    /// Marks the holders of `epoch` as being read; `None` when they already
    /// are (or another caller just started), else the generation the read
    /// must still be current in to land (see [`SaleView::learning`]).
    pub fn start_learning(&self, epoch: u64) -> Option<u64> {
        let learning = self.learning.load(Ordering::Acquire);
        if learning == epoch
            || self
                .learning
                .compare_exchange(learning, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return None;
        }
        Some(self.holders_gen.load(Ordering::Acquire))
    }

    /// Whether a read of the holders of `epoch` started in `generation` is
    /// still wanted (no reset, no returned ticket since).
    pub fn learning(&self, epoch: u64, generation: u64) -> bool {
        self.learning.load(Ordering::Acquire) == epoch
            && self.holders_gen.load(Ordering::Acquire) == generation
    }

    /// Keeps the holders read for `epoch`.
    pub fn learned(&self, epoch: u64, holders: Holders) {
        self.holders
            .store(Some(Arc::new(KnownHolders { epoch, holders })));
    }

    /// Notes that the store renewed this node's lease just now.
    pub fn renewed(&self) {
        self.last_renewed
            .store(self.born.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// Whether the store renewed the lease less than `within` ago.
    pub fn renewed_within(&self, within: Duration) -> bool {
        let heard = self.last_renewed.load(Ordering::Acquire);
        let now = self.born.elapsed().as_millis() as u64;
        heard != 0 && now.saturating_sub(heard) < within.as_millis() as u64
    }

    /// Whether the store answered this node within the last few polls: a
    /// node that cannot reach it keeps its sold-out flag, and a balancer
    /// must not answer for the whole sale from that stale view.
    pub fn heard_lately(&self) -> bool {
        self.renewed_within(3 * POLL_EVERY)
    }

    /// What `/sold_out` says now: sold out only while the store is heard.
    pub fn sold_out_view(&self) -> SoldOutView {
        SoldOutView {
            sold_out: self.is_sold_out() && self.heard_lately(),
            epoch: self.epoch(),
            released: self.released(),
        }
    }

    /// Whether a caller that knows (`epoch`, `released`) of a sold-out sale
    /// still has it right.
    pub fn still(&self, epoch: u64, released: u64) -> bool {
        self.is_sold_out()
            && self.heard_lately()
            && self.epoch() == epoch
            && self.released() == released
    }

    /// Resolves when what `/sold_out` says may have changed (see the
    /// `changed` field).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}
