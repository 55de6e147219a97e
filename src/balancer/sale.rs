//! The admin's `/sale` (the status page has the sale from
//! [`super::recent`]): the balancer has no store, but its upstreams are
//! nodes that do, so the admin listener asks one of them for its `/sale`
//! (cached there, so asking often costs the store little).
//! Admin-only: nothing here runs on the proxy's path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
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
    // The first look is at once: until a node has answered, the sale's
    // moments are the file's and the clock this host's.
    let mut first = true;
    loop {
        let known = shared.edge.current();
        match &known {
            _ if std::mem::take(&mut first) => {}
            // Then a long poll: the node answers as soon as its view changes.
            Some(_) => tokio::time::sleep(EDGE_RECHECK).await,
            None => tokio::select! {
                () = tokio::time::sleep(EDGE_OPEN_POLL) => {}
                () = shared.edge.poked() => {}
            },
        }
        let (at_edge, ready_before_open) = {
            let active = shared.current.load();
            (
                active.config.sold_out_at_edge,
                active.config.ready_before_open,
            )
        };
        let enabled = shared.has_sale() && at_edge;
        if !enabled {
            shared
                .edge
                .clear("sold_out_at_edge is off or the file has no [sale]");
            // `/ready` still waits for the opening by the store's moments
            // and clock.
            if shared.has_sale()
                && !ready_before_open
                && let Some(now) = read_sold_out(&shared, None).await
                && let Some(m) = &now.moments
            {
                shared.edge.moments.set(m);
            }
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
    heard(shared, &body)
}

/// A node's `/sold_out` answer, read; the store's clock in it kept for the
/// edge (see [`super::edge::StoreTime`]).
pub(super) fn heard(shared: &Shared, body: &[u8]) -> Option<SoldOutView> {
    let view: SoldOutView = serde_json::from_slice(body).ok()?;
    if let Some(ms) = view.store_now_ms {
        shared.edge.store_time.heard(ms, std::time::Instant::now());
    }
    Some(view)
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

/// One `GET path` to `addr` (also the status's read of the sale,
/// [`super::recent`]), on a kept-alive connection when one is idle.
pub(super) async fn ask(addr: SocketAddr, path: &str) -> Result<Bytes, String> {
    let reused = match idle_asker(addr) {
        // An idle connection the node has closed since fails at once: then
        // a fresh one.
        Some(sender) => ask_on(addr, sender, path).await.ok(),
        None => None,
    };
    let (status, body) = match reused {
        Some(answer) => answer,
        None => {
            let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            ask_on(addr, sender, path).await?
        }
    };
    if status != StatusCode::OK {
        return Err(format!("answered {status}"));
    }
    Ok(body)
}

/// A connection for [`ask`]: its sender, kept between asks.
type Asker = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Idle connections of [`ask`] by address, so that the edges' long polls
/// (one per sold-out sale asked about, each coming back every 0.7 s) and
/// the status page's reads reuse connections: a fresh one per poll was
/// 1.4 connections a second per sold-out sale, each leaving a TIME_WAIT
/// at the balancer (found in review: a thousand sold-out trains would use
/// up its ports). The addresses are the file's nodes.
static IDLE_ASKERS: LazyLock<Mutex<HashMap<SocketAddr, Vec<Asker>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Idle connections kept per address: more than the long polls one
/// balancer keeps at once in a usual fleet; beyond, a connection closes
/// after its answer.
const IDLE_ASKERS_MOST: usize = 64;

fn idle_asker(addr: SocketAddr) -> Option<Asker> {
    let mut idle = IDLE_ASKERS.lock().unwrap_or_else(|e| e.into_inner());
    let kept = idle.get_mut(&addr)?;
    while let Some(sender) = kept.pop() {
        if !sender.is_closed() {
            return Some(sender);
        }
    }
    None
}

fn keep_asker(addr: SocketAddr, sender: Asker) {
    if sender.is_closed() {
        return;
    }
    let mut idle = IDLE_ASKERS.lock().unwrap_or_else(|e| e.into_inner());
    let kept = idle.entry(addr).or_default();
    if kept.len() < IDLE_ASKERS_MOST {
        kept.push(sender);
    }
}

/// `GET path` on `sender`'s connection, which is kept for the next ask
/// once the whole answer is read; `Err` when the connection failed.
async fn ask_on(
    addr: SocketAddr,
    mut sender: Asker,
    path: &str,
) -> Result<(StatusCode, Bytes), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status();
    let body = Limited::new(res.into_body(), MAX_SALE_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    keep_asker(addr, sender);
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Asks of one address reuse one connection (a fresh one per ask was a
    /// TIME_WAIT per poll), and a connection the peer closed is replaced.
    #[tokio::test]
    async fn asks_reuse_a_kept_alive_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    loop {
                        let mut chunk = [0u8; 1024];
                        let Ok(read) = s.read(&mut chunk).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..read]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                            answered += 1;
                            // The first connection closes after two answers.
                            if n == 0 && answered == 2 {
                                return;
                            }
                        }
                    }
                });
            }
        });
        for _ in 0..2 {
            assert_eq!(
                ask(addr, "/sale").await.expect("ask"),
                Bytes::from_static(b"ok")
            );
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..3 {
            assert_eq!(
                ask(addr, "/sale").await.expect("ask"),
                Bytes::from_static(b"ok")
            );
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
