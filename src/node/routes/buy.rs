//! `GET` or `POST /buy/ticket`: the request's checks, then the purchase
//! ([`Node::buy`]), then [`render`]: the one place a [`BuyAnswer`] becomes
//! HTTP.

use hyper::header::{CONTENT_LENGTH, HeaderName, HeaderValue, RETRY_AFTER, TRANSFER_ENCODING};
use hyper::{Request, StatusCode};

use super::reply::{Answer, Rfc3339, Tickets, fixed, json, unauthorized, written};
use crate::auth::{Authority, VerifiedBuyer};
use crate::node::buy::{BuyAnswer, Key};
use crate::node::state::Node;
use crate::node::store::OrderState;
use crate::protocol::{self, BuyerError, KeyError, QuantityError, SOLD_OUT_HEADER, buyer_of};

/// On an answer that repeats the first answer to the same key.
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A purchase that found its sale's state dropped (idle) under it: its
/// lease request was refused, nothing sold. The answer it would get, a
/// 503, is for a second try that meets the same.
pub struct Dropped(pub Answer);

/// Serves a purchase on `node`.
pub async fn serve<B>(node: &Node, req: &Request<B>) -> Result<Answer, Dropped> {
    let auth = node.auth();
    let mut verified = None;
    let mut answer = match checked(node, req, auth.as_deref(), &mut verified) {
        Ok((buyer, key, quantity)) => node.buy(buyer, key, quantity).await,
        Err(refused) => refused,
    };
    if matches!(answer, BuyAnswer::Dropped) {
        // Not counted: the state is gone with its counters.
        return Err(Dropped(render(node, answer)));
    }
    answer.count(&node.stats);
    // In a fleet of several sales an order id names its sale, so that
    // its routes find it (see `routes::orders`).
    if !node.order_prefix.is_empty()
        && let BuyAnswer::Sold { order, .. } | BuyAnswer::AlreadyBought { order } = &mut answer
    {
        order.insert_str(0, &node.order_prefix);
    }
    let sold_out = matches!(answer, BuyAnswer::SoldOut);
    let mut res = render(node, answer);
    // Which sale sold out, for a balancer's edge per sale.
    if sold_out && let Some(event) = &node.event_header {
        res.headers_mut()
            .insert(protocol::SALE_EVENT_HEADER, event.clone());
    }
    Ok(res)
}

/// The buyer, the key and the quantity of a purchase, or why it is
/// refused before any work.
///
/// With `[auth]` (`auth`), the buyer is the one the token names (kept in
/// `verified`), whatever `?user=` or `X-User-Id` say.
fn checked<'a, B>(
    node: &Node,
    req: &'a Request<B>,
    auth: Option<&Authority>,
    verified: &'a mut Option<VerifiedBuyer>,
) -> Result<(&'a str, Key<'a>, u64), BuyAnswer<'a>> {
    // The body is never needed: refuse big ones by their declared size,
    // and chunked ones outright, before any work.
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > node.max_body) || req.headers().contains_key(TRANSFER_ENCODING)
    {
        return Err(BuyAnswer::TooLarge);
    }
    let buyer = match auth {
        Some(auth) => match auth.buyer(req.headers()) {
            Ok(b) => verified.insert(b).id.as_str(),
            Err(e) => return Err(BuyAnswer::Unauthorized(e)),
        },
        None => match buyer_of(req, node.per_user_limit() > 0) {
            Ok(b) => b,
            Err(BuyerError::Missing) => return Err(BuyAnswer::BuyerMissing),
            Err(BuyerError::Malformed) => return Err(BuyAnswer::BuyerMalformed),
        },
    };
    let key = match protocol::key_in(req.headers()) {
        Ok(k) => Key {
            text: k,
            made: !k.is_empty() && req.headers().contains_key(protocol::MADE_KEY),
        },
        Err(KeyError::Malformed) => return Err(BuyAnswer::KeyMalformed),
    };
    // Only in the query: a purchase has no body (see above).
    let quantity = match protocol::quantity_from(req.uri().query(), node.max_per_purchase) {
        Ok(q) => q,
        Err(QuantityError::OutOfRange(max)) => return Err(BuyAnswer::QuantityInvalid { max }),
    };
    Ok((buyer, key, quantity))
}

