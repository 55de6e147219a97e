//! An order's life after its purchase, when the sale has a payment window:
//! `POST /orders/{id}/pay`, `POST /orders/{id}/cancel`, `GET /orders/{id}`
//! (the sweep that expires unpaid reservations is `crate::node::sweep`).
//!
//! Every node serves these for every order (the store is shared), so they
//! work through the balancer whatever the strategy. Each is one store call
//! that checks the order's state and changes it atomically; the node keeps
//! no state of its own about orders.

use std::sync::atomic::Ordering;

use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, HeaderValue, RETRY_AFTER, TRANSFER_ENCODING};
use hyper::{Method, Request, StatusCode};

use super::reply::{Answer, Rfc3339, Tickets, fixed, json, not_allowed, unauthorized};
use crate::auth::{Asker, AuthError, Authority};
use crate::node::sales::Sales;
use crate::node::state::Node;
use crate::node::store::{ANY_BUYER, OrderAnswer, OrderOp, OrderRecord, OrderState, StoreError};
use crate::protocol::{BuyerError, buyer_of};

/// Longest payment reference accepted (it is stored with the order).
pub const MAX_REF_LEN: usize = 64;

/// Why an order request was refused before reaching the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OrderRequestError {
    /// Not an order id spike hands out (`epoch-number`).
    #[error("an order id is two numbers joined by '-', as the purchase answered it")]
    BadId,
    /// The payment reference has characters that cannot be stored as is.
    #[error(
        "a payment reference is 1 to 64 characters of letters, digits, '_', '.', ':', '@' or '-'"
    )]
    BadRef,
    /// The buyer id is malformed.
    #[error("a buyer id is 1 to 64 characters of letters, digits, '_', '.', ':', '@' or '-'")]
    BadBuyer,
    /// A body was sent; these routes take none.
    #[error("these routes take no body (the payment reference goes in ?ref=)")]
    Body,
}

impl OrderRequestError {
    /// The one status each refusal gets.
    pub fn status(self) -> StatusCode {
        match self {
            OrderRequestError::Body => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The `status` field of the JSON answer, naming the same thing as
    /// the HTTP status.
    pub fn label(self) -> &'static str {
        match self {
            OrderRequestError::Body => "payload_too_large",
            _ => "bad_request",
        }
    }
}

/// An order id as spike makes them: the epoch, '-', the ticket's number.
fn valid_id(id: &str) -> bool {
    let Some((epoch, seq)) = id.split_once('-') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    digits(epoch) && digits(seq)
}

fn query_value<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
    })
}

fn payment_ref(req: &Request<Incoming>) -> Result<&str, OrderRequestError> {
    match query_value(req, "ref") {
        None => Ok(""),
        Some(r)
            if !r.is_empty()
                && r.len() <= MAX_REF_LEN
                && r.bytes().all(crate::protocol::is_id_byte) =>
        {
            Ok(r)
        }
        Some(_) => Err(OrderRequestError::BadRef),
    }
}

/// Serves `/orders/...` on the node's `sales`: the order's sale is the one
/// its id names (`EVENT:EPOCH-SEQ`, as a fleet of several sales answers
/// them), else the only one.
pub async fn handle(sales: &Sales, req: &Request<Incoming>) -> Answer {
    let rest = req.uri().path().trim_start_matches("/orders/");
    let (id, op) = match rest.split_once('/') {
        None => (rest, OrderOp::Get),
        Some((id, "pay")) => (id, OrderOp::Pay),
        Some((id, "cancel")) => (id, OrderOp::Cancel),
        Some(_) => {
            return fixed(
                StatusCode::NOT_FOUND,
                b"{\"status\":\"not_found\",\"reason\":\"an order's routes are /orders/{id}, /orders/{id}/pay and /orders/{id}/cancel\"}\n",
            );
        }
    };
    let allowed = match op {
        OrderOp::Get => Method::GET,
        _ => Method::POST,
    };
    if req.method() != allowed {
        return not_allowed(if op == OrderOp::Get { "GET" } else { "POST" });
    }
    // The event is what stands before the id's last ':' (no event name
    // has one).
    let (node, id) = match id.rsplit_once(':') {
        Some((event, bare)) => (sales.get(event).await, bare),
        None => (sales.find(None).await, id),
    };
    let node = match node {
        Ok(node) => node,
        Err(m) => return super::missing(m),
    };
    let node = &*node;
    let auth = node.auth();
    let mut asker = None;
    match checked(req, id, op, auth.as_deref(), &mut asker) {
        Ok(Ok((buyer, reference))) => call(node, op, id, buyer, reference).await,
        Ok(Err(e)) => {
            node.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            unauthorized(&e)
        }
        Err(e) => {
            node.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            json(
                e.status(),
                &Refusal {
                    reason: &e.to_string(),
                    status: e.label(),
                },
            )
        }
    }
}

