//! The sale in Redis: one Lua script per batch of purchases, through a fred
//! pool.
//!
//! Purchases queue on the store; a batch task sends whatever has queued as
//! one `EVALSHA` as soon as one of `pool_size` call slots is free. Under a
//! rush, calls carry many purchases each and Redis's single thread pays the
//! call, the parsing and the sale's key lookups once per batch; one lone
//! buyer still goes out at once, alone. Each purchase is still decided by
//! one call, and the batch is atomic: the script runs every purchase in
//! arrival order, each against its own deadline, and a batch that fails or
//! times out is a 503 for each of its buyers, who get their local unit back.
//!
//! The script is loaded once and called by SHA (`EVALSHA`), reloaded when
//! Redis answers NOSCRIPT (after a restart or `SCRIPT FLUSH`).

//!
//! The parts: `batch` (the queue and the task that sends it), `link` (the
//! pool, how a script is called, Redis's clock), `replicas` (`WAIT` and the
//! barrier), `read` (the `HSCAN` and `XRANGE` readers), `reach` (why Redis
//! is out of reach, in words), `parse` (replies into the store's types).

mod audit;
mod batch;
mod link;
mod parse;
mod reach;
mod read;
mod replicas;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use fred::interfaces::ClusterInterface as _;
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};

pub use self::batch::MAX_BATCH;
use self::batch::{Entry, Pending, send_batches};
use self::link::{Link, keep_clock};
use self::parse::{Raw, array, header, int, map_error, text};
use self::reach::Reach;
use self::read::Reader;
use self::replicas::{NOT_REPLICATED, NOT_REPLICATED_EARLIER};
use super::clock::StoreClock;
use super::durability::Durability;
use super::holders::{HolderCell, HolderChanges, HolderSeed, Holders, NoChanges};
use super::model::ticket_number;
use super::model::{
    Control, ControlAnswer, LineAdmit, LineState, OrderAnswer, OrderOp, OrderRecord, OrderState,
    Outcome, Purchase, Reply, SaleKeys, SaleState, Shut, StoreError, Swept,
};
use super::snapshot::Snapshot;
use crate::config::{RedisConfig, SaleConfig};

const DEDUCT: &str = include_str!("../../deduct.lua");
const SHOW: &str = include_str!("../../show.lua");
const INIT: &str = include_str!("../../init.lua");
const ORDERS: &str = include_str!("../../orders.lua");
const HOLDERS: &str = include_str!("../../holders.lua");
const AUDIT: &str = include_str!("../../audit.lua");

/// Events one `holders.lua` call reads at most: the call holds Redis's one
/// thread for that many small lookups, no more.
const CHANGES_PAGE: u64 = 500;

const CONTROL: &str = include_str!("../../control.lua");
const LINE: &str = include_str!("../../line.lua");

/// A `deduct.lua` answer of code 10 (the sale does not sell now), with
/// the sale's state of the batch.
fn shut(kind: &str, at_ms: u64, sale: SaleState) -> Result<StoreError, StoreError> {
    Shut::parse(kind, at_ms)
        .map(|s| StoreError::NotSelling(s, sale))
        .ok_or_else(|| StoreError::Protocol(format!("deduct says the sale is {kind:?}")))
}

