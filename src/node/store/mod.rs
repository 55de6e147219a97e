//! Where the sale's truth lives: Redis (one Lua script through fred, a call
//! per batch of purchases) or, with no `[redis]` configured, an embedded
//! in-process store with the same rules.
//!
//! An enum rather than a trait object, so the hot path pays no boxing for
//! the async call.

pub mod clock;
pub mod durability;
pub mod embedded;
pub mod redis;

use std::sync::Arc;

use tokio::time::Instant;

use crate::config::SaleConfig;

pub use durability::Durability;
pub use embedded::EmbeddedStore;
pub use redis::RedisStore;

/// Where an order is in its life. Without a payment window every order is
/// [`OrderState::Final`]; with one it starts `Reserved` and ends in one of
/// the other three, for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderState {
    /// Sold for good: the sale has no payment window.
    #[serde(rename = "sold")]
    Final,
    /// Held for the buyer until its `pay_by`.
    Reserved,
    /// Paid in time: the buyer's for good.
    Paid,
    /// Given back by the buyer; the ticket went back on sale.
    Cancelled,
    /// Not paid in time; the ticket went back on sale.
    Expired,
}

impl OrderState {
    /// The name in answers, the store and the event stream.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Final => "sold",
            OrderState::Reserved => "reserved",
            OrderState::Paid => "paid",
            OrderState::Cancelled => "cancelled",
            OrderState::Expired => "expired",
        }
    }

    /// Reads the scripts' spelling ('' for a final order).
    pub fn parse(s: &str) -> Option<OrderState> {
        Some(match s {
            "" | "sold" => OrderState::Final,
            "reserved" => OrderState::Reserved,
            "paid" => OrderState::Paid,
            "cancelled" => OrderState::Cancelled,
            "expired" => OrderState::Expired,
            _ => return None,
        })
    }

    /// The ticket went back on sale (the order holds nothing).
    pub fn released(self) -> bool {
        matches!(self, OrderState::Cancelled | OrderState::Expired)
    }
}

/// What the store decided for one purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A ticket was sold (or, with a payment window, reserved) and its
    /// order recorded.
    Sold {
        /// The order id, unique for the life of the sale.
        order: String,
        /// The ticket's number (order ids handed out when it was sold).
        sold: u64,
        /// With a payment window: the deadline, Unix ms in Redis's clock.
        pay_by: Option<u64>,
    },
    /// The purchase's `Idempotency-Key` had already bought this order: the
    /// same order again, in its state now, and no second ticket.
    Replayed {
        /// The order the key bought.
        order: String,
        /// That ticket's number.
        sold: u64,
        /// Where the order is now (a released one is not the buyer's).
        state: OrderState,
        /// With a payment window: the deadline, Unix ms.
        pay_by: Option<u64>,
    },
    /// Every ticket is gone.
    SoldOut,
    /// The buyer already holds `per_user_limit` tickets.
    AlreadyBought {
        /// The buyer's last order id, so a retry after a lost answer finds it.
        order: String,
    },
    /// The `Idempotency-Key` was used by another buyer: the request is not
    /// the retry it claims to be.
    KeyConflict,
    /// The sale's limit needs a named buyer and the purchase had none.
    BuyerRequired,
}

/// What every answer of the store says about the sale as a whole, so that a
/// node keeps up with it (a reset, the stored limit, sold out) without
/// asking separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaleState {
    /// Which incarnation of the sale this is; grows at every `stock init`.
    pub epoch: u64,
    /// The per-user limit stored with the sale (the one enforced).
    pub limit: u64,
    /// Tickets taken (with a payment window: reserved or paid).
    pub sold: u64,
    /// Tickets on sale.
    pub total: u64,
    /// Tickets that came back (cancelled or expired reservations), ever:
    /// when it grows, what a node learned about holders is stale.
    pub released: u64,
    /// The payment window stored with the sale, in ms (0: final sales).
    pub pay_within_ms: u64,
}

impl SaleState {
    /// No ticket is free right now. With a payment window that may change:
    /// a reservation that is cancelled or expires comes back.
    pub fn sold_out(&self) -> bool {
        self.sold >= self.total
    }
}

