//! The node's HTTP routes and answers. The hot path (`/buy/ticket`) touches
//! only atomics until its one Redis call (shared with the purchases queued
//! beside it), and answers from memory once Redis has said the sale is over.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, HeaderValue, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode};

use super::allowance::{Allowance, NoUnit};
use super::store::{Holders, Outcome, Store};
use crate::server::json;

/// Longest buyer id accepted; it becomes a Redis hash field.
pub const MAX_BUYER_LEN: usize = 64;

/// Longest request target accepted (Nginx's default header buffer is 8k);
/// nothing legitimate on a node comes near it.
pub const MAX_URI_LEN: usize = 8192;

/// Counters for `/stats`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Tickets this node sold.
    pub sold: AtomicU64,
    /// Sold-out answers (from Redis or from memory).
    pub sold_out: AtomicU64,
    /// Answers to buyers at their limit.
    pub already_bought: AtomicU64,
    /// Store calls that failed (each a 503).
    pub store_errors: AtomicU64,
    /// Purchases sent to the store (one per purchase that passed the local
    /// gates; with Redis several go out in one call, see `redis_calls`).
    pub store_calls: AtomicU64,
    /// Requests refused as malformed.
    pub bad_requests: AtomicU64,
    /// 503 busy answers: the allowance was all held by purchases in flight.
    pub busy: AtomicU64,
}

/// One node's selling state, shared by all its connections.
pub struct Node {
    name: String,
    store: Store,
    allowance: Allowance,
    sold_out: AtomicBool,
    /// Once sold out (or spent): the buyers at their limit and their orders, read from
    /// the store once, so that a buyer who bought (perhaps without hearing
    /// the answer) is told "already bought" from memory, as the script would
    /// have, instead of "sold out".
    holders: Arc<OnceLock<Holders>>,
    /// Whether that read has been started (it is started once).
    learning: AtomicBool,
    per_user_limit: u64,
    max_body: u64,
    /// What the node has done, for `/stats`.
    pub stats: Stats,
}

/// Why a buyer id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuyerError {
    /// No `user` parameter and no `X-User-Id`, but the sale needs one.
    #[error("a buyer id is required: ?user=ID or the X-User-Id header")]
    Missing,
    /// Empty, too long, or with characters outside `[A-Za-z0-9_.:@-]`.
    #[error("a buyer id is 1 to 64 characters of letters, digits, '_', '.', ':', '@' or '-'")]
    Malformed,
}

impl Node {
    /// A node named `name` with `allowance` tickets of local stock.
    pub fn new(
        name: &str,
        allowance: u64,
        per_user_limit: u64,
        max_body: u64,
        store: Store,
    ) -> Node {
        Node {
            name: name.to_string(),
            store,
            allowance: Allowance::new(allowance),
            sold_out: AtomicBool::new(false),
            holders: Arc::new(OnceLock::new()),
            learning: AtomicBool::new(false),
            per_user_limit,
            max_body,
            stats: Stats::default(),
        }
    }

    /// The store this node sells from.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Units of local allowance left.
    pub fn allowance_left(&self) -> u64 {
        self.allowance.left()
    }

