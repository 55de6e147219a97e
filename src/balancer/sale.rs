//! The admin's `/sale` (the status page has the sale from
//! [`super::recent`]): the balancer has no store, but its upstreams are
//! nodes that do, so the admin listener asks one of them for its `/sale`
//! (cached there, so asking often costs the store little).
//! Admin-only: nothing here runs on the proxy's path.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::protocol::{self, HoldersView, SoldOutView};

use super::edge::SoldOut;
use super::state::Shared;
use super::upstream::now_ms;

/// The pause between two long polls of a node while the edge answers for
/// the sale (each comes back as soon as the node's view changes, or after
/// the node's wait): it only bounds the asking when a node does not wait.
const EDGE_RECHECK: Duration = Duration::from_millis(20);

/// How often it reads the sale while the sale is open, to notice one that
/// sold out without a sold-out answer passing through (sold out before
/// this balancer started, or through another balancer).
const EDGE_OPEN_POLL: Duration = Duration::from_secs(1);

/// How long one upstream may take to answer `/sale` before the next is
/// asked.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Largest body taken from a node: a snapshot is a few hundred bytes, the
/// holders of a big sale a few tens of bytes each.
const MAX_SALE_BODY: usize = 64 * 1024 * 1024;

/// The answer to the admin's `GET /sale`: a node's snapshot as it sent it;
/// 404 when the file has no `[sale]`; 503 with the reason when no live
/// upstream answered. With several sales, `?event=E` names the sale (a
/// node's `/sale?event=E`): without it a 400 listing them, an event the
/// file does not list a 404.
pub async fn sale(shared: &Shared, query: Option<&str>) -> (StatusCode, Bytes) {
    let several = shared.several_sales();
    if !several.is_empty() {
        let answer =
            |status: StatusCode, body: serde_json::Value| (status, Bytes::from(body.to_string()));
        let event = match protocol::event_from(query) {
            Ok(Some(e)) => e,
            Ok(None) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({
                        "status": "bad_request",
                        "reason": "the file has several sales: name one, /sale?event=EVENT",
                        "sales": several.len(),
                        "events": &several[..several.len().min(20)],
                    }),
                );
            }
            Err(e) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"status": "bad_request", "reason": e.to_string()}),
                );
            }
        };
        if !protocol::is_event(event) || !several.iter().any(|s| s == event) {
            return answer(
                StatusCode::NOT_FOUND,
                serde_json::json!({"status": "no_such_sale", "reason": "the file has no sale of that event"}),
            );
        }
        return match ask_any(shared, &format!("{}?event={event}", protocol::SALE_PATH)).await {
            Ok(body) => (StatusCode::OK, body),
            Err(e) => answer(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({
                    "status": "unavailable",
                    "reason": format!("no upstream answered /sale?event={event} ({e})"),
                }),
            ),
        };
    }
    if !shared.has_sale() {
        return (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"{\"status\":\"no_sale\",\"reason\":\"the file has no [sale]\"}"),
        );
    }
    let last_error = match ask_any(shared, protocol::SALE_PATH).await {
        Ok(body) => return (StatusCode::OK, body),
        Err(e) => e,
    };
    let body = serde_json::json!({
        "status": "unavailable",
        "reason": format!("no upstream answered /sale ({last_error})"),
    });
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Bytes::from(body.to_string()),
    )
}

/// `GET path` of the first upstream that answers 200 (on its internal
/// address, where a node serves these routes): live ones first (a failed
/// one may still answer), each within [`ASK_TIMEOUT`].
pub(super) async fn ask_any(shared: &Shared, path: &str) -> Result<Bytes, String> {
    let active = shared.current.load_full();
    let now = now_ms();
    let mut order: Vec<_> = active
        .selector
        .upstreams()
        .filter(|u| !u.config.down)
        .collect();
    // Healthy and live ones first; a failed one may still answer.
    order.sort_by_key(|u| {
        (
            !u.live.healthy.load(std::sync::atomic::Ordering::Relaxed),
            u.is_failed(now),
        )
    });
    let mut last_error = String::from("no upstream to ask");
    for u in order {
        let addr = u.config.internal_addr();
        match tokio::time::timeout(ASK_TIMEOUT, ask(addr, path)).await {
            Ok(Ok(body)) => return Ok(body),
            Ok(Err(e)) => last_error = format!("{addr}: {e}"),
            Err(_) => last_error = format!("{addr}: no answer in {ASK_TIMEOUT:?}"),
        }
    }
    Err(last_error)
}

