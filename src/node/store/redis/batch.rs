//! The batch queue: purchases and lease requests queue on the store, and
//! one task sends whatever has queued as one `EVALSHA` of `deduct.lua` as
//! soon as one of `pool_size` call slots is free (see the module comment
//! of [`super`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fred::prelude::*;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::link::Link;
use super::parse::{Raw, answers};
use super::replicas;
use crate::node::store::model::{Reply, StoreError};

/// Most entries in one call: the script holds Redis's single thread
/// for the whole batch (a few microseconds a purchase), so other clients of
/// the same Redis wait at most that long behind it.
pub const MAX_BATCH: usize = 128;

/// What an entry asks.
pub(super) enum Entry {
    /// A purchase of `quantity` tickets by `buyer` (maybe anonymous), with
    /// its key (maybe ''; `made_key`: a balancer's), and the `units` of the
    /// node's lease it brings.
    Purchase {
        buyer: Value,
        key: Value,
        made_key: bool,
        quantity: u64,
        units: u64,
    },
    /// Up to `want` more units on the holder's lease.
    Lease { want: u64 },
    /// The holder's lease given back whole (its node drops the sale's
    /// state).
    GiveBack,
}

/// One entry waiting in the queue, its arguments already built.
pub(super) struct Pending {
    pub(super) entry: Entry,
    pub(super) holder: Value,
    pub(super) node: Value,
    /// When the node tells its buyer 503 (or stops waiting for a lease).
    pub(super) give_up: Instant,
    pub(super) reply: oneshot::Sender<Result<Reply<Raw>, StoreError>>,
}

/// Arguments per entry of `deduct.lua`.
const ENTRY_ARGS: usize = 6;
/// Takes a free call slot, then everything queued (up to [`MAX_BATCH`]), and
/// sends it as one call. Waiting for the slot first is what makes batches:
/// while every slot is busy, purchases pile up for the next call.
pub(super) async fn send_batches(
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
            send(&link, batch).await;
            drop(slot);
        });
    }
}

/// One call for `batch`; every entry in it gets its answer.
async fn send(link: &Link, batch: Vec<Pending>) {
    let now = Instant::now();
    // One look at the clock for the whole batch.
    let reading = link.clock.reading();
    let mut args = Vec::with_capacity(1 + ENTRY_ARGS * batch.len());
    args.push(link.lease_ttl.clone());
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
            Entry::Purchase {
                buyer,
                key,
                made_key,
                quantity,
                units,
            } => {
                // 'm': the key is a balancer's (see deduct.lua).
                args.push(Value::from_static_str(if made_key { "m" } else { "p" }));
                args.push(p.holder);
                args.push(p.node);
                args.push(buyer);
                args.push(key);
                // One ticket keeps the plain deadline (no formatting on
                // the common path).
                args.push(if quantity > 1 {
                    Value::from(format!("{deadline}:{quantity}:{units}"))
                } else {
                    Value::from(deadline as i64)
                });
            }
            Entry::Lease { want } => {
                args.push(Value::from_static_str("l"));
                args.push(p.holder);
                args.push(p.node);
                args.push(Value::from_static_str(""));
                args.push(Value::from_static_str(""));
                args.push(Value::from(format!("{want}:{deadline}")));
            }
            Entry::GiveBack => {
                args.push(Value::from_static_str("r"));
                args.push(p.holder);
                args.push(p.node);
                args.push(Value::from_static_str(""));
                args.push(Value::from_static_str(""));
                args.push(Value::from_static_str(""));
            }
        }
        replies.push(p.reply);
    }
    if replies.is_empty() {
        return;
    }
    link.calls.fetch_add(1, Ordering::Relaxed);
    // Each entry carries its own deadline, which the script checks:
    // one buyer about to give up does not cut the others' wait short.
    let client = link.pool.next();
    let mut answers = link
        .eval_on(client, &link.deduct, args, latest - now)
        .await
        .and_then(|v| answers(v, replies.len()));
    if link.replicas > 0
        && let Ok(list) = &mut answers
    {
        replicas::hold(link, client, list, latest).await;
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
