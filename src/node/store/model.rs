//! What the store's calls take and answer, whichever store answers: a
//! purchase and its outcome, the sale's state every answer carries, orders
//! and their life, the holders a sold-out node keeps, the sale's Redis
//! keys, and the store's errors. Imports neither store, so both (and the
//! `Store` enum over them) build on it without a circle.

use tokio::time::Instant;

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

pub use crate::protocol::Shut;

/// An operator's change to a running sale (`spike stock pause`, `resume`,
/// `close`, `add N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop selling until `Resume`; nothing sells meanwhile.
    Pause,
    /// Sell again after a `Pause`.
    Resume,
    /// Close the sale for good, now.
    Close,
    /// Put this many more tickets on sale (a staged release).
    Add(u64),
}

/// What a [`Control`] came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAnswer {
    /// Done: the sale now.
    Done {
        /// Tickets on sale now.
        total: u64,
        /// Paused now.
        paused: bool,
        /// When it closes (Unix ms; 0: no closing).
        closes_at_ms: u64,
    },
    /// The change makes no sense for this sale (it is closed, paused
    /// already, not paused): why, and nothing changed.
    Refused(String),
}

/// What the store decided for one purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The tickets asked for were sold (or, with a payment window,
    /// reserved), all of them, and their one order recorded.
    Sold {
        /// The order id, unique for the life of the sale.
        order: String,
        /// The ticket's number; of an order of several, the last's (its
        /// tickets are numbered up to it).
        sold: u64,
        /// With a payment window: the deadline, Unix ms in Redis's clock.
        pay_by: Option<u64>,
    },
    /// The purchase's `Idempotency-Key` had already bought this order: the
    /// same order again, in its state now, and no second ticket.
    Replayed {
        /// The order the key bought.
        order: String,
        /// That ticket's number (of several, the last's).
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
    /// The `Idempotency-Key` bought an order of another quantity: a retry
    /// asks for what the first request asked. Nothing done.
    KeyOtherQuantity {
        /// The tickets the key's order holds.
        quantity: u64,
    },
    /// Tickets remain, fewer than asked: a purchase is all or nothing, so
    /// nothing was sold (not sold out).
    TooFewLeft {
        /// Tickets left (`total - sold`) when the store looked.
        remaining: u64,
    },
    /// The purchase would take the buyer over the sale's limit (they hold
    /// some, under it). Nothing done.
    OverLimit {
        /// Tickets the buyer may still buy.
        may_buy: u64,
    },
    /// The sale's limit needs a named buyer and the purchase had none.
    BuyerRequired,
}

/// What every answer of the store says about the sale as a whole, so that a
/// node keeps up with it (a reset, the stored limit, sold out) without
/// asking separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
    /// When the sale sells: its opening and closing, paused, closed.
    pub moments: crate::protocol::Moments,
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
    /// The tickets it holds, when more than one (absent: one): numbered
    /// up to the one its id ends with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<u64>,
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

    /// The tickets it holds (1 for a record without `quantity`).
    pub fn quantity(&self) -> u64 {
        self.quantity.unwrap_or(1).max(1)
    }

    /// Its ticket numbers: `quantity` of them, up to the one its id ends
    /// with.
    pub fn tickets(&self) -> std::ops::RangeInclusive<u64> {
        tickets(ticket_number(&self.id), self.quantity())
    }
}

/// The ticket's number: the part of an order id after the epoch (of an
/// order of several tickets, its last's).
pub fn ticket_number(order: &str) -> u64 {
    order
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The numbers of `quantity` tickets up to `last`.
pub fn tickets(last: u64, quantity: u64) -> std::ops::RangeInclusive<u64> {
    (last + 1).saturating_sub(quantity.max(1))..=last
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
    /// `key` was made by a balancer ([`crate::protocol::MADE_KEY`]).
    pub made_key: bool,
    /// Tickets asked for, all or nothing (1 or more).
    pub quantity: u64,
    /// Units the node took from its own lease for it (up to `quantity`;
    /// the store takes the rest from the free stock or other leases).
    pub units: u64,
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
    /// The sale does not sell now: not open yet, closed, or paused (in
    /// the store's clock), and the sale's state with it. Nothing was sold;
    /// the answer is the sale's state, not a failure (409).
    #[error("the sale does not sell now: {0}")]
    NotSelling(Shut, SaleState),
    /// Redis answered something this version of spike does not understand.
    #[error("unexpected answer from the store: {0}")]
    Protocol(String),
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

/// The keys of a sale's waiting-room line (see `line.lua`), in the sale's
/// hash slot.
pub fn line_keys(event: &str) -> [String; 8] {
    [
        format!("spike:{{{event}}}:stock"),
        format!("spike:{{{event}}}:line"),
        format!("spike:{{{event}}}:line_pre"),
        format!("spike:{{{event}}}:line_who"),
        format!("spike:{{{event}}}:line_log"),
        format!("spike:{{{event}}}:line_marks"),
        format!("spike:{{{event}}}:line_balancers"),
        format!("spike:{{{event}}}:line_window"),
    ]
}

/// How the waiting room's serving mark moves (see `line.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineAdmit {
    /// This many buyers a second while tickets are free.
    Rate(u32),
    /// About as many buyers in flight as free tickets, plus a margin;
    /// a buyer admitted longer than `pass_ttl_ms` ago is no longer in
    /// flight.
    FollowStock { pass_ttl_ms: u64 },
}

/// The line as the store last told it: what every balancer answers its
/// waiting buyers from, without a store call per request. (Its `Debug`
/// leaves the secret out: it goes to logs.)
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LineState {
    /// The sale's epoch: a line belongs to one.
    pub epoch: u64,
    /// The secret every balancer signs places and passes with (the first
    /// balancer's, kept with the line).
    pub secret: String,
    /// Buyers in the pre-queue (shuffled at the opening).
    pub pre: u64,
    /// Buyers who joined after the opening.
    pub seq: u64,
    /// Positions up to this one are admitted.
    pub serving: u64,
    /// The store's clock, Unix ms.
    pub now_ms: u64,
    /// The sale's opening, Unix ms (0: none).
    pub opens_at_ms: u64,
    /// Tickets neither sold nor reserved.
    pub free: u64,
    /// Tickets reserved and not paid yet.
    pub reserved: u64,
    /// 0 selling, 1 paused, 2 closed.
    pub shut: u8,
    /// For an advance: how long the first buyer not yet admitted has
    /// waited, in ms (0: nobody waits).
    pub oldest_wait_ms: u64,
    /// For a join: the buyer's position (0: in the pre-queue, which is
    /// ranked at the opening).
    pub position: u64,
    /// For an advance: the balancers heard moving the line in the last
    /// two seconds (each lets through its share of the admit rate).
    pub balancers: u64,
}

impl std::fmt::Debug for LineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineState")
            .field("epoch", &self.epoch)
            .field("secret", &"<hidden>")
            .field("pre", &self.pre)
            .field("seq", &self.seq)
            .field("serving", &self.serving)
            .field("now_ms", &self.now_ms)
            .field("opens_at_ms", &self.opens_at_ms)
            .field("free", &self.free)
            .field("reserved", &self.reserved)
            .field("shut", &self.shut)
            .field("oldest_wait_ms", &self.oldest_wait_ms)
            .field("position", &self.position)
            .field("balancers", &self.balancers)
            .finish()
    }
}

impl LineState {
    /// Everyone who joined.
    pub fn joined(&self) -> u64 {
        self.pre + self.seq
    }
}