    /// Serves one request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if target_len > MAX_URI_LEN {
            self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return Ok(json(
                StatusCode::URI_TOO_LONG,
                Bytes::from_static(b"{\"status\":\"uri_too_long\"}"),
            ));
        }
        Ok(match req.uri().path() {
            "/buy/ticket" => match *req.method() {
                Method::GET | Method::POST => self.buy(&req).await,
                _ => not_allowed("GET, POST"),
            },
            "/healthz" if req.method() == Method::GET => self.healthz().await,
            "/stats" if req.method() == Method::GET => self.stats_json(),
            "/sale" if req.method() == Method::GET => self.sale().await,
            "/healthz" | "/stats" | "/sale" => not_allowed("GET"),
            _ => json(
                StatusCode::NOT_FOUND,
                Bytes::from_static(b"{\"status\":\"not_found\"}"),
            ),
        })
    }

    async fn buy(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        // The body is never needed: refuse big ones by their declared size,
        // and chunked ones outright, before any work.
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body)
            || req.headers().contains_key(TRANSFER_ENCODING)
        {
            self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                Bytes::from_static(b"{\"status\":\"payload_too_large\"}"),
            );
        }
        let buyer = match buyer_of(req, self.per_user_limit > 0) {
            Ok(b) => b,
            Err(e) => {
                self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                let reason = match e {
                    BuyerError::Missing => &b"{\"status\":\"bad_request\",\"reason\":\"a buyer id is required: ?user=ID or X-User-Id\"}"[..],
                    BuyerError::Malformed => &b"{\"status\":\"bad_request\",\"reason\":\"a buyer id is 1 to 64 characters of [A-Za-z0-9_.:@-]\"}"[..],
                };
                return json(StatusCode::BAD_REQUEST, Bytes::from_static(reason));
            }
        };
        if self.sold_out.load(Ordering::Acquire) {
            return self.sold_out_answer(buyer);
        }
        let unit = match self.allowance.take() {
            Ok(unit) => unit,
            Err(NoUnit::Spent) => {
                // This node never asks the store again, so it will not hear
                // "sold out" from it: read the holders now. Some may still
                // buy elsewhere and be missed, but a buyer at the limit
                // stays there with the same order, so whoever is read is
                // answered right.
                self.learn_holders();
                return self.sold_out_answer(buyer);
            }
            Err(NoUnit::InFlight) => {
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                let mut res = json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::from_static(b"{\"status\":\"busy\",\"reason\":\"purchases in flight hold this node's stock; retry\"}"),
                );
                res.headers_mut()
                    .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
                return res;
            }
        };
        self.stats.store_calls.fetch_add(1, Ordering::Relaxed);
        // `unit` goes back to the allowance on every path but a sale,
        // including this future being dropped because the client left.
        match self.store.deduct(buyer, &self.name).await {
            Ok(Outcome::Sold { order, sold }) => {
                unit.keep();
                self.stats.sold.fetch_add(1, Ordering::Relaxed);
                let mut body = String::with_capacity(96 + buyer.len() + order.len());
                body.push_str("{\"status\":\"sold\",\"order\":\"");
                body.push_str(&order);
                body.push_str("\",\"node\":\"");
                body.push_str(&self.name);
                body.push_str("\",\"buyer\":\"");
                body.push_str(buyer);
                let _ = write!(body, "\",\"sold\":{sold}}}");
                json(StatusCode::OK, body)
            }
            Ok(Outcome::SoldOut) => {
                self.sold_out.store(true, Ordering::Release);
                self.learn_holders();
                drop(unit);
                self.sold_out_answer(buyer)
            }
            Ok(Outcome::AlreadyBought { order }) => {
                drop(unit);
                self.already_bought_answer(&order)
            }
            Ok(Outcome::NoSale) => {
                drop(unit);
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::from_static(b"{\"status\":\"unavailable\",\"reason\":\"the sale is not initialised: run spike stock init\"}"),
                )
            }
            Err(e) => {
                drop(unit);
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, node = %self.name, "store call failed; unit returned");
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::from_static(b"{\"status\":\"unavailable\"}"),
                )
            }
        }
    }

    /// Reads the holders once, in the background (later calls do nothing);
    /// until they are in, sold-out answers are plain "sold out". Retried
    /// while the store is unreachable: a buyer at the limit stays there.
    fn learn_holders(&self) {
        // A load first: this runs on every answer of a spent node.
        if self.per_user_limit == 0
            || self.learning.load(Ordering::Relaxed)
            || self.learning.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let (store, holders, limit) = (
            self.store.clone(),
            self.holders.clone(),
            self.per_user_limit,
        );
        let name = self.name.clone();
        tokio::spawn(async move {
            for attempt in 1..=30 {
                match store.holders(limit).await {
                    Ok(found) => {
                        tracing::info!(node = %name, buyers = found.len(), "buyers at their limit read into memory");
                        let _ = holders.set(found);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(node = %name, error = %e, attempt, "reading the buyers at their limit failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    fn already_bought_answer(&self, order: &str) -> Response<Full<Bytes>> {
        self.stats.already_bought.fetch_add(1, Ordering::Relaxed);
        let mut body = String::with_capacity(48 + order.len());
        body.push_str("{\"status\":\"already_bought\",\"order\":\"");
        body.push_str(order);
        body.push_str("\"}");
        json(StatusCode::CONFLICT, body)
    }

    fn sold_out_answer(&self, buyer: &str) -> Response<Full<Bytes>> {
        if let Some(order) = self.holders.get().and_then(|h| h.get(buyer)) {
            return self.already_bought_answer(order);
        }
        self.stats.sold_out.fetch_add(1, Ordering::Relaxed);
        json(
            StatusCode::CONFLICT,
            Bytes::from_static(b"{\"status\":\"sold_out\"}"),
        )
    }

    async fn healthz(&self) -> Response<Full<Bytes>> {
        match self.store.ping().await {
            Ok(()) => json(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}")),
            Err(_) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from_static(b"{\"status\":\"unavailable\"}"),
            ),
        }
    }

    fn stats_json(&self) -> Response<Full<Bytes>> {
        let s = &self.stats;
        let body = serde_json::json!({
            "node": self.name,
            "allowance": self.allowance.left(),
            "sold_out": self.sold_out.load(Ordering::Acquire),
            "holders_known": self.holders.get().map(|h| h.len()),
            "sold": s.sold.load(Ordering::Relaxed),
            "sold_out_answers": s.sold_out.load(Ordering::Relaxed),
            "already_bought": s.already_bought.load(Ordering::Relaxed),
            "store_calls": s.store_calls.load(Ordering::Relaxed),
            "redis_calls": self.store.deduct_calls(),
            "store_errors": s.store_errors.load(Ordering::Relaxed),
            "bad_requests": s.bad_requests.load(Ordering::Relaxed),
            "busy": s.busy.load(Ordering::Relaxed),
        });
        json(StatusCode::OK, body.to_string())
    }

    async fn sale(&self) -> Response<Full<Bytes>> {
        match self.store.snapshot().await {
            Ok(snap) => match serde_json::to_string(&snap) {
                Ok(body) => json(StatusCode::OK, body),
                Err(_) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Bytes::from_static(b"{\"status\":\"error\"}"),
                ),
            },
            Err(_) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from_static(b"{\"status\":\"unavailable\"}"),
            ),
        }
    }
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut res = json(
        StatusCode::METHOD_NOT_ALLOWED,
        Bytes::from_static(b"{\"status\":\"method_not_allowed\"}"),
    );
    res.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    res
}

/// The buyer of a request: the `user` query parameter, else `X-User-Id`.
/// Returns `""` for an anonymous buyer when none is required.
pub fn buyer_of<B>(req: &Request<B>, required: bool) -> Result<&str, BuyerError> {
    let from_query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("user=")));
    let raw = match from_query {
        Some(v) => Some(v),
        None => match req.headers().get("x-user-id") {
            Some(h) => Some(h.to_str().map_err(|_| BuyerError::Malformed)?),
            None => None,
        },
    };
    match raw {
        None if required => Err(BuyerError::Missing),
        None => Ok(""),
        Some(id) => check_buyer(id),
    }
}