/// One order as the store records it: the JSON the scripts write, read by
/// both stores and rendered by the order endpoints.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrderRecord {
    /// The order id.
    pub id: String,
    /// Who bought (`""` when anonymous).
    #[serde(default)]
    pub buyer: String,
    /// The node that sold it.
    #[serde(default)]
    pub node: String,
    /// When it was sold or reserved, Unix ms in the store's clock.
    pub time: u64,
    /// The purchase's Idempotency-Key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Absent for a final sale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<OrderState>,
    /// The payment deadline, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pay_by: Option<u64>,
    /// When it was paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_at: Option<u64>,
    /// When it was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_at: Option<u64>,
    /// When it expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<u64>,
    /// The payment's reference, as the payer sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_ref: Option<String>,
}

impl OrderRecord {
    /// Where the order is now.
    pub fn state(&self) -> OrderState {
        self.state.unwrap_or(OrderState::Final)
    }
}

/// The asker of an order call who may act on any buyer's order: the
/// payment service, once its signature verified (`[auth]`). `*` is no
/// buyer id (see [`crate::protocol::is_id_byte`]), so no buyer can be it.
pub const ANY_BUYER: &str = "*";

/// What can be done to an order after its purchase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderOp {
    /// Pay a reservation (again: the same answer).
    Pay,
    /// Give a reservation back.
    Cancel,
    /// Read it (expiring it first when its deadline has passed).
    Get,
}

impl OrderOp {
    /// The name `orders.lua` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderOp::Pay => "pay",
            OrderOp::Cancel => "cancel",
            OrderOp::Get => "get",
        }
    }
}

/// What the store did with an [`OrderOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderAnswer {
    /// Done, or already so (paying twice is one payment): the order now.
    Done(OrderRecord),
    /// Its state does not allow it (paying an expired order): the order.
    Conflict(OrderRecord),
    /// A final sale: there is nothing to pay or cancel.
    Final(OrderRecord),
    /// No order has this id.
    NotFound,
    /// The order is another buyer's.
    NotTheBuyer,
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Swept {
    /// Reservations expired (their tickets went back on sale).
    pub expired: u64,
    /// More were due than one sweep takes: sweep again now.
    pub more: bool,
}

/// One answer of the store: what it decided, the sale's state, and how many
/// units the asking node's lease holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<T> {
    /// The decision for this request.
    pub answer: T,
    /// The sale as the store saw it.
    pub sale: SaleState,
    /// Units left in the asking holder's lease (purchases of its still in
    /// flight included).
    pub lease: u64,
}

/// One purchase as a node sends it.
#[derive(Debug, Clone, Copy)]
pub struct Purchase<'a> {
    /// The node process's lease name (see [`crate::node::Node`]).
    pub holder: &'a str,
    /// The node's name, recorded with the order.
    pub node: &'a str,
    /// The buyer, `""` when anonymous.
    pub buyer: &'a str,
    /// The `Idempotency-Key`, `""` when none.
    pub key: &'a str,
    /// When the node tells the buyer 503: from then on the purchase must
    /// do nothing.
    pub give_up: Instant,
}

