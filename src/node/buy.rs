//! The purchase logic, apart from HTTP: a checked buyer and key in, a
//! [`BuyAnswer`] out. The hot path touches only atomics until its one store
//! call (shared with the purchases queued beside it), and answers from
//! memory once the store has said the sale is over. `routes::buy` turns the
//! answer into HTTP, in one place.

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::lease::Unit;
use super::state::{
    Node, REFILL_FAILED, REFILL_NO_SALE, REFILL_NONE, REFILL_NOT_SELLING, REFILL_RETIRED,
};
use super::stats::Stats;
use super::store::{Holders, Lookup, OrderState, Outcome, Purchase, StoreError};

/// What a purchase came to, before it is HTTP: the purchase logic (and the
/// route's checks of the request) decide it, [`BuyAnswer::count`] counts
/// it, and `routes::buy::render` writes it, each in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuyAnswer<'a> {
    /// The tickets sold (or reserved) now, all asked for, in one order,
    /// or, `replayed`, the first answer to the same key given again (a 409
    /// when its order went back on sale).
    Sold {
        /// The order id.
        order: String,
        /// The buyer, as the request named them (`""` when anonymous).
        buyer: &'a str,
        /// The ticket's number (of several, the last's).
        sold: u64,
        /// The tickets the order holds.
        quantity: u64,
        /// The answer repeats the key's first one.
        replayed: bool,
        /// Where the order stands.
        state: OrderState,
        /// Unix ms by which a reservation must be paid.
        pay_by: Option<u64>,
    },
    /// The sale is sold out (409, `Spike-Sold-Out: 1`).
    SoldOut,
    /// The buyer holds the limit; `order` is their last.
    AlreadyBought {
        /// The buyer's last order.
        order: String,
    },
    /// Tickets remain, fewer than asked: nothing sold (409, not sold out).
    TooFewLeft {
        /// Tickets left when the store looked.
        remaining: u64,
    },
    /// The purchase would take the buyer over the limit (409).
    OverLimit {
        /// Tickets they may still buy.
        may_buy: u64,
    },
    /// `?quantity=` is not a whole number from 1 to the sale's
    /// `max_per_purchase` (400).
    QuantityInvalid {
        /// The sale's `max_per_purchase`.
        max: u64,
    },
    /// The Idempotency-Key bought an order of another quantity (422).
    KeyOtherQuantity {
        /// The tickets the key's order holds.
        quantity: u64,
    },
    /// The sale has a limit and the request named no buyer (400); also the
    /// store's answer when its limit says so.
    BuyerMissing,
    /// The buyer id is malformed (400).
    BuyerMalformed,
    /// The Idempotency-Key is malformed (400).
    KeyMalformed,
    /// A body declared over `[server] max_body`, or a chunked one (413).
    TooLarge,
    /// The Idempotency-Key bought for another buyer (422).
    KeyReused,
    /// Every unit left is held by purchases in flight (503, retry).
    Busy,
    /// The store failed or did not answer in time (503).
    StoreFailed,
    /// The sale's state was dropped (idle) under the purchase before it
    /// asked the store for units: nothing sold (503, as `StoreFailed`;
    /// the route asks for the sale's state again first).
    Dropped,
    /// The store holds no sale (503: run `spike stock init`).
    NotInitialised,
    /// A sale (or replay) the replicas did not acknowledge in time (503:
    /// the order may exist).
    NotReplicated,
    /// Redis refused the write for want of replicas (503: nothing sold).
    NoReplicas,
    /// With `[auth]`: no buyer token, or one that does not verify (401);
    /// nothing is sold and nothing is counted against anyone.
    Unauthorized(crate::auth::AuthError),
    /// The sale does not sell now: not open yet, closed, or paused (409).
    NotSelling(crate::protocol::Shut),
}

