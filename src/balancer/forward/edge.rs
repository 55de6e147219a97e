//! The edge's decision for a purchase while the sale is sold out (see
//! [`crate::balancer::edge`]): answered here, or sent to a node.

use std::sync::atomic::Ordering;

use hyper::Method;

use crate::balancer::state::{Active, Shared};
use crate::node::store::Lookup;
use crate::protocol::{self, BuyerError};

/// The edge's answer to a late buyer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeAnswer {
    /// `409 sold_out`, with the node's sold-out mark.
    SoldOut,
    /// `409 already_bought` for a buyer at the limit: the body, with their
    /// last order.
    AlreadyBought(String),
    /// `409 not_open` before the sale's opening, `409 paused`, `409 closed` after its
    /// closing (the store's moments and clock as a node last gave them;
    /// the file's moments and this host's clock before): the body, and
    /// `Retry-After` in seconds.
    NotSelling(String, Option<u64>),
}

/// The answer the edge gives for a sold-out sale: `already_bought` with
/// the order for a buyer at the limit, `sold_out` for everyone else;
/// `None` (go to a node) while the edge is not answering, and for what
/// only a node may answer: a request that is not a `GET` or `POST`
/// purchase, a purchase with the client's own `Idempotency-Key`
/// (`client_key`: it may be the retry of a purchase that got an order), or
/// a buyer id or a `quantity` the node would refuse (the node says why).
/// `buyer` reads the buyer id, required or not (see
/// [`protocol::buyer_from`]), `query` the request's query (for its
/// `quantity`, see [`protocol::quantity_from`]); both are asked only
/// while the edge answers. Sold out is sold out whatever the quantity: the
/// edge answers only once a node heard the store say nothing is left (a
/// purchase of more than is left hears `too_few_left` from a node, which
/// carries no sold-out mark). Counts the answer it gives.
///
/// With `[auth]`, the buyer is the one a verified token names (`token`
/// reads it, see [`crate::auth::token_in`]), never `?user=`: a sold-out
/// request whose token names no holder (or has none) is `sold_out`, which
/// needs no identity; only a holder's token is verified (about 3 µs for
/// HS256), so the flood costs what it cost without `[auth]`.
///
/// In front of several sales (`several_sales`), the edge is per sale
/// ([`crate::balancer::sale_edges`]): `event` reads the sale the purchase
/// names (its path or its `?event=`), asked only while some sale has an
/// edge; a purchase that names none, or a sale with no edge, goes to a
/// node. There only a purchase of one ticket is answered here (every
/// sale's `max_per_purchase` allows it; a larger one goes to a node, which
/// knows its sale's), and a token must name the sale in its `aud`.
// Each part of the request the edge may read is a closure of its own, read
// only when needed (the two paths read them from different shapes).
#[allow(clippy::too_many_arguments)]
pub fn answer<'a>(
    shared: &Shared,
    active: &Active,
    is_buy: bool,
    method: &Method,
    client_key: bool,
    buyer: impl FnOnce(bool) -> Result<&'a str, BuyerError>,
    query: impl FnOnce() -> Option<&'a str>,
    token: impl FnOnce() -> Option<&'a str>,
    event: impl FnOnce() -> Result<Option<&'a str>, protocol::AmbiguousSale>,
) -> Option<EdgeAnswer> {
    let config = &active.config;
    if !is_buy {
        return None;
    }
    if config.several_sales {
        if shared.edge.sales.is_empty()
            || !config.sold_out_at_edge
            || !(*method == Method::GET || *method == Method::POST)
            || client_key
            || protocol::quantity_from(query(), 1).is_err()
        {
            return None;
        }
        // A purchase that names no sale, or more than one, is a node's to
        // refuse.
        let event = event().ok().flatten()?;
        return shared.edge.sales.with_sale(event, |sale| {
            answer_for(shared, active, sale, Some(event), buyer, token)
        });
    }
    // Read only for a purchase: every other request passes by untouched.
    let moments = shared.edge.moments_or_file(config);
    if (*method == Method::GET || *method == Method::POST)
        && config.sold_out_at_edge
        && moments.any()
    {
        // Before the opening the whole crowd is answered here, from
        // memory: nothing to look up, nobody to identify; so is a paused
        // or closed sale. (The store decides at the moment itself, in its
        // own clock; a node that gets a purchase a little early asks it.)
        // Read in the store's clock as the nodes last gave it.
        let now = shared.edge.store_time.now_ms();
        // While paused or after the closing, a purchase with its own key
        // may be the retry of one that got an order, which the store
        // still replays: the node (the store) answers that. Before the
        // opening nothing has sold, so no key has an order: answered here.
        if let Some(shut) = moments
            .shut_at(now)
            .filter(|s| matches!(s, crate::protocol::Shut::NotOpen { .. }) || !client_key)
        {
            shared
                .edge
                .not_selling_answers
                .fetch_add(1, Ordering::Relaxed);
            let (body, retry_after) = crate::protocol::not_selling_answer(shut, now);
            return Some(EdgeAnswer::NotSelling(body, retry_after));
        }
    }
    if !(is_buy && shared.edge.one_active() && config.sold_out_at_edge) {
        return None;
    }
    if !(*method == Method::GET || *method == Method::POST) || client_key {
        return None;
    }
    if protocol::quantity_from(query(), config.sale_max_per_purchase).is_err() {
        return None;
    }
    // Read without taking a reference count: on every worker at once
    // under the flood, that would bounce one counter between cores.
    shared
        .edge
        .with_current(|sale| answer_for(shared, active, sale?, None, buyer, token))
}

/// The edge's answer for `sale`, sold out: `already_bought` for a holder,
/// `sold_out` for anyone else, `None` when only a node may say (see
/// [`answer`]); `event`: the sale's, in front of several (a token must
/// name it).
fn answer_for<'a>(
    shared: &Shared,
    active: &Active,
    sale: &crate::balancer::edge::SoldOut,
    event: Option<&str>,
    buyer: impl FnOnce(bool) -> Result<&'a str, BuyerError>,
    token: impl FnOnce() -> Option<&'a str>,
) -> Option<EdgeAnswer> {
    let limited = sale.per_user_limit > 0;
    let holder = if active.config.auth.is_some() {
        // `active.auth` is `None` only if the keys failed to load:
        // then nobody is believed to hold anything here.
        match (limited, active.auth.as_deref(), token()) {
            (true, Some(auth), Some(token)) => match crate::auth::unverified_subject(token) {
                Some(claimed) => match sale.holder(claimed.as_str()) {
                    Lookup::Found(seq) => {
                        let verified = match event {
                            Some(event) => auth.verify_for(token, event),
                            None => auth.verify(token),
                        };
                        if verified.is_ok_and(|b| b.id == claimed) {
                            Lookup::Found(seq)
                        } else {
                            Lookup::Absent
                        }
                    }
                    other => other,
                },
                None => Lookup::Absent,
            },
            _ => Lookup::Absent,
        }
    } else {
        let buyer = buyer(limited).ok()?;
        if limited {
            sale.holder(buyer)
        } else {
            Lookup::Absent
        }
    };
    // Two holders share this buyer's hash: a node asks the store.
    if holder == Lookup::AskStore {
        return None;
    }
    if let Lookup::Found(seq) = holder {
        shared
            .edge
            .already_bought_answers
            .fetch_add(1, Ordering::Relaxed);
        return Some(EdgeAnswer::AlreadyBought(protocol::already_bought_body(
            &sale.order_id(seq),
        )));
    }
    shared.edge.sold_out_answers.fetch_add(1, Ordering::Relaxed);
    Some(EdgeAnswer::SoldOut)
}