/// Why the store could not answer; each becomes a 503 and the local unit goes back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Redis did not answer within the configured timeout.
    #[error("the store did not answer in time")]
    Timeout,
    /// Redis could not be reached or the connection broke.
    #[error("the store is unreachable: {0}")]
    Unavailable(String),
    /// Redis is disconnected and the last try to connect failed: what an
    /// operator needs to fix it (where, which line names it, and why),
    /// rather than a timeout that hides a refused connection or a TLS
    /// handshake that failed.
    #[error("cannot connect to Redis at {url} (`redis.url` in {origin}): {cause}")]
    Unreachable {
        /// The URL, its password hidden.
        url: String,
        /// Where the config file sets it (`FILE:LINE`).
        origin: String,
        /// Why the last try failed, as fred reports it.
        cause: String,
    },
    /// The request reached Redis at or after its deadline (in Redis's own
    /// clock) and did nothing.
    #[error("the request reached the store after its deadline and did nothing")]
    TooLate,
    /// The node has not yet measured its clock against Redis's, so it
    /// cannot give a purchase a deadline Redis understands.
    #[error("the store's clock is not known yet")]
    NoClock,
    /// The sale was never initialised (`spike stock init`).
    #[error("the sale is not initialised: run spike stock init")]
    NoSale,
    /// An answer that would tell a buyer they hold a ticket (a sale made
    /// on the primary, or an earlier order: a replayed key, `already_bought`,
    /// an order's state) was acknowledged by fewer than `[redis] replicas`
    /// replicas in time: a failover now could lose it, so the buyer is not
    /// told. The outcome is ambiguous (the order exists on the primary); a
    /// retry with the same `Idempotency-Key`, or the per-user limit, finds
    /// it once the replicas have it.
    #[error(
        "the answer was not replicated to {wanted} replica(s) in time ({acked} acknowledged); the order may exist: retry with the same Idempotency-Key"
    )]
    NotReplicated {
        /// Replicas the answer needed.
        wanted: u64,
        /// Replicas that acknowledged it.
        acked: u64,
        /// Whether this call sold (its lease unit is spent), rather than
        /// naming an order sold before.
        sold: bool,
    },
    /// Redis refused to write (`NOREPLICAS`): fewer replicas than its
    /// `min-replicas-to-write` are in reach, so nothing was sold or
    /// changed. How `[redis] replicas` keeps a primary without replicas
    /// (after a failover) from selling what it cannot acknowledge.
    #[error(
        "Redis refused the write: fewer replicas than its min-replicas-to-write are connected; nothing was sold"
    )]
    NoReplicas,
    /// Redis answered something this version of spike does not understand.
    #[error("unexpected answer from the store: {0}")]
    Protocol(String),
}

/// The sale in constant time, for `stock show`, `/sale` and the start of
/// `stock audit`: counters the script keeps, never a pass over the buyers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    /// The event on sale.
    pub event: String,
    /// Whether `stock init` has written the sale.
    pub initialised: bool,
    /// Tickets on sale.
    pub total: u64,
    /// Tickets taken: with a payment window, reserved or paid.
    pub sold: u64,
    /// `total - sold` (never negative in the output).
    pub remaining: u64,
    /// Order records (every order id handed out, released ones included).
    pub orders: u64,
    /// Distinct named buyers.
    pub buyers: u64,
    /// Tickets held by named buyers, added up (kept by the script).
    pub tickets_held: u64,
    /// The most tickets any one buyer holds (kept by the script).
    pub most_by_one_buyer: u64,
    /// The sale's epoch (the first part of every order id; 0 before the
    /// sale is initialised). A number wherever it is shown.
    pub epoch: u64,
    /// The per-user limit stored with the sale, which every node enforces.
    pub per_user_limit: u64,
    /// Unsold units that live leases hold (counted in `remaining`).
    pub leased: u64,
    /// Idempotency keys recorded (one per sale that carried one).
    pub keys: u64,
    /// Order ids handed out (never goes down).
    pub seq: u64,
    /// The payment window stored with the sale, in ms (0: sales are final).
    pub pay_within_ms: u64,
    /// Orders waiting for payment.
    pub reserved: u64,
    /// Orders paid.
    pub paid: u64,
    /// Reservations cancelled or expired: their tickets went back on sale.
    pub released: u64,
    /// Deadline entries (one per reservation).
    pub due: u64,
    /// Events in the sale's stream now (None for the embedded store, which
    /// has no stream).
    pub events: Option<u64>,
    /// The stream's length bound stored with the sale (0: the embedded
    /// store, or a sale written before the stream existed, whose stream
    /// holds only what came after).
    pub events_max: u64,
    /// Final sales are streamed too (`[sale] stream`, stored by `stock
    /// init`); a sale with a payment window streams either way.
    pub stream: bool,
    /// Sold out for good: nothing free and nothing reserved that could come
    /// back.
    pub finished: bool,
}

/// What a full audit reads beyond the snapshot: a pass over every buyer, in
/// pages, so that it never holds Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuyerTally {
    /// Tickets held by named buyers, added up from the buyers themselves.
    pub tickets_held: u64,
    /// The most any one buyer holds.
    pub most_by_one_buyer: u64,
}

/// What the sale's event stream holds since this sale began (the stream
/// outlives a reset: what came before belongs to older epochs), read in
/// pages for `stock audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct EventTally {
    /// Events appended since the sale began, trimmed ones included (from
    /// Redis 7's `entries-added`; None when Redis does not say).
    pub added: Option<u64>,
    /// Events of this sale in the stream now.
    pub length: u64,
    /// Order creations (`sold` or `reserved`) among them.
    pub created: u64,
    /// Payments among them.
    pub paid: u64,
    /// Cancels and expiries among them.
    pub released: u64,
}