/// The asker and the payment reference of an order request, or why it is
/// refused: malformed (the outer error), or, with `[auth]`, not signed by
/// the payment service (to pay) nor carrying a buyer token (to read or
/// cancel) that verifies (the inner one). The payment service asks as
/// [`ANY_BUYER`]; `asker` keeps a verified buyer's id.
fn checked<'a>(
    req: &'a Request<Incoming>,
    id: &str,
    op: OrderOp,
    auth: Option<&Authority>,
    asker: &'a mut Option<String>,
) -> Result<Result<(&'a str, &'a str), AuthError>, OrderRequestError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > 0) || req.headers().contains_key(TRANSFER_ENCODING) {
        return Err(OrderRequestError::Body);
    }
    if !valid_id(id) {
        return Err(OrderRequestError::BadId);
    }
    let reference = payment_ref(req)?;
    let Some(auth) = auth else {
        let buyer = match buyer_of(req, false) {
            Ok(b) => b,
            Err(BuyerError::Missing | BuyerError::Malformed) => {
                return Err(OrderRequestError::BadBuyer);
            }
        };
        return Ok(Ok((buyer, reference)));
    };
    // What the payment service signed: the request line's method and
    // target, as sent (the balancer passes the target unchanged).
    let target = format!(
        "{} {}",
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str())
    );
    Ok(
        match auth.asker(req.headers(), &target, op == OrderOp::Pay) {
            Ok(Asker::PaymentService) => Ok((ANY_BUYER, reference)),
            Ok(Asker::Buyer(id)) => Ok((asker.insert(id).as_str(), reference)),
            Err(e) => Err(e),
        },
    )
}

async fn call(node: &Node, op: OrderOp, id: &str, buyer: &str, reference: &str) -> Answer {
    node.stats.order_calls.fetch_add(1, Ordering::Relaxed);
    let reply = match node.store().order(op, id, buyer, reference).await {
        Ok(r) => r,
        Err(StoreError::NoSale) => {
            return fixed(
                StatusCode::SERVICE_UNAVAILABLE,
                b"{\"reason\":\"the sale is not initialised: run spike stock init\",\"status\":\"unavailable\"}\n",
            );
        }
        Err(e @ StoreError::NotReplicated { .. }) => {
            node.stats.not_replicated.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %node.name(), error = %e, "an order answer was not replicated in time; answered 503");
            let mut res = fixed(
                StatusCode::SERVICE_UNAVAILABLE,
                b"{\"reason\":\"the order, as it stands, was not replicated in time (a change asked for may have been made): send the same request again to learn where it stands\",\"status\":\"unavailable\"}\n",
            );
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return res;
        }
        Err(StoreError::NoReplicas) => {
            node.stats.not_replicated.fetch_add(1, Ordering::Relaxed);
            let mut res = fixed(
                StatusCode::SERVICE_UNAVAILABLE,
                b"{\"reason\":\"too few Redis replicas are connected to acknowledge a change; nothing was changed: try again shortly\",\"status\":\"unavailable\"}\n",
            );
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return res;
        }
        Err(e) => {
            node.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %node.name(), error = %e, "order call failed");
            let mut res = fixed(
                StatusCode::SERVICE_UNAVAILABLE,
                b"{\"reason\":\"the store did not answer in time; the same request sent again is safe\",\"status\":\"unavailable\"}\n",
            );
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return res;
        }
    };
    // A cancel (or an expiry found on the way) may have put a ticket back
    // on sale: this node reopens at once, the others at their next poll.
    node.heard(&reply.sale);
    let mut answer = reply.answer;
    if !node.order_prefix.is_empty()
        && let OrderAnswer::Done(o) | OrderAnswer::Conflict(o) | OrderAnswer::Final(o) = &mut answer
    {
        o.id.insert_str(0, &node.order_prefix);
    }
    match answer {
        OrderAnswer::Done(o) => {
            let status = match op {
                OrderOp::Get => o.state().as_str(),
                OrderOp::Pay => "paid",
                OrderOp::Cancel => "cancelled",
            };
            json(StatusCode::OK, &view(status, &o))
        }
        OrderAnswer::Conflict(o) => json(StatusCode::CONFLICT, &view(o.state().as_str(), &o)),
        OrderAnswer::Final(o) if op == OrderOp::Get => json(StatusCode::OK, &view("sold", &o)),
        OrderAnswer::Final(o) => {
            let mut v = view("final", &o);
            v.reason = Some("the sale has no payment window: the order is final");
            json(StatusCode::CONFLICT, &v)
        }
        OrderAnswer::NotFound => fixed(StatusCode::NOT_FOUND, b"{\"status\":\"not_found\",\"reason\":\"no such order in this sale\"}\n"),
        OrderAnswer::NotTheBuyer if buyer.is_empty() => fixed(
            StatusCode::FORBIDDEN,
            b"{\"reason\":\"the order has a buyer: name them with ?user= or X-User-Id\",\"status\":\"forbidden\"}\n",
        ),
        OrderAnswer::NotTheBuyer => fixed(
            StatusCode::FORBIDDEN,
            b"{\"reason\":\"the order is another buyer's\",\"status\":\"forbidden\"}\n",
        ),
    }
}

