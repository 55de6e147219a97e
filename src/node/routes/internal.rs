//! The routes a balancer (and an operator) reads, not buyers: `/sold_out`
//! (the edge's long poll), `/holders` (who to answer `already_bought`
//! for), `/sale` (the snapshot).

use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use super::reply::{Answer, fixed, json_of, written};
use crate::node::snapshot::SnapshotError;
use crate::node::state::Node;
use crate::protocol::{self, HoldersView};

/// Longest a `/sold_out` long poll waits for a change (under the
/// balancer's one-second bound on asking a node).
pub const VIEW_WAIT: Duration = Duration::from_millis(700);

/// `GET /sold_out`: whether this node answers `sold_out` from memory,
/// for which epoch, and how many tickets had come back when it last
/// heard from the store. From memory, no store call. With
/// `?epoch=E&released=R` (what the caller knows) it is a long poll: it
/// answers when that view stops holding (a reset, returned stock, the
/// node open again), or after [`VIEW_WAIT`], so a balancer answering
/// for a sold-out sale hears of a change as soon as this node does
/// (see `crate::balancer::edge`).
pub async fn sold_out(node: &Node, req: &Request<Incoming>) -> Answer {
    if let Some((epoch, released)) = protocol::sold_out_poll_params(req.uri().query()) {
        let changed = node.view.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if node.view.still(epoch, released) && !node.closed_confirmed() {
            let _ = tokio::time::timeout(VIEW_WAIT, changed).await;
        }
    }
    let mut view = node.view.sold_out_view(node.closed_confirmed());
    view.store_now_ms = node.store().clock_now_ms();
    json_of(&view)
}

/// `GET /holders`: once the node answers `sold_out` from memory, the
/// buyers at the limit and their last orders, as it knows them (in
/// [`HoldersView::encode`]'s bytes, not JSON), so a balancer can answer `already_bought` for
/// them without a node. 409 while the sale is open; 503 while the node is
/// still reading them or taking in a change (a ticket came back).
pub fn holders(node: &Node) -> Answer {
    if !node.is_sold_out() {
        return fixed(StatusCode::CONFLICT, b"{\"status\":\"open\",\"reason\":\"the holders are listed once the sale is sold out\"}\n");
    }
    let view = {
        let known = node.view.holders();
        known
            .as_deref()
            .filter(|k| k.epoch == node.epoch())
            .and_then(|k| {
                let h = k.read();
                node.view.is_current(&h).then(|| {
                    let (buyers, ask) = h.buyer_entries();
                    HoldersView {
                        epoch: k.epoch,
                        released: h.released,
                        per_user_limit: h.per_user_limit,
                        seed: [h.seed.0, h.seed.1],
                        buyers,
                        ask,
                    }
                })
            })
    };
    match view {
        Some(view) => super::reply::bytes(view.encode()),
        None => fixed(
            StatusCode::SERVICE_UNAVAILABLE,
            b"{\"status\":\"learning\",\"reason\":\"the node is still reading the holders\"}\n",
        ),
    }
}

/// `GET /sale`: the sale's snapshot, at most half a second old (see
/// [`crate::node::snapshot`]).
pub async fn sale(node: &Node) -> Answer {
    match node.snapshot.get(&node.store, node.timeout).await {
        Ok(body) => written(StatusCode::OK, body),
        Err(SnapshotError::Encode) => fixed(
            StatusCode::INTERNAL_SERVER_ERROR,
            b"{\"status\":\"error\",\"reason\":\"the answer could not be written\"}\n",
        ),
        // Not the purchase's 503, whose reason is about retrying a
        // purchase.
        Err(SnapshotError::Unavailable) => fixed(
            StatusCode::SERVICE_UNAVAILABLE,
            b"{\"status\":\"unavailable\",\"reason\":\"the store did not answer in time\"}\n",
        ),
    }
}