/// A fred pool plus the sale's keys and scripts, built once per process.
#[derive(Clone)]
pub struct RedisStore {
    /// Entries waiting for the batch task. Unbounded on purpose: a live
    /// purchase in it holds a unit of a node's lease, so the leases bound
    /// it; one whose buyer gave up (its unit went back) stays until the
    /// batch task drops it, unsent, at its next call.
    queue: mpsc::UnboundedSender<Pending>,
    link: Link,
    event: String,
    total: u64,
    per_user_limit: u64,
    /// `[sale] pay_within` in ms (0: final sales), written by `init`.
    pay_within_ms: u64,
    events_max: u64,
    /// `[sale] stream`, written by `init`.
    stream: bool,
    /// `[sale] opens_at` and `closes_at`, Unix ms (0: none), written by
    /// `init`.
    opens_at_ms: u64,
    closes_at_ms: u64,
    show: Script,
    init: Script,
    orders: Script,
    holders: Script,
    /// `stock audit`'s pages (see `audit.lua`).
    audit: Script,
    /// The holders this process's nodes keep for this Redis and sale.
    holder_cell: Arc<HolderCell>,
    control: Script,
    line: Script,
    /// The waiting room's keys (see `line.lua`).
    line_keys: Vec<Key>,
    timeout: Duration,
    /// For `/healthz`: fail fast while disconnected, one attempt.
    ping: Options,
}

/// One process's connection to Redis, shared by the stores of every sale
/// it sells: the fred pool, what says why Redis is out of reach, and the
/// settings every call of every sale uses. Each sale's [`RedisStore`] adds
/// its keys, its batch queue and its clock reading on top, when first
/// asked for (see [`super::Stores`]).
pub struct RedisConn {
    pool: Pool,
    reach: Arc<Reach>,
    timeout: Duration,
    pool_size: usize,
    replicas: u64,
    /// `redis.url`, naming the holders' cell (one per Redis and sale).
    url: String,
    /// For `/healthz`: fail fast while disconnected, one attempt.
    ping: Options,
    /// With one Redis server (not a Cluster), the one reading of its
    /// clock every sale's store shares while any lives: one `TIME` a
    /// second per process, not one per sale. (A Cluster's stores read at
    /// their own slot: the clock that matters is the one of the shard
    /// that runs the sale's script, and a slot may move between shards.)
    shared_clock: std::sync::Mutex<std::sync::Weak<StoreClock>>,
}

impl RedisConn {
    /// Builds the pool and starts connecting. A Redis that is down at start
    /// is not fatal: the node answers 503 until it comes back.
    pub async fn connect(cfg: &RedisConfig) -> Result<Arc<RedisConn>, StoreError> {
        let mut config = crate::redis_client::fred_config(&cfg.url, cfg.tls.as_ref())
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        // Keep reconnecting in the background instead of failing the node.
        config.fail_fast = false;
        let timeout = cfg.timeout;
        let pool = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
                // A deduction whose connection broke may already have run.
                // fred would silently send it again; one attempt means the
                // buyer gets a 503 and retries, and the script's key and
                // per-buyer checks turn that retry into the same order.
                c.max_command_attempts = 1;
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..Default::default()
                };
            })
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
            })
            .set_policy(ReconnectPolicy::new_constant(0, 100))
            .build_pool(cfg.pool_size)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let reach = Reach::watch(&pool, cfg);
        let _connections = pool.connect_pool();
        // A Redis still starting gets the whole wait, not just its first
        // refusal; the wait is longer than fred's own connection timeout
        // (the same `timeout`), so that one that times out is reported
        // with fred's reason.
        match tokio::time::timeout(timeout + timeout / 2, pool.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(
                    "{}; answering 503 until it can",
                    reach.unreachable(e.to_string())
                );
            }
            Err(_) => match reach.cause() {
                Some(cause) => {
                    tracing::warn!("{}; answering 503 until it can", reach.unreachable(cause));
                }
                None => tracing::warn!(
                    "Redis at {} (`redis.url` in {}) did not answer in time; answering 503 until it does",
                    reach.url,
                    reach.origin
                ),
            },
        }
        let ping = Options {
            // While disconnected, fail now instead of queueing.
            fail_fast: true,
            timeout: Some(timeout),
            max_attempts: Some(1),
            ..Options::default()
        };
        Ok(Arc::new(RedisConn {
            pool,
            reach,
            timeout,
            pool_size: cfg.pool_size,
            replicas: cfg.replicas,
            url: cfg.url.clone(),
            ping,
            shared_clock: std::sync::Mutex::new(std::sync::Weak::new()),
        }))
    }

    /// The clock reading a store of the sale at `slot` uses: the shared
    /// one of a single server (made now if no store holds it), or, in a
    /// Cluster, its own. Either is read once now (no deadline before the
    /// first reading), then once a second while a store holds it.
    async fn clock_for(&self, slot: u16) -> Arc<StoreClock> {
        let shared = !self.pool.next().is_clustered();
        if shared
            && let Some(clock) = self
                .shared_clock
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .upgrade()
        {
            return clock;
        }
        let clock = Arc::new(StoreClock::new());
        link::sample(&self.pool, slot, &clock, &self.ping).await;
        if shared {
            let mut kept = self.shared_clock.lock().unwrap_or_else(|p| p.into_inner());
            // Two first stores at once: the one kept first is everyone's
            // (this one's reading is dropped, its task never starts).
            if let Some(first) = kept.upgrade() {
                return first;
            }
            *kept = Arc::downgrade(&clock);
        }
        tokio::spawn(keep_clock(
            self.pool.clone(),
            slot,
            Arc::downgrade(&clock),
            self.ping.clone(),
        ));
        clock
    }

    /// PING within the timeout: whether Redis answers at all, whatever
    /// the sale.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.pool
            .next()
            .with_options(&self.ping)
            .ping::<Value>(None)
            .await
            .map(|_| ())
            .map_err(map_error)
    }
}

