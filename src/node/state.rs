//! `Node`: one node's selling state, shared by all its connections, apart
//! from HTTP; and the background work that keeps it current: lease requests
//! (refills), the once-a-second poll ([`Node::watch`]), and reading the
//! holders into memory once sold out.
//!
//! What a node holds is never the truth, only a lease on it: units it may
//! send without asking (taken from the store in chunks, coalesced), and the
//! sale as the last store answer gave it ([`SaleView`]). Every store answer
//! carries the sale's state, and a poll refreshes it once a second when no
//! purchase does, so a reset or returned stock reaches a node within about
//! a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::lease::Lease;
use super::sale::{HolderStep, POLL_EVERY, SaleView};
use super::snapshot::SnapshotCache;
use super::stats::Stats;
use super::store::{NoChanges, Reply, SaleState, Store, StoreError};

/// How often a node asks instead, while it answers `sold_out` from memory
/// and reservations may come back (the sale has a payment window).
pub const POLL_SOLD_OUT_EVERY: Duration = Duration::from_millis(250);

/// How the last lease request ended, for the buyers waiting on it.
pub(super) const REFILL_GRANTED: u8 = 0;
pub(super) const REFILL_NONE: u8 = 1;
pub(super) const REFILL_FAILED: u8 = 2;
/// The store holds no sale: the buyers are told so, not "the store is slow".
pub(super) const REFILL_NO_SALE: u8 = 3;
/// The sale does not sell now (see [`Node::last_shut`]).
pub(super) const REFILL_NOT_SELLING: u8 = 4;
/// The state is dropped (idle): no lease request is sent from it.
pub(super) const REFILL_RETIRED: u8 = 5;

/// What a node needs to sell, beside its store.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The node's name, recorded with every order it sells.
    pub name: String,
    /// The sale's event.
    pub event: String,
    /// The fleet sells several sales: order ids are answered as
    /// `EVENT:ID`, so that an order route finds the sale from the id
    /// alone (with one sale, ids stay `EPOCH-SEQ`).
    pub names_sale: bool,
    /// The per-user limit of the file: used until the store's is known.
    pub per_user_limit: u64,
    /// Most tickets one purchase may ask for (`[sale] max_per_purchase`).
    pub max_per_purchase: u64,
    /// Units asked for per lease request.
    pub lease: u64,
    /// How long a buyer may wait for the store.
    pub timeout: Duration,
    /// Largest body accepted on `/buy/ticket`.
    pub max_body: u64,
    /// `/healthz` fails past this clock offset to Redis.
    pub max_clock_offset: Option<Duration>,
    /// With `[auth]`: who a buyer is (their token) and who may pay (the
    /// payment service's signature). `None`: buyers are who the client
    /// says they are.
    pub auth: Option<Arc<crate::auth::Authority>>,
    /// `[sale] opens_at` and `closes_at`, Unix ms (0: none): before the
    /// opening and after the closing the node answers from memory, so the
    /// crowd that comes early costs the store nothing. The store decides
    /// at the moment itself, in its own clock.
    pub opens_at_ms: u64,
    /// See `opens_at_ms`.
    pub closes_at_ms: u64,
}

