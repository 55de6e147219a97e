//! Where the sale's truth lives: Redis (one Lua script through fred, a call
//! per batch of purchases) or, with no `[redis]` configured, an embedded
//! in-process store with the same rules.
//!
//! An enum rather than a trait object, so the hot path pays no boxing for
//! the async call.

pub mod embedded;
pub mod redis;

use std::sync::Arc;

use crate::config::SaleConfig;

pub use embedded::EmbeddedStore;
pub use redis::RedisStore;

/// What the store said about one purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A ticket was sold and its order recorded.
    Sold {
        /// The order id, unique for the life of the sale.
        order: String,
        /// Tickets sold so far, this one included.
        sold: u64,
    },
    /// Every ticket is gone.
    SoldOut,
    /// The buyer already holds `per_user_limit` tickets.
    AlreadyBought {
        /// The buyer's last order id, so a retry after a lost answer finds it.
        order: String,
    },
    /// The sale was never initialised (`spike stock init`).
    NoSale,
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
    /// The deduction reached Redis after its deadline and was refused
    /// without effect (delivered late, or this host's clock is behind Redis's).
    #[error(
        "the deduction reached the store after its deadline and did nothing (check clock sync if this persists)"
    )]
    TooLate,
    /// Redis answered something this version of spike does not understand.
    #[error("unexpected answer from the store: {0}")]
    Protocol(String),
}

/// A consistent snapshot of the sale, for `stock show`, `stock audit` and `/sale`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    /// The event on sale.
    pub event: String,
    /// Whether `stock init` has written the sale.
    pub initialised: bool,
    /// Tickets on sale.
    pub total: u64,
    /// Tickets sold.
    pub sold: u64,
    /// `total - sold` (never negative in the output).
    pub remaining: u64,
    /// Order records.
    pub orders: u64,
    /// Distinct named buyers.
    pub buyers: u64,
    /// Tickets held by named buyers, added up.
    pub tickets_held: u64,
    /// The most tickets any one buyer holds.
    pub most_by_one_buyer: u64,
    /// The sale's epoch (the first part of every order id).
    pub epoch: String,
}

impl Snapshot {
    /// The invariants that must hold whatever happened during the sale; each
    /// broken one is a sentence in the result.
    pub fn audit(&self, per_user_limit: u64) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.initialised {
            problems.push("the sale is not initialised (run `spike stock init`)".to_string());
        }
        if self.sold > self.total {
            problems.push(format!("oversold: sold {} of {}", self.sold, self.total));
        }
        if self.sold != self.orders {
            problems.push(format!(
                "sold {} but {} order records",
                self.sold, self.orders
            ));
        }
        if per_user_limit > 0 {
            if self.most_by_one_buyer > per_user_limit {
                problems.push(format!(
                    "a buyer holds {} tickets, over the limit of {per_user_limit}",
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
        problems
    }
}

/// The Redis keys of one sale, built once: every key carries the event as a
/// hash tag so the script's keys land in one Cluster slot.
#[derive(Debug, Clone)]
pub struct SaleKeys {
    /// `total`, `sold`, `epoch`.
    pub stock: String,
    /// buyer → tickets held.
    pub buyers: String,
    /// order id → order JSON.
    pub orders: String,
    /// buyer → last order id.
    pub buyer_order: String,
}

impl SaleKeys {
    /// The keys for `event`.
    pub fn new(event: &str) -> SaleKeys {
        SaleKeys {
            stock: format!("spike:{{{event}}}:stock"),
            buyers: format!("spike:{{{event}}}:buyers"),
            orders: format!("spike:{{{event}}}:orders"),
            buyer_order: format!("spike:{{{event}}}:buyer_order"),
        }
    }
}

/// Buyer id → order id of the buyers at their limit (see [`Store::holders`]).
pub type Holders = std::collections::HashMap<String, String>;

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

    /// One purchase: check stock and the buyer's limit, sell, record the order.
    pub async fn deduct(&self, buyer: &str, node: &str) -> Result<Outcome, StoreError> {
        match self {
            Store::Redis(r) => r.deduct(buyer, node).await,
            Store::Embedded(e) => Ok(e.deduct(buyer, node)),
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

    /// Writes the total; `Ok(false)` when the sale has started and `force` is off.
    pub async fn init(&self, force: bool) -> Result<bool, StoreError> {
        match self {
            Store::Redis(r) => r.init(force).await,
            Store::Embedded(e) => Ok(e.init(force)),
        }
    }

    /// Reads the sale in one consistent step.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        match self {
            Store::Redis(r) => r.snapshot().await,
            Store::Embedded(e) => Ok(e.snapshot()),
        }
    }

    /// Buyers holding `per_user_limit` tickets or more, each with their last
    /// order id. Read once a node will not ask the store again (sold out,
    /// or its allowance spent): a buyer at the limit stays there with the
    /// same order, so the node can tell them "already bought" from memory
    /// as the script would.
    pub async fn holders(&self, per_user_limit: u64) -> Result<Holders, StoreError> {
        match self {
            Store::Redis(r) => r.holders(per_user_limit).await,
            Store::Embedded(e) => Ok(e.holders(per_user_limit)),
        }
    }

    /// Whether the store answers at all (for `/healthz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.ping().await,
            Store::Embedded(_) => Ok(()),
        }
    }
}

/// Milliseconds since the Unix epoch, for order times and sale epochs.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