/// Accepts only ids that are safe as a Redis hash field and in JSON without
/// escaping; percent-encoding is refused rather than decoded, so one buyer
/// has exactly one spelling.
pub fn check_buyer(id: &str) -> Result<&str, BuyerError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_BUYER_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'));
    if ok {
        Ok(id)
    } else {
        Err(BuyerError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, header: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = header {
            b = b.header("X-User-Id", h);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn buyer_comes_from_query_then_header() {
        assert_eq!(
            buyer_of(&req("/buy/ticket?a=1&user=u7", None), true),
            Ok("u7")
        );
        assert_eq!(buyer_of(&req("/buy/ticket", Some("h9")), true), Ok("h9"));
        assert_eq!(
            buyer_of(&req("/buy/ticket?user=q", Some("h")), true),
            Ok("q")
        );
    }

    #[test]
    fn buyer_is_required_only_with_a_limit() {
        assert_eq!(
            buyer_of(&req("/buy/ticket", None), true),
            Err(BuyerError::Missing)
        );
        assert_eq!(buyer_of(&req("/buy/ticket", None), false), Ok(""));
    }

    #[test]
    fn bad_buyer_ids_are_refused() {
        let long = "x".repeat(MAX_BUYER_LEN + 1);
        for bad in ["", "a b", "a%20b", "ä", "a\"b", "a{b}", long.as_str()] {
            assert_eq!(check_buyer(bad), Err(BuyerError::Malformed), "{bad:?}");
        }
        assert_eq!(
            check_buyer(&"y".repeat(MAX_BUYER_LEN)).map(str::len),
            Ok(MAX_BUYER_LEN)
        );
        assert_eq!(
            buyer_of(&req("/buy/ticket?user=", None), true),
            Err(BuyerError::Malformed)
        );
    }
}
