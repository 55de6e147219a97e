//! The sweep that expires unpaid reservations, on every node.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::state::{Node, random_u64};
use super::store::StoreError;

/// Reservations one sweep call expires at most: the call holds Redis's one
/// thread for that many small updates, no more.
pub const SWEEP_BATCH: u64 = 100;

/// Expires unpaid reservations whose deadline has passed, every 250 to
/// 500 ms (jittered, so the nodes of a sale do not all call at once), in
/// batches of [`SWEEP_BATCH`] until none is due. Every node runs it; the
/// store makes each expiry happen once, so any live node is enough, and
/// after an outage the sweeps catch up batch by batch. Idle while the sale
/// has no payment window.
pub async fn sweep(node: std::sync::Weak<Node>) {
    let mut jitter = random_u64();
    loop {
        jitter = jitter.rotate_left(7) ^ 0x9e37_79b9_7f4a_7c15;
        tokio::time::sleep(Duration::from_millis(250 + jitter % 250)).await;
        let Some(node) = node.upgrade() else {
            return;
        };
        if node.pay_within().is_none() {
            continue;
        }
        sweep_now(&node).await;
    }
}

/// Sweeps until nothing more is due (or the store fails: the next round
/// tries again).
pub async fn sweep_now(node: &Arc<Node>) {
    loop {
        match node.store().sweep(SWEEP_BATCH).await {
            Ok(reply) => {
                node.heard(&reply.sale);
                if reply.answer.expired > 0 {
                    node.stats
                        .expired
                        .fetch_add(reply.answer.expired, Ordering::Relaxed);
                    tracing::info!(node = %node.name(), expired = reply.answer.expired, "unpaid reservations expired; their tickets are on sale again");
                }
                if !reply.answer.more {
                    return;
                }
            }
            Err(StoreError::NoSale) => return,
            Err(e) => {
                tracing::debug!(node = %node.name(), error = %e, "sweep failed");
                return;
            }
        }
    }
}