/// Keeps the edge's view of the sale (see [`super::edge`]): while it
/// answers, keeps a long poll on a node's `/sold_out` (the node answers as
/// soon as its view changes) and lets go at the first sign of stock: a
/// reset, returned tickets, the node selling again, or no node answering.
/// While open, it asks every [`EDGE_OPEN_POLL`], or at once
/// when a node said `sold_out`, and takes over once a node says it is sold
/// out and has read its holders. A node's view is never older than its
/// own poll of the store (a second, a quarter of one with a payment
/// window), and the node is what the buyers would otherwise hear.
pub async fn watch_edge(shared: Arc<Shared>) {
    loop {
        let known = shared.edge.current();
        match &known {
            // Then a long poll: the node answers as soon as its view changes.
            Some(_) => tokio::time::sleep(EDGE_RECHECK).await,
            None => tokio::select! {
                () = tokio::time::sleep(EDGE_OPEN_POLL) => {}
                () = shared.edge.poked() => {}
            },
        }
        let enabled = shared.has_sale() && shared.current.load().config.sold_out_at_edge;
        if !enabled {
            shared
                .edge
                .clear("sold_out_at_edge is off or the file has no [sale]");
            continue;
        }
        let Some(now) = read_sold_out(&shared, known.as_deref()).await else {
            shared.edge.clear("no node answered /sold_out");
            continue;
        };
        if let Some(m) = &now.moments {
            shared.edge.moments.set(m);
        }
        match known {
            Some(known) => {
                if !now.sold_out {
                    shared.edge.clear("the nodes sell again");
                } else if now.epoch != known.epoch {
                    shared.edge.clear("the sale was reset");
                } else if now.released != known.released {
                    shared.edge.clear("tickets came back");
                }
            }
            None if now.sold_out => learn(&shared).await,
            None => {}
        }
    }
}

/// What a node says of the sale from memory (`GET /sold_out`, the same
/// view it answers its buyers from); with `known`, a long poll that comes
/// back when the node's view is no longer `known` (or after the node's
/// wait).
async fn read_sold_out(shared: &Shared, known: Option<&SoldOut>) -> Option<SoldOutView> {
    let path = match known {
        Some(k) => protocol::sold_out_poll(k.epoch, k.released),
        None => String::from(protocol::SOLD_OUT_PATH),
    };
    let body = ask_any(shared, &path).await.ok()?;
    serde_json::from_slice(&body).ok()
}

/// Reads the holders from a node that answers from memory, and starts
/// answering for the sale (nothing when no node has them yet: the next
/// sold-out answer or poll tries again).
async fn learn(shared: &Shared) {
    if !shared.edge.start_learning() {
        return;
    }
    let read = async {
        let body = ask_any(shared, protocol::HOLDERS_PATH).await.ok()?;
        let v = HoldersView::decode(&body).ok()?;
        Some(SoldOut::from_view(v))
    };
    if let Some(sold_out) = read.await {
        shared.edge.set(sold_out);
    }
    shared.edge.done_learning();
}

/// One `GET path` on a fresh connection to `addr` (also the status's read
/// of the sale, [`super::recent`]).
pub(super) async fn ask(addr: std::net::SocketAddr, path: &str) -> Result<Bytes, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if res.status() != StatusCode::OK {
        return Err(format!("answered {}", res.status()));
    }
    let body = Limited::new(res.into_body(), MAX_SALE_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(body)
}