impl BuyAnswer<'_> {
    /// Counts the answer in `stats`: each kind of answer in one counter.
    pub fn count(&self, stats: &Stats) {
        let counter = match self {
            // Tickets, not answers.
            BuyAnswer::Sold {
                replayed: false,
                quantity,
                ..
            } => {
                stats.sold.fetch_add(*quantity, Ordering::Relaxed);
                return;
            }
            BuyAnswer::Sold { replayed: true, .. } => &stats.replayed,
            BuyAnswer::SoldOut => &stats.sold_out,
            BuyAnswer::AlreadyBought { .. } | BuyAnswer::OverLimit { .. } => &stats.already_bought,
            BuyAnswer::TooFewLeft { .. } => &stats.too_few_left,
            BuyAnswer::BuyerMissing
            | BuyAnswer::BuyerMalformed
            | BuyAnswer::KeyMalformed
            | BuyAnswer::TooLarge
            | BuyAnswer::QuantityInvalid { .. }
            | BuyAnswer::KeyOtherQuantity { .. }
            | BuyAnswer::KeyReused => &stats.bad_requests,
            BuyAnswer::Busy => &stats.busy,
            BuyAnswer::StoreFailed | BuyAnswer::Dropped => &stats.store_errors,
            BuyAnswer::NotInitialised => &stats.not_initialised,
            BuyAnswer::NotReplicated | BuyAnswer::NoReplicas => &stats.not_replicated,
            BuyAnswer::Unauthorized(_) => &stats.unauthorized,
            BuyAnswer::NotSelling(_) => &stats.not_selling,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A purchase's `Idempotency-Key` (`text`, `""` for none), and whether a
/// balancer made it ([`crate::protocol::MADE_KEY`]): unique, sent again
/// only by that balancer's retry.
#[derive(Debug, Clone, Copy)]
pub struct Key<'k> {
    /// The key as the request carried it (without quotes).
    pub text: &'k str,
    /// Made by a balancer for a request that came without one.
    pub made: bool,
}

impl Key<'_> {
    /// No key.
    pub const NONE: Key<'static> = Key {
        text: "",
        made: false,
    };

    fn is_empty(&self) -> bool {
        self.text.is_empty()
    }
}

impl Node {
    /// Sells `quantity` tickets (checked: 1 to `max_per_purchase`) to
    /// `buyer` (checked; `""` when anonymous) under `key` (`""` for none),
    /// all or nothing: units of the lease, then the store, or the answer
    /// from memory once sold out, within `[redis] timeout`.
    pub async fn buy<'a>(&self, buyer: &'a str, key: Key<'_>, quantity: u64) -> BuyAnswer<'a> {
        let give_up = Instant::now() + self.timeout;
        if let Some(shut) = self.shut_now() {
            return self.shut_answer(shut, buyer, key, quantity, give_up).await;
        }
        loop {
            if self.is_sold_out() {
                return self.sold_out_answer(buyer, key, quantity, give_up).await;
            }
            // A unit per ticket, all at once; when the lease has fewer,
            // those it has, and the store takes the rest from the free
            // stock or other leases (it decides the sale either way).
            if let Some(unit) = self.lease.take(quantity) {
                if self.lease.left() < self.lease_chunk.div_ceil(4) {
                    // Ask for more before the lease is empty, so that
                    // buyers seldom wait for it.
                    self.refill();
                }
                return self
                    .purchase(buyer, key, quantity, Some(unit), give_up)
                    .await;
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
                    REFILL_FAILED => return BuyAnswer::StoreFailed,
                    REFILL_RETIRED => return BuyAnswer::Dropped,
                    REFILL_NO_SALE => return BuyAnswer::NotInitialised,
                    REFILL_NOT_SELLING => {
                        // The store said it does not sell (a pause this
                        // node had not heard of yet): a key may still be
                        // the retry of a purchase that got an order.
                        return self
                            .shut_answer(self.last_shut(), buyer, key, quantity, give_up)
                            .await;
                    }
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

    /// The answer while the sale does not sell (`shut`). A purchase
    /// without a key hears why, from memory. One with a key may be the
    /// retry of a purchase that got an order, whose replay the store still
    /// answers while the sale is shut (it sells nothing: `deduct.lua`).
    async fn shut_answer<'a>(
        &self,
        shut: crate::protocol::Shut,
        buyer: &'a str,
        key: Key<'_>,
        quantity: u64,
        give_up: Instant,
    ) -> BuyAnswer<'a> {
        use crate::protocol::Shut;
        if key.is_empty() {
            return BuyAnswer::NotSelling(shut);
        }
        match shut {
            // Only the store knows whether this key bought: it is asked,
            // as while selling, without a unit (it sells nothing while
            // paused, and a resume it heard first sells as usual).
            Shut::Paused => self.purchase(buyer, key, quantity, None, give_up).await,
            // Nothing sells before the opening, so no key has an order to
            // replay: answered from memory, unless the store has said it
            // sold in this epoch (it opened by its clock, which this
            // host's may trail by a little).
            Shut::NotOpen { .. } if self.view.created() == 0 => BuyAnswer::NotSelling(shut),
            Shut::NotOpen { .. } => self.purchase(buyer, key, quantity, None, give_up).await,
            // After the closing, once the store has said "closed", nothing
            // sells any more and the holders read then are all of them:
            // answered from them. Before that (this host's clock may run a
            // little ahead) the store decides.
            Shut::Closed { .. } if !self.closed_confirmed() => {
                self.purchase(buyer, key, quantity, None, give_up).await
            }
            Shut::Closed { .. } => {
                match self.sold_out_answer(buyer, key, quantity, give_up).await {
                    BuyAnswer::SoldOut => BuyAnswer::NotSelling(shut),
                    other => other,
                }
            }
        }
    }

    /// A buyer waited for a unit until its deadline: "busy" when the store
    /// said every unit left is out with purchases in flight, "unavailable"
    /// when the store did not answer (slow, down, or failed).
    fn gave_up_waiting(&self) -> BuyAnswer<'static> {
        if !self.refilling.load(Ordering::Acquire)
            && self.refill_result.load(Ordering::Acquire) == REFILL_NONE
        {
            return BuyAnswer::Busy;
        }
        if !self.refilling.load(Ordering::Acquire)
            && self.refill_result.load(Ordering::Acquire) == REFILL_NO_SALE
        {
            return BuyAnswer::NotInitialised;
        }
        if !self.refilling.load(Ordering::Acquire)
            && self.refill_result.load(Ordering::Acquire) == REFILL_NOT_SELLING
        {
            return BuyAnswer::NotSelling(self.last_shut());
        }
        BuyAnswer::StoreFailed
    }

