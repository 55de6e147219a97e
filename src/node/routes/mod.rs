//! The node's HTTP routes: [`handle`] reads the path and sends the request
//! to its route; each route checks the request, asks the node, and writes
//! the answer through [`reply`].
//!
//! - [`buy`]: `/buy/ticket`, the purchase (the hot path)
//! - [`orders`]: `/orders/{id}`, `/orders/{id}/pay`, `/orders/{id}/cancel`
//! - [`internal`]: `/sold_out`, `/holders`, `/sale`, what the balancer reads
//! - [`metrics`]: `/healthz`, `/stats`, `/metrics`

pub mod buy;
pub mod internal;
pub mod metrics;
pub mod orders;
pub mod reply;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};

use self::reply::{Answer, fixed, not_allowed};
use super::state::Node;
use crate::protocol::{HOLDERS_PATH, PURCHASE_PATH, SALE_PATH, SOLD_OUT_PATH};

/// Longest request target accepted (Nginx's default header buffer is 8k);
/// nothing legitimate on a node comes near it.
pub const MAX_URI_LEN: usize = 8192;

/// Serves one request on `node`.
pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Result<Answer, Infallible> {
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > MAX_URI_LEN {
        node.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        return Ok(fixed(
            StatusCode::URI_TOO_LONG,
            b"{\"status\":\"uri_too_long\",\"reason\":\"the request target is longer than 8 KiB\"}\n",
        ));
    }
    Ok(match req.uri().path() {
        PURCHASE_PATH => match *req.method() {
            Method::GET | Method::POST => buy::serve(&node, &req).await,
            _ => not_allowed("GET, POST"),
        },
        "/healthz" if req.method() == Method::GET => metrics::healthz(&node).await,
        "/stats" if req.method() == Method::GET => metrics::stats_json(&node),
        "/metrics" if req.method() == Method::GET => {
            crate::prometheus::response(metrics::render(&node))
        }
        SALE_PATH if req.method() == Method::GET => internal::sale(&node).await,
        HOLDERS_PATH if req.method() == Method::GET => internal::holders(&node),
        SOLD_OUT_PATH if req.method() == Method::GET => internal::sold_out(&node, &req).await,
        "/healthz" | "/stats" | SALE_PATH | "/metrics" | HOLDERS_PATH | SOLD_OUT_PATH => {
            not_allowed("GET")
        }
        path if path.starts_with("/orders/") => orders::handle(&node, &req).await,
        _ => not_found(),
    })
}

/// The answer for a path that is no route of the node's (or, with
/// `[[node]] internal`, one of the internal routes on the public listener).
pub fn not_found() -> Answer {
    fixed(
        StatusCode::NOT_FOUND,
        b"{\"status\":\"not_found\",\"reason\":\"no such route: purchases are at /buy/ticket, orders at /orders/{id}\"}\n",
    )
}
