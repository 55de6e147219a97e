//! Many sales in one fleet (issue 28): a file of `[[sale]]`s, a flood of
//! buyers spread at random over them, and the check that every sale sold
//! exactly its total within each buyer's limit.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};

use super::http::{TestClient, client, json, send};

/// The shape of a fleet's sales and of the crowd that buys in them.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Sales in the fleet.
    pub sales: usize,
    /// Tickets per sale.
    pub total: u64,
    /// Purchases per ticket on sale.
    pub oversubscribed: usize,
    /// Tickets one buyer may hold in a sale.
    pub limit: u64,
    /// Buyers, each buying in any sale.
    pub buyers: u64,
}

/// The event of sale `i`.
pub fn event(i: usize) -> String {
    format!("train-{i:03}")
}

/// `[[sale]]` × `shape.sales`, then `tail` (nodes, redis, balancer).
pub fn config(shape: Shape, tail: &str) -> String {
    config_of(shape, 0..shape.sales, tail)
}

/// `[[sale]]` for each of `sales` (a file that a reload grows), then `tail`.
pub fn config_of(shape: Shape, sales: Range<usize>, tail: &str) -> String {
    let mut text = String::new();
    for i in sales {
        text.push_str(&format!(
            "[[sale]]\nevent = \"{}\"\ntotal = {}\nper_user_limit = {}\n\n",
            event(i),
            shape.total,
            shape.limit
        ));
    }
    text.push_str(tail);
    text
}

/// xorshift64: buyers and sales at random, from a seed the test prints
/// (never 0: xorshift stays at 0).
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A seed from the clock, printed so a failure can be replayed.
pub fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("seed {s}");
    s
}

/// One purchase's outcome: its sale, its buyer, its status and body.
pub struct Bought {
    pub sale: usize,
    pub buyer: u64,
    pub status: StatusCode,
    pub body: String,
}

/// `sales × total × oversubscribed` purchases by `workers` tasks, each a
/// random buyer in a random sale at a random target, half naming the sale
/// in the path and half in the query.
pub async fn flood(shape: Shape, targets: &[SocketAddr], workers: usize, seed: u64) -> Vec<Bought> {
    flood_in(shape, 0..shape.sales, targets, workers, seed).await
}

/// [`flood`] over the sales `sales` only (the ones a reload added).
pub async fn flood_in(
    shape: Shape,
    sales: Range<usize>,
    targets: &[SocketAddr],
    workers: usize,
    seed: u64,
) -> Vec<Bought> {
    let per_worker = sales.len() * shape.total as usize * shape.oversubscribed / workers;
    let (first, count) = (sales.start, sales.len() as u64);
    let client = client();
    let targets = Arc::new(targets.to_vec());
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, targets) = (client.clone(), targets.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut out = Vec::with_capacity(per_worker);
            for _ in 0..per_worker {
                let sale = first + (rng.next() % count) as usize;
                let buyer = rng.next() % shape.buyers;
                let to = targets[(rng.next() % targets.len() as u64) as usize];
                let path = if rng.next().is_multiple_of(2) {
                    format!("/events/{}/buy?user=b{buyer}", event(sale))
                } else {
                    format!("/buy/ticket?event={}&user=b{buyer}", event(sale))
                };
                let (status, body) = buy(&client, to, &path).await;
                out.push(Bought {
                    sale,
                    buyer,
                    status,
                    body,
                });
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("worker"));
    }
    all
}

/// A POST purchase, retried on a transport error (a purchase without a
/// key is answered once; a connection that broke before it was sent sold
/// nothing).
async fn buy(client: &TestClient, to: SocketAddr, path: &str) -> (StatusCode, String) {
    for _ in 0..5 {
        if let Ok(r) = send(client, Method::POST, to, path, &[]).await {
            return (r.status, r.body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no answer to {path} at {to}");
}

/// Every sale sold exactly its total, in distinct tickets 1..=total; no
/// buyer over the limit in any sale; every other answer a refusal that
/// sells nothing. Returns an order of each sale (its id and buyer).
pub fn check_exact(shape: Shape, all: &[Bought]) -> Vec<(String, u64)> {
    check_exact_in(shape, 0..shape.sales, all)
}

/// [`check_exact`] for the sales `sales`, which every purchase in `all`
/// is in. Returns an order of each sale (its id and buyer).
pub fn check_exact_in(shape: Shape, sales: Range<usize>, all: &[Bought]) -> Vec<(String, u64)> {
    let mut tickets: Vec<HashSet<u64>> = vec![HashSet::new(); sales.end];
    let mut held: HashMap<(usize, u64), u64> = HashMap::new();
    let mut order_of: Vec<Option<(String, u64)>> = vec![None; sales.end];
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for b in all {
        assert!(sales.contains(&b.sale), "a purchase outside {sales:?}");
        *statuses.entry(b.status.as_u16()).or_default() += 1;
        match b.status {
            StatusCode::OK => {
                let v = json(&b.body);
                let order = v["order"].as_str().expect("order id").to_string();
                assert!(
                    order.starts_with(&format!("{}:", event(b.sale))),
                    "an order id names its sale: {}",
                    b.body
                );
                for t in v["tickets"].as_array().expect("tickets") {
                    let t = t.as_u64().expect("a ticket number");
                    assert!((1..=shape.total).contains(&t), "{}", b.body);
                    assert!(
                        tickets[b.sale].insert(t),
                        "ticket {t} of {} sold twice",
                        event(b.sale)
                    );
                }
                *held.entry((b.sale, b.buyer)).or_default() += v["quantity"].as_u64().expect("q");
                order_of[b.sale].get_or_insert((order, b.buyer));
            }
            StatusCode::CONFLICT => {
                let v = json(&b.body);
                let s = v["status"].as_str().unwrap_or_default();
                assert!(matches!(s, "sold_out" | "already_bought"), "{}", b.body);
            }
            // Every unit left held by purchases in flight: sells nothing.
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(b.body.contains("busy"), "{}", b.body);
            }
            other => panic!("{other}: {}", b.body),
        }
    }
    eprintln!("answers by status: {statuses:?}");
    for (i, t) in tickets.iter().enumerate().skip(sales.start) {
        assert_eq!(
            t.len() as u64,
            shape.total,
            "{} sold {} of {}",
            event(i),
            t.len(),
            shape.total
        );
    }
    for ((sale, buyer), n) in &held {
        assert!(
            *n <= shape.limit,
            "buyer b{buyer} holds {n} in {}",
            event(*sale)
        );
    }
    order_of
        .into_iter()
        .enumerate()
        .skip(sales.start)
        .map(|(i, o)| o.unwrap_or_else(|| panic!("{} sold nothing", event(i))))
        .collect()
}
