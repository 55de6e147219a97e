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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};

use super::{Outcome, SaleKeys, Snapshot, StoreError, now_millis};
use crate::config::{RedisConfig, SaleConfig};

const DEDUCT: &str = include_str!("../deduct.lua");
const AUDIT: &str = include_str!("../audit.lua");
const INIT: &str = include_str!("../init.lua");

/// Most purchases in one call: the script holds Redis's single thread
/// for the whole batch (a few microseconds a purchase), so other clients of
/// the same Redis wait at most that long behind it.
pub const MAX_BATCH: usize = 128;

/// A fred pool plus the sale's keys and scripts, built once per process.
#[derive(Clone)]
pub struct RedisStore {
    /// Purchases waiting for the batch task. Unbounded on purpose: a live
    /// purchase in it holds a unit of a node's allowance, so the allowances
    /// bound it; a purchase whose buyer gave up (its unit went back) stays
    /// until the batch task drops it, unsent, at its next call.
    queue: mpsc::UnboundedSender<Pending>,
    link: Link,
    event: String,
    total: u64,
    audit: Script,
    init: Script,
    timeout: Duration,
    /// For `/healthz`: fail fast while disconnected, one attempt.
    ping: Options,
}

impl RedisStore {
    /// Builds the pool and starts connecting. A Redis that is down at start
    /// is not fatal: the node answers 503 until it comes back.
    pub async fn connect(sale: &SaleConfig, cfg: &RedisConfig) -> Result<RedisStore, StoreError> {
        let mut config =
            Config::from_url(&cfg.url).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        // Keep reconnecting in the background instead of failing the node.
        config.fail_fast = false;
        let timeout = cfg.timeout;
        let pool = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
                // A deduction whose connection broke may already have run.
                // fred would silently send it again; one attempt means the
                // buyer gets a 503 and retries, and the script's per-buyer
                // check turns that retry into `already_bought` with the order.
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
        let _connections = pool.connect_pool();
        match tokio::time::timeout(timeout, pool.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, url = %cfg.url, "redis is not reachable yet; answering 503 until it is")
            }
            Err(_) => {
                tracing::warn!(url = %cfg.url, "redis did not answer in time; answering 503 until it does")
            }
        }
        let keys = SaleKeys::new(&sale.event);
        let link = Link {
            calls: Arc::new(AtomicU64::new(0)),
            pool,
            keys: vec![
                Key::from(keys.stock),
                Key::from(keys.buyers),
                Key::from(keys.orders),
                Key::from(keys.buyer_order),
            ],
            per_user_limit: Value::from(sale.per_user_limit as i64),
            deduct: Script::from_lua(DEDUCT),
        };
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
            audit: Script::from_lua(AUDIT),
            init: Script::from_lua(INIT),
            timeout,
            ping: Options {
                // While disconnected, fail now instead of queueing.
                fail_fast: true,
                timeout: Some(timeout),
                max_attempts: Some(1),
                ..Options::default()
            },
        })
    }

    /// Deduction calls sent to Redis so far (each carries one or more
    /// purchases).
    pub fn calls(&self) -> u64 {
        self.link.calls.load(Ordering::Relaxed)
    }

    async fn eval(&self, script: &Script, args: Vec<Value>) -> Result<Value, StoreError> {
        self.link.eval(script, args, self.timeout).await
    }

    /// One purchase, decided with the others of its batch (see `deduct.lua`).
    /// The deadline starts now, queueing included: a buyer is answered
    /// within `timeout`, and a purchase that reaches Redis at or after its
    /// deadline does nothing.
    pub async fn deduct(&self, buyer: &str, node: &str) -> Result<Outcome, StoreError> {
        // Wall clock first, then the timer: the handler gives up no earlier
        // than the deadline the script checks against Redis's clock.
        let deadline = now_millis() + self.timeout.as_millis() as u64;
        let give_up = tokio::time::Instant::now() + self.timeout;
        let (reply, answer) = oneshot::channel();
        let purchase = Pending {
            buyer: Value::from(buyer),
            node: Value::from(node),
            deadline,
            reply,
        };
        if self.queue.send(purchase).is_err() {
            return Err(StoreError::Unavailable("the batch task has stopped".into()));
        }
        match tokio::time::timeout_at(give_up, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(StoreError::Unavailable(
                "the batch task dropped the purchase".into(),
            )),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// See `init.lua`.
    pub async fn init(&self, force: bool) -> Result<bool, StoreError> {
        let args = vec![
            Value::from(self.total as i64),
            Value::from(now_millis() as i64),
            Value::from(if force { "1" } else { "0" }),
        ];
        Ok(int(Some(self.eval(&self.init, args).await?))? == 1)
    }

    /// See `audit.lua`.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let reply = self.eval(&self.audit, Vec::new()).await?;
        let mut f = array(reply, 8)?.into_iter();
        let initialised = int(f.next())? == 1;
        let total = int(f.next())?;
        let sold = int(f.next())?;
        Ok(Snapshot {
            event: self.event.clone(),
            initialised,
            total,
            sold,
            remaining: total.saturating_sub(sold),
            orders: int(f.next())?,
            buyers: int(f.next())?,
            tickets_held: int(f.next())?,
            most_by_one_buyer: int(f.next())?,
            epoch: text(f.next())?,
        })
    }

    /// See [`Store::holders`](super::Store::holders). Two hashes read in
    /// `HSCAN` pages, not one script nor `HGETALL`: after sold out neither
    /// hash changes, and a bulk read of a field per buyer must not hold
    /// Redis's single thread (other sales on the same Redis would time
    /// out meanwhile). Retried, unlike a deduction: it only reads.
    pub async fn holders(&self, per_user_limit: u64) -> Result<super::Holders, StoreError> {
        if per_user_limit == 0 {
            return Ok(super::Holders::new());
        }
        let options = Options {
            timeout: Some(self.timeout.max(Duration::from_secs(5))),
            max_attempts: Some(3),
            ..Options::default()
        };
        let client = self.link.pool.next().with_options(&options);
        let held = scan_hash(&client, &self.link.keys[1]).await?;
        let orders = scan_hash(&client, &self.link.keys[3]).await?;
        Ok(orders
            .into_iter()
            .filter(|(buyer, _)| {
                held.get(buyer)
                    .and_then(|h| h.parse::<u64>().ok())
                    .is_some_and(|h| h >= per_user_limit)
            })
            .collect())
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
            .map_err(map_error)
    }
}

