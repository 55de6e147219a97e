//! The sale in Redis: one Lua script per purchase, through a fred pool.
//!
//! The script is loaded once and called by SHA (`EVALSHA`), reloaded when
//! Redis answers NOSCRIPT (after a restart or `SCRIPT FLUSH`).

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};

use super::{Outcome, SaleKeys, Snapshot, StoreError, now_millis};
use crate::config::{RedisConfig, SaleConfig};

const DEDUCT: &str = include_str!("../deduct.lua");
const AUDIT: &str = include_str!("../audit.lua");
const INIT: &str = include_str!("../init.lua");

/// A fred pool plus the sale's keys and scripts, built once per process.
#[derive(Clone)]
pub struct RedisStore {
    pool: Pool,
    keys: Vec<Key>,
    event: String,
    total: u64,
    per_user_limit: Value,
    deduct: Script,
    audit: Script,
    init: Script,
    timeout: Duration,
    options: Options,
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
        let store = RedisStore {
            pool,
            keys: vec![
                Key::from(keys.stock),
                Key::from(keys.buyers),
                Key::from(keys.orders),
                Key::from(keys.buyer_order),
            ],
            event: sale.event.clone(),
            total: sale.total,
            per_user_limit: Value::from(sale.per_user_limit as i64),
            deduct: Script::from_lua(DEDUCT),
            audit: Script::from_lua(AUDIT),
            init: Script::from_lua(INIT),
            timeout,
            options: Options {
                // While disconnected, fail now instead of queueing: a queued
                // deduction would run after its buyer was told 503.
                fail_fast: true,
                // fred's own timeout marks the command as timed out so it is
                // never written late; an outer tokio timeout would not.
                timeout: Some(timeout),
                max_attempts: Some(1),
                ..Options::default()
            },
        };
        Ok(store)
    }

    async fn eval(&self, script: &Script, args: Vec<Value>) -> Result<Value, StoreError> {
        let call =
            script.evalsha_with_reload::<Value, _, _>(self.pool.next(), self.keys.clone(), args);
        // fred enforces the command timeout too; this bound also covers the
        // NOSCRIPT reload round trip.
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// See `deduct.lua`.
    pub async fn deduct(&self, buyer: &str, node: &str) -> Result<Outcome, StoreError> {
        let now = now_millis();
        let deadline = now + self.timeout.as_millis() as u64;
        let args = vec![
            Value::from(buyer),
            self.per_user_limit.clone(),
            Value::from(node),
            Value::from(now as i64),
            Value::from(deadline as i64),
        ];
        let reply = self.eval(&self.deduct, args).await?;
        let mut fields = array(reply, 3)?.into_iter();
        let code = int(fields.next())?;
        let order = text(fields.next())?;
        let sold = int(fields.next())?;
        match code {
            1 => Ok(Outcome::Sold { order, sold }),
            2 => Ok(Outcome::SoldOut),
            3 => Ok(Outcome::AlreadyBought { order }),
            4 => Ok(Outcome::NoSale),
            5 => Err(StoreError::TooLate),
            other => Err(StoreError::Protocol(format!(
                "deduct returned code {other}"
            ))),
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
        let client = self.pool.next().with_options(&options);
        let held = scan_hash(&client, &self.keys[1]).await?;
        let orders = scan_hash(&client, &self.keys[3]).await?;
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
        self.pool
            .next()
            .with_options(&self.options)
            .ping::<Value>(None)
            .await
            .map(|_| ())
            .map_err(map_error)
    }
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