impl Snapshot {
    /// The invariants that must hold whatever happened during the sale; each
    /// broken one is a sentence in the result. `buyers`, when given, is the
    /// full pass over the buyers, checked against the kept counters;
    /// `events`, the pass over the event stream.
    pub fn audit(&self, buyers: Option<BuyerTally>, events: Option<EventTally>) -> Vec<String> {
        let mut problems = Vec::new();
        // The stream carries the orders of a sale with a payment window,
        // or of one with `stream` (written by this version: it has a bound).
        if let Some(e) =
            events.filter(|_| self.events_max > 0 && (self.pay_within_ms > 0 || self.stream))
        {
            // One event per order created, per payment, per release.
            let changes = self.seq + self.paid + self.released;
            if e.added.is_some_and(|a| a != changes) {
                problems.push(format!(
                    "the event stream had {} events appended for {changes} order changes",
                    e.added.unwrap_or(0)
                ));
            }
            let untrimmed = match e.added {
                Some(a) => a == e.length,
                // Redis before 7 does not say: trust a stream well short
                // of its bound only.
                None => e.length < self.events_max / 2,
            };
            if untrimmed {
                // Nothing trimmed: every change is there, once.
                let counted = [
                    ("creations", e.created, self.seq),
                    ("payments", e.paid, self.paid),
                    ("releases", e.released, self.released),
                ];
                for (what, streamed, kept) in counted {
                    if streamed != kept {
                        problems.push(format!(
                            "the event stream holds {streamed} {what} but the sale counted {kept}"
                        ));
                    }
                }
            }
        }
        if !self.initialised {
            problems.push("the sale is not initialised (run `spike stock init`)".to_string());
        }
        if self.sold > self.total {
            problems.push(format!("oversold: sold {} of {}", self.sold, self.total));
        }
        if self.sold + self.leased > self.total {
            problems.push(format!(
                "leases promise more than is left: sold {} + leased {} > total {}",
                self.sold, self.leased, self.total
            ));
        }
        if self.sold + self.released != self.orders {
            problems.push(format!(
                "sold {} and released {} but {} order records",
                self.sold, self.released, self.orders
            ));
        }
        if self.orders != self.seq {
            problems.push(format!(
                "{} order ids handed out but {} order records",
                self.seq, self.orders
            ));
        }
        if self.keys > self.orders {
            problems.push(format!(
                "{} idempotency keys recorded for {} orders",
                self.keys, self.orders
            ));
        }
        if self.pay_within_ms > 0 {
            if self.sold != self.reserved + self.paid {
                problems.push(format!(
                    "sold {} but reserved {} + paid {}",
                    self.sold, self.reserved, self.paid
                ));
            }
            if self.due != self.reserved {
                problems.push(format!(
                    "{} reservations but {} deadline entries",
                    self.reserved, self.due
                ));
            }
        } else if self.reserved + self.paid + self.released > 0 {
            problems.push(format!(
                "final sales, yet reserved {}, paid {}, released {}",
                self.reserved, self.paid, self.released
            ));
        }
        let limit = self.per_user_limit;
        if limit > 0 {
            if self.most_by_one_buyer > limit {
                problems.push(format!(
                    "a buyer holds {} tickets, over the limit of {limit}",
                    self.most_by_one_buyer
                ));
            }
            if self.tickets_held != self.sold {
                problems.push(format!(
                    "buyers hold {} tickets but {} were sold",
                    self.tickets_held, self.sold
                ));
            }
        }
        if let Some(b) = buyers {
            if b.tickets_held != self.tickets_held {
                problems.push(format!(
                    "the buyers hold {} tickets but the sale counted {}",
                    b.tickets_held, self.tickets_held
                ));
            }
            if limit > 0 && b.most_by_one_buyer > limit {
                problems.push(format!(
                    "a buyer holds {} tickets, over the limit of {limit}",
                    b.most_by_one_buyer
                ));
            }
        }
        problems
    }
}