impl RedisStore {
    /// Connects to Redis for one sale (a process of one sale: `spike
    /// stock`, `spike check`, a single-sale node).
    pub async fn connect(sale: &SaleConfig, cfg: &RedisConfig) -> Result<RedisStore, StoreError> {
        let conn = RedisConn::connect(cfg).await?;
        Ok(RedisStore::on(&conn, sale).await)
    }

    /// The store of `sale` over `conn`: its keys and scripts, its batch
    /// queue and task, and its reading of Redis's clock at its slot (read
    /// once now, then once a second while the store lives).
    pub async fn on(conn: &RedisConn, sale: &SaleConfig) -> RedisStore {
        let (timeout, ping) = (conn.timeout, conn.ping.clone());
        let pool = conn.pool.clone();
        let reach = conn.reach.clone();
        let keys = SaleKeys::new(&sale.event);
        let slot = fred::util::redis_keyslot(keys.stock.as_bytes());
        let clock = conn.clock_for(slot).await;
        let link = Link {
            calls: Arc::new(AtomicU64::new(0)),
            pool,
            slot,
            keys: keys.all().map(Key::from).to_vec(),
            lease_ttl: Value::from(sale.lease_ttl.as_millis() as i64),
            deduct: Script::from_lua(DEDUCT),
            clock,
            replicas: conn.replicas,
            reach,
        };
        let (queue, pending) = mpsc::unbounded_channel();
        // The task holds no sender: it ends when the last clone of the
        // store (and so of `queue`) is dropped.
        tokio::spawn(send_batches(
            link.clone(),
            pending,
            Arc::new(Semaphore::new(conn.pool_size)),
        ));
        RedisStore {
            queue,
            link,
            event: sale.event.clone(),
            total: sale.total,
            per_user_limit: sale.per_user_limit,
            pay_within_ms: sale.pay_within.map_or(0, |d| d.as_millis() as u64),
            events_max: sale.events_max,
            stream: sale.stream,
            opens_at_ms: sale.opens_at_ms.unwrap_or(0),
            closes_at_ms: sale.closes_at_ms.unwrap_or(0),
            show: Script::from_lua(SHOW),
            init: Script::from_lua(INIT),
            orders: Script::from_lua(ORDERS),
            holders: Script::from_lua(HOLDERS),
            audit: Script::from_lua(AUDIT),
            holder_cell: HolderCell::shared(&format!("{}\u{1f}{}", conn.url, sale.event)),
            control: Script::from_lua(CONTROL),
            line: Script::from_lua(LINE),
            line_keys: super::model::line_keys(&sale.event).map(Key::from).to_vec(),
            timeout,
            ping,
        }
    }

