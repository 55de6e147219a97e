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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};

use super::clock::StoreClock;
use super::embedded::ticket_number;
use super::{
    BuyerTally, Holders, KeyHolder, OrderAnswer, OrderOp, OrderRecord, OrderState, Outcome,
    Purchase, Reply, SaleKeys, SaleState, Snapshot, StoreError, Swept,
};
use crate::config::{RedisConfig, SaleConfig};

const DEDUCT: &str = include_str!("../deduct.lua");
const SHOW: &str = include_str!("../show.lua");
const INIT: &str = include_str!("../init.lua");
const ORDERS: &str = include_str!("../orders.lua");

/// Most entries in one call: the script holds Redis's single thread
/// for the whole batch (a few microseconds a purchase), so other clients of
/// the same Redis wait at most that long behind it.
pub const MAX_BATCH: usize = 128;

/// How often a node reads Redis's `TIME` to keep its deadlines in Redis's
/// clock.
const CLOCK_EVERY: Duration = Duration::from_secs(1);

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
    show: Script,
    init: Script,
    orders: Script,
    timeout: Duration,
    /// For `/healthz`: fail fast while disconnected, one attempt.
    ping: Options,
}

impl RedisStore {
    /// Builds the pool and starts connecting. A Redis that is down at start
    /// is not fatal: the node answers 503 until it comes back.
    pub async fn connect(sale: &SaleConfig, cfg: &RedisConfig) -> Result<RedisStore, StoreError> {
        let mut config = crate::redis_client::fred_config(cfg)
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
        let keys = SaleKeys::new(&sale.event);
        let ping = Options {
            // While disconnected, fail now instead of queueing.
            fail_fast: true,
            timeout: Some(timeout),
            max_attempts: Some(1),
            ..Options::default()
        };
        let clock = Arc::new(StoreClock::new());
        let link = Link {
            calls: Arc::new(AtomicU64::new(0)),
            pool,
            slot: fred::util::redis_keyslot(keys.stock.as_bytes()),
            keys: keys.all().map(Key::from).to_vec(),
            lease_ttl: Value::from(sale.lease_ttl.as_millis() as i64),
            deduct: Script::from_lua(DEDUCT),
            clock,
            replicas: cfg.replicas,
            reach,
        };
        // The first reading before any purchase, then one a second.
        link.sample_clock(&ping).await;
        tokio::spawn(keep_clock(
            link.pool.clone(),
            link.slot,
            Arc::downgrade(&link.clock),
            ping.clone(),
        ));
        let (queue, pending) = mpsc::unbounded_channel();
        // The task holds no sender: it ends when the last clone of the
        // store (and so of `queue`) is dropped.
        tokio::spawn(send_batches(
            link.clone(),
            pending,
            Arc::new(Semaphore::new(cfg.pool_size)),
        ));
        Ok(RedisStore {
            queue,
            link,
            event: sale.event.clone(),
            total: sale.total,
            per_user_limit: sale.per_user_limit,
            pay_within_ms: sale.pay_within.map_or(0, |d| d.as_millis() as u64),
            events_max: sale.events_max,
            stream: sale.stream,
            show: Script::from_lua(SHOW),
            init: Script::from_lua(INIT),
            orders: Script::from_lua(ORDERS),
            timeout,
            ping,
        })
    }