/// The Redis keys of one sale, built once: every key carries the event as a
/// hash tag so the script's keys land in one Cluster slot.
#[derive(Debug, Clone)]
pub struct SaleKeys {
    /// `total`, `sold`, `epoch`, `limit`, `held`, `most`.
    pub stock: String,
    /// buyer → tickets held.
    pub buyers: String,
    /// order id → order JSON.
    pub orders: String,
    /// buyer → last order id.
    pub buyer_order: String,
    /// lease holder → `units:expires_ms`.
    pub leases: String,
    /// Idempotency-Key → `order id` and `buyer`, space-separated (with a
    /// payment window, then the order's state and `pay_by`).
    pub keys: String,
    /// Reserved order id → its deadline (sorted set, Unix ms).
    pub due: String,
    /// Every order's creation and state change (stream), for an order or
    /// payment service.
    pub events: String,
}

impl SaleKeys {
    /// The keys for `event`.
    pub fn new(event: &str) -> SaleKeys {
        SaleKeys {
            stock: format!("spike:{{{event}}}:stock"),
            buyers: format!("spike:{{{event}}}:buyers"),
            orders: format!("spike:{{{event}}}:orders"),
            buyer_order: format!("spike:{{{event}}}:buyer_order"),
            leases: format!("spike:{{{event}}}:leases"),
            keys: format!("spike:{{{event}}}:keys"),
            due: format!("spike:{{{event}}}:due"),
            events: format!("spike:{{{event}}}:events"),
        }
    }

    /// In the order every script takes them.
    pub fn all(&self) -> [&str; 8] {
        [
            &self.stock,
            &self.buyers,
            &self.orders,
            &self.buyer_order,
            &self.leases,
            &self.keys,
            &self.due,
            &self.events,
        ]
    }
}

/// What a node that no longer asks the store must know to answer as the
/// store would (see [`Store::holders`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holders {
    /// Buyer id → last order id, of the buyers at the limit.
    pub buyers: std::collections::HashMap<String, String>,
    /// Idempotency-Key → what it bought, of every key that bought.
    pub keys: std::collections::HashMap<String, KeyHolder>,
}

/// What an Idempotency-Key bought, as a node remembers it once sold out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHolder {
    /// The order id.
    pub order: String,
    /// Its buyer (`""` when anonymous).
    pub buyer: String,
    /// The order's state when read.
    pub state: OrderState,
    /// Its payment deadline, with a window.
    pub pay_by: Option<u64>,
}

impl KeyHolder {
    /// Reads the keys hash's value: `order buyer` and, with a payment
    /// window, ` state pay_by` after it.
    pub fn parse(value: &str) -> KeyHolder {
        let mut parts = value.split(' ');
        let order = parts.next().unwrap_or_default().to_string();
        let buyer = parts.next().unwrap_or_default().to_string();
        let state = parts
            .next()
            .and_then(OrderState::parse)
            .unwrap_or(OrderState::Final);
        let pay_by = parts.next().and_then(|p| p.parse().ok());
        KeyHolder {
            order,
            buyer,
            state,
            pay_by,
        }
    }
}

/// The store a node sells from.
#[derive(Clone)]
pub enum Store {
    /// Redis through fred: the production store, shared by every node.
    Redis(Arc<RedisStore>),
    /// In-process: one process (e.g. `spike up`) only.
    Embedded(Arc<EmbeddedStore>),
}

impl Store {
    /// Connects to Redis when configured, otherwise makes an embedded store.
    pub async fn open(
        sale: &SaleConfig,
        redis: Option<&crate::config::RedisConfig>,
    ) -> Result<Store, StoreError> {
        match redis {
            Some(r) => Ok(Store::Redis(Arc::new(RedisStore::connect(sale, r).await?))),
            None => Ok(Store::Embedded(Arc::new(EmbeddedStore::new(sale)))),
        }
    }

    /// One purchase: check the key, the buyer's limit and the stock, sell,
    /// record the order.
    pub async fn deduct(&self, p: Purchase<'_>) -> Result<Reply<Outcome>, StoreError> {
        match self {
            Store::Redis(r) => r.deduct(p).await,
            Store::Embedded(e) => e.deduct(p),
        }
    }

    /// Asks for up to `want` more units on `holder`'s lease (0: only renew
    /// it and hear the sale's state). Answers the units granted.
    pub async fn lease(
        &self,
        holder: &str,
        want: u64,
        give_up: Instant,
    ) -> Result<Reply<u64>, StoreError> {
        match self {
            Store::Redis(r) => r.lease(holder, want, give_up).await,
            Store::Embedded(e) => e.lease(holder, want),
        }
    }