    /// One purchase at the store, with units of the lease (or none, for a
    /// buyer who may hold a ticket when the node is sold out).
    async fn purchase<'a>(
        &self,
        buyer: &'a str,
        key: Key<'_>,
        quantity: u64,
        unit: Option<Unit<'_>>,
        give_up: Instant,
    ) -> BuyAnswer<'a> {
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
                key: key.text,
                made_key: key.made,
                quantity,
                units: unit.as_ref().map_or(0, Unit::count),
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
                tracing::warn!(node = %self.name, wanted, acked, sold, "a purchase's answer was not replicated in time; answered 503");
                return BuyAnswer::NotReplicated;
            }
            Err(e) => {
                drop(unit);
                if matches!(e, StoreError::NoSale) {
                    return BuyAnswer::NotInitialised;
                }
                if let StoreError::NotSelling(shut, sale) = e {
                    self.heard_shut(shut, &sale);
                    return BuyAnswer::NotSelling(shut);
                }
                if matches!(e, StoreError::NoReplicas) {
                    tracing::warn!(node = %self.name, "Redis refused the sale: too few replicas connected; answered 503, nothing sold");
                    return BuyAnswer::NoReplicas;
                }
                tracing::warn!(error = %e, node = %self.name, "store call failed; unit returned");
                return BuyAnswer::StoreFailed;
            }
        };
        self.observe(&reply.sale);
        let answer = self.answer(reply.answer, unit, buyer, quantity);
        if reply.sale.sold_out() && self.is_sold_out() {
            // A unit that came back just now (its purchase heard "sold
            // out") is no unit: no lease holds anything after sold out.
            self.lease.clamp(self.lease.generation(), 0);
        }
        answer
    }

    /// The answer to a purchase the store decided; `unit` is kept on a sale
    /// and goes back on anything else.
    fn answer<'a>(
        &self,
        outcome: Outcome,
        unit: Option<Unit<'_>>,
        buyer: &'a str,
        quantity: u64,
    ) -> BuyAnswer<'a> {
        match outcome {
            Outcome::Sold {
                order,
                sold,
                pay_by,
            } => {
                if let Some(u) = unit {
                    u.keep();
                }
                self.view.renewed();
                let state = if pay_by.is_some() {
                    OrderState::Reserved
                } else {
                    OrderState::Final
                };
                BuyAnswer::Sold {
                    order,
                    buyer,
                    sold,
                    quantity,
                    replayed: false,
                    state,
                    pay_by,
                }
            }
            Outcome::Replayed {
                order,
                sold,
                state,
                pay_by,
            } => {
                drop(unit);
                // The store replays a key only for the quantity it bought.
                BuyAnswer::Sold {
                    order,
                    buyer,
                    sold,
                    quantity,
                    replayed: true,
                    state,
                    pay_by,
                }
            }
            Outcome::SoldOut => {
                drop(unit);
                BuyAnswer::SoldOut
            }
            Outcome::AlreadyBought { order } => {
                drop(unit);
                BuyAnswer::AlreadyBought { order }
            }
            Outcome::BuyerRequired => {
                drop(unit);
                BuyAnswer::BuyerMissing
            }
            Outcome::KeyConflict => {
                drop(unit);
                BuyAnswer::KeyReused
            }
            Outcome::KeyOtherQuantity { quantity } => {
                drop(unit);
                BuyAnswer::KeyOtherQuantity { quantity }
            }
            Outcome::TooFewLeft { remaining } => {
                drop(unit);
                BuyAnswer::TooFewLeft { remaining }
            }
            Outcome::OverLimit { may_buy } => {
                drop(unit);
                BuyAnswer::OverLimit { may_buy }
            }
        }
    }

    /// The answer once the store said the sale is sold out: from memory
    /// when the holders are known and current (no ticket came back or was
    /// sold since they were last read); otherwise, or where memory cannot
    /// tell (a hash two holders share), a buyer who may hold a ticket (a
    /// key, or a named buyer under a limit) asks the store, which sells
    /// nothing more but knows.
    async fn sold_out_answer<'a>(
        &self,
        buyer: &'a str,
        key: Key<'_>,
        quantity: u64,
        give_up: Instant,
    ) -> BuyAnswer<'a> {
        let may_hold = !key.is_empty() || (self.per_user_limit() > 0 && !buyer.is_empty());
        // Decided under the holders' read lock, acted on after it.
        let verdict = {
            let known = self.view.holders();
            match known.as_deref().filter(|k| k.epoch == self.epoch()) {
                Some(k) => {
                    let h = k.read();
                    if self.view.is_current(&h) {
                        from_memory(&h, buyer, key, self.pay_within().is_some())
                    } else {
                        Memory::Stale
                    }
                }
                None => Memory::Stale,
            }
        };
        match verdict {
            Memory::Answer(Remembered::AlreadyBought(order)) => BuyAnswer::AlreadyBought { order },
            Memory::Answer(Remembered::SoldOut) => BuyAnswer::SoldOut,
            Memory::AskStore => self.purchase(buyer, key, quantity, None, give_up).await,
            Memory::Stale if may_hold => {
                self.learn_holders(self.epoch());
                self.purchase(buyer, key, quantity, None, give_up).await
            }
            Memory::Stale => BuyAnswer::SoldOut,
        }
    }
}

