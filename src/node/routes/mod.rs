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

use self::reply::{Answer, fixed, json, not_allowed};
use super::sales::{Missing, Sales};
use crate::protocol::{HOLDERS_PATH, PURCHASE_PATH, SALE_PATH, SOLD_OUT_PATH};

/// Longest request target accepted (Nginx's default header buffer is 8k);
/// nothing legitimate on a node comes near it.
pub const MAX_URI_LEN: usize = 8192;

/// Serves one request on the node's `sales`: the sale is the one the
/// request names (`/events/{event}/buy`, `?event=`, an order id's
/// `EVENT:`), else the node's only one.
pub async fn handle(sales: Arc<Sales>, req: Request<Incoming>) -> Result<Answer, Infallible> {
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > MAX_URI_LEN {
        if let Some(node) = sales.only() {
            node.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        }
        return Ok(fixed(
            StatusCode::URI_TOO_LONG,
            b"{\"status\":\"uri_too_long\",\"reason\":\"the request target is longer than 8 KiB\"}\n",
        ));
    }
    let named = || crate::protocol::event_from(req.uri().query());
    Ok(match req.uri().path() {
        PURCHASE_PATH => match *req.method() {
            Method::GET | Method::POST => match named() {
                Ok(event) => match sales.find(event).await {
                    Ok(node) => buy::serve(&node, &req).await,
                    Err(m) => missing(m),
                },
                Err(twice) => event_twice(twice),
            },
            _ => not_allowed("GET, POST"),
        },
        "/healthz" if req.method() == Method::GET => match sales.only() {
            Some(node) => metrics::healthz(&node).await,
            None => metrics::healthz_all(&sales).await,
        },
        "/stats" if req.method() == Method::GET => match sales.only() {
            Some(node) => metrics::stats_json(&node),
            None => metrics::stats_all(&sales),
        },
        "/metrics" if req.method() == Method::GET => {
            crate::prometheus::response(match sales.only() {
                Some(node) => metrics::render(&node),
                None => metrics::render_all(&sales),
            })
        }
        SALE_PATH | HOLDERS_PATH | SOLD_OUT_PATH if req.method() == Method::GET => {
            match named() {
                Ok(event) => match sales.find(event).await {
                    Ok(node) => match req.uri().path() {
                        SALE_PATH => internal::sale(&node).await,
                        HOLDERS_PATH => internal::holders(&node),
                        _ => internal::sold_out(&node, &req).await,
                    },
                    Err(m) => missing(m),
                },
                Err(twice) => event_twice(twice),
            }
        }
        "/healthz" | "/stats" | SALE_PATH | "/metrics" | HOLDERS_PATH | SOLD_OUT_PATH => {
            not_allowed("GET")
        }
        path if path.starts_with("/orders/") => orders::handle(&sales, &req).await,
        path => match crate::protocol::event_purchase(path) {
            Some(event) => match *req.method() {
                // The path names the sale; a query that names another (or
                // names one twice) is no purchase in either.
                Method::GET | Method::POST => match named() {
                    Ok(also) if also.is_none_or(|a| a == event) => match sales.get(event).await {
                        Ok(node) => buy::serve(&node, &req).await,
                        Err(m) => missing(m),
                    },
                    Ok(_) => fixed(
                        StatusCode::BAD_REQUEST,
                        b"{\"status\":\"bad_request\",\"reason\":\"the path names one sale and `event` in the query another: name one\"}\n",
                    ),
                    Err(twice) => event_twice(twice),
                },
                _ => not_allowed("GET, POST"),
            },
            None => not_found(),
        },
    })
}

/// The answer when a request's sale is not found: it named none and the
/// node sells several (400, naming the choice), it named one the node
/// does not sell (404), or the sale's state could not be made (503).
pub fn missing(m: Missing) -> Answer {
    match m {
        Missing::Unnamed(events) => json(
            StatusCode::BAD_REQUEST,
            &NoSale {
                status: "bad_request",
                reason: &format!(
                    "this fleet sells several sales: name one, /events/EVENT/buy or ?event=EVENT (an order by its id as the purchase answered it, EVENT:ID); the sales: {events}"
                ),
            },
        ),
        Missing::Unknown => fixed(
            StatusCode::NOT_FOUND,
            b"{\"status\":\"no_such_sale\",\"reason\":\"this node sells no sale of that event\"}\n",
        ),
        Missing::Broken(why) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &NoSale {
                status: "unavailable",
                reason: &why,
            },
        ),
    }
}

/// The answer to a query that names `event` twice: a 400, never a pick
/// of either (see [`crate::protocol::event_from`]).
fn event_twice(_: crate::protocol::EventTwice) -> Answer {
    fixed(
        StatusCode::BAD_REQUEST,
        b"{\"status\":\"bad_request\",\"reason\":\"`event` is given more than once in the query: name one sale\"}\n",
    )
}

/// The body of [`missing`]'s answers.
#[derive(serde::Serialize)]
struct NoSale<'a> {
    status: &'static str,
    reason: &'a str,
}

/// The answer for a path that is no route of the node's (or, with
/// `[[node]] internal`, one of the internal routes on the public listener).
pub fn not_found() -> Answer {
    fixed(
        StatusCode::NOT_FOUND,
        b"{\"status\":\"not_found\",\"reason\":\"no such route: purchases are at /buy/ticket, orders at /orders/{id}\"}\n",
    )
}
