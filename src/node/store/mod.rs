//! Where the sale's truth lives: Redis (one Lua script through fred, a call
//! per batch of purchases) or, with no `[redis]` configured, an embedded
//! in-process store with the same rules.
//!
//! An enum rather than a trait object, so the hot path pays no boxing for
//! the async call.

pub mod clock;
pub mod durability;
pub mod embedded;
pub mod holders;
pub mod line;
pub mod model;
pub mod redis;
pub mod snapshot;

use std::sync::Arc;

use tokio::time::Instant;

use crate::config::SaleConfig;

pub use durability::Durability;
pub use embedded::{EmbeddedStore, now_millis};
pub use holders::{HolderChanges, HolderSeed, Holders, Lookup, NoChanges};
pub use model::{
    ANY_BUYER, Control, ControlAnswer, LineAdmit, LineState, OrderAnswer, OrderOp, OrderRecord,
    OrderState, Outcome, Purchase, Reply, SaleKeys, SaleState, Shut, StoreError, Swept, line_keys,
    ticket_number, tickets,
};
pub use redis::{RedisConn, RedisStore};
pub use snapshot::{Audit, BuyerTally, EventTally, Snapshot};

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

    /// Puts `buyer` in the sale's waiting-room line (see `line.lua`), or
    /// tells their place; `lottery` ranks them if they join before the
    /// opening, `secret` signs places if the line starts now. `None`:
    /// there is no sale.
    pub async fn line_join(
        &self,
        buyer: &str,
        lottery: u64,
        secret: &str,
    ) -> Result<Option<LineState>, StoreError> {
        match self {
            Store::Redis(r) => r.line_join(buyer, lottery, secret).await,
            Store::Embedded(e) => Ok(e.line_join(buyer, lottery, secret)),
        }
    }

    /// Moves the waiting room's serving mark by the time since its last
    /// move, and answers the line (see `line.lua`). `None`: no sale.
    pub async fn line_advance(
        &self,
        admit: LineAdmit,
        secret: &str,
    ) -> Result<Option<LineState>, StoreError> {
        match self {
            Store::Redis(r) => r.line_advance(admit, secret).await,
            Store::Embedded(e) => Ok(e.line_advance(admit, secret)),
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

    /// Gives `holder`'s lease back whole: a node that drops its state of
    /// the sale (idle) frees its units at once rather than when the lease
    /// runs out.
    pub async fn give_back(&self, holder: &str, give_up: Instant) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.give_back(holder, give_up).await,
            Store::Embedded(e) => e.give_back(holder),
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

    /// An operator's change to the running sale (`spike stock pause`,
    /// `resume`, `close`, `add`): Redis only, since `spike stock` cannot
    /// reach a `spike up`'s embedded store.
    pub async fn control(&self, change: Control) -> Result<ControlAnswer, StoreError> {
        match self {
            Store::Redis(r) => r.control(change).await,
            Store::Embedded(_) => Ok(ControlAnswer::Refused(
                "the embedded store lives inside `spike up`: pause, resume, close and add need [redis]"
                    .into(),
            )),
        }
    }

    /// Reads the sale in one consistent step, in constant time.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        match self {
            Store::Redis(r) => r.snapshot().await,
            Store::Embedded(e) => Ok(e.snapshot()),
        }
    }

    /// The sale's event stream counted up to now, in pages inside Redis
    /// (None for the embedded store, which has no stream).
    pub async fn tally_events(&self) -> Result<Option<EventTally>, StoreError> {
        match self {
            Store::Redis(r) => Ok(Some(r.tally_events().await?)),
            Store::Embedded(_) => Ok(None),
        }
    }

    /// Adds up every buyer's tickets, in pages (for `stock audit`).
    pub async fn tally_buyers(&self) -> Result<BuyerTally, StoreError> {
        match self {
            Store::Redis(r) => r.tally_buyers().await,
            Store::Embedded(e) => Ok(e.tally_buyers()),
        }
    }

    /// What `stock audit` checks, read in one pass over the stream and the
    /// buyers: the snapshot, the stream counted up to the moment of that
    /// snapshot (so it is exact even while the sale moves), and the buyers
    /// when a pass over them ran while the sale stood still (None when the
    /// sale never did, in a few attempts: the constant-time checks remain).
    pub async fn audit(&self) -> Result<Audit, StoreError> {
        match self {
            Store::Redis(r) => r.audit().await,
            // Two reads of the process's memory: they agree when nothing
            // sells between them, as in the tests that call this (`stock
            // audit` reaches only Redis).
            Store::Embedded(e) => Ok(Audit {
                snapshot: e.snapshot(),
                buyers: Some(e.tally_buyers()),
                events: None,
            }),
        }
    }

    /// The buyers holding `per_user_limit` tickets or more, each with their
    /// last order, and every idempotency key that bought, in the compact
    /// form of [`Holders`]: read once a node knows the sale is sold out, so
    /// that it answers "already bought" and replays keys from memory as
    /// the script would. `Ok(None)`: `wanted` said the read was no longer
    /// wanted (the sale was reset) and it stopped. From Redis they are
    /// current only once [`Store::holder_changes`] since their cursor are
    /// applied (the embedded store reads them in one step: current).
    pub async fn holders(
        &self,
        epoch: u64,
        per_user_limit: u64,
        seed: HolderSeed,
        wanted: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<Option<Holders>, StoreError> {
        match self {
            Store::Redis(r) => r.holders(epoch, per_user_limit, seed, wanted).await,
            Store::Embedded(e) => Ok(Some(e.holders(epoch, per_user_limit, seed))),
        }
    }

    /// What changed among the holders since `cursor` (see `holders.lua`):
    /// how a node keeps its holders current while tickets come back and
    /// resell, at the cost of the changes rather than of every holder.
    /// `Ok(Err(NoChanges::Gone))`: the events are gone (or the store keeps
    /// none): read them in full.
    pub async fn holder_changes(
        &self,
        cursor: &str,
        per_user_limit: u64,
    ) -> Result<Result<HolderChanges, NoChanges>, StoreError> {
        match self {
            Store::Redis(r) => r.holder_changes(cursor, per_user_limit).await,
            Store::Embedded(_) => Ok(Err(NoChanges::Gone)),
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

    /// The Cluster primary that holds the sale (see
    /// [`RedisStore::primary`]); `None` with one Redis server or embedded.
    pub fn primary(&self) -> Option<String> {
        match self {
            Store::Redis(r) => r.primary(),
            Store::Embedded(_) => None,
        }
    }

    /// Where the nodes of this process that sell from this store keep its
    /// holders: one copy per process (see [`holders::HolderCell`]).
    pub fn holder_cell(&self) -> std::sync::Arc<holders::HolderCell> {
        match self {
            Store::Redis(r) => r.holder_cell(),
            Store::Embedded(e) => e.holder_cell(),
        }
    }

    /// Whether the store answers at all (for `/healthz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.ping().await,
            Store::Embedded(_) => Ok(()),
        }
    }

    /// The store's clock now, in Unix milliseconds, once known: Redis's
    /// as this host measures it (None before the first measurement), the
    /// embedded store's, which is this host's. What `/sold_out` tells a
    /// balancer, which must not take a node's unmeasured wall clock for
    /// the store's.
    pub fn clock_now_ms(&self) -> Option<u64> {
        match self {
            Store::Redis(r) => r.clock_now_ms(),
            Store::Embedded(_) => Some(now_millis()),
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

/// The stores of every sale one process sells, each made on its first use
/// (see docs/design/many-sales.md): the configs of all the file's sales
/// are here from the start, but a sale's store (its keys, batch queue and
/// task, clock reading; or its embedded memory) exists only once something
/// in the process asked for it, so a sale nobody asks about costs its
/// config and nothing else. Shared by the nodes of one process that sell
/// from the same store.
///
/// A Redis store lives while a node of the process holds it: once every
/// node dropped its state of the sale (idle), the store goes too, and its
/// batch task and clock reading with it; the next ask makes a new one.
/// An embedded store is the sale itself and stays while the process runs.
/// A reload adds sales ([`Stores::set_sales`]); those kept keep their
/// stores.
pub struct Stores {
    /// The shared Redis connection; `None`: the embedded store.
    redis: Option<Arc<RedisConn>>,
    /// The sales by event, swapped whole by a reload.
    slots: arc_swap::ArcSwap<std::collections::HashMap<String, Arc<StoreSlot>>>,
}

/// One sale's config and, once made, its store.
struct StoreSlot {
    config: SaleConfig,
    /// Taken while the store is made, so that two first asks make one.
    store: tokio::sync::Mutex<Held>,
}

/// A sale's store as [`Stores`] keeps it.
enum Held {
    /// Not made yet.
    None,
    /// Redis: alive while a node holds it.
    Redis(std::sync::Weak<RedisStore>),
    /// Embedded: the sale itself.
    Embedded(Arc<EmbeddedStore>),
}

impl StoreSlot {
    fn new(config: &SaleConfig) -> Arc<StoreSlot> {
        Arc::new(StoreSlot {
            config: config.clone(),
            store: tokio::sync::Mutex::new(Held::None),
        })
    }

    /// The store if it is alive, without making it.
    fn alive(&self) -> Option<Store> {
        match &*self.store.try_lock().ok()? {
            Held::None => None,
            Held::Redis(weak) => weak.upgrade().map(Store::Redis),
            Held::Embedded(e) => Some(Store::Embedded(e.clone())),
        }
    }
}

impl Stores {
    /// The stores of `sales` over one connection to `redis` (made now, as
    /// a single sale's store would), or embedded without it. No sale's
    /// store is made yet.
    pub async fn open(
        sales: &[SaleConfig],
        redis: Option<&crate::config::RedisConfig>,
    ) -> Result<Arc<Stores>, StoreError> {
        let redis = match redis {
            Some(r) => Some(RedisConn::connect(r).await?),
            None => None,
        };
        let slots = sales
            .iter()
            .map(|s| (s.event.clone(), StoreSlot::new(s)))
            .collect();
        Ok(Arc::new(Stores {
            redis,
            slots: arc_swap::ArcSwap::from_pointee(slots),
        }))
    }

    /// The config of the sale of `event`, if the process sells it.
    pub fn config(&self, event: &str) -> Option<SaleConfig> {
        self.slots.load().get(event).map(|s| s.config.clone())
    }

    /// Puts `sales` in force (a reload of the file): a sale added gets its
    /// slot (its store is made on its first ask), one kept keeps its store
    /// and its config as it was (a sale's settings are the store's once
    /// started), one removed is forgotten here (its store goes with the
    /// last node that holds it). Returns the events added.
    pub fn set_sales(&self, sales: &[SaleConfig]) -> Vec<String> {
        let old = self.slots.load_full();
        let (next, added) = crate::node::sale_map::keep_or_make(&old, sales, StoreSlot::new);
        self.slots.store(Arc::new(next));
        added
    }

    /// Adds the sales of `sales` this process does not sell yet (their
    /// stores made on their first ask), keeping every other: how a reload
    /// starts its added sales before it is sure to go in force (a reload
    /// refused later must not have taken a sale away).
    pub fn add_sales(&self, sales: &[SaleConfig]) {
        self.slots.rcu(|old| {
            let mut next = std::collections::HashMap::clone(old);
            for s in sales {
                next.entry(s.event.clone())
                    .or_insert_with(|| StoreSlot::new(s));
            }
            next
        });
    }

    /// The store of the sale of `event`, made now if it is the first ask
    /// (an embedded store starts its sale then, as `spike node` did at
    /// start); `None` when the process does not sell it.
    pub async fn get(&self, event: &str) -> Option<Store> {
        let slot = self.slots.load().get(event)?.clone();
        let mut held = slot.store.lock().await;
        match &*held {
            Held::Redis(weak) => {
                if let Some(r) = weak.upgrade() {
                    return Some(Store::Redis(r));
                }
            }
            Held::Embedded(e) => return Some(Store::Embedded(e.clone())),
            Held::None => {}
        }
        let store = match &self.redis {
            Some(conn) => {
                let r = Arc::new(RedisStore::on(conn, &slot.config).await);
                *held = Held::Redis(Arc::downgrade(&r));
                Store::Redis(r)
            }
            None => {
                let e = EmbeddedStore::new(&slot.config);
                e.init(false);
                let e = Arc::new(e);
                *held = Held::Embedded(e.clone());
                Store::Embedded(e)
            }
        };
        Some(store)
    }

    /// The stores alive now, with their events: what `/metrics` and the
    /// process's counters read.
    pub fn made(&self) -> Vec<(String, Store)> {
        self.slots
            .load()
            .iter()
            .filter_map(|(e, s)| s.alive().map(|st| (e.clone(), st)))
            .collect()
    }

    /// How many sales the process sells.
    pub fn len(&self) -> usize {
        self.slots.load().len()
    }

    /// Whether it sells none.
    pub fn is_empty(&self) -> bool {
        self.slots.load().is_empty()
    }

    /// Whether Redis answers (or, embedded, always): `/healthz` of a node
    /// of several sales, which are not all made.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.redis {
            Some(conn) => conn.ping().await,
            None => Ok(()),
        }
    }
}