/// A refusal before the store: its reason and its `status`. (The fields of
/// the order routes' bodies are in alphabetical order, as they were when
/// written through `serde_json::Value`, so the bytes stay the same.)
#[derive(serde::Serialize)]
struct Refusal<'a> {
    reason: &'a str,
    status: &'a str,
}

/// An order as the routes show it: times in RFC 3339, fields in
/// alphabetical order (see [`Refusal`]).
#[derive(serde::Serialize)]
struct OrderView<'a> {
    buyer: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cancelled_at: Option<Rfc3339>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expired_at: Option<Rfc3339>,
    node: &'a str,
    order: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    paid_at: Option<Rfc3339>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pay_by: Option<Rfc3339>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payment_ref: Option<&'a str>,
    quantity: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reserved_at: Option<Rfc3339>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sold_at: Option<Rfc3339>,
    state: &'static str,
    status: &'a str,
    tickets: Tickets,
}

/// `o` as the routes show it, with `status`.
fn view<'a>(status: &'a str, o: &'a OrderRecord) -> OrderView<'a> {
    let created = Some(Rfc3339(o.time));
    let is_final = o.state() == OrderState::Final;
    OrderView {
        buyer: &o.buyer,
        cancelled_at: o.cancelled_at.map(Rfc3339),
        expired_at: o.expired_at.map(Rfc3339),
        node: &o.node,
        order: &o.id,
        paid_at: o.paid_at.map(Rfc3339),
        pay_by: o.pay_by.map(Rfc3339),
        payment_ref: o.payment_ref.as_deref(),
        quantity: o.quantity(),
        reason: None,
        reserved_at: created.filter(|_| !is_final),
        sold_at: created.filter(|_| is_final),
        state: o.state().as_str(),
        status,
        tickets: Tickets(o.tickets()),
    }
}

#[cfg(test)]
mod tests {
    use super::valid_id;

    #[test]
    fn order_ids_are_two_numbers() {
        for ok in ["1732838400123-1", "1-99999"] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-1-1",
            "1--1",
            "1 -1",
            "123456789012345678901-1",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}

#[cfg(test)]
mod body_tests {
    use super::*;

    /// The bytes the routes wrote through `serde_json::Value` before the
    /// bodies became structs: the same fields, in the same order.
    #[test]
    fn order_bodies_keep_their_bytes() {
        let mut o: OrderRecord = serde_json::from_str(
            r#"{"id":"17-3","buyer":"al","node":"n1","time":1732838400123,"state":"paid","pay_by":1732838500123,"paid_at":1732838450000,"cancelled_at":1,"expired_at":2,"payment_ref":"r-1"}"#,
        )
        .unwrap();
        let mut v = view("final", &o);
        v.reason = Some("the sale has no payment window: the order is final");
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"buyer":"al","cancelled_at":"1970-01-01T00:00:00.001Z","expired_at":"1970-01-01T00:00:00.002Z","node":"n1","order":"17-3","paid_at":"2024-11-29T00:00:50.000Z","pay_by":"2024-11-29T00:01:40.123Z","payment_ref":"r-1","quantity":1,"reason":"the sale has no payment window: the order is final","reserved_at":"2024-11-29T00:00:00.123Z","state":"paid","status":"final","tickets":[3]}"#
        );
        o.state = None;
        o.pay_by = None;
        o.paid_at = None;
        o.cancelled_at = None;
        o.expired_at = None;
        o.payment_ref = None;
        assert_eq!(
            serde_json::to_string(&view("sold", &o)).unwrap(),
            r#"{"buyer":"al","node":"n1","order":"17-3","quantity":1,"sold_at":"2024-11-29T00:00:00.123Z","state":"sold","status":"sold","tickets":[3]}"#
        );
        let e = OrderRequestError::BadRef;
        let refusal = Refusal {
            reason: &e.to_string(),
            status: e.label(),
        };
        assert_eq!(
            serde_json::to_string(&refusal).unwrap(),
            format!(r#"{{"reason":"{e}","status":"bad_request"}}"#)
        );
    }
}
