//! With `[redis] replicas`: `WAIT` after a batch that sold, and the
//! barrier (a small write, then `WAIT`) that makes a `WAIT` cover what a
//! connection only read, so that no answer telling a buyer they hold a
//! ticket is one a failover can take back.

use std::time::Duration;

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use tokio::time::Instant;

use super::link::Link;
use super::parse::Raw;
use crate::node::store::model::Reply;

/// `deduct.lua`'s code for a sale.
const SOLD: u64 = 1;
/// `deduct.lua`'s code for a buyer at the limit (with their last order).
const ALREADY_BOUGHT: u64 = 3;
/// `deduct.lua`'s code for a key that already bought (with its order).
const REPLAYED: u64 = 6;
/// `deduct.lua`'s code for a key that bought another quantity (with its
/// order's quantity).
const OTHER_QUANTITY: u64 = 12;

/// Whether `raw` tells its buyer they hold a ticket written by an earlier
/// call, maybe on another connection: a replay of a key, the key's order
/// of another quantity, or `already_bought` naming an order. Such an
/// answer writes nothing, so the `WAIT` of its own connection would cover
/// nothing.
fn names_an_earlier_order(raw: &Raw) -> bool {
    raw.code == REPLAYED
        || raw.code == OTHER_QUANTITY
        || (raw.code == ALREADY_BOUGHT && !raw.order.is_empty())
}

/// With `[redis] replicas`, holds every answer of a batch that tells a
/// buyer they hold a ticket until that many replicas acknowledge it: a sale
/// by its own write, an earlier order through a [`barrier`]. Those
/// not acknowledged in time become [`StoreError::NotReplicated`]: never an
/// answer a failover can take back.
///
/// [`StoreError::NotReplicated`]: crate::node::store::StoreError::NotReplicated
pub(super) async fn hold(
    link: &Link,
    client: &Client,
    answers: &mut [Reply<Raw>],
    latest: Instant,
) {
    let earlier = answers.iter().any(|a| names_an_earlier_order(&a.answer));
    let sold = answers.iter().any(|a| a.answer.code == SOLD);
    let acked = if earlier {
        barrier(link, client, latest).await
    } else if sold {
        acked(link, client, latest).await
    } else {
        return;
    };
    if acked >= link.replicas {
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
pub(super) async fn barrier<C: ClientLike>(link: &Link, client: &C, latest: Instant) -> u64 {
    let hincrby = CustomCommand::new_static("HINCRBY", ClusterHash::FirstKey, false);
    let args: Vec<Value> = vec![link.keys[0].clone().into(), "barriers".into(), 1.into()];
    let wrote: Result<i64, _> = client.custom(hincrby, args).await;
    if wrote.is_err() {
        return 0;
    }
    acked(link, client, latest).await
}

/// `WAIT replicas` on `client` (WAIT covers that connection's writes),
/// ending a quarter of the time left before `latest` (at least 5 ms
/// before it), so a short count is reported as such rather than lost in
/// the caller's own timeout. Whole milliseconds, and never 0, which
/// would block forever. Answers how many replicas acknowledged.
async fn acked<C: ClientLike>(link: &Link, client: &C, latest: Instant) -> u64 {
    let left = latest.saturating_duration_since(Instant::now());
    let margin = (left / 4).max(Duration::from_millis(5));
    let ms = left.saturating_sub(margin).as_millis().max(1) as i64;
    let wait = CustomCommand::new_static("WAIT", ClusterHash::Custom(link.slot), true);
    let acked: Result<u64, _> = client
        .custom(
            wait,
            vec![Value::from(link.replicas as i64), Value::from(ms)],
        )
        .await;
    acked.unwrap_or(0)
}

/// Not a code of the script: a sale `WAIT` did not see replicated.
pub(super) const NOT_REPLICATED: u64 = 100;
/// Not a code of the script: an earlier order (a replay, `already_bought`)
/// that a barrier did not see replicated; nothing was sold.
pub(super) const NOT_REPLICATED_EARLIER: u64 = 101;