/// The HTTP answer to a purchase by `node` (its name is recorded with the
/// order; a `Retry-After` until the opening is counted in its store's clock).
pub fn render(node: &Node, answer: BuyAnswer<'_>) -> Answer {
    let name = node.name();
    match answer {
        BuyAnswer::Sold {
            order,
            buyer,
            sold,
            quantity,
            replayed,
            state,
            pay_by,
        } => sold_answer(
            &order,
            name,
            buyer,
            (sold, quantity),
            replayed,
            state,
            pay_by,
        ),
        BuyAnswer::SoldOut => {
            let mut res = fixed(StatusCode::CONFLICT, protocol::SOLD_OUT_BODY);
            res.headers_mut()
                .insert(SOLD_OUT_HEADER, HeaderValue::from_static("1"));
            res
        }
        BuyAnswer::AlreadyBought { order } => {
            written(StatusCode::CONFLICT, protocol::already_bought_body(&order))
        }
        // Tickets remain: no sold-out mark, so neither the node nor the
        // edge takes it for sold out.
        BuyAnswer::TooFewLeft { remaining } => json(
            StatusCode::CONFLICT,
            &TooFewLeft {
                status: "too_few_left",
                remaining,
            },
        ),
        BuyAnswer::OverLimit { may_buy } => json(
            StatusCode::CONFLICT,
            &OverLimit {
                status: "over_limit",
                may_buy,
            },
        ),
        BuyAnswer::QuantityInvalid { max } => json(
            StatusCode::BAD_REQUEST,
            &Refused {
                status: "bad_request",
                reason: &QuantityError::OutOfRange(max).to_string(),
                quantity: None,
            },
        ),
        BuyAnswer::KeyOtherQuantity { quantity } => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            &Refused {
                status: "idempotency_key_reused",
                reason: "this Idempotency-Key bought an order of another quantity: a retry asks for the quantity the first request asked",
                quantity: Some(quantity),
            },
        ),
        BuyAnswer::BuyerMissing => fixed(
            StatusCode::BAD_REQUEST,
            b"{\"status\":\"bad_request\",\"reason\":\"a buyer id is required: ?user=ID or X-User-Id\"}\n",
        ),
        BuyAnswer::BuyerMalformed => fixed(
            StatusCode::BAD_REQUEST,
            b"{\"status\":\"bad_request\",\"reason\":\"a buyer id is 1 to 64 characters of [A-Za-z0-9_.:@-]\"}\n",
        ),
        BuyAnswer::KeyMalformed => fixed(
            StatusCode::BAD_REQUEST,
            b"{\"status\":\"bad_request\",\"reason\":\"an Idempotency-Key is one header of 1 to 64 characters of [A-Za-z0-9_.:@-], optionally in double quotes\"}\n",
        ),
        BuyAnswer::TooLarge => fixed(
            StatusCode::PAYLOAD_TOO_LARGE,
            b"{\"status\":\"payload_too_large\",\"reason\":\"a purchase has no body: a declared one over max_body, or a chunked one, is refused\"}\n",
        ),
        BuyAnswer::KeyReused => fixed(
            StatusCode::UNPROCESSABLE_ENTITY,
            b"{\"status\":\"idempotency_key_reused\",\"reason\":\"this Idempotency-Key was used by another buyer\"}\n",
        ),
        BuyAnswer::Busy => retry_shortly(
            b"{\"status\":\"busy\",\"reason\":\"every ticket left is held by purchases in flight; retry\"}\n",
        ),
        BuyAnswer::StoreFailed | BuyAnswer::Dropped => fixed(
            StatusCode::SERVICE_UNAVAILABLE,
            b"{\"status\":\"unavailable\",\"reason\":\"the store did not answer in time; if a ticket was sold, the same purchase sent again (same Idempotency-Key) gets its order\"}\n",
        ),
        BuyAnswer::NotInitialised => fixed(
            StatusCode::SERVICE_UNAVAILABLE,
            b"{\"status\":\"unavailable\",\"reason\":\"the sale is not initialised: run spike stock init\"}\n",
        ),
        // Unlike the other 503s, the ticket may be the buyer's, and the
        // retry with the same key (or the per-user limit) says so.
        BuyAnswer::NotReplicated => retry_shortly(
            b"{\"status\":\"unavailable\",\"reason\":\"the sale may have been made but was not replicated in time: retry with the same Idempotency-Key to learn its order\"}\n",
        ),
        // While Redis refuses writes for want of replicas
        // (`min-replicas-to-write`): unlike the above, nothing was sold.
        BuyAnswer::NoReplicas => retry_shortly(
            b"{\"status\":\"unavailable\",\"reason\":\"too few Redis replicas are connected to acknowledge a sale; nothing was sold: try again shortly\"}\n",
        ),
        BuyAnswer::Unauthorized(e) => unauthorized(&e),
        BuyAnswer::NotSelling(shut) => {
            let (body, retry_after) =
                protocol::not_selling_answer(shut, node.store_now_ms());
            let mut res = written(StatusCode::CONFLICT, body);
            if let Some(s) = retry_after
                && let Ok(v) = HeaderValue::from_str(itoa::Buffer::new().format(s))
            {
                res.headers_mut().insert(RETRY_AFTER, v);
            }
            res
        }
    }
}

