//! The node's HTTP routes and answers. The hot path (`/buy/ticket`) touches
//! only atomics until its one store call (shared with the purchases queued
//! beside it), and answers from memory once the store has said the sale is
//! over.
//!
//! What a node holds is never the truth, only a lease on it: units it may
//! send without asking (taken from the store in chunks, coalesced), the
//! sale's epoch and limit as the last store answer gave them, and, once
//! the sale is sold out, who holds what. Every store answer carries the
//! sale's state, and a poll refreshes it once a second when no purchase
//! does, so a reset or returned stock reaches a node within about a second.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, HeaderName, HeaderValue, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode};
use tokio::time::Instant;

use super::lease::{Lease, Unit};
use super::store::{
    Holders, OrderState, Outcome, Purchase, SaleState, Snapshot, Store, StoreError,
};
use crate::protocol::{
    self, BuyerError, HOLDERS_PATH, HoldersView, KeyError, PURCHASE_PATH, SALE_PATH,
    SOLD_OUT_HEADER, SOLD_OUT_PATH, SoldOutView, buyer_of,
};
use crate::server::json;

/// Longest request target accepted (Nginx's default header buffer is 8k);
/// nothing legitimate on a node comes near it.
pub const MAX_URI_LEN: usize = 8192;

/// On an answer that repeats the first answer to the same key.
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// How often a node that has not heard from the store asks for the sale's
/// state (and so renews its lease).
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// Longest a `/sold_out` long poll waits for a change (under the
/// balancer's one-second bound on asking a node).
pub const VIEW_WAIT: Duration = Duration::from_millis(700);

/// How often a node asks instead, while it answers `sold_out` from memory
/// and reservations may come back (the sale has a payment window).
pub const POLL_SOLD_OUT_EVERY: Duration = Duration::from_millis(250);

/// How long a cached `/sale` answer is served: a flood of it costs the store
/// a few calls a second, not one per request.
const SALE_CACHE: Duration = Duration::from_millis(500);

/// Counters for `/stats`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Tickets this node sold.
    pub sold: AtomicU64,
    /// Sold-out answers (from the store or from memory).
    pub sold_out: AtomicU64,
    /// Answers to buyers at their limit.
    pub already_bought: AtomicU64,
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
    /// 503 answers for sales made on the primary that fewer than
    /// `[redis] replicas` acknowledged in time (ambiguous: the order exists).
    pub not_replicated: AtomicU64,
    /// How long purchases and lease requests waited for the store.
    pub store_latency: crate::prometheus::Histogram,
    /// Reservations this node's sweeps expired.
    pub expired: AtomicU64,
    /// Order calls (pay, cancel, read) this node answered from the store.
    pub order_calls: AtomicU64,
}

/// How the last lease request ended, for the buyers waiting on it.
const REFILL_GRANTED: u8 = 0;
const REFILL_NONE: u8 = 1;
const REFILL_FAILED: u8 = 2;
/// The store holds no sale: the buyers are told so, not "the store is slow".
const REFILL_NO_SALE: u8 = 3;

/// The holders of one epoch of the sale.
struct KnownHolders {
    epoch: u64,
    holders: Holders,
}

/// A `/sale` answer and when it was read.
struct CachedSale {
    at: Instant,
    body: Bytes,
}

/// What a node needs to sell, beside its store.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The node's name, recorded with every order it sells.
    pub name: String,
    /// The per-user limit of the file: used until the store's is known.
    pub per_user_limit: u64,
    /// Units asked for per lease request.
    pub lease: u64,
    /// How long a buyer may wait for the store.
    pub timeout: Duration,
    /// Largest body accepted on `/buy/ticket`.
    pub max_body: u64,
    /// `/healthz` fails past this clock offset to Redis.
    pub max_clock_offset: Option<Duration>,
}

