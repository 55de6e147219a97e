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

use arc_swap::Guard;
use tokio::time::Instant;

use super::lease::Lease;
use super::store::holders::{HolderCell, KnownHolders};
use super::store::{HolderChanges, HolderSeed, Holders, SaleState};
use crate::protocol::{Moments, SoldOutView};

/// How often a node that has not heard from the store asks for the sale's
/// state (and so renews its lease).
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// What the task that keeps a node's holders current does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderStep {
    /// Read them in full, with this per-user limit.
    Full(u64),
    /// Read what changed since this cursor, for this per-user limit.
    Changes(String, u64),
    /// They are current, or not needed now (the sale is open).
    Done,
    /// The sale was reset since the task began: stop.
    Abandon,
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
    /// holders read into memory are stale until the change is read.
    released: AtomicU64,
    /// Orders created so far (sold + released), as last heard: when it
    /// grows, a buyer may be at the limit whom memory does not know yet.
    created: AtomicU64,
    /// The sale's payment window in ms as last heard (0: final sales, and
    /// no sweep).
    pay_within: AtomicU64,
    /// Once sold out: the buyers at their limit and the keys that bought,
    /// read from the store, so that they are answered from memory as the
    /// script would answer them; shared with the other nodes of the
    /// process that sell from the same store.
    cell: Arc<HolderCell>,
    /// Rung when what `/sold_out` says changes for the worse for a
    /// balancer answering from it (a reset, returned stock, open again):
    /// its long poll answers at once.
    changed: tokio::sync::Notify,
    /// Milliseconds since `born` of the last store answer that renewed
    /// this node's lease (a sale, a lease request or a poll).
    last_renewed: AtomicU64,
    born: Instant,
    /// The sale's moments as last heard.
    moments: crate::protocol::MomentsCell,
}

impl SaleView {
    /// Nothing heard yet; `per_user_limit` (the file's) holds until the
    /// store's is known; the holders are kept in `cell` (the store's, see
    /// [`HolderCell`]).
    pub fn new(per_user_limit: u64, cell: Arc<HolderCell>) -> SaleView {
        SaleView {
            epoch: AtomicU64::new(0),
            limit: AtomicU64::new(per_user_limit),
            sold_out_epoch: AtomicU64::new(0),
            released: AtomicU64::new(0),
            created: AtomicU64::new(0),
            pay_within: AtomicU64::new(0),
            cell,
            changed: tokio::sync::Notify::new(),
            last_renewed: AtomicU64::new(0),
            born: Instant::now(),
            moments: crate::protocol::MomentsCell::default(),
        }
    }