    /// Deduction calls this process's Redis store has sent, each carrying
    /// one or more purchases (None for the embedded store, which has no
    /// calls). Shared by the nodes of one process (`spike up`).
    pub fn deduct_calls(&self) -> Option<u64> {
        match self {
            Store::Redis(r) => Some(r.calls()),
            Store::Embedded(_) => None,
        }
    }

    /// Writes the sale (its total and limit from the file); `Ok(None)` when
    /// the sale has started and `force` is off, else its new epoch.
    pub async fn init(&self, force: bool) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Redis(r) => r.init(force).await,
            Store::Embedded(e) => Ok(e.init(force)),
        }
    }

    /// Reads the sale in one consistent step, in constant time.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        match self {
            Store::Redis(r) => r.snapshot().await,
            Store::Embedded(e) => Ok(e.snapshot()),
        }
    }

    /// Reads the sale's event stream in pages (for `stock audit`; None for
    /// the embedded store, which has no stream).
    pub async fn tally_events(&self) -> Result<Option<EventTally>, StoreError> {
        let Store::Redis(r) = self else {
            return Ok(None);
        };
        let added = r.events_added().await?;
        let events = r.events().await?;
        let mut tally = EventTally {
            added,
            length: events.len() as u64,
            ..EventTally::default()
        };
        for (kind, _) in &events {
            match kind.as_str() {
                "sold" | "reserved" => tally.created += 1,
                "paid" => tally.paid += 1,
                "cancelled" | "expired" => tally.released += 1,
                _ => {}
            }
        }
        Ok(Some(tally))
    }

    /// Adds up every buyer's tickets, in pages (for `stock audit`).
    pub async fn tally_buyers(&self) -> Result<BuyerTally, StoreError> {
        match self {
            Store::Redis(r) => r.tally_buyers().await,
            Store::Embedded(e) => Ok(e.tally_buyers()),
        }
    }

    /// The buyers holding `per_user_limit` tickets or more, each with their
    /// last order id, and every idempotency key that bought. Read once a
    /// node knows the sale is sold out: neither changes after that, so the
    /// node can answer "already bought" and replay keys from memory as the
    /// script would.
    pub async fn holders(&self, per_user_limit: u64) -> Result<Holders, StoreError> {
        match self {
            Store::Redis(r) => r.holders(per_user_limit).await,
            Store::Embedded(e) => Ok(e.holders(per_user_limit)),
        }
    }

    /// Pays, cancels or reads an order (see `orders.lua`); `buyer` is who
    /// asks, and must be the order's buyer when it has one.
    pub async fn order(
        &self,
        op: OrderOp,
        id: &str,
        buyer: &str,
        payment_ref: &str,
    ) -> Result<Reply<OrderAnswer>, StoreError> {
        match self {
            Store::Redis(r) => r.order(op, id, buyer, payment_ref).await,
            Store::Embedded(e) => e.order(op, id, buyer, payment_ref),
        }
    }

    /// Expires up to `most` reservations whose deadline has passed; any
    /// node may call it any time, as often as it likes.
    pub async fn sweep(&self, most: u64) -> Result<Reply<Swept>, StoreError> {
        match self {
            Store::Redis(r) => r.sweep(most).await,
            Store::Embedded(e) => e.sweep(most),
        }
    }

    /// What Redis says about keeping what it acknowledged (None for the
    /// embedded store, which keeps nothing past its process and says so in
    /// the README).
    pub async fn durability(&self) -> Result<Option<Durability>, StoreError> {
        match self {
            Store::Redis(r) => r.durability().await.map(Some),
            Store::Embedded(_) => Ok(None),
        }
    }

    /// Whether the store answers at all (for `/healthz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.ping().await,
            Store::Embedded(_) => Ok(()),
        }
    }

    /// How far the store's clock is ahead of this host's, in milliseconds
    /// (None for the embedded store, or before the first measurement).
    pub fn clock_offset_ms(&self) -> Option<i64> {
        match self {
            Store::Redis(r) => r.clock_offset_ms(),
            Store::Embedded(_) => None,
        }
    }
}

/// Milliseconds since the Unix epoch, for the embedded store's clock.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
