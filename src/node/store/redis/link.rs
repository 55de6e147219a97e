//! [`Link`]: the fred pool and the sale's keys, shared by the store and its
//! batch task; how a script is called (by SHA, within a bound) and how an
//! error says why while Redis is out of reach; Redis's `TIME`, read once a
//! second into the store's clock.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};
use tokio::time::Instant;

use super::parse::map_error;
use super::reach::Reach;
use crate::node::store::clock::StoreClock;
use crate::node::store::model::StoreError;

/// How often a node reads Redis's `TIME` to keep its deadlines in Redis's
/// clock.
const CLOCK_EVERY: Duration = Duration::from_secs(1);

/// The pool and the sale's keys, plus what deductions need: shared by the
/// store and its batch task (which must not hold the queue's sender).
#[derive(Clone)]
pub(super) struct Link {
    /// Deduction calls sent, for `/stats` (purchases ÷ calls = batch size).
    pub(super) calls: Arc<AtomicU64>,
    pub(super) pool: Pool,
    /// The Cluster slot of the sale's keys, where `TIME` is read too: the
    /// clock that matters is the one of the Redis that runs the script.
    pub(super) slot: u16,
    pub(super) keys: Vec<Key>,
    pub(super) lease_ttl: Value,
    pub(super) deduct: Script,
    pub(super) clock: Arc<StoreClock>,
    /// `[redis] replicas`: a batch that sold waits for this many replicas.
    pub(super) replicas: u64,
    pub(super) reach: Arc<Reach>,
}

/// Reads Redis's `TIME` once a second while the store lives.
pub(super) async fn keep_clock(pool: Pool, slot: u16, clock: Weak<StoreClock>, options: Options) {
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
pub(super) async fn sample(pool: &Pool, slot: u16, clock: &StoreClock, options: &Options) {
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

impl Link {
    /// `e`, or what made it when the pool is disconnected and its last
    /// try to connect failed: a timeout or a broken call then is that
    /// failure, and the operator needs its cause.
    pub(super) fn explain(&self, e: StoreError) -> StoreError {
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
    pub(super) async fn eval(
        &self,
        script: &Script,
        args: Vec<Value>,
        limit: Duration,
    ) -> Result<Value, StoreError> {
        self.eval_on(self.pool.next(), script, args, limit).await
    }

    /// [`Link::eval`] on a given client, for a `WAIT` that must follow on
    /// the same connection.
    pub(super) async fn eval_on(
        &self,
        client: &Client,
        script: &Script,
        args: Vec<Value>,
        limit: Duration,
    ) -> Result<Value, StoreError> {
        self.eval_keys(client, script, self.keys.clone(), args, limit)
            .await
    }

    /// [`Link::eval_on`] with keys other than the sale's own (the
    /// waiting room's line).
    pub(super) async fn eval_keys(
        &self,
        client: &Client,
        script: &Script,
        keys: Vec<Key>,
        args: Vec<Value>,
        limit: Duration,
    ) -> Result<Value, StoreError> {
        let call = script.evalsha_with_reload::<Value, _, _>(client, keys, args);
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.explain(map_error(e))),
            Err(_) => Err(self.explain(StoreError::Timeout)),
        }
    }
}