    /// Deduction calls sent to Redis so far (each carries one or more
    /// purchases or lease requests).
    pub fn calls(&self) -> u64 {
        self.link.calls.load(Ordering::Relaxed)
    }

    /// Redis's clock now, in Unix milliseconds, as this node measures it.
    pub fn clock_now_ms(&self) -> Option<u64> {
        self.link.clock.now_ms()
    }

    /// Redis's clock minus this host's, in milliseconds.
    pub fn clock_offset_ms(&self) -> Option<i64> {
        self.link.clock.offset_ms()
    }

    async fn eval(&self, script: &Script, args: Vec<Value>) -> Result<Value, StoreError> {
        self.link.eval(script, args, self.timeout).await
    }

    /// Queues one entry and waits for its answer until `give_up`.
    async fn queued(
        &self,
        entry: Entry,
        holder: &str,
        node: &str,
        give_up: Instant,
    ) -> Result<Reply<Raw>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            entry,
            holder: Value::from(holder),
            node: Value::from(node),
            give_up,
            reply,
        };
        if self.queue.send(pending).is_err() {
            return Err(StoreError::Unavailable("the batch task has stopped".into()));
        }
        match tokio::time::timeout_at(give_up, answer).await {
            Ok(Ok(raw)) => raw,
            Ok(Err(_)) => Err(StoreError::Unavailable(
                "the batch task dropped the request".into(),
            )),
            Err(_) => Err(self.link.explain(StoreError::Timeout)),
        }
    }

    /// One purchase, decided with the others of its batch (see `deduct.lua`).
    /// A purchase that reaches Redis at or after `give_up` (in Redis's clock)
    /// does nothing.
    pub async fn deduct(&self, p: Purchase<'_>) -> Result<Reply<Outcome>, StoreError> {
        let entry = Entry::Purchase {
            buyer: Value::from(p.buyer),
            key: Value::from(p.key),
            made_key: p.made_key,
            quantity: p.quantity,
            units: p.units,
        };
        let r = self.queued(entry, p.holder, p.node, p.give_up).await?;
        let pay_by = (r.answer.pay_by > 0).then_some(r.answer.pay_by);
        let answer = match r.answer.code {
            1 => Outcome::Sold {
                order: r.answer.order,
                sold: r.answer.count,
                pay_by,
            },
            2 => Outcome::SoldOut,
            3 => Outcome::AlreadyBought {
                order: r.answer.order,
            },
            5 => return Err(StoreError::TooLate),
            6 => Outcome::Replayed {
                sold: ticket_number(&r.answer.order),
                order: r.answer.order,
                state: OrderState::parse(&r.answer.state).ok_or_else(|| {
                    StoreError::Protocol(format!("an order in state {:?}", r.answer.state))
                })?,
                pay_by,
            },
            7 => Outcome::KeyConflict,
            9 => Outcome::BuyerRequired,
            11 => Outcome::OverLimit {
                may_buy: r.answer.count,
            },
            12 => Outcome::KeyOtherQuantity {
                quantity: r.answer.count,
            },
            13 => Outcome::TooFewLeft {
                remaining: r.answer.count,
            },
            10 => return Err(shut(&r.answer.order, r.answer.count, r.sale)?),
            NOT_REPLICATED | NOT_REPLICATED_EARLIER => {
                return Err(StoreError::NotReplicated {
                    wanted: self.link.replicas,
                    acked: r.answer.count,
                    sold: r.answer.code == NOT_REPLICATED,
                });
            }
            other => {
                return Err(StoreError::Protocol(format!(
                    "deduct returned code {other} for a purchase"
                )));
            }
        };
        Ok(Reply {
            answer,
            sale: r.sale,
            lease: r.lease,
        })
    }

    /// A lease request (see `deduct.lua`), batched with the purchases.
    pub async fn lease(
        &self,
        holder: &str,
        want: u64,
        give_up: Instant,
    ) -> Result<Reply<u64>, StoreError> {
        let r = self
            .queued(Entry::Lease { want }, holder, "", give_up)
            .await?;
        match r.answer.code {
            8 => Ok(Reply {
                answer: r.answer.count,
                sale: r.sale,
                lease: r.lease,
            }),
            5 => Err(StoreError::TooLate),
            10 => Err(shut(&r.answer.order, r.answer.count, r.sale)?),
            other => Err(StoreError::Protocol(format!(
                "deduct returned code {other} for a lease"
            ))),
        }
    }

    /// Gives `holder`'s lease back whole (see `deduct.lua`): its units
    /// are free at once.
    pub async fn give_back(&self, holder: &str, give_up: Instant) -> Result<(), StoreError> {
        let r = self.queued(Entry::GiveBack, holder, "", give_up).await?;
        match r.answer.code {
            8 => Ok(()),
            other => Err(StoreError::Protocol(format!(
                "deduct returned code {other} for a lease given back"
            ))),
        }
    }

    /// See `init.lua`.
    pub async fn init(&self, force: bool) -> Result<Option<u64>, StoreError> {
        let args = vec![
            Value::from(self.total as i64),
            Value::from(self.per_user_limit as i64),
            Value::from(if force { "1" } else { "0" }),
            Value::from(self.pay_within_ms as i64),
            Value::from(self.events_max as i64),
            Value::from(if self.stream { "1" } else { "0" }),
            Value::from(self.opens_at_ms as i64),
            Value::from(self.closes_at_ms as i64),
        ];
        let reply = self.eval(&self.init, args).await?;
        let Value::Array(fields) = reply else {
            return Err(StoreError::Protocol(format!(
                "init returned {reply:?}, not an array"
            )));
        };
        let mut f = fields.into_iter();
        match int(f.next())? {
            1 => Ok(Some(int(f.next())?)),
            _ => Ok(None),
        }
    }

    /// Changes the running sale (see `control.lua`): what it is now, or
    /// why the change makes no sense.
    pub async fn control(&self, change: Control) -> Result<ControlAnswer, StoreError> {
        let (op, tickets) = match change {
            Control::Pause => ("pause", 0),
            Control::Resume => ("resume", 0),
            Control::Close => ("close", 0),
            Control::Add(n) => ("add", n),
        };
        let args = vec![Value::from(op), Value::from(tickets as i64)];
        let client = self.link.pool.next();
        let reply = self
            .link
            .eval_on(client, &self.control, args, self.timeout)
            .await?;
        let Value::Array(fields) = reply else {
            return Err(StoreError::Protocol(format!(
                "control returned {reply:?}, not an array"
            )));
        };
        let mut f = fields.into_iter();
        match int(f.next())? {
            // Done only once the replicas have it, as a sale is: a
            // failover must not bring back a primary where the sale still
            // sells after the operator was told it is paused or closed.
            1 if self.link.replicas > 0
                && replicas::barrier(&self.link, client, Instant::now() + self.timeout).await
                    < self.link.replicas =>
            {
                Err(StoreError::NotReplicated {
                    wanted: self.link.replicas,
                    acked: 0,
                    sold: false,
                })
            }
            1 => Ok(ControlAnswer::Done {
                total: int(f.next())?,
                paused: int(f.next())? == 1,
                closes_at_ms: int(f.next())?,
            }),
            4 => Err(StoreError::NoSale),
            _ => Ok(ControlAnswer::Refused(text(f.next())?)),
        }
    }

    /// See `line.lua`'s join.
    pub async fn line_join(
        &self,
        buyer: &str,
        lottery: u64,
        secret: &str,
    ) -> Result<Option<LineState>, StoreError> {
        let args = vec![
            Value::from("join"),
            Value::from(secret),
            Value::from(buyer),
            Value::from((lottery & ((1 << 52) - 1)) as i64),
        ];
        self.line_call(args).await
    }

    /// See `line.lua`'s advance.
    pub async fn line_advance(
        &self,
        admit: LineAdmit,
        secret: &str,
    ) -> Result<Option<LineState>, StoreError> {
        let (mode, rate, ttl) = match admit {
            LineAdmit::Rate(n) => ("rate", u64::from(n), 0),
            LineAdmit::FollowStock { pass_ttl_ms } => ("follow", 0, pass_ttl_ms),
        };
        let args = vec![
            Value::from("advance"),
            Value::from(secret),
            Value::from(mode),
            Value::from(rate as i64),
            Value::from(ttl as i64),
            // The secret candidate is this process's own random string.
            Value::from(secret.get(..16).unwrap_or(secret)),
        ];
        self.line_call(args).await
    }

    async fn line_call(&self, args: Vec<Value>) -> Result<Option<LineState>, StoreError> {
        let reply = self
            .link
            .eval_keys(
                self.link.pool.next(),
                &self.line,
                self.line_keys.clone(),
                args,
                self.timeout,
            )
            .await?;
        let Value::Array(fields) = reply else {
            return Err(StoreError::Protocol(format!(
                "line returned {reply:?}, not an array"
            )));
        };
        let mut f = fields.into_iter();
        if int(f.next())? != 1 {
            return Ok(None);
        }
        let epoch = text(f.next())?
            .parse()
            .map_err(|_| StoreError::Protocol("line: the epoch is not a number".into()))?;
        let secret = text(f.next())?;
        let mut state = LineState {
            epoch,
            secret,
            pre: int(f.next())?,
            seq: int(f.next())?,
            serving: int(f.next())?,
            now_ms: int(f.next())?,
            opens_at_ms: int(f.next())?,
            free: int(f.next())?,
            reserved: int(f.next())?,
            shut: int(f.next())? as u8,
            ..LineState::default()
        };
        let last = int(f.next())?;
        // The field is the join's position or the advance's wait.
        state.position = last;
        state.oldest_wait_ms = last;
        state.balancers = int(f.next())?;
        Ok(Some(state))
    }

    /// See `show.lua`.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let reply = self.eval(&self.show, Vec::new()).await?;
        self.parse_snapshot(&mut array(reply, 28)?.into_iter())
    }

    /// `show.lua`'s first 28 fields.
    fn parse_snapshot(&self, f: &mut impl Iterator<Item = Value>) -> Result<Snapshot, StoreError> {
        let initialised = int(f.next())? == 1;
        let total = int(f.next())?;
        let sold = int(f.next())?;
        let mut snap = Snapshot {
            event: self.event.clone(),
            initialised,
            total,
            sold,
            remaining: total.saturating_sub(sold),
            orders: int(f.next())?,
            buyers: int(f.next())?,
            tickets_held: int(f.next())?,
            most_by_one_buyer: int(f.next())?,
            // A number, as in `/stats` and `stock init`'s answer; '' (no
            // sale yet) is 0.
            epoch: {
                let e = text(f.next())?;
                if e.is_empty() {
                    0
                } else {
                    e.parse()
                        .map_err(|_| StoreError::Protocol(format!("the sale's epoch is {e:?}")))?
                }
            },
            per_user_limit: int(f.next())?,
            leased: int(f.next())?,
            keys: int(f.next())?,
            seq: int(f.next())?,
            pay_within_ms: int(f.next())?,
            reserved: int(f.next())?,
            paid: int(f.next())?,
            released: int(f.next())?,
            due: int(f.next())?,
            events: Some(int(f.next())?),
            events_max: int(f.next())?,
            stream: int(f.next())? == 1,
            opens_at_ms: int(f.next())?,
            closes_at_ms: int(f.next())?,
            paused: int(f.next())? == 1,
            controls: int(f.next())?,
            closed: int(f.next())? == 1,
            finished: false,
            extra: int(f.next())?,
            extra_paid: int(f.next())?,
            extra_released: int(f.next())?,
        };
        snap.finished = snap.initialised && snap.sold >= snap.total && snap.reserved == 0;
        Ok(snap)
    }

    /// See `orders.lua`.
    pub async fn order(
        &self,
        op: OrderOp,
        id: &str,
        buyer: &str,
        payment_ref: &str,
    ) -> Result<Reply<OrderAnswer>, StoreError> {
        let args = vec![
            Value::from_static_str(op.as_str()),
            Value::from(id),
            Value::from(buyer),
            Value::from(payment_ref),
        ];
        let client = self.link.pool.next();
        let reply = self
            .link
            .eval_on(client, &self.orders, args, self.timeout)
            .await?;
        let (sale, mut rest) = header(reply, 2)?;
        let code = int(rest.next())?;
        let record = text(rest.next())?;
        // An answer about an order is given only once the replicas have
        // the order as it says, as a sale is: a failover must not turn a
        // paid order back into a reservation that expires, nor take back
        // an order that `GET` (or a second payment, which writes nothing)
        // described. The barrier's write makes the `WAIT` cover the
        // order's state whichever connection wrote it.
        if matches!(code, 1..=3) && self.link.replicas > 0 {
            let acked = replicas::barrier(&self.link, client, Instant::now() + self.timeout).await;
            if acked < self.link.replicas {
                return Err(StoreError::NotReplicated {
                    wanted: self.link.replicas,
                    acked,
                    sold: false,
                });
            }
        }
        let parsed = || {
            serde_json::from_str::<OrderRecord>(&record)
                .map_err(|e| StoreError::Protocol(format!("an order record {record:?}: {e}")))
        };
        let answer = match code {
            0 => OrderAnswer::NotFound,
            5 => OrderAnswer::NotTheBuyer,
            1 => OrderAnswer::Done(parsed()?),
            2 => OrderAnswer::Conflict(parsed()?),
            3 => OrderAnswer::Final(parsed()?),
            other => {
                return Err(StoreError::Protocol(format!(
                    "orders.lua returned code {other}"
                )));
            }
        };
        Ok(Reply {
            answer,
            sale,
            lease: 0,
        })
    }

    /// See the sweep of `orders.lua`.
    pub async fn sweep(&self, most: u64) -> Result<Reply<Swept>, StoreError> {
        let args = vec![Value::from_static_str("sweep"), Value::from(most as i64)];
        let reply = self.eval(&self.orders, args).await?;
        let (sale, mut rest) = header(reply, 2)?;
        let expired = int(rest.next())?;
        let more = int(rest.next())? == 1;
        Ok(Reply {
            answer: Swept { expired, more },
            sale,
            lease: 0,
        })
    }

    fn read(&self) -> Reader<'_> {
        Reader {
            link: &self.link,
            timeout: self.timeout,
        }
    }

    /// The events of this sale in its stream, oldest first, in pages (for
    /// `stock audit`): each event's type and order id.
    pub async fn events(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read().events().await
    }

    /// See [`Store::holders`](super::Store::holders) and `Reader::holders`
    /// (in `read.rs`).
    pub async fn holders(
        &self,
        epoch: u64,
        per_user_limit: u64,
        seed: HolderSeed,
        wanted: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<Option<Holders>, StoreError> {
        self.read()
            .holders(epoch, per_user_limit, seed, wanted)
            .await
    }

    /// See [`Store::holder_cell`](super::Store::holder_cell).
    pub fn holder_cell(&self) -> Arc<HolderCell> {
        self.holder_cell.clone()
    }

    /// See [`Store::holder_changes`](super::Store::holder_changes) and
    /// `holders.lua`.
    pub async fn holder_changes(
        &self,
        cursor: &str,
        per_user_limit: u64,
    ) -> Result<Result<HolderChanges, NoChanges>, StoreError> {
        let args = vec![
            Value::from(cursor),
            Value::from(CHANGES_PAGE as i64),
            Value::from(per_user_limit as i64),
        ];
        let reply = self.eval(&self.holders, args).await?;
        let (sale, mut rest) = header(reply, usize::MAX)?;
        if int(rest.next())? == 1 {
            return Ok(Err(NoChanges::Gone));
        }
        let cursor = text(rest.next())?;
        let more = int(rest.next())? == 1;
        let named = int(rest.next())?;
        let mut buyers = Vec::with_capacity(named as usize);
        for _ in 0..named {
            let buyer = text(rest.next())?;
            let order = text(rest.next())?;
            buyers.push((buyer, order));
        }
        let keys = rest.map(|k| text(Some(k))).collect::<Result<Vec<_>, _>>()?;
        // What the changes say is answered from, as the full read's is:
        // it must be on the replicas first.
        let read = self.read();
        read.acknowledged(&read.patient()).await?;
        Ok(Ok(HolderChanges {
            sale,
            buyers,
            keys,
            cursor,
            more,
        }))
    }

    /// What Redis says about its own durability: `INFO persistence`,
    /// `memory` and `replication` (sent to the node that holds the sale's
    /// slot), and `CONFIG GET appendfsync` where `CONFIG` is allowed; where
    /// it is renamed or refused, that field stays unknown and the policy
    /// comes from `INFO memory` alone.
    pub async fn durability(&self) -> Result<Durability, StoreError> {
        let client = self.link.pool.next().with_options(&self.ping);
        let info = CustomCommand::new_static("INFO", ClusterHash::Custom(self.link.slot), false);
        let text: String = client
            .custom(info, vec!["persistence", "memory", "replication"])
            .await
            .map_err(|e| self.link.explain(map_error(e)))?;
        let mut durability = Durability::from_info(&text);
        let config =
            CustomCommand::new_static("CONFIG", ClusterHash::Custom(self.link.slot), false);
        let fsync: Result<Vec<String>, _> = client
            .custom(config.clone(), vec!["GET", "appendfsync"])
            .await;
        if let Ok(pair) = fsync {
            durability.appendfsync = pair.get(1).cloned();
        }
        durability.replicas_wanted = self.link.replicas;
        if self.link.replicas > 0 {
            let min: Result<Vec<String>, _> = client
                .custom(config.clone(), vec!["GET", "min-replicas-to-write"])
                .await;
            if let Ok(pair) = min {
                durability.min_replicas_to_write = pair.get(1).and_then(|v| v.parse().ok());
            }
        }
        if durability.maxmemory_policy.is_none() {
            let policy: Result<Vec<String>, _> =
                client.custom(config, vec!["GET", "maxmemory-policy"]).await;
            if let Ok(pair) = policy {
                durability.maxmemory_policy = pair.get(1).cloned();
            }
        }
        Ok(durability)
    }

    /// The Redis server that answers [`RedisStore::durability`] for this
    /// sale: `None` with one server (every sale's answer is the same),
    /// else the Cluster primary that holds the sale's slot as the
    /// connection last learned it (the slot itself when not known), so
    /// that `spike check` asks each primary once.
    pub fn primary(&self) -> Option<String> {
        let client = self.link.pool.next();
        if !client.is_clustered() {
            return None;
        }
        Some(
            client
                .cached_cluster_state()
                .and_then(|s| s.get_server(self.link.slot).map(|s| s.to_string()))
                .unwrap_or_else(|| format!("slot {}", self.link.slot)),
        )
    }

    /// PING within the timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.link
            .pool
            .next()
            .with_options(&self.ping)
            .ping::<Value>(None)
            .await
            .map(|_| ())
            .map_err(|e| self.link.explain(map_error(e)))
    }
}