/// One purchase waiting in the queue, its arguments already built.
struct Pending {
    buyer: Value,
    node: Value,
    /// Unix milliseconds from which the buyer has been told 503.
    deadline: u64,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// The pool and the sale's keys, plus what deductions need: shared by the
/// store and its batch task (which must not hold the queue's sender).
#[derive(Clone)]
struct Link {
    /// Deduction calls sent, for `/stats` (purchases ÷ calls = batch size).
    calls: Arc<AtomicU64>,
    pool: Pool,
    keys: Vec<Key>,
    per_user_limit: Value,
    deduct: Script,
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
        let call =
            script.evalsha_with_reload::<Value, _, _>(self.pool.next(), self.keys.clone(), args);
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// One call for `batch`; every purchase in it gets its answer.
    async fn send(&self, batch: Vec<Pending>) {
        let now = now_millis();
        let mut args = Vec::with_capacity(2 + 3 * batch.len());
        args.push(self.per_user_limit.clone());
        args.push(Value::from(now as i64));
        let mut replies = Vec::with_capacity(batch.len());
        let mut latest = now;
        for p in batch {
            // A buyer who left (the handler was dropped, the unit went
            // back) or whose deadline passed in the queue is not sold a
            // ticket nobody will hear of.
            if p.reply.is_closed() {
                continue;
            }
            if p.deadline <= now {
                let _ = p.reply.send(Err(StoreError::Timeout));
                continue;
            }
            latest = latest.max(p.deadline);
            args.push(p.buyer);
            args.push(p.node);
            args.push(Value::from(p.deadline as i64));
            replies.push(p.reply);
        }
        if replies.is_empty() {
            return;
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        // Each purchase carries its own deadline, which the script checks:
        // one buyer about to give up does not cut the others' wait short.
        let left = Duration::from_millis(latest - now);
        let answers = self
            .eval(&self.deduct, args, left)
            .await
            .and_then(|v| outcomes(v, replies.len()));
        match answers {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
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

/// The script's answer, one outcome per purchase (see `deduct.lua`).
fn outcomes(
    reply: Value,
    purchases: usize,
) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
    let fields = match reply {
        Value::Array(a) => a,
        other => {
            return Err(StoreError::Protocol(format!(
                "deduct returned {other:?}, not an array"
            )));
        }
    };
    if fields.len() == 1 {
        return match int(fields.into_iter().next())? {
            4 => Ok(vec![Ok(Outcome::NoSale); purchases]),
            other => Err(StoreError::Protocol(format!(
                "deduct returned code {other} for the batch"
            ))),
        };
    }
    if fields.len() != 3 * purchases {
        return Err(StoreError::Protocol(format!(
            "deduct returned {} fields for {purchases} purchases",
            fields.len()
        )));
    }
    let mut fields = fields.into_iter();
    let mut out = Vec::with_capacity(purchases);
    for _ in 0..purchases {
        let code = int(fields.next())?;
        let order = text(fields.next())?;
        let sold = int(fields.next())?;
        out.push(match code {
            1 => Ok(Outcome::Sold { order, sold }),
            2 => Ok(Outcome::SoldOut),
            3 => Ok(Outcome::AlreadyBought { order }),
            5 => Err(StoreError::TooLate),
            other => Err(StoreError::Protocol(format!(
                "deduct returned code {other}"
            ))),
        });
    }
    Ok(out)
}

fn map_error(e: Error) -> StoreError {
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