/// One node's selling state, shared by all its connections.
pub struct Node {
    /// Itself, for the background tasks it starts.
    me: std::sync::Weak<Node>,
    pub(super) name: String,
    /// The sale's event.
    event: String,
    /// `EVENT:` before every order id this node answers with, when the
    /// fleet sells several sales; empty with one.
    pub(super) order_prefix: String,
    /// `Spike-Event: EVENT` on this node's `sold_out` answers when the
    /// fleet sells several sales: a balancer in front keeps its edge per
    /// sale, and learns from it which sale sold out (`None` with one).
    pub(super) event_header: Option<hyper::header::HeaderValue>,
    /// This process's lease name in the store: the node's name and a
    /// random part, so a restarted node never inherits the lease of its
    /// previous life (that one runs out by itself).
    pub(super) holder: String,
    pub(super) store: Store,
    pub(super) lease: Lease,
    pub(super) lease_chunk: u64,
    /// A lease request is in flight (buyers who find no unit wait for it).
    pub(super) refilling: AtomicBool,
    pub(super) refill_result: AtomicU8,
    /// The sale as last heard from the store.
    pub(super) view: SaleView,
    pub(super) timeout: Duration,
    pub(super) max_body: u64,
    /// Most tickets one purchase may ask for.
    pub(super) max_per_purchase: u64,
    max_clock_offset: Option<Duration>,
    /// `/sale`'s snapshot, cached.
    pub(super) snapshot: SnapshotCache,
    /// `[auth]` as last loaded: swapped whole when the keys change (a
    /// reload), so a request sees one set of keys.
    auth: arc_swap::ArcSwapOption<crate::auth::Authority>,
    /// What the node has done, for `/stats`.
    pub stats: Stats,
    /// Why the store last said the sale does not sell (a lease request's
    /// answer, for the buyers that waited on it).
    last_shut: std::sync::Mutex<Option<crate::protocol::Shut>>,
    /// The epoch of a sale the store said is closed (0: none): a new
    /// epoch, a reset, is another sale.
    closed_epoch: std::sync::atomic::AtomicU64,
    /// The file's moments, until the store gives its own.
    file_moments: crate::protocol::Moments,
    /// When this state was made, the origin of `last_used`.
    born: Instant,
    /// Milliseconds since `born` of the last request for the sale (to
    /// about a quarter of a second): a node of several sales drops the
    /// state of a sale nobody asks about (see [`super::Sales`]).
    last_used: AtomicU64,
    /// The state is being dropped: no new lease request starts (its units
    /// would be held by a node that no longer sells).
    retired: AtomicBool,
    /// This state's poll, sweep and idle check ([`super::Sales`] starts
    /// them): kept here, not with the sale, so that stopping one state's
    /// tasks can never stop those of the state made after it.
    tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

/// A random 64-bit value from the standard library's per-process hasher
/// keys (seeded by the OS), without a random-number dependency.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

impl Node {
    /// A node selling from `store` under `settings`.
    pub fn new(settings: NodeSettings, store: Store) -> Arc<Node> {
        let cell = store.holder_cell();
        Arc::new_cyclic(|me| Node {
            me: me.clone(),
            holder: format!("{}/{:016x}", settings.name, random_u64()),
            name: settings.name,
            order_prefix: if settings.names_sale {
                format!("{}:", settings.event)
            } else {
                String::new()
            },
            event_header: settings
                .names_sale
                .then(|| hyper::header::HeaderValue::from_str(&settings.event).ok())
                .flatten(),
            event: settings.event,
            store,
            lease: Lease::new(),
            lease_chunk: settings.lease.max(1),
            refilling: AtomicBool::new(false),
            refill_result: AtomicU8::new(REFILL_GRANTED),
            view: SaleView::new(settings.per_user_limit, cell),
            timeout: settings.timeout,
            max_body: settings.max_body,
            max_per_purchase: settings.max_per_purchase.max(1),
            max_clock_offset: settings.max_clock_offset,
            snapshot: SnapshotCache::new(),
            auth: arc_swap::ArcSwapOption::new(settings.auth),
            stats: Stats::default(),
            last_shut: std::sync::Mutex::new(None),
            closed_epoch: std::sync::atomic::AtomicU64::new(0),
            file_moments: crate::protocol::Moments {
                opens_at_ms: settings.opens_at_ms,
                closes_at_ms: settings.closes_at_ms,
                paused: false,
                closed: false,
            },
            born: Instant::now(),
            last_used: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            tasks: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// A request for the sale came in now: the state is in use. A load
    /// and, at most every quarter second, a store: a busy sale's cores do
    /// not fight over the word.
    pub fn touch(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        if now >= self.last_used.load(Ordering::Relaxed) + 250 {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// How long since the last request for the sale (since the state was
    /// made, before any).
    pub fn idle_for(&self) -> Duration {
        self.born.elapsed().saturating_sub(Duration::from_millis(
            self.last_used.load(Ordering::Relaxed),
        ))
    }

    /// Whether purchases are under way here: units of the lease out with
    /// them, or a lease request in flight.
    pub fn busy(&self) -> bool {
        self.lease.in_flight() > 0 || self.refilling.load(Ordering::Acquire)
    }

    /// Keeps `task` (one of this state's background tasks) to be stopped
    /// with the state.
    pub(super) fn keep_task(&self, task: tokio::task::AbortHandle) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Stops this state's background tasks, but the one calling (an idle
    /// check dropping its own state goes on to give the lease back).
    pub(super) fn stop_tasks(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let me = tokio::task::try_id();
        for t in tasks {
            if Some(t.id()) != me {
                t.abort();
            }
        }
    }

    /// Stops selling from this state for good (its sale's state is being
    /// dropped): no lease request starts from now on, the units the node
    /// holds are forgotten, and the lease is given back to the store, so
    /// that its units are free at once for the other nodes (or for this
    /// node's next state of the sale). Should the store not hear of it,
    /// the lease runs out by itself within `lease_ttl`.
    pub async fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        // A lease request already sent is answered (or times out) first:
        // its grant must not land after the lease was given back.
        let until = Instant::now() + self.timeout;
        while self.refilling.load(Ordering::SeqCst) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.lease.reset();
        let give_up = Instant::now() + self.timeout;
        match self.store.give_back(&self.holder, give_up).await {
            Ok(()) => {}
            Err(StoreError::NoSale) => {}
            Err(e) => {
                tracing::debug!(node = %self.name, event = %self.event, error = %e, "lease not given back; it runs out by itself")
            }
        }
    }

    /// Takes in a store answer that the sale does not sell now: the sale's
    /// state it carries (its moments among it), why, and a closing the
    /// store confirmed: from then on nothing more sells in this epoch, so
    /// the holders read now are all of them, and a key's retry is answered
    /// from them.
    pub(super) fn heard_shut(&self, shut: crate::protocol::Shut, sale: &SaleState) {
        self.observe(sale);
        self.view.renewed();
        *self.last_shut.lock().unwrap_or_else(|p| p.into_inner()) = Some(shut);
        if matches!(shut, crate::protocol::Shut::Closed { .. })
            && sale.epoch == self.epoch()
            && self.closed_epoch.swap(sale.epoch, Ordering::AcqRel) != sale.epoch
        {
            self.learn_holders(sale.epoch);
        }
    }

    /// The store said the sale of the epoch the node knows is closed.
    pub(super) fn closed_confirmed(&self) -> bool {
        let e = self.closed_epoch.load(Ordering::Acquire);
        e != 0 && e == self.epoch()
    }

    /// Why the sale does not sell now, from memory, if so: the stored
    /// moments as the store last gave them (the file's until its first
    /// answer), and the store's clock now as this host measures it (its
    /// own wall clock only before the first measurement). Before the
    /// opening and while paused nothing can sell; after the closing, see
    /// [`Node::buy`] for a key's retry.
    pub(super) fn shut_now(&self) -> Option<crate::protocol::Shut> {
        let moments = self.view.moments().unwrap_or(self.file_moments);
        if !moments.any() {
            return None;
        }
        moments.shut_at(self.store_now_ms())
    }

    /// The store's clock now (Unix milliseconds) as this node measures it:
    /// what the sale's opening and closing are read against. This host's
    /// wall clock only before the first measurement, or with the embedded
    /// store, whose clock it is.
    pub fn store_now_ms(&self) -> u64 {
        self.store
            .clock_now_ms()
            .unwrap_or_else(super::store::now_millis)
    }

    /// Why the store last said the sale does not sell.
    pub(super) fn last_shut(&self) -> crate::protocol::Shut {
        self.last_shut
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(crate::protocol::Shut::Paused)
    }

    /// `[auth]` as it stands: `None` when buyers are unverified.
    pub fn auth(&self) -> Option<Arc<crate::auth::Authority>> {
        self.auth.load_full()
    }

    /// Puts new keys in force (a reload of the file): requests from now on
    /// are checked with them, and a removed key id is refused.
    pub fn set_auth(&self, auth: Option<Arc<crate::auth::Authority>>) {
        self.auth.store(auth);
    }

    /// The store this node sells from.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Units of the node's lease not yet sent.
    pub fn lease_left(&self) -> u64 {
        self.lease.left()
    }

    /// The sale's epoch as this node last heard it (0 before any answer).
    pub fn epoch(&self) -> u64 {
        self.view.epoch()
    }

    /// The per-user limit this node enforces (the store's once heard).
    pub fn per_user_limit(&self) -> u64 {
        self.view.per_user_limit()
    }

    /// The node's name in the file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The event of the sale this state sells.
    pub fn event(&self) -> &str {
        &self.event
    }

    /// This process's lease name in the store.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The sale's payment window as last heard (None: purchases are final).
    pub fn pay_within(&self) -> Option<Duration> {
        self.view.pay_within()
    }

    /// The store has said this epoch of the sale is sold out.
    pub fn is_sold_out(&self) -> bool {
        self.view.is_sold_out()
    }

    /// The buyers and keys read into memory once sold out, when read.
    pub fn holders_known(&self) -> Option<(usize, usize)> {
        self.view.holders_known()
    }

    /// `/healthz` fails past this clock offset to Redis.
    pub fn max_clock_offset(&self) -> Option<Duration> {
        self.max_clock_offset
    }

    /// Takes in what a store answer says about the sale (see
    /// [`SaleView::observe`]); a reset also drops `/sale`'s cached
    /// snapshot, and a new sold out starts reading the holders.
    pub(super) fn observe(&self, sale: &SaleState) {
        self.view.observe(
            sale,
            &self.lease,
            &self.name,
            || self.snapshot.clear(),
            |epoch| self.learn_holders(epoch),
        );
    }

    /// Takes in a store answer's view of the sale (for the order routes
    /// and the sweep).
    pub(super) fn heard(&self, sale: &SaleState) {
        self.observe(sale);
    }

    /// Once a second, when the lease was not renewed in that second (by a
    /// sale or a lease request), asks the store for the sale's state,
    /// renewing the lease: how a node that answers from memory learns of a
    /// reset, and how a quiet node keeps its lease.
    ///
    /// While the node answers `sold_out` from memory and the sale has a
    /// payment window, reservations may come back at any moment, so it
    /// asks four times as often: returned stock is on sale again within
    /// about a quarter of a second on every node.
    pub async fn watch(self: Arc<Self>) {
        let mut every = tokio::time::interval(POLL_SOLD_OUT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let pause = if self.is_sold_out() && self.pay_within().is_some() {
                POLL_SOLD_OUT_EVERY
            } else {
                POLL_EVERY
            };
            if self.view.renewed_within(pause) {
                continue;
            }
            self.stats.lease_calls.fetch_add(1, Ordering::Relaxed);
            match self
                .store
                .lease(&self.holder, 0, Instant::now() + self.timeout)
                .await
            {
                Ok(reply) => {
                    self.observe(&reply.sale);
                    self.view.renewed();
                }
                Err(StoreError::NoSale) => {}
                Err(StoreError::NotSelling(shut, sale)) => self.heard_shut(shut, &sale),
                Err(e) => tracing::debug!(node = %self.name, error = %e, "sale poll failed"),
            }
        }
    }

    /// Starts a lease request unless one is in flight.
    pub(super) fn refill(&self) {
        if self.refilling.load(Ordering::Relaxed) || self.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.retired.load(Ordering::SeqCst) {
            // The state is dropped: the buyers waiting here are told no
            // unit came (they are few: the sale was idle).
            self.refill_result.store(REFILL_RETIRED, Ordering::Release);
            self.refilling.store(false, Ordering::Release);
            self.lease.wake();
            return;
        }
        let store = self.store.clone();
        let holder = self.holder.clone();
        let (chunk, timeout) = (self.lease_chunk, self.timeout);
        let generation = self.lease.generation();
        // Counted when sent, as the poll is: a call whose answer is still
        // on its way has reached the store all the same.
        self.stats.lease_calls.fetch_add(1, Ordering::Relaxed);
        // A task of its own: the buyer who started it may leave, the
        // others still wait for it.
        let node = NodeRef::of(self);
        tokio::spawn(async move {
            // Should this task end without an answer (cancelled when the
            // runtime stops), the flag must not stay set: buyers would wait
            // for a request that never ends.
            let mut guard = RefillGuard(Some(NodeRef(node.0.clone())));
            let asked = Instant::now();
            let result = store.lease(&holder, chunk, asked + timeout).await;
            guard.0 = None;
            node.with(|n| n.stats.store_latency.observe(asked.elapsed()));
            node.with(|n| n.refilled(generation, result));
        });
    }

    fn refilled(&self, generation: u64, result: Result<Reply<u64>, StoreError>) {
        let outcome = match result {
            Ok(reply) => {
                self.observe(&reply.sale);
                self.view.renewed();
                // Units granted in the epoch the node now knows count; a
                // reset in between made a new generation.
                let now = self.lease.generation();
                let generation = if reply.sale.epoch == self.epoch() {
                    now
                } else {
                    generation
                };
                let mut granted = reply.answer;
                if granted == 0 && reply.sale.epoch == self.epoch() {
                    // Units the store holds for this node that it does not
                    // know of (a grant whose answer was lost) would be
                    // stranded: nobody else asks for them while this node
                    // renews its lease. Taken back here. (Answers handled
                    // out of order can only make the count too high, which
                    // costs nothing: the store decides every sale.)
                    let known = self.lease.left() + self.lease.in_flight();
                    granted = reply.lease.saturating_sub(known);
                }
                if !reply.sale.sold_out() && !self.is_sold_out() {
                    self.lease.add(generation, granted);
                }
                if granted > 0 {
                    REFILL_GRANTED
                } else {
                    REFILL_NONE
                }
            }
            Err(StoreError::NoSale) => REFILL_NO_SALE,
            Err(StoreError::NotSelling(shut, sale)) => {
                self.heard_shut(shut, &sale);
                REFILL_NOT_SELLING
            }
            Err(e) => {
                tracing::warn!(node = %self.name, error = %e, "lease request failed");
                REFILL_FAILED
            }
        };
        self.refill_result.store(outcome, Ordering::Release);
        self.refilling.store(false, Ordering::Release);
        self.lease.wake();
    }

    /// Keeps the holders of `epoch` current, in the background, while the
    /// sale is sold out: read in full once (retrying with backoff until it
    /// lands: a buyer at the limit stays there, a key that bought keeps its
    /// order), then, each time a ticket comes back or is sold, only what
    /// changed since (`Store::holder_changes`), not every holder again. One
    /// task at a time for all the nodes of the process that sell from the
    /// same store (they share the holders, see `HolderCell`); a reset stops
    /// it, a full read included, at its next page.
    pub(super) fn learn_holders(&self, epoch: u64) {
        let Some(generation) = self.view.start_learning(epoch) else {
            return;
        };
        let node = NodeRef::of(self);
        let store = self.store.clone();
        let name = self.name.clone();
        let seed = self.view.seed();
        let running = Running {
            cell: self.store.holder_cell(),
            epoch,
            armed: true,
        };
        tokio::spawn(async move {
            // The whole guard moves into the task (not just a field).
            let mut running = running;
            let mut pause = Duration::from_millis(100);
            let wanted_by = NodeRef(node.0.clone());
            let wanted = move || {
                wanted_by
                    .with(|n| n.view.learning(epoch, generation))
                    .unwrap_or(false)
            };
            loop {
                let Some(step) = node.with(|n| n.view.holder_step(epoch, generation)) else {
                    return;
                };
                let failed = match step {
                    HolderStep::Abandon => return,
                    HolderStep::Done => {
                        // A change heard between the last step and now
                        // found this task running: look once more.
                        running.disarm();
                        node.with(|n| {
                            n.view.done_learning(epoch);
                            if n.view.needs_holders(epoch) {
                                n.learn_holders(epoch);
                            }
                        });
                        return;
                    }
                    HolderStep::Full(limit) => {
                        match store.holders(epoch, limit, seed, &wanted).await {
                            Ok(Some(mut found)) => {
                                tracing::info!(node = %name, buyers = found.buyer_count(), keys = found.key_count(), "holders read into memory");
                                node.with(|n| {
                                    // Final sales never change once sold
                                    // out (no ticket comes back): what was
                                    // read is current, no events needed.
                                    if n.view.pay_within().is_none() {
                                        found.released = n.view.released();
                                        found.created = n.view.created();
                                    }
                                    n.stats.holder_reads.fetch_add(1, Ordering::Relaxed);
                                    n.view.learned(epoch, generation, found);
                                });
                                None
                            }
                            Ok(None) => return,
                            Err(e) => Some(e),
                        }
                    }
                    HolderStep::Changes(cursor, limit) => {
                        match store.holder_changes(&cursor, limit).await {
                            Ok(Ok(changes)) => {
                                if changes.sale.epoch != epoch {
                                    // Reset meanwhile: the answer says so.
                                    node.with(|n| n.observe(&changes.sale));
                                    return;
                                }
                                let behind = node
                                    .with(|n| {
                                        n.stats.holder_changes.fetch_add(1, Ordering::Relaxed);
                                        n.view.apply(epoch, &changes);
                                        n.observe(&changes.sale);
                                        !changes.more && n.view.needs_holders(epoch)
                                    })
                                    .unwrap_or(false);
                                if behind {
                                    // Heard of a change the store's answer did
                                    // not show yet (answers cross): give the
                                    // store a moment rather than asking in a
                                    // tight loop.
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                None
                            }
                            Ok(Err(NoChanges::Gone)) => {
                                tracing::info!(node = %name, "the holders' changes are gone from the stream; reading them in full");
                                node.with(|n| n.view.drop_holders(epoch));
                                None
                            }
                            Err(e) => Some(e),
                        }
                    }
                };
                match failed {
                    None => pause = Duration::from_millis(100),
                    Some(e) => {
                        tracing::warn!(node = %name, error = %e, retry_in = ?pause, "reading the holders failed; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }
}

/// Marks the holders' task as ended however it ends (its node stopped, the
/// runtime stopped): the other nodes sharing the holders may start one.
struct Running {
    cell: Arc<super::store::holders::HolderCell>,
    epoch: u64,
    armed: bool,
}

impl Running {
    /// The task clears the flag itself (and may start the next one).
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.armed {
            self.cell.done_learning(self.epoch);
        }
    }
}

/// Clears the lease-request flag (and wakes the buyers waiting on it) if
/// the request's task ends without handing its answer over.
struct RefillGuard(Option<NodeRef>);

impl Drop for RefillGuard {
    fn drop(&mut self) {
        if let Some(node) = self.0.take() {
            node.with(|n| {
                n.refill_result.store(REFILL_FAILED, Ordering::Release);
                n.refilling.store(false, Ordering::Release);
                n.lease.wake();
            });
        }
    }
}

/// A weak reference for background tasks: they must not keep a stopped
/// node alive.
struct NodeRef(std::sync::Weak<Node>);

impl NodeRef {
    fn of(node: &Node) -> NodeRef {
        NodeRef(node.me.clone())
    }

    fn with<T>(&self, f: impl FnOnce(&Node) -> T) -> Option<T> {
        self.0.upgrade().map(|n| f(&n))
    }
}
