//! The node's HTTP routes: [`handle`] reads the path and sends the request
//! to its route; each route checks the request, asks the node, and writes
//! the answer through [`reply`].
//!
//! - [`buy`]: `/buy/ticket`, the purchase (the hot path)
//! - [`purchases`]: `/purchases`, several purchases from a balancer in one
//! - [`orders`]: `/orders/{id}`, `/orders/{id}/pay`, `/orders/{id}/cancel`
//! - [`internal`]: `/sold_out`, `/holders`, `/sale`, what the balancer reads
//! - [`metrics`]: `/healthz`, `/stats`, `/metrics`

pub mod buy;
pub mod internal;
pub mod metrics;
pub mod orders;
pub mod purchases;
pub mod reply;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};

use self::reply::{Answer, fixed, json, not_allowed};
use super::sales::{Missing, Sales};
use crate::protocol::{HOLDERS_PATH, PURCHASE_PATH, PURCHASES_PATH, SALE_PATH, SOLD_OUT_PATH};

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
    if let Some(answer) = purchase_route(&sales, &req).await {
        return Ok(answer);
    }
    let named = || crate::protocol::event_from(req.uri().query());
    Ok(match req.uri().path() {
        PURCHASES_PATH => match *req.method() {
            Method::POST => purchases::serve(&sales, req).await,
            _ => not_allowed("POST"),
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
        SALE_PATH | HOLDERS_PATH | SOLD_OUT_PATH if req.method() == Method::GET => match named() {
            Ok(event) => match sales.find(event).await {
                Ok(node) => match req.uri().path() {
                    SALE_PATH => internal::sale(&node).await,
                    HOLDERS_PATH => internal::holders(&node),
                    _ => internal::sold_out(&node, &req).await,
                },
                Err(m) => missing(m),
            },
            Err(twice) => event_twice(twice),
        },
        "/healthz" | "/stats" | SALE_PATH | "/metrics" | HOLDERS_PATH | SOLD_OUT_PATH => {
            not_allowed("GET")
        }
        path if path.starts_with("/orders/") => orders::handle(&sales, &req).await,
        _ => not_found(),
    })
}

/// A purchase's route (`/buy/ticket`, or a sale's `/events/{event}/buy`)
/// and its answer; `None` for any other path. Its own function so that a
/// purchase in a batch ([`purchases`]) goes the one way a purchase alone
/// does.
pub(super) async fn purchase_route<B>(sales: &Sales, req: &Request<B>) -> Option<Answer> {
    let named = || crate::protocol::event_from(req.uri().query());
    let path = req.uri().path();
    let event = if path == PURCHASE_PATH {
        None
    } else {
        Some(crate::protocol::event_purchase(path)?)
    };
    Some(match *req.method() {
        Method::GET | Method::POST => match (event, named()) {
            (None, Ok(named)) => purchase(sales, named, req).await,
            // The path names the sale; a query that names another (or
            // names one twice) is no purchase in either.
            (Some(event), Ok(also)) if also.is_none_or(|a| a == event) => {
                purchase(sales, Some(event), req).await
            }
            (Some(_), Ok(_)) => fixed(
                StatusCode::BAD_REQUEST,
                b"{\"status\":\"bad_request\",\"reason\":\"the path names one sale and `event` in the query another: name one\"}\n",
            ),
            (_, Err(twice)) => event_twice(twice),
        },
        _ => not_allowed("GET, POST"),
    })
}

/// A purchase in the sale of `event` (`None`: the only one). The state
/// found may be dropped (idle) before the purchase asks the store for
/// units, which it then refuses: the sale's state is asked for once more,
/// so that a drop costs no buyer a 503.
async fn purchase<B>(sales: &Sales, event: Option<&str>, req: &Request<B>) -> Answer {
    let node = match sales.find(event).await {
        Ok(node) => node,
        Err(m) => return missing(m),
    };
    super::sales::pause::at("purchase", node.event()).await;
    match buy::serve(&node, req).await {
        Ok(answer) => answer,
        Err(buy::Dropped(_)) => match sales.find(event).await {
            Ok(node) => match buy::serve(&node, req).await {
                Ok(answer) | Err(buy::Dropped(answer)) => answer,
            },
            Err(m) => missing(m),
        },
    }
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::path::Path;
    use std::time::Duration;

    use crate::config::Config;
    use crate::node::Sales;
    use crate::node::sales::pause;
    use crate::node::store::Stores;

    /// A purchase that found its sale's state just before the idle drop
    /// took it (its lease request refused: the state is retired) asks for
    /// the state again and buys there: a drop costs no buyer a 503.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purchase_on_a_state_dropped_under_it_buys_on_the_next() {
        let text = "[[sale]]\nevent = \"rd-a\"\ntotal = 10\nper_user_limit = 0\n\n\
                    [[sale]]\nevent = \"rd-b\"\ntotal = 10\n\n\
                    [[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:1\"\n";
        let mut config = Config::parse(Path::new("test.toml"), text).expect("valid");
        for s in &mut config.sales {
            s.idle_after = Duration::from_millis(300);
        }
        let stores = Stores::open(&config.sales, None).await.expect("stores");
        let sales = Sales::new(&config, "n1", stores).await.expect("sales");
        let listener = crate::server::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn({
            let (sales, limits) = (sales.clone(), config.server.clone());
            async move { crate::node::run(listener, sales, &limits, std::future::pending()).await }
        });
        let gate = pause::set("purchase", "rd-a");
        let buyer = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            c.write_all(
                b"POST /events/rd-a/buy HTTP/1.1\r\nHost: n1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .expect("send");
            let mut answer = String::new();
            c.read_to_string(&mut answer).expect("answer");
            answer
        });
        tokio::time::timeout(Duration::from_secs(10), gate.reached.acquire())
            .await
            .expect("the purchase found the state")
            .expect("open")
            .forget();
        // The state the purchase holds is dropped (its drop done).
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while !sales.made().is_empty() {
            assert!(tokio::time::Instant::now() < until, "not dropped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.go.add_permits(1);
        let answer = buyer.await.expect("buyer");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        server.abort();
    }
}