/// The 200 of a purchase (or its replay). With a payment window it is a
/// reservation, and says until when it must be paid. A replay whose order
/// went back on sale is a 409 naming the order: the key bought it, and the
/// buyer holds nothing now.
fn sold_answer(
    order: &str,
    node: &str,
    buyer: &str,
    (sold, quantity): (u64, u64),
    replayed: bool,
    state: OrderState,
    pay_by: Option<u64>,
) -> Answer {
    if state.released() {
        let mut res = json(
            StatusCode::CONFLICT,
            &Released {
                status: state.as_str(),
                order,
            },
        );
        res.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        return res;
    }
    let body = Sold {
        status: "sold",
        order,
        node,
        buyer,
        sold,
        quantity,
        tickets: Tickets(crate::node::store::tickets(sold, quantity)),
        state: (state != OrderState::Final).then(|| state.as_str()),
        pay_by: pay_by.map(Rfc3339),
    };
    let mut res = json(StatusCode::OK, &body);
    if replayed {
        res.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    res
}

/// The body of a 200 to a purchase.
#[derive(serde::Serialize)]
struct Sold<'a> {
    status: &'static str,
    order: &'a str,
    node: &'a str,
    buyer: &'a str,
    sold: u64,
    quantity: u64,
    tickets: Tickets,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pay_by: Option<Rfc3339>,
}

/// The body of the 409 to a purchase of more tickets than are left.
#[derive(serde::Serialize)]
struct TooFewLeft {
    status: &'static str,
    remaining: u64,
}

/// The body of the 409 to a purchase that would take its buyer over the
/// limit.
#[derive(serde::Serialize)]
struct OverLimit {
    status: &'static str,
    may_buy: u64,
}

/// A refusal with its reason (and, for a key's other quantity, the
/// quantity it bought).
#[derive(serde::Serialize)]
struct Refused<'a> {
    status: &'static str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    quantity: Option<u64>,
}

/// The body of the 409 to a replay whose order went back on sale.
#[derive(serde::Serialize)]
struct Released<'a> {
    status: &'static str,
    order: &'a str,
}

/// A 503 with `body` and `Retry-After: 1`: what it waits for (a unit, the
/// replicas) may be there in a moment.
fn retry_shortly(body: &'static [u8]) -> Answer {
    let mut res = fixed(StatusCode::SERVICE_UNAVAILABLE, body);
    res.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(res: Answer) -> String {
        use http_body_util::BodyExt;
        let bytes = futures_body(res.into_body().collect());
        String::from_utf8(bytes).unwrap()
    }

    fn futures_body(
        f: impl std::future::Future<
            Output = Result<http_body_util::Collected<bytes::Bytes>, std::convert::Infallible>,
        >,
    ) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(f).unwrap().to_bytes().to_vec()
    }

    /// The bytes the purchase answers were written as, by hand, before
    /// they became structs (and a newline, as every JSON body ends).
    #[test]
    fn sold_bodies_keep_their_bytes() {
        let res = sold_answer("17-3", "n1", "al", (3, 1), false, OrderState::Final, None);
        assert_eq!(
            body(res),
            "{\"status\":\"sold\",\"order\":\"17-3\",\"node\":\"n1\",\"buyer\":\"al\",\"sold\":3,\"quantity\":1,\"tickets\":[3]}\n"
        );
        let res = sold_answer("17-7", "n1", "al", (7, 3), false, OrderState::Final, None);
        assert_eq!(
            body(res),
            "{\"status\":\"sold\",\"order\":\"17-7\",\"node\":\"n1\",\"buyer\":\"al\",\"sold\":7,\"quantity\":3,\"tickets\":[5,6,7]}\n"
        );
        let res = sold_answer(
            "17-3",
            "n1",
            "",
            (3, 1),
            true,
            OrderState::Reserved,
            Some(1732838500123),
        );
        assert_eq!(res.headers()[&IDEMPOTENT_REPLAYED], "true");
        assert_eq!(
            body(res),
            concat!(
                r#"{"status":"sold","order":"17-3","node":"n1","buyer":"","sold":3,"quantity":1,"tickets":[3],"state":"reserved","pay_by":"2024-11-29T00:01:40.123Z"}"#,
                "\n"
            )
        );
        let res = sold_answer(
            "17-3",
            "n1",
            "al",
            (3, 1),
            true,
            OrderState::Cancelled,
            None,
        );
        assert_eq!(res.status(), StatusCode::CONFLICT);
        assert_eq!(body(res), "{\"status\":\"cancelled\",\"order\":\"17-3\"}\n");
    }
}
