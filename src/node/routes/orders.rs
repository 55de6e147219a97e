//! An order's life after its purchase, when the sale has a payment window:
//! `POST /orders/{id}/pay`, `POST /orders/{id}/cancel`, `GET /orders/{id}`
//! (the sweep that expires unpaid reservations is `crate::node::sweep`).
//!
//! Every node serves these for every order (the store is shared), so they
//! work through the balancer whatever the strategy. Each is one store call
//! that checks the order's state and changes it atomically; the node keeps
//! no state of its own about orders.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, HeaderValue, RETRY_AFTER, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value, json};

use super::reply::rfc3339;
use crate::node::state::Node;
use crate::node::store::{OrderAnswer, OrderOp, OrderRecord, OrderState, StoreError};
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
                && r.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-')
                }) =>
        {
            Ok(r)
        }
        Some(_) => Err(OrderRequestError::BadRef),
    }
}

/// Serves `/orders/...` on `node`.
pub async fn handle(node: &Node, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let rest = req.uri().path().trim_start_matches("/orders/");
    let (id, op) = match rest.split_once('/') {
        None => (rest, OrderOp::Get),
        Some((id, "pay")) => (id, OrderOp::Pay),
        Some((id, "cancel")) => (id, OrderOp::Cancel),
        Some(_) => return answer(StatusCode::NOT_FOUND, json!({"status": "not_found"})),
    };
    let allowed = match op {
        OrderOp::Get => Method::GET,
        _ => Method::POST,
    };
    if req.method() != allowed {
        let mut res = answer(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"status": "method_not_allowed"}),
        );
        res.headers_mut().insert(
            ALLOW,
            HeaderValue::from_static(if op == OrderOp::Get { "GET" } else { "POST" }),
        );
        return res;
    }
    match checked(req, id) {
        Ok((buyer, reference)) => call(node, op, id, buyer, reference).await,
        Err(e) => {
            node.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            answer(
                e.status(),
                json!({"status": e.label(), "reason": e.to_string()}),
            )
        }
    }
}

fn checked<'a>(
    req: &'a Request<Incoming>,
    id: &str,
) -> Result<(&'a str, &'a str), OrderRequestError> {
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
    let buyer = match buyer_of(req, false) {
        Ok(b) => b,
        Err(BuyerError::Missing | BuyerError::Malformed) => {
            return Err(OrderRequestError::BadBuyer);
        }
    };
    Ok((buyer, payment_ref(req)?))
}

async fn call(
    node: &Node,
    op: OrderOp,
    id: &str,
    buyer: &str,
    reference: &str,
) -> Response<Full<Bytes>> {
    node.stats.order_calls.fetch_add(1, Ordering::Relaxed);
    let reply = match node.store().order(op, id, buyer, reference).await {
        Ok(r) => r,
        Err(StoreError::NoSale) => {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "unavailable", "reason": "the sale is not initialised: run spike stock init"}),
            );
        }
        Err(e @ StoreError::NotReplicated { .. }) => {
            node.stats.not_replicated.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %node.name(), error = %e, "an order answer was not replicated in time; answered 503");
            let mut res = answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "unavailable", "reason": "the order, as it stands, was not replicated in time (a change asked for may have been made): send the same request again to learn where it stands"}),
            );
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return res;
        }
        Err(StoreError::NoReplicas) => {
            node.stats.not_replicated.fetch_add(1, Ordering::Relaxed);
            let mut res = answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "unavailable", "reason": "too few Redis replicas are connected to acknowledge a change; nothing was changed: try again shortly"}),
            );
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return res;
        }
        Err(e) => {
            node.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %node.name(), error = %e, "order call failed");
            let mut res = answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "unavailable", "reason": "the store did not answer in time; the same request sent again is safe"}),
            );
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return res;
        }
    };
    // A cancel (or an expiry found on the way) may have put a ticket back
    // on sale: this node reopens at once, the others at their next poll.
    node.heard(&reply.sale);
    match reply.answer {
        OrderAnswer::Done(o) => {
            let status = match op {
                OrderOp::Get => o.state().as_str(),
                OrderOp::Pay => "paid",
                OrderOp::Cancel => "cancelled",
            };
            answer(StatusCode::OK, view(status, &o))
        }
        OrderAnswer::Conflict(o) => answer(StatusCode::CONFLICT, view(o.state().as_str(), &o)),
        OrderAnswer::Final(o) if op == OrderOp::Get => answer(StatusCode::OK, view("sold", &o)),
        OrderAnswer::Final(o) => {
            let mut v = view("final", &o);
            v["reason"] = Value::from("the sale has no payment window: the order is final");
            answer(StatusCode::CONFLICT, v)
        }
        OrderAnswer::NotFound => answer(StatusCode::NOT_FOUND, json!({"status": "not_found"})),
        OrderAnswer::NotTheBuyer if buyer.is_empty() => answer(
            StatusCode::FORBIDDEN,
            json!({"status": "forbidden", "reason": "the order has a buyer: name them with ?user= or X-User-Id"}),
        ),
        OrderAnswer::NotTheBuyer => answer(
            StatusCode::FORBIDDEN,
            json!({"status": "forbidden", "reason": "the order is another buyer's"}),
        ),
    }
}

/// An order as the routes show it: times in RFC 3339.
fn view(status: &str, o: &OrderRecord) -> Value {
    let mut m = Map::new();
    m.insert("status".into(), status.into());
    m.insert("order".into(), o.id.clone().into());
    m.insert("state".into(), o.state().as_str().into());
    m.insert("buyer".into(), o.buyer.clone().into());
    m.insert("node".into(), o.node.clone().into());
    let at = |ms: u64| Value::from(rfc3339(ms).to_string());
    let created = if o.state() == OrderState::Final {
        "sold_at"
    } else {
        "reserved_at"
    };
    m.insert(created.into(), at(o.time));
    let times = [
        ("pay_by", o.pay_by),
        ("paid_at", o.paid_at),
        ("cancelled_at", o.cancelled_at),
        ("expired_at", o.expired_at),
    ];
    for (name, ms) in times {
        if let Some(ms) = ms {
            m.insert(name.into(), at(ms));
        }
    }
    if let Some(r) = &o.payment_ref {
        m.insert("payment_ref".into(), r.clone().into());
    }
    Value::Object(m)
}

fn answer(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    crate::server::json(status, Bytes::from(body.to_string()))
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