/// What memory says of a purchase once sold out.
enum Memory {
    /// The answer, from memory.
    Answer(Remembered),
    /// Only the store can tell.
    AskStore,
    /// The holders are not read, or not current.
    Stale,
}

/// An answer memory can give.
enum Remembered {
    AlreadyBought(String),
    SoldOut,
}

/// The answer current holders give for `buyer` and `key`, as the script
/// would give it; `returns`: tickets may come back (the sale has a payment
/// window).
fn from_memory(h: &Holders, buyer: &str, key: Key<'_>, returns: bool) -> Memory {
    // A key that bought is the store's to replay (or to refuse to another
    // buyer) exactly. Where tickets come back, a key memory does not know
    // may have bought one at another node since this one last heard (a
    // cancel, then a purchase, within the quarter second the news takes):
    // only the store can say that it did not.
    if !key.is_empty() && (returns || h.key_bought(key.text)) {
        return Memory::AskStore;
    }
    if buyer.is_empty() || h.per_user_limit == 0 {
        return Memory::Answer(Remembered::SoldOut);
    }
    match h.buyer(buyer) {
        // A balancer's own key may be kept with its order alone, which
        // memory does not read: the holder's order may be this key's, to
        // replay (a retry after a reply lost with its node).
        Lookup::Found(_) if key.made && h.per_user_limit == 1 => Memory::AskStore,
        Lookup::Found(seq) => Memory::Answer(Remembered::AlreadyBought(h.order_id(seq))),
        Lookup::AskStore => Memory::AskStore,
        Lookup::Absent => Memory::Answer(Remembered::SoldOut),
    }
}