/// One node's selling state, shared by all its connections.
pub struct Node {
    /// Itself, for the background tasks it starts.
    me: std::sync::Weak<Node>,
    name: String,
    /// This process's lease name in the store: the node's name and a
    /// random part, so a restarted node never inherits the lease of its
    /// previous life (that one runs out by itself).
    holder: String,
    store: Store,
    lease: Lease,
    lease_chunk: u64,
    /// A lease request is in flight (buyers who find no unit wait for it).
    refilling: AtomicBool,
    refill_result: AtomicU8,
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
    view_changed: tokio::sync::Notify,
    /// Milliseconds since `born` of the last store answer that renewed
    /// this node's lease (a sale, a lease request or a poll).
    last_renewed: AtomicU64,
    born: Instant,
    timeout: Duration,
    max_body: u64,
    max_clock_offset: Option<Duration>,
    sale_cache: Mutex<Option<CachedSale>>,
    sale_refreshing: AtomicBool,
    /// Wakes the `/sale` callers waiting for the first snapshot.
    sale_ready: tokio::sync::Notify,
    /// What the node has done, for `/stats`.
    pub stats: Stats,
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
        Arc::new_cyclic(|me| Node {
            me: me.clone(),
            holder: format!("{}/{:016x}", settings.name, random_u64()),
            name: settings.name,
            store,
            lease: Lease::new(),
            lease_chunk: settings.lease.max(1),
            refilling: AtomicBool::new(false),
            refill_result: AtomicU8::new(REFILL_GRANTED),
            epoch: AtomicU64::new(0),
            limit: AtomicU64::new(settings.per_user_limit),
            sold_out_epoch: AtomicU64::new(0),
            released: AtomicU64::new(0),
            pay_within: AtomicU64::new(0),
            holders: ArcSwapOption::empty(),
            learning: AtomicU64::new(0),
            holders_gen: AtomicU64::new(0),
            view_changed: tokio::sync::Notify::new(),
            last_renewed: AtomicU64::new(0),
            born: Instant::now(),
            timeout: settings.timeout,
            max_body: settings.max_body,
            max_clock_offset: settings.max_clock_offset,
            sale_cache: Mutex::new(None),
            sale_refreshing: AtomicBool::new(false),
            sale_ready: tokio::sync::Notify::new(),
            stats: Stats::default(),
        })
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
        self.epoch.load(Ordering::Acquire)
    }

    /// The per-user limit this node enforces (the store's once heard).
    pub fn per_user_limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// The node's name in the file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This process's lease name in the store.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Takes in what a store answer says about the sale: a new epoch drops
    /// everything the node knew of the old sale; the limit is the stored
    /// one; sold out or not is the store's word. An answer about an older
    /// epoch than the node knows changes nothing (answers can be handled
    /// out of the store's order).
    fn observe(&self, sale: &SaleState) {
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
                tracing::info!(node = %self.name, old = known, new = sale.epoch, "the sale was reset; lease, sold-out flag and holders dropped");
            }
            // What the node knew goes first, then the lease wakes its
            // waiters: none of them may see the old sale's flag.
            self.forget_holders();
            self.released.store(0, Ordering::Release);
            self.clear_sale_cache();
            self.lease.reset();
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
            self.lease.clamp(self.lease.generation(), 0);
            self.learn_holders(sale.epoch);
            self.lease.wake();
        }
    }

    /// Drops the holders read into memory (and any read in flight), so the
    /// next sold out reads them again.
    fn forget_holders(&self) {
        self.holders_gen.fetch_add(1, Ordering::AcqRel);
        self.holders.store(None);
        self.learning.store(0, Ordering::Release);
        self.view_changed.notify_waiters();
    }

    /// The sale's payment window as last heard (None: purchases are final).
    pub fn pay_within(&self) -> Option<Duration> {
        match self.pay_within.load(Ordering::Acquire) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Takes in a store answer's view of the sale (for the order routes).
    pub(super) fn heard(&self, sale: &SaleState) {
        self.observe(sale);
    }

    /// The store has said this epoch of the sale is sold out.
    pub fn is_sold_out(&self) -> bool {
        let e = self.sold_out_epoch.load(Ordering::Acquire);
        e != 0 && e == self.epoch.load(Ordering::Acquire)
    }

    /// Serves one request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if target_len > MAX_URI_LEN {
            self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return Ok(json(
                StatusCode::URI_TOO_LONG,
                Bytes::from_static(b"{\"status\":\"uri_too_long\"}"),
            ));
        }
        Ok(match req.uri().path() {
            PURCHASE_PATH => match *req.method() {
                Method::GET | Method::POST => self.buy(&req).await,
                _ => not_allowed("GET, POST"),
            },
            "/healthz" if req.method() == Method::GET => self.healthz().await,
            "/stats" if req.method() == Method::GET => self.stats_json(),
            "/metrics" if req.method() == Method::GET => {
                crate::prometheus::response(super::metrics::render(&self))
            }
            SALE_PATH if req.method() == Method::GET => self.sale().await,
            HOLDERS_PATH if req.method() == Method::GET => self.holders_json(),
            SOLD_OUT_PATH if req.method() == Method::GET => self.sold_out_json(&req).await,
            "/healthz" | "/stats" | SALE_PATH | "/metrics" | HOLDERS_PATH | SOLD_OUT_PATH => {
                not_allowed("GET")
            }
            path if path.starts_with("/orders/") => super::orders::handle(&self, &req).await,
            _ => json(
                StatusCode::NOT_FOUND,
                Bytes::from_static(b"{\"status\":\"not_found\"}"),
            ),
        })
    }

    fn bad_request(&self, body: &'static [u8]) -> Response<Full<Bytes>> {
        self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        json(StatusCode::BAD_REQUEST, Bytes::from_static(body))
    }

    async fn buy(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        // The body is never needed: refuse big ones by their declared size,
        // and chunked ones outright, before any work.
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body)
            || req.headers().contains_key(TRANSFER_ENCODING)
        {
            self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                Bytes::from_static(b"{\"status\":\"payload_too_large\"}"),
            );
        }
        let buyer = match buyer_of(req, self.per_user_limit() > 0) {
            Ok(b) => b,
            Err(BuyerError::Missing) => {
                return self.bad_request(b"{\"status\":\"bad_request\",\"reason\":\"a buyer id is required: ?user=ID or X-User-Id\"}");
            }
            Err(BuyerError::Malformed) => {
                return self.bad_request(b"{\"status\":\"bad_request\",\"reason\":\"a buyer id is 1 to 64 characters of [A-Za-z0-9_.:@-]\"}");
            }
        };
        let key = match protocol::key_in(req.headers()) {
            Ok(k) => k,
            Err(KeyError::Malformed) => {
                return self.bad_request(b"{\"status\":\"bad_request\",\"reason\":\"an Idempotency-Key is one header of 1 to 64 characters of [A-Za-z0-9_.:@-], optionally in double quotes\"}");
            }
        };
        let give_up = Instant::now() + self.timeout;
        loop {
            if self.is_sold_out() {
                return self.sold_out_answer(buyer, key, give_up).await;
            }
            if let Some(unit) = self.lease.take() {
                if self.lease.left() < self.lease_chunk.div_ceil(4) {
                    // Ask for more before the lease is empty, so that
                    // buyers seldom wait for it.
                    self.refill();
                }
                return self.purchase(buyer, key, Some(unit), give_up).await;
            }
            // No unit: one lease request for all the buyers here (the
            // first starts it), then look again.
            self.refill();
            let woke = self
                .lease
                .changed(give_up, || {
                    self.lease.left() > 0
                        || self.is_sold_out()
                        || !self.refilling.load(Ordering::Acquire)
                })
                .await;
            if !woke {
                return self.gave_up_waiting();
            }
            if self.lease.left() == 0
                && !self.is_sold_out()
                && !self.refilling.load(Ordering::Acquire)
            {
                match self.refill_result.load(Ordering::Acquire) {
                    REFILL_FAILED => {
                        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                        return unavailable();
                    }
                    REFILL_NO_SALE => return self.not_initialised(),
                    _ => {}
                }
            }
            if self.lease.left() == 0
                && !self.is_sold_out()
                && self.refill_result.load(Ordering::Acquire) == REFILL_NONE
            {
                // Every unit left is out with purchases in flight (this
                // node's or others'): wait for one of them to end, then ask
                // again.
                if !self
                    .lease
                    .changed(give_up, || self.lease.left() > 0 || self.is_sold_out())
                    .await
                {
                    return self.gave_up_waiting();
                }
            }
        }
    }

    /// A buyer waited for a unit until its deadline: "busy" when the store
    /// said every unit left is out with purchases in flight, "unavailable"
    /// when the store did not answer (slow, down, or failed).
    fn gave_up_waiting(&self) -> Response<Full<Bytes>> {
        if !self.refilling.load(Ordering::Acquire)
            && self.refill_result.load(Ordering::Acquire) == REFILL_NONE
        {
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            return busy();
        }
        if !self.refilling.load(Ordering::Acquire)
            && self.refill_result.load(Ordering::Acquire) == REFILL_NO_SALE
        {
            return self.not_initialised();
        }
        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        unavailable()
    }

    /// The 503 for a store that holds no sale (counted apart from store
    /// errors: nothing failed, the operator has a command to run).
    fn not_initialised(&self) -> Response<Full<Bytes>> {
        self.stats.not_initialised.fetch_add(1, Ordering::Relaxed);
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"{\"status\":\"unavailable\",\"reason\":\"the sale is not initialised: run spike stock init\"}"),
        )
    }

    /// Starts a lease request unless one is in flight.
    fn refill(&self) {
        if self.refilling.load(Ordering::Relaxed) || self.refilling.swap(true, Ordering::AcqRel) {
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

    /// Notes that the store renewed this node's lease just now.
    fn renewed(&self) {
        self.last_renewed
            .store(self.born.elapsed().as_millis() as u64, Ordering::Release);
    }

    fn refilled(&self, generation: u64, result: Result<super::store::Reply<u64>, StoreError>) {
        let outcome = match result {
            Ok(reply) => {
                self.observe(&reply.sale);
                self.renewed();
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
            Err(e) => {
                tracing::warn!(node = %self.name, error = %e, "lease request failed");
                REFILL_FAILED
            }
        };
        self.refill_result.store(outcome, Ordering::Release);
        self.refilling.store(false, Ordering::Release);
        self.lease.wake();
    }

    /// One purchase at the store, with a unit of the lease (or none, for a
    /// buyer who may hold a ticket when the node is sold out).
    async fn purchase(
        &self,
        buyer: &str,
        key: &str,
        unit: Option<Unit<'_>>,
        give_up: Instant,
    ) -> Response<Full<Bytes>> {
        self.stats.store_calls.fetch_add(1, Ordering::Relaxed);
        let asked = Instant::now();
        // `unit` goes back to the lease on every path but a sale,
        // including this future being dropped because the client left.
        let result = self
            .store
            .deduct(Purchase {
                holder: &self.holder,
                node: &self.name,
                buyer,
                key,
                give_up,
            })
            .await;
        self.stats.store_latency.observe(asked.elapsed());
        let reply = match result {
            Ok(reply) => reply,
            Err(StoreError::NotReplicated {
                wanted,
                acked,
                sold,
            }) => {
                // A sale spent its unit; a replay of an earlier order
                // took none, so its unit goes back.
                match unit {
                    Some(u) if sold => u.keep(),
                    other => drop(other),
                }
                self.stats.not_replicated.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %self.name, wanted, acked, sold, "a purchase's answer was not replicated in time; answered 503");
                return not_replicated();
            }
            Err(e) => {
                drop(unit);
                if matches!(e, StoreError::NoSale) {
                    return self.not_initialised();
                }
                if matches!(e, StoreError::NoReplicas) {
                    self.stats.not_replicated.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node = %self.name, "Redis refused the sale: too few replicas connected; answered 503, nothing sold");
                    return no_replicas();
                }
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, node = %self.name, "store call failed; unit returned");
                return unavailable();
            }
        };
        self.observe(&reply.sale);
        let answer = self.answer(reply.answer, unit, buyer);
        if reply.sale.sold_out() && self.is_sold_out() {
            // A unit that came back just now (its purchase heard "sold
            // out") is no unit: no lease holds anything after sold out.
            self.lease.clamp(self.lease.generation(), 0);
        }
        answer
    }

    /// The answer to a purchase the store decided; `unit` is kept on a sale
    /// and goes back on anything else.
    fn answer(
        &self,
        outcome: Outcome,
        unit: Option<Unit<'_>>,
        buyer: &str,
    ) -> Response<Full<Bytes>> {
        match outcome {
            Outcome::Sold {
                order,
                sold,
                pay_by,
            } => {
                if let Some(u) = unit {
                    u.keep();
                }
                self.renewed();
                self.stats.sold.fetch_add(1, Ordering::Relaxed);
                let state = if pay_by.is_some() {
                    OrderState::Reserved
                } else {
                    OrderState::Final
                };
                sold_answer(&order, &self.name, buyer, sold, false, state, pay_by)
            }
            Outcome::Replayed {
                order,
                sold,
                state,
                pay_by,
            } => {
                drop(unit);
                self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                sold_answer(&order, &self.name, buyer, sold, true, state, pay_by)
            }
            Outcome::SoldOut => {
                drop(unit);
                self.stats.sold_out.fetch_add(1, Ordering::Relaxed);
                sold_out()
            }
            Outcome::AlreadyBought { order } => {
                drop(unit);
                self.already_bought_answer(&order)
            }
            Outcome::BuyerRequired => {
                drop(unit);
                self.bad_request(b"{\"status\":\"bad_request\",\"reason\":\"a buyer id is required: ?user=ID or X-User-Id\"}")
            }
            Outcome::KeyConflict => {
                drop(unit);
                self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Bytes::from_static(b"{\"status\":\"idempotency_key_reused\",\"reason\":\"this Idempotency-Key was used by another buyer\"}"),
                )
            }
        }
    }

    /// Reads the holders of `epoch` once, in the background, retrying with
    /// backoff until it lands (a buyer at the limit stays there, a key
    /// that bought keeps its order) or the sale is reset.
    fn learn_holders(&self, epoch: u64) {
        let learning = self.learning.load(Ordering::Acquire);
        if learning == epoch
            || self
                .learning
                .compare_exchange(learning, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let node = NodeRef::of(self);
        let store = self.store.clone();
        let name = self.name.clone();
        let generation = self.holders_gen.load(Ordering::Acquire);
        let current = move |n: &Node| {
            n.learning.load(Ordering::Acquire) == epoch
                && n.holders_gen.load(Ordering::Acquire) == generation
        };
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                let Some(limit) = node
                    .with(|n| current(n).then(|| n.per_user_limit()))
                    .flatten()
                else {
                    return;
                };
                match store.holders(limit).await {
                    Ok(found) => {
                        tracing::info!(node = %name, buyers = found.buyers.len(), keys = found.keys.len(), "holders read into memory");
                        node.with(|n| {
                            if n.epoch() == epoch && current(n) {
                                n.holders.store(Some(Arc::new(KnownHolders {
                                    epoch,
                                    holders: found,
                                })));
                            }
                        });
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(node = %name, error = %e, retry_in = ?pause, "reading the holders failed; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }

    fn already_bought_answer(&self, order: &str) -> Response<Full<Bytes>> {
        self.stats.already_bought.fetch_add(1, Ordering::Relaxed);
        json(StatusCode::CONFLICT, protocol::already_bought_body(order))
    }

    /// The answer once the store said the sale is sold out: from memory
    /// when the holders are known; before that, a buyer who may hold a
    /// ticket (a key, or a named buyer under a limit) asks the store, which
    /// sells nothing more but knows.
    async fn sold_out_answer(
        &self,
        buyer: &str,
        key: &str,
        give_up: Instant,
    ) -> Response<Full<Bytes>> {
        let known = self.holders.load();
        match known.as_deref() {
            Some(k) if k.epoch == self.epoch() => {
                if !key.is_empty()
                    && let Some(order) = k.holders.keys.get(key)
                {
                    if order.state == OrderState::Reserved {
                        // Paid or expired since it was read, maybe: the
                        // store knows (a retry of a reservation is rare).
                        return self.purchase(buyer, key, None, give_up).await;
                    }
                    if order.buyer != buyer {
                        self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                        return json(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            Bytes::from_static(b"{\"status\":\"idempotency_key_reused\",\"reason\":\"this Idempotency-Key was used by another buyer\"}"),
                        );
                    }
                    self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                    return sold_answer(
                        &order.order,
                        &self.name,
                        buyer,
                        super::store::embedded::ticket_number(&order.order),
                        true,
                        order.state,
                        order.pay_by,
                    );
                }
                if let Some(order) = k.holders.buyers.get(buyer) {
                    return self.already_bought_answer(order);
                }
            }
            _ if !key.is_empty() || (self.per_user_limit() > 0 && !buyer.is_empty()) => {
                self.learn_holders(self.epoch());
                return self.purchase(buyer, key, None, give_up).await;
            }
            _ => {}
        }
        self.stats.sold_out.fetch_add(1, Ordering::Relaxed);
        sold_out()
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
            let heard = self.last_renewed.load(Ordering::Acquire);
            let now = self.born.elapsed().as_millis() as u64;
            let pause = if self.is_sold_out() && self.pay_within().is_some() {
                POLL_SOLD_OUT_EVERY
            } else {
                POLL_EVERY
            };
            if heard != 0 && now.saturating_sub(heard) < pause.as_millis() as u64 {
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
                    self.renewed();
                }
                Err(StoreError::NoSale) => {}
                Err(e) => tracing::debug!(node = %self.name, error = %e, "sale poll failed"),
            }
        }
    }

    /// Whether the node can sell: the store answers and holds an
    /// initialised sale, and its clock is near this host's. A 503 says why.
    async fn healthz(&self) -> Response<Full<Bytes>> {
        let (status, body) = super::metrics::health(self).await;
        json(status, body)
    }

    /// Whether the store answered this node within the last few polls: a
    /// node that cannot reach it keeps its sold-out flag, and a balancer
    /// must not answer for the whole sale from that stale view.
    fn heard_lately(&self) -> bool {
        let heard = self.last_renewed.load(Ordering::Acquire);
        let now = self.born.elapsed().as_millis() as u64;
        heard != 0 && now.saturating_sub(heard) < 3 * POLL_EVERY.as_millis() as u64
    }

    /// `GET /sold_out`: whether this node answers `sold_out` from memory,
    /// for which epoch, and how many tickets had come back when it last
    /// heard from the store. From memory, no store call. With
    /// `?epoch=E&released=R` (what the caller knows) it is a long poll: it
    /// answers when that view stops holding (a reset, returned stock, the
    /// node open again), or after [`VIEW_WAIT`], so a balancer answering
    /// for a sold-out sale hears of a change as soon as this node does
    /// (see `crate::balancer::edge`).
    async fn sold_out_json(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some((epoch, released)) = protocol::sold_out_poll_params(req.uri().query()) {
            let changed = self.view_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let same = self.is_sold_out()
                && self.heard_lately()
                && self.epoch() == epoch
                && self.released.load(Ordering::Acquire) == released;
            if same {
                let _ = tokio::time::timeout(VIEW_WAIT, changed).await;
            }
        }
        let view = SoldOutView {
            sold_out: self.is_sold_out() && self.heard_lately(),
            epoch: self.epoch(),
            released: self.released.load(Ordering::Acquire),
        };
        json_of(&view)
    }

    /// `GET /holders`: once the node answers `sold_out` from memory, the
    /// buyers at the limit and their last orders, as it knows them, so a
    /// balancer can answer `already_bought` for them without a node. 409
    /// while the sale is open; 503 while the node is still reading them.
    fn holders_json(&self) -> Response<Full<Bytes>> {
        if !self.is_sold_out() {
            return json(
                StatusCode::CONFLICT,
                Bytes::from_static(b"{\"status\":\"open\"}"),
            );
        }
        let known = self.holders.load();
        let Some(k) = known.as_deref().filter(|k| k.epoch == self.epoch()) else {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from_static(b"{\"status\":\"learning\",\"reason\":\"the node is still reading the holders\"}"),
            );
        };
        json_of(&HoldersView {
            epoch: k.epoch,
            released: self.released.load(Ordering::Acquire),
            per_user_limit: self.per_user_limit(),
            buyers: std::borrow::Cow::Borrowed(&k.holders.buyers),
        })
    }

    /// The buyers and keys read into memory once sold out, when read.
    pub fn holders_known(&self) -> Option<(usize, usize)> {
        let holders = self.holders.load();
        holders
            .as_deref()
            .filter(|h| h.epoch == self.epoch())
            .map(|h| (h.holders.buyers.len(), h.holders.keys.len()))
    }

    /// `/healthz` fails past this clock offset to Redis.
    pub fn max_clock_offset(&self) -> Option<Duration> {
        self.max_clock_offset
    }

    fn stats_json(&self) -> Response<Full<Bytes>> {
        json(StatusCode::OK, super::metrics::stats(self))
    }

    fn clear_sale_cache(&self) {
        *self.sale_cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The sale's snapshot, at most [`SALE_CACHE`] old: one store call at a
    /// time refreshes it, whatever the number of callers.
    async fn sale(&self) -> Response<Full<Bytes>> {
        let cached = || {
            self.sale_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|c| (c.at, c.body.clone()))
        };
        let now = Instant::now();
        let stale = match cached() {
            Some((at, body)) if now.duration_since(at) < SALE_CACHE => {
                return json(StatusCode::OK, body);
            }
            other => other,
        };
        if self.sale_refreshing.swap(true, Ordering::AcqRel) {
            // Another request is reading it: the last answer will do, or,
            // with none yet, the one being read.
            if let Some((_, body)) = stale {
                return json(StatusCode::OK, body);
            }
            let ready = self.sale_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some((_, body)) = cached() {
                return json(StatusCode::OK, body);
            }
            let _ = tokio::time::timeout(self.timeout, ready).await;
            return match cached() {
                Some((_, body)) => json(StatusCode::OK, body),
                None => sale_unavailable(),
            };
        }
        let refresh = SaleRefresh(self);
        let result = self.store.snapshot().await;
        match result.map(|snap: Snapshot| serde_json::to_vec(&snap)) {
            Ok(Ok(body)) => {
                let body = Bytes::from(body);
                *self.sale_cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(CachedSale {
                    at: now,
                    body: body.clone(),
                });
                drop(refresh);
                json(StatusCode::OK, body)
            }
            Ok(Err(_)) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::from_static(b"{\"status\":\"error\"}"),
            ),
            Err(_) => sale_unavailable(),
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

/// Clears the `/sale` refresh flag however the refresh ends (a caller that
/// hangs up mid-read drops it), and wakes the callers waiting for it.
struct SaleRefresh<'a>(&'a Node);

impl Drop for SaleRefresh<'_> {
    fn drop(&mut self) {
        self.0.sale_refreshing.store(false, Ordering::Release);
        self.0.sale_ready.notify_waiters();
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

/// The 200 of a purchase (or its replay). With a payment window it is a
/// reservation, and says until when it must be paid. A replay whose order
/// went back on sale is a 409 naming the order: the key bought it, and the
/// buyer holds nothing now.
fn sold_answer(
    order: &str,
    node: &str,
    buyer: &str,
    sold: u64,
    replayed: bool,
    state: OrderState,
    pay_by: Option<u64>,
) -> Response<Full<Bytes>> {
    if state.released() {
        let mut body = String::with_capacity(40 + order.len());
        body.push_str("{\"status\":\"");
        body.push_str(state.as_str());
        body.push_str("\",\"order\":\"");
        body.push_str(order);
        body.push_str("\"}");
        let mut res = json(StatusCode::CONFLICT, body);
        res.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        return res;
    }
    let mut body = String::with_capacity(150 + buyer.len() + order.len());
    body.push_str("{\"status\":\"sold\",\"order\":\"");
    body.push_str(order);
    body.push_str("\",\"node\":\"");
    body.push_str(node);
    body.push_str("\",\"buyer\":\"");
    body.push_str(buyer);
    let _ = write!(body, "\",\"sold\":{sold}");
    if state != OrderState::Final {
        body.push_str(",\"state\":\"");
        body.push_str(state.as_str());
        body.push('"');
    }
    if let Some(ms) = pay_by {
        let _ = write!(body, ",\"pay_by\":\"{}\"", rfc3339(ms));
    }
    body.push('}');
    let mut res = json(StatusCode::OK, body);
    if replayed {
        res.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    res
}

/// Unix milliseconds as RFC 3339 (UTC, to the millisecond).
pub fn rfc3339(ms: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
}

/// A 200 with `body` (a contract type, see [`crate::protocol`]) as JSON.
fn json_of(body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(body) {
        Ok(body) => json(StatusCode::OK, body),
        Err(_) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            Bytes::from_static(b"{\"status\":\"error\"}"),
        ),
    }
}

fn sold_out() -> Response<Full<Bytes>> {
    let mut res = json(
        StatusCode::CONFLICT,
        Bytes::from_static(protocol::SOLD_OUT_BODY),
    );
    res.headers_mut()
        .insert(SOLD_OUT_HEADER, HeaderValue::from_static("1"));
    res
}

fn busy() -> Response<Full<Bytes>> {
    let mut res = json(
        StatusCode::SERVICE_UNAVAILABLE,
        Bytes::from_static(
            b"{\"status\":\"busy\",\"reason\":\"every ticket left is held by purchases in flight; retry\"}",
        ),
    );
    res.headers_mut()
        .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

fn unavailable() -> Response<Full<Bytes>> {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        Bytes::from_static(b"{\"status\":\"unavailable\",\"reason\":\"the store did not answer in time; if a ticket was sold, the same purchase sent again (same Idempotency-Key) gets its order\"}"),
    )
}

/// The 503 while Redis refuses writes for want of replicas
/// (`min-replicas-to-write`): unlike [`not_replicated`], nothing was sold.
fn no_replicas() -> Response<Full<Bytes>> {
    retry_shortly(b"{\"status\":\"unavailable\",\"reason\":\"too few Redis replicas are connected to acknowledge a sale; nothing was sold: try again shortly\"}")
}

/// The 503 for a sale the replicas did not acknowledge in time: unlike
/// the other 503s, the ticket may be the buyer's, and the retry with the
/// same key (or the per-user limit) says so.
fn not_replicated() -> Response<Full<Bytes>> {
    retry_shortly(b"{\"status\":\"unavailable\",\"reason\":\"the sale may have been made but was not replicated in time: retry with the same Idempotency-Key to learn its order\"}")
}

/// A 503 with `body` and `Retry-After: 1`: the replicas may be back in a
/// moment.
fn retry_shortly(body: &'static [u8]) -> Response<Full<Bytes>> {
    let mut res = json(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(body));
    res.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from_static("1"),
    );
    res
}

/// `/sale` could not be read: not the purchase's 503, whose reason is
/// about retrying a purchase.
fn sale_unavailable() -> Response<Full<Bytes>> {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        Bytes::from_static(
            b"{\"status\":\"unavailable\",\"reason\":\"the store did not answer in time\"}",
        ),
    )
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut res = json(
        StatusCode::METHOD_NOT_ALLOWED,
        Bytes::from_static(b"{\"status\":\"method_not_allowed\"}"),
    );
    res.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    res
}