    /// Deduction calls sent to Redis so far (each carries one or more
    /// purchases or lease requests).
    pub fn calls(&self) -> u64 {
        self.link.calls.load(Ordering::Relaxed)
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
            other => Err(StoreError::Protocol(format!(
                "deduct returned code {other} for a lease"
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

    /// See `show.lua`.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let reply = self.eval(&self.show, Vec::new()).await?;
        let mut f = array(reply, 20)?.into_iter();
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
            finished: false,
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
            let acked = self
                .link
                .barrier(client, Instant::now() + self.timeout)
                .await;
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

    /// Where this sale's events begin in the stream, as `init.lua` wrote
    /// it: the last id before them, and how many events had been appended
    /// by then (None when a Redis before 7 did not say). A sale written
    /// before the stream outlived resets has neither: its stream began
    /// with it (`0-0`, 0).
    async fn events_start(&self) -> Result<(String, Option<u64>), StoreError> {
        let hmget = CustomCommand::new_static("HMGET", ClusterHash::FirstKey, false);
        let args: Vec<Value> = vec![
            self.link.keys[0].clone().into(),
            "events_from".into(),
            "events_base".into(),
        ];
        let reply: Value = self.reader().custom(hmget, args).await.map_err(map_error)?;
        let mut f = match reply {
            Value::Array(f) => f.into_iter(),
            other => {
                return Err(StoreError::Protocol(format!(
                    "HMGET returned {other:?}, not an array"
                )));
            }
        };
        let from = f.next().and_then(|v| v.into_string());
        let base = f.next().and_then(|v| v.into_string());
        Ok(match (from, base) {
            (Some(from), Some(base)) => (from, base.parse().ok()),
            (Some(from), None) => (from, None),
            (None, _) => ("0-0".to_string(), Some(0)),
        })
    }

    /// The events of this sale in its stream, oldest first, in pages (for
    /// `stock audit`): each event's type and order id.
    pub async fn events(&self) -> Result<Vec<(String, String)>, StoreError> {
        let client = self.reader();
        let xrange = CustomCommand::new_static("XRANGE", ClusterHash::FirstKey, false);
        let mut out = Vec::new();
        let (from, _) = self.events_start().await?;
        // Exclusive: the entry at `from` is the last of an older sale.
        let mut start = format!("({from}");
        loop {
            let args: Vec<Value> = vec![
                self.link.keys[7].clone().into(),
                start.as_str().into(),
                "+".into(),
                "COUNT".into(),
                SCAN_PAGE.into(),
            ];
            let reply: Value = client
                .custom(xrange.clone(), args)
                .await
                .map_err(|e| self.link.explain(map_error(e)))?;
            let Value::Array(entries) = reply else {
                return Ok(out);
            };
            let page = entries.len();
            let mut last = None;
            for entry in entries {
                let mut e = array(entry, 2)?.into_iter();
                let id = text(e.next())?;
                let Some(Value::Array(fields)) = e.next() else {
                    return Err(StoreError::Protocol("a stream entry without fields".into()));
                };
                let mut fields = fields.into_iter();
                let (mut kind, mut order) = (String::new(), String::new());
                while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                    match text(Some(name))?.as_str() {
                        "type" => kind = text(Some(value))?,
                        "order" => order = text(Some(value))?,
                        _ => {}
                    }
                }
                out.push((kind, order));
                last = Some(id);
            }
            match last {
                // Exclusive start: the next page begins after this id.
                Some(id) if page == SCAN_PAGE as usize => start = format!("({id}"),
                _ => return Ok(out),
            }
        }
    }

    /// How many events this sale appended to its stream, trimmed ones
    /// included (`XINFO STREAM`'s `entries-added` less what older sales
    /// appended, Redis 7 and later; None before, or when the stream does
    /// not exist).
    pub async fn events_added(&self) -> Result<Option<u64>, StoreError> {
        let (_, base) = self.events_start().await?;
        let Some(base) = base else {
            return Ok(None);
        };
        Ok(self
            .stream_entries_added()
            .await?
            .map(|added| added.saturating_sub(base)))
    }

    /// `XINFO STREAM`'s `entries-added` (Redis 7 and later).
    async fn stream_entries_added(&self) -> Result<Option<u64>, StoreError> {
        let xinfo = CustomCommand::new_static("XINFO", ClusterHash::Custom(self.link.slot), false);
        let args: Vec<Value> = vec!["STREAM".into(), self.link.keys[7].clone().into()];
        let reply: Result<Value, _> = self.reader().custom(xinfo, args).await;
        let Ok(Value::Array(fields)) = reply else {
            return Ok(None);
        };
        let mut fields = fields.into_iter();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            if name.as_str().is_some_and(|n| n == "entries-added") {
                return Ok(value.as_u64());
            }
        }
        Ok(None)
    }

    fn reader(&self) -> fred::clients::WithOptions<Client> {
        let options = Options {
            timeout: Some(self.timeout.max(Duration::from_secs(5))),
            max_attempts: Some(3),
            ..Options::default()
        };
        self.link.pool.next().with_options(&options)
    }

    /// Every buyer's tickets, read in `HSCAN` pages so that a big sale never
    /// holds Redis (for `stock audit`).
    pub async fn tally_buyers(&self) -> Result<BuyerTally, StoreError> {
        let held = scan_hash(&self.reader(), &self.link.keys[1])
            .await
            .map_err(|e| self.link.explain(e))?;
        let mut tally = BuyerTally::default();
        for v in held.values() {
            let n: u64 = v
                .parse()
                .map_err(|_| StoreError::Protocol(format!("a buyer holds {v:?} tickets")))?;
            tally.tickets_held += n;
            tally.most_by_one_buyer = tally.most_by_one_buyer.max(n);
        }
        Ok(tally)
    }

    /// See [`Store::holders`](super::Store::holders). Hashes read in
    /// `HSCAN` pages, not one script nor `HGETALL`: after sold out they do
    /// not change, and a bulk read of a field per buyer must not hold
    /// Redis's single thread (other sales on the same Redis would time
    /// out meanwhile). Retried, unlike a deduction: it only reads.
    ///
    /// With `[redis] replicas`, the holders are kept only once a barrier
    /// after the read is acknowledged: a node answers `already_bought` (or
    /// a replay) from them, and hands them to the balancer's edge, so they
    /// must hold nothing a failover can take back.
    pub async fn holders(&self, per_user_limit: u64) -> Result<Holders, StoreError> {
        let client = self.reader();
        let holders = self
            .read_holders(&client, per_user_limit)
            .await
            .map_err(|e| self.link.explain(e))?;
        if self.link.replicas > 0 {
            let acked = self
                .link
                .barrier(&client, Instant::now() + self.timeout)
                .await;
            if acked < self.link.replicas {
                return Err(StoreError::NotReplicated {
                    wanted: self.link.replicas,
                    acked,
                    sold: false,
                });
            }
        }
        Ok(holders)
    }

    async fn read_holders<C: ClientLike>(
        &self,
        client: &C,
        per_user_limit: u64,
    ) -> Result<Holders, StoreError> {
        let keys = scan_hash(client, &self.link.keys[5])
            .await?
            .into_iter()
            .map(|(key, v)| (key, KeyHolder::parse(&v)))
            .collect();
        if per_user_limit == 0 {
            return Ok(Holders {
                buyers: HashMap::new(),
                keys,
            });
        }
        let held = scan_hash(client, &self.link.keys[1]).await?;
        let orders = scan_hash(client, &self.link.keys[3]).await?;
        let buyers = orders
            .into_iter()
            .filter(|(buyer, _)| {
                held.get(buyer)
                    .and_then(|h| h.parse::<u64>().ok())
                    .is_some_and(|h| h >= per_user_limit)
            })
            .collect();
        Ok(Holders { buyers, keys })
    }

    /// What Redis says about its own durability: `INFO persistence`,
    /// `memory` and `replication` (sent to the node that holds the sale's
    /// slot), and `CONFIG GET appendfsync` where `CONFIG` is allowed; where
    /// it is renamed or refused, that field stays unknown and the policy
    /// comes from `INFO memory` alone.
    pub async fn durability(&self) -> Result<super::Durability, StoreError> {
        let client = self.link.pool.next().with_options(&self.ping);
        let info = CustomCommand::new_static("INFO", ClusterHash::Custom(self.link.slot), false);
        let text: String = client
            .custom(info, vec!["persistence", "memory", "replication"])
            .await
            .map_err(|e| self.link.explain(map_error(e)))?;
        let mut durability = super::Durability::from_info(&text);
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

/// What an entry asks.
enum Entry {
    /// A purchase by `buyer` (maybe anonymous), with its key (maybe '').
    Purchase { buyer: Value, key: Value },
    /// Up to `want` more units on the holder's lease.
    Lease { want: u64 },
}

/// One answer of the script, before it is read as a purchase's or a lease's.
struct Raw {
    code: u64,
    order: String,
    count: u64,
    /// The payment deadline (0: a final sale).
    pay_by: u64,
    /// The order's state ('' when final).
    state: String,
}

/// One entry waiting in the queue, its arguments already built.
struct Pending {
    entry: Entry,
    holder: Value,
    node: Value,
    /// When the node tells its buyer 503 (or stops waiting for a lease).
    give_up: Instant,
    reply: oneshot::Sender<Result<Reply<Raw>, StoreError>>,
}

/// The pool and the sale's keys, plus what deductions need: shared by the
/// store and its batch task (which must not hold the queue's sender).
#[derive(Clone)]
struct Link {
    /// Deduction calls sent, for `/stats` (purchases ÷ calls = batch size).
    calls: Arc<AtomicU64>,
    pool: Pool,
    /// The Cluster slot of the sale's keys, where `TIME` is read too: the
    /// clock that matters is the one of the Redis that runs the script.
    slot: u16,
    keys: Vec<Key>,
    lease_ttl: Value,
    deduct: Script,
    clock: Arc<StoreClock>,
    /// `[redis] replicas`: a batch that sold waits for this many replicas.
    replicas: u64,
    reach: Arc<Reach>,
}

/// Where the pool connects and why its last try failed, so that an error
/// while disconnected says "connection refused" (or the TLS handshake's
/// complaint) with the URL, instead of the timeout the waiting command
/// ends in.
struct Reach {
    /// The URL, its password hidden.
    url: String,
    /// Where the config file sets it.
    origin: String,
    /// The last connection error any client of the pool reported.
    cause: std::sync::Mutex<Option<String>>,
}

/// fred's connection error in words, with what to check: an OS error
/// arrives as its `Debug` form (`Os { code: 111, kind: ConnectionRefused,
/// message: "Connection refused" }`, shown as `Connection refused (os error
/// 111)`), a TLS failure as rustls's (`Custom { kind: InvalidData, error:
/// InvalidCertificate(UnknownIssuer) }`).
fn plain_cause(e: &Error, tls_url: bool) -> String {
    let details = e.details();
    let between = |start: &str, end: char| {
        details
            .split_once(start)
            .and_then(|(_, rest)| rest.split_once(end))
            .map(|(inside, _)| inside)
    };
    if let (Some(message), Some(code)) = (between("message: \"", '"'), between("code: ", ',')) {
        return format!("{message} (os error {code})");
    }
    let custom = details
        .split_once("error: ")
        .map(|(_, rest)| rest.trim_end().trim_end_matches('}').trim_end());
    // A resolver's error is a quoted message; rustls's is an enum variant.
    if let Some(message) = custom.and_then(|c| c.strip_prefix('"')?.strip_suffix('"')) {
        return message.to_string();
    }
    if let Some(tls) = custom.filter(|_| tls_url) {
        let hint = if tls.starts_with("InvalidCertificate") {
            "Redis's certificate was refused (is `tls_ca_file` the CA that signed it?)"
        } else if tls.contains("CertificateRequired") {
            "Redis asks for a client certificate (`tls-auth-clients`): set `tls_cert_file` and `tls_key_file`"
        } else {
            "the TLS handshake failed"
        };
        return format!("TLS: {hint}: {tls}");
    }
    if tls_url && *e.kind() == ErrorKind::Timeout {
        return format!(
            "{e} (no TLS handshake in time: is the port Redis's `tls-port`, not its plaintext one?)"
        );
    }
    e.to_string()
}

impl Reach {
    /// Listens to the connection errors of every client of `pool`; call
    /// before connecting, so the first is not missed.
    fn watch(pool: &Pool, cfg: &RedisConfig) -> Arc<Reach> {
        let reach = Arc::new(Reach {
            url: crate::redis_client::redacted(&cfg.url),
            origin: cfg.origin.clone(),
            cause: std::sync::Mutex::new(None),
        });
        let tls_url = cfg.url.starts_with("rediss");
        for client in pool.clients() {
            // The listener holds a weak link: it must not keep the store's
            // state alive, and it ends with the client's channel.
            let weak = Arc::downgrade(&reach);
            let _listener = client.on_error(move |(e, _server)| {
                if let Some(reach) = weak.upgrade()
                    && let Ok(mut cause) = reach.cause.lock()
                {
                    *cause = Some(plain_cause(&e, tls_url));
                }
                async { Ok(()) }
            });
        }
        reach
    }

    fn cause(&self) -> Option<String> {
        self.cause.lock().ok().and_then(|c| c.clone())
    }

    fn unreachable(&self, cause: String) -> StoreError {
        StoreError::Unreachable {
            url: self.url.clone(),
            origin: self.origin.clone(),
            cause,
        }
    }
}

/// Reads Redis's `TIME` once a second while the store lives.
async fn keep_clock(pool: Pool, slot: u16, clock: Weak<StoreClock>, options: Options) {
    let mut every = tokio::time::interval(CLOCK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(clock) = clock.upgrade() else {
            return;
        };
        sample(&pool, slot, &clock, &options).await;
    }
}

/// One `TIME` reading into `clock` (nothing when Redis does not answer).
async fn sample(pool: &Pool, slot: u16, clock: &StoreClock, options: &Options) {
    let time = CustomCommand::new_static("TIME", ClusterHash::Custom(slot), false);
    let sent = Instant::now();
    let reply: Result<Value, _> = pool
        .next()
        .with_options(options)
        .custom(time, Vec::<Value>::new())
        .await;
    let received = Instant::now();
    if let Ok(Value::Array(parts)) = reply {
        let mut parts = parts.into_iter();
        let secs = parts.next().and_then(|v| v.as_u64());
        let micros = parts.next().and_then(|v| v.as_u64());
        if let (Some(s), Some(us)) = (secs, micros) {
            clock.record(sent, s * 1_000_000 + us, received);
        }
    }
}

/// Takes a free call slot, then everything queued (up to [`MAX_BATCH`]), and
/// sends it as one call. Waiting for the slot first is what makes batches:
/// while every slot is busy, purchases pile up for the next call.
async fn send_batches(
    link: Link,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    slots: Arc<Semaphore>,
) {
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut batch = Vec::with_capacity(queue.len().min(MAX_BATCH - 1) + 1);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let link = link.clone();
        tokio::spawn(async move {
            link.send(batch).await;
            drop(slot);
        });
    }
}

impl Link {
    /// `e`, or what made it when the pool is disconnected and its last
    /// try to connect failed: a timeout or a broken call then is that
    /// failure, and the operator needs its cause.
    fn explain(&self, e: StoreError) -> StoreError {
        if !matches!(e, StoreError::Timeout | StoreError::Unavailable(_))
            || self.pool.clients().iter().all(|c| c.is_connected())
        {
            return e;
        }
        match self.reach.cause() {
            Some(cause) => self.reach.unreachable(cause),
            None => e,
        }
    }

    /// `script` by SHA (loaded again on NOSCRIPT), answered within `limit`.
    /// fred enforces its command timeout too; this bound also covers the
    /// reload round trip. A call given up on may still reach Redis late
    /// (fred does not resend it, but may have queued it across a
    /// reconnect): `deduct.lua`'s deadlines are what make that harmless.
    async fn eval(
        &self,
        script: &Script,
        args: Vec<Value>,
        limit: Duration,
    ) -> Result<Value, StoreError> {
        self.eval_on(self.pool.next(), script, args, limit).await
    }

    /// [`Link::eval`] on a given client, for a `WAIT` that must follow on
    /// the same connection.
    async fn eval_on(
        &self,
        client: &Client,
        script: &Script,
        args: Vec<Value>,
        limit: Duration,
    ) -> Result<Value, StoreError> {
        let call = script.evalsha_with_reload::<Value, _, _>(client, self.keys.clone(), args);
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.explain(map_error(e))),
            Err(_) => Err(self.explain(StoreError::Timeout)),
        }
    }

    async fn sample_clock(&self, options: &Options) {
        sample(&self.pool, self.slot, &self.clock, options).await;
    }

    /// One call for `batch`; every entry in it gets its answer.
    async fn send(&self, batch: Vec<Pending>) {
        let now = Instant::now();
        // One look at the clock for the whole batch.
        let reading = self.clock.reading();
        let mut args = Vec::with_capacity(1 + ENTRY_ARGS * batch.len());
        args.push(self.lease_ttl.clone());
        let mut replies = Vec::with_capacity(batch.len());
        let mut latest = now;
        for p in batch {
            // A buyer who left (the handler was dropped, the unit went
            // back) or whose deadline passed in the queue is not sold a
            // ticket nobody will hear of.
            if p.reply.is_closed() {
                continue;
            }
            if p.give_up <= now {
                let _ = p.reply.send(Err(StoreError::Timeout));
                continue;
            }
            // The deadline in Redis's clock: the earliest Redis time that
            // the moment this buyer is told 503 can be.
            let Some(deadline) = reading.map(|r| r.redis_ms_at(p.give_up)) else {
                let _ = p.reply.send(Err(StoreError::NoClock));
                continue;
            };
            latest = latest.max(p.give_up);
            match p.entry {
                Entry::Purchase { buyer, key } => {
                    args.push(Value::from_static_str("p"));
                    args.push(p.holder);
                    args.push(p.node);
                    args.push(buyer);
                    args.push(key);
                    args.push(Value::from(deadline as i64));
                }
                Entry::Lease { want } => {
                    args.push(Value::from_static_str("l"));
                    args.push(p.holder);
                    args.push(p.node);
                    args.push(Value::from_static_str(""));
                    args.push(Value::from_static_str(""));
                    args.push(Value::from(format!("{want}:{deadline}")));
                }
            }
            replies.push(p.reply);
        }
        if replies.is_empty() {
            return;
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        // Each entry carries its own deadline, which the script checks:
        // one buyer about to give up does not cut the others' wait short.
        let client = self.pool.next();
        let mut answers = self
            .eval_on(client, &self.deduct, args, latest - now)
            .await
            .and_then(|v| answers(v, replies.len()));
        if self.replicas > 0
            && let Ok(list) = &mut answers
        {
            self.replicated(client, list, latest).await;
        }
        match answers {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// `deduct.lua`'s code for a sale.
const SOLD: u64 = 1;
/// `deduct.lua`'s code for a buyer at the limit (with their last order).
const ALREADY_BOUGHT: u64 = 3;
/// `deduct.lua`'s code for a key that already bought (with its order).
const REPLAYED: u64 = 6;

/// Whether `raw` tells its buyer they hold a ticket written by an earlier
/// call, maybe on another connection: a replay of a key, or
/// `already_bought` naming an order. Such an answer writes nothing, so the
/// `WAIT` of its own connection would cover nothing.
fn names_an_earlier_order(raw: &Raw) -> bool {
    raw.code == REPLAYED || (raw.code == ALREADY_BOUGHT && !raw.order.is_empty())
}

impl Link {
    /// With `[redis] replicas`, holds every answer of a batch that tells
    /// a buyer they hold a ticket until that many replicas acknowledge it:
    /// a sale by its own write, an earlier order through a
    /// [barrier](Link::barrier). Those not acknowledged in time become
    /// [`StoreError::NotReplicated`]: never an answer a failover can take
    /// back.
    async fn replicated(&self, client: &Client, answers: &mut [Reply<Raw>], latest: Instant) {
        let earlier = answers.iter().any(|a| names_an_earlier_order(&a.answer));
        let sold = answers.iter().any(|a| a.answer.code == SOLD);
        let acked = if earlier {
            self.barrier(client, latest).await
        } else if sold {
            self.acked(client, latest).await
        } else {
            return;
        };
        if acked >= self.replicas {
            return;
        }
        for a in answers.iter_mut() {
            if a.answer.code == SOLD {
                a.answer.code = NOT_REPLICATED;
            } else if names_an_earlier_order(&a.answer) {
                a.answer.code = NOT_REPLICATED_EARLIER;
            } else {
                continue;
            }
            a.answer.count = acked;
        }
    }

    /// `WAIT replicas` after one small write on `client`. `WAIT` covers
    /// the writes of its own connection only, up to the primary's
    /// replication offset at that connection's last write; the write here
    /// (a counter in the stock hash) moves that offset past everything
    /// the primary had when it ran, so the `WAIT` covers what this
    /// connection read before it too: a replayed order, or holders
    /// another node sold. Answers how many replicas acknowledged (0 when
    /// the write failed).
    async fn barrier<C: ClientLike>(&self, client: &C, latest: Instant) -> u64 {
        let hincrby = CustomCommand::new_static("HINCRBY", ClusterHash::FirstKey, false);
        let args: Vec<Value> = vec![self.keys[0].clone().into(), "barriers".into(), 1.into()];
        let wrote: Result<i64, _> = client.custom(hincrby, args).await;
        if wrote.is_err() {
            return 0;
        }
        self.acked(client, latest).await
    }

    /// `WAIT replicas` on `client` (WAIT covers that connection's writes),
    /// ending a quarter of the time left before `latest` (at least 5 ms
    /// before it), so a short count is reported as such rather than lost in
    /// the caller's own timeout. Whole milliseconds, and never 0, which
    /// would block forever. Answers how many replicas acknowledged.
    async fn acked<C: ClientLike>(&self, client: &C, latest: Instant) -> u64 {
        let left = latest.saturating_duration_since(Instant::now());
        let margin = (left / 4).max(Duration::from_millis(5));
        let ms = left.saturating_sub(margin).as_millis().max(1) as i64;
        let wait = CustomCommand::new_static("WAIT", ClusterHash::Custom(self.slot), true);
        let acked: Result<u64, _> = client
            .custom(
                wait,
                vec![Value::from(self.replicas as i64), Value::from(ms)],
            )
            .await;
        acked.unwrap_or(0)
    }
}

/// Not a code of the script: a sale `WAIT` did not see replicated.
const NOT_REPLICATED: u64 = 100;
/// Not a code of the script: an earlier order (a replay, `already_bought`)
/// that a barrier did not see replicated; nothing was sold.
const NOT_REPLICATED_EARLIER: u64 = 101;

/// Arguments per entry of `deduct.lua`.
const ENTRY_ARGS: usize = 6;
/// Fields of the sale's state that every script answer starts with.
const HEADER_FIELDS: usize = 7;
/// Fields per entry in `deduct.lua`'s answer.
const ANSWER_FIELDS: usize = 6;

/// The header every script answer starts with (the sale's state), and the
/// `rest` fields after it; `{4}` is [`StoreError::NoSale`].
fn header(reply: Value, rest: usize) -> Result<(SaleState, std::vec::IntoIter<Value>), StoreError> {
    let fields = match reply {
        Value::Array(a) => a,
        other => {
            return Err(StoreError::Protocol(format!(
                "a script returned {other:?}, not an array"
            )));
        }
    };
    if fields.len() == 1 {
        return match int(fields.into_iter().next())? {
            4 => Err(StoreError::NoSale),
            other => Err(StoreError::Protocol(format!(
                "a script returned code {other} for the call"
            ))),
        };
    }
    if fields.len() != HEADER_FIELDS + rest {
        return Err(StoreError::Protocol(format!(
            "a script returned {} fields, not {}",
            fields.len(),
            HEADER_FIELDS + rest
        )));
    }
    let mut fields = fields.into_iter();
    let _status = int(fields.next())?;
    let epoch = text(fields.next())?;
    let sale = SaleState {
        epoch: epoch
            .parse()
            .map_err(|_| StoreError::Protocol(format!("the sale's epoch is {epoch:?}")))?,
        limit: int(fields.next())?,
        sold: int(fields.next())?,
        total: int(fields.next())?,
        released: int(fields.next())?,
        pay_within_ms: int(fields.next())?,
    };
    Ok((sale, fields))
}

/// The script's answer: the sale's state, then one answer per entry (see
/// `deduct.lua`).
fn answers(reply: Value, entries: usize) -> Result<Vec<Reply<Raw>>, StoreError> {
    let (sale, mut fields) = header(reply, ANSWER_FIELDS * entries)?;
    let mut out = Vec::with_capacity(entries);
    for _ in 0..entries {
        let code = int(fields.next())?;
        let order = text(fields.next())?;
        let count = int(fields.next())?;
        let lease = int(fields.next())?;
        let pay_by = int(fields.next())?;
        let state = text(fields.next())?;
        out.push(Reply {
            answer: Raw {
                code,
                order,
                count,
                pay_by,
                state,
            },
            sale,
            lease,
        });
    }
    Ok(out)
}

fn map_error(e: Error) -> StoreError {
    // Redis refuses a write (a script's first one, so nothing of the call
    // was done) while fewer replicas than `min-replicas-to-write` are in
    // reach.
    if e.details().contains("NOREPLICAS") {
        return StoreError::NoReplicas;
    }
    match e.kind() {
        ErrorKind::Timeout => StoreError::Timeout,
        ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Routing | ErrorKind::Backpressure => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Protocol(e.to_string()),
    }
}

/// Fields per `HSCAN` page: Redis's work per call stays small.
const SCAN_PAGE: u32 = 1000;

/// A whole hash, read one `HSCAN` page per call. (A field that `HSCAN`
/// returns twice, as it may while Redis rehashes, is kept once.)
async fn scan_hash<C: ClientLike>(
    client: &C,
    key: &Key,
) -> Result<HashMap<String, String>, StoreError> {
    let hscan = CustomCommand::new_static("HSCAN", ClusterHash::FirstKey, false);
    let mut fields = HashMap::new();
    let mut cursor = String::from("0");
    loop {
        let args: Vec<Value> = vec![
            key.clone().into(),
            cursor.as_str().into(),
            "COUNT".into(),
            SCAN_PAGE.into(),
        ];
        let reply: Value = client
            .custom(hscan.clone(), args)
            .await
            .map_err(map_error)?;
        let mut page = array(reply, 2)?.into_iter();
        cursor = text(page.next())?;
        let Some(Value::Array(pairs)) = page.next() else {
            return Err(StoreError::Protocol("HSCAN page without fields".into()));
        };
        let mut pairs = pairs.into_iter();
        while let (Some(field), Some(value)) = (pairs.next(), pairs.next()) {
            fields.insert(text(Some(field))?, text(Some(value))?);
        }
        if cursor == "0" {
            return Ok(fields);
        }
    }
}

fn array(v: Value, len: usize) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(a) if a.len() == len => Ok(a),
        other => Err(StoreError::Protocol(format!(
            "expected an array of {len}, got {other:?}"
        ))),
    }
}

fn int(v: Option<Value>) -> Result<u64, StoreError> {
    match v {
        Some(Value::Integer(i)) if i >= 0 => Ok(i as u64),
        other => Err(StoreError::Protocol(format!(
            "expected a non-negative integer, got {other:?}"
        ))),
    }
}

fn text(v: Option<Value>) -> Result<String, StoreError> {
    match v {
        Some(v @ (Value::String(_) | Value::Bytes(_))) => v
            .into_string()
            .ok_or_else(|| StoreError::Protocol("a string from Redis is not UTF-8".into())),
        other => Err(StoreError::Protocol(format!(
            "expected a string, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_errors_read_as_words() {
        let refused = Error::new(
            ErrorKind::IO,
            r#"Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }"#,
        );
        assert_eq!(
            plain_cause(&refused, false),
            "Connection refused (os error 111)"
        );
        let dns = Error::new(
            ErrorKind::IO,
            r#"Custom { kind: Uncategorized, error: "failed to lookup address information: Name or service not known" }"#,
        );
        assert_eq!(
            plain_cause(&dns, true),
            "failed to lookup address information: Name or service not known"
        );
        let untrusted = Error::new(
            ErrorKind::IO,
            "Custom { kind: InvalidData, error: InvalidCertificate(UnknownIssuer) }",
        );
        let said = plain_cause(&untrusted, true);
        assert!(said.starts_with("TLS: "), "{said}");
        assert!(said.contains("tls_ca_file"), "{said}");
        assert!(
            said.ends_with("InvalidCertificate(UnknownIssuer)"),
            "{said}"
        );
        let silent = Error::new(ErrorKind::Timeout, "Request timed out.");
        assert!(plain_cause(&silent, true).contains("tls-port"));
        assert!(!plain_cause(&silent, false).contains("tls-port"));
    }
}
