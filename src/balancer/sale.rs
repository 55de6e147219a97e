//! The sale as the status page shows it: the balancer has no store, but its
//! upstreams are nodes that do, so the admin listener asks one of them for
//! its `/sale` (cached there, so a refreshing page costs the store little).
//! Admin-only: nothing here runs on the proxy's path.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::state::Shared;
use super::upstream::now_ms;

/// How long one upstream may take to answer `/sale` before the next is
/// asked.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Largest `/sale` body taken from a node (a snapshot is a few hundred
/// bytes).
const MAX_SALE_BODY: usize = 64 * 1024;

/// The answer to the admin's `GET /sale`: a node's snapshot as it sent it;
/// 404 when the file has no `[sale]`; 503 with the reason when no live
/// upstream answered.
pub async fn sale(shared: &Shared) -> (StatusCode, Bytes) {
    if !shared.has_sale() {
        return (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"{\"status\":\"no_sale\",\"reason\":\"the file has no [sale]\"}"),
        );
    }
    let active = shared.current.load_full();
    let now = now_ms();
    // Live upstreams first; a failed one may still answer.
    let mut order: Vec<_> = active
        .selector
        .upstreams()
        .filter(|u| !u.config.down)
        .collect();
    order.sort_by_key(|u| u.is_failed(now));
    let mut last_error = String::from("no upstream to ask");
    for u in order {
        match tokio::time::timeout(ASK_TIMEOUT, ask(u.config.addr)).await {
            Ok(Ok(body)) => return (StatusCode::OK, body),
            Ok(Err(e)) => last_error = format!("{}: {e}", u.config.addr),
            Err(_) => last_error = format!("{}: no answer in {ASK_TIMEOUT:?}", u.config.addr),
        }
    }
    let body = serde_json::json!({
        "status": "unavailable",
        "reason": format!("no upstream answered /sale ({last_error})"),
    });
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Bytes::from(body.to_string()),
    )
}

/// One `GET /sale` on a fresh connection to `addr`.
async fn ask(addr: std::net::SocketAddr) -> Result<Bytes, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/sale")
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