    /// The sale's moments as the store last gave them; `None` before any
    /// store answer.
    pub fn moments(&self) -> Option<Moments> {
        self.moments.get()
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

    /// Orders created (sold + released) when the node last heard from the
    /// store.
    pub fn created(&self) -> u64 {
        self.created.load(Ordering::Acquire)
    }

    /// The keys of this node's holder hashes.
    pub fn seed(&self) -> HolderSeed {
        self.cell.seed
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
    /// is the store's word. `sold_out` is called with the epoch when the
    /// holders are wanted and may not be current: the sale just sold out,
    /// or, sold out, tickets came back or were sold since. An answer about
    /// an older epoch than the node knows changes nothing (answers can be
    /// handled out of the store's order).
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
            self.cell.forget_before(sale.epoch);
            self.changed.notify_waiters();
            self.released.store(0, Ordering::Release);
            self.created.store(0, Ordering::Release);
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
        self.moments.set(&sale.moments);
        // A ticket came back: a buyer may be under the limit again, a key's
        // order released. Memory is not answered from until the change is
        // read (`HolderStep::Changes`), and a balancer answering from
        // `/sold_out` hears of it at once.
        let released = self.released.load(Ordering::Acquire) < sale.released
            && self.released.fetch_max(sale.released, Ordering::AcqRel) < sale.released;
        if released {
            self.changed.notify_waiters();
        }
        let created = sale.sold + sale.released;
        let sold = self.created.load(Ordering::Acquire) < created
            && self.created.fetch_max(created, Ordering::AcqRel) < created;
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
                self.changed.notify_waiters();
            }
        } else if self.sold_out_epoch.swap(sale.epoch, Ordering::AcqRel) != sale.epoch {
            // No lease holds a unit any more (`sold + leased <= total`).
            lease.clamp(lease.generation(), 0);
            sold_out(sale.epoch);
            lease.wake();
        } else if released || sold {
            sold_out(sale.epoch);
        }
    }

    /// The holders read into memory, of whatever epoch (the caller checks
    /// it against [`SaleView::epoch`] and [`SaleView::is_current`]); a
    /// guard, not a clone, as the sold-out flood reads it on every request.
    pub fn holders(&self) -> Guard<Option<Arc<KnownHolders>>> {
        self.cell.holders.load()
    }

    /// Whether `holders` say what the store said in the last answer the
    /// node heard: no ticket came back, and none was sold, since.
    pub fn is_current(&self, holders: &Holders) -> bool {
        holders.epoch == self.epoch() && holders.current_for(self.released(), self.created())
    }

    /// The buyers and keys read into memory once sold out, when read.
    pub fn holders_known(&self) -> Option<(usize, usize)> {
        let known = self.cell.holders.load();
        let k = known.as_deref().filter(|k| k.epoch == self.epoch())?;
        let h = k.read();
        Some((h.buyer_count(), h.key_count()))
    }

    /// Marks the holders of `epoch` as being kept current; `None` when a
    /// task already does (this node's or another's of the process), else
    /// the generation it must still be in to go on.
    pub fn start_learning(&self, epoch: u64) -> Option<u64> {
        self.cell.start_learning(epoch)
    }

    /// The task for `epoch` ends (it found the holders current, or not
    /// needed, or stopped).
    pub fn done_learning(&self, epoch: u64) {
        self.cell.done_learning(epoch);
    }

    /// Whether a task keeping the holders of `epoch` current, started in
    /// `generation`, is still wanted (no reset since).
    pub fn learning(&self, epoch: u64, generation: u64) -> bool {
        self.cell.learning(epoch, generation)
    }

    /// What the task keeping the holders of `epoch` current (started in
    /// `generation`) does next.
    pub fn holder_step(&self, epoch: u64, generation: u64) -> HolderStep {
        if !self.learning(epoch, generation) || self.epoch() != epoch {
            return HolderStep::Abandon;
        }
        if !self.is_sold_out() {
            // Not answered from while the sale is open; the next sold out
            // takes the changes in.
            return HolderStep::Done;
        }
        let known = self.cell.holders.load();
        match known.as_deref().filter(|k| k.epoch == epoch) {
            None => HolderStep::Full(self.per_user_limit()),
            Some(k) => {
                let h = k.read();
                if self.is_current(&h) {
                    HolderStep::Done
                } else if h.cursor.is_empty() {
                    // A store without a stream: read them again.
                    HolderStep::Full(self.per_user_limit())
                } else {
                    HolderStep::Changes(h.cursor.clone(), h.per_user_limit)
                }
            }
        }
    }

    /// Whether the holders of `epoch` are wanted and not current (a task
    /// should keep them so).
    pub fn needs_holders(&self, epoch: u64) -> bool {
        if self.epoch() != epoch || !self.is_sold_out() {
            return false;
        }
        let known = self.cell.holders.load();
        known
            .as_deref()
            .filter(|k| k.epoch == epoch)
            .is_none_or(|k| !self.is_current(&k.read()))
    }

    /// Keeps the holders read in full for `epoch`, if the task that read
    /// them (started in `generation`) is still wanted.
    pub fn learned(&self, epoch: u64, generation: u64, holders: Holders) {
        if self.learning(epoch, generation) && self.epoch() == epoch {
            self.cell
                .holders
                .store(Some(Arc::new(KnownHolders::new(epoch, holders))));
        }
    }

    /// Takes in what changed among the holders of `epoch`.
    pub fn apply(&self, epoch: u64, changes: &HolderChanges) {
        let known = self.cell.holders.load();
        if let Some(k) = known.as_deref().filter(|k| k.epoch == epoch) {
            k.apply(changes);
        }
    }

    /// Drops the holders of `epoch` so that they are read in full again
    /// (the events since their cursor are gone).
    pub fn drop_holders(&self, epoch: u64) {
        let known = self.cell.holders.load();
        if known.as_deref().is_some_and(|k| k.epoch == epoch) {
            self.cell.holders.store(None);
        }
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

    /// What `/sold_out` says now: sold out only while the store is heard,
    /// and not once the sale is `closed` (the node answers that itself,
    /// and a balancer that answered `sold_out` must let go). Without the
    /// store's time, which the route adds from the node's clock reading.
    pub fn sold_out_view(&self, closed: bool) -> SoldOutView {
        SoldOutView {
            sold_out: self.is_sold_out() && self.heard_lately() && !closed,
            epoch: self.epoch(),
            released: self.released(),
            moments: self.moments(),
            store_now_ms: None,
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
