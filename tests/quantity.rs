//! Several tickets in one purchase (issue 28): `?quantity=N` on
//! `/buy/ticket`, up to the sale's `max_per_purchase` and within the
//! buyer's `per_user_limit`. All or nothing in one store step: one order
//! holding N tickets, reserved, paid, cancelled or expired together, N
//! returned; a sale with fewer than N left answers 409 with how many
//! remain and sells nothing. Real redis-server processes and the embedded
//! store, nodes in this process; the edge through a real `spike up`.

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::http::{Reply, TestClient, client, json, send};
use common::redis::RedisServer;
use common::sale::InProcessSale;
use hyper::{Method, StatusCode};
use spike::node::Store;

/// A sale over `nodes` nodes in this process.
fn file(
    total: u64,
    limit: u64,
    max: u64,
    window: Option<&str>,
    redis: Option<&RedisServer>,
    nodes: usize,
) -> String {
    let mut t = format!(
        "[sale]\nevent = \"qty\"\ntotal = {total}\nper_user_limit = {limit}\nmax_per_purchase = {max}\n"
    );
    if let Some(w) = window {
        t.push_str(&format!("pay_within = \"{w}\"\n"));
    }
    if let Some(r) = redis {
        // A loaded machine must not turn a sale into a 503 (its buyer would
        // hold tickets no 200 names; the key's retry below finds them, but
        // the test is about quantities, not lost replies).
        t.push_str(&format!(
            "[redis]\nurl = \"{}\"\ntimeout = \"5s\"\n",
            r.url()
        ));
    }
    for i in 0..nodes {
        t.push_str(&format!(
            "[[node]]\nname = \"n{}\"\nlisten = \"127.0.0.1:{}\"\n",
            i + 1,
            common::free_port()
        ));
    }
    t
}

/// `quantity` tickets for `buyer` at `at`, under `key` ('' for none).
async fn buy(c: &TestClient, at: SocketAddr, buyer: &str, quantity: &str, key: &str) -> Reply {
    let path = format!("/buy/ticket?user={buyer}&quantity={quantity}");
    let headers: Vec<(&str, &str)> = if key.is_empty() {
        Vec::new()
    } else {
        vec![("Idempotency-Key", key)]
    };
    send(c, Method::POST, at, &path, &headers)
        .await
        .unwrap_or_else(|e| panic!("buy {quantity} for {buyer}: {e}"))
}

/// One purchase of the storm: who asked for how many, and the last answer
/// (a 503 is sent again with the same key, whose replay names the order).
struct Bought {
    buyer: String,
    quantity: u64,
    reply: Reply,
}

/// Purchases of 1 to 4 tickets (a fixed pseudo-random mix) by distinct
/// buyers `{prefix}{i}`, spread over `nodes`, 64 at a time, until they ask
/// for `oversubscribed` times `total` tickets.
async fn storm(
    c: &TestClient,
    nodes: &[SocketAddr],
    total: u64,
    oversubscribed: u64,
    prefix: &str,
) -> Vec<Bought> {
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    let (mut asked, mut x) = (0u64, 12345u64);
    let mut i = 0usize;
    while asked < oversubscribed * total {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let quantity = 1 + (x >> 33) % 4;
        asked += quantity;
        let (c, gate, at) = (c.clone(), gate.clone(), nodes[i % nodes.len()]);
        let buyer = format!("{prefix}{i}");
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("gate");
            let key = format!("k-{buyer}");
            let mut reply = buy(&c, at, &buyer, &quantity.to_string(), &key).await;
            for _ in 0..20 {
                if reply.status != StatusCode::SERVICE_UNAVAILABLE {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                reply = buy(&c, at, &buyer, &quantity.to_string(), &key).await;
            }
            Bought {
                buyer,
                quantity,
                reply,
            }
        }));
        i += 1;
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("buyer"));
    }
    out
}

/// An order a 200 named: its id, buyer, and the tickets it holds.
#[derive(Debug, Clone)]
struct Held {
    order: String,
    buyer: String,
    tickets: Vec<u64>,
}

/// The tickets of a purchase's 200, checked against what was asked: as
/// many as asked, numbered consecutively up to `sold`.
fn tickets_of(body: &serde_json::Value, asked: u64, raw: &str) -> Vec<u64> {
    assert_eq!(body["quantity"], asked, "{raw}");
    let tickets: Vec<u64> = body["tickets"]
        .as_array()
        .unwrap_or_else(|| panic!("no tickets in {raw}"))
        .iter()
        .map(|t| t.as_u64().expect("a ticket number"))
        .collect();
    assert_eq!(tickets.len() as u64, asked, "{raw}");
    let last = body["sold"].as_u64().expect("sold");
    let want: Vec<u64> = (last + 1 - asked..=last).collect();
    assert_eq!(tickets, want, "{raw}");
    tickets
}

/// Every answer of a storm: a 200 sells exactly what was asked, with
/// tickets nobody else got; a 409 is `sold_out`, or `too_few_left` with
/// fewer left than asked. Returns the orders the 200s named.
fn check_answers(bought: &[Bought], seen: &mut HashSet<u64>) -> Vec<Held> {
    let mut held = Vec::new();
    for b in bought {
        let r = &b.reply;
        let v = json(&r.body);
        match r.status {
            StatusCode::OK => {
                assert_eq!(v["status"], "sold", "{}", r.body);
                assert_eq!(v["buyer"], b.buyer.as_str(), "{}", r.body);
                let tickets = tickets_of(&v, b.quantity, &r.body);
                for t in &tickets {
                    assert!(seen.insert(*t), "ticket {t} sold twice: {}", r.body);
                }
                held.push(Held {
                    order: v["order"].as_str().expect("order").to_string(),
                    buyer: b.buyer.clone(),
                    tickets,
                });
            }
            StatusCode::CONFLICT => match v["status"].as_str() {
                Some("sold_out") => {}
                Some("too_few_left") => {
                    let left = v["remaining"].as_u64().expect("remaining");
                    assert!(
                        left < b.quantity && left > 0,
                        "{} for {}",
                        r.body,
                        b.quantity
                    );
                    assert!(
                        r.headers.get("spike-sold-out").is_none(),
                        "tickets remain: not sold out: {}",
                        r.body
                    );
                }
                _ => panic!("unexpected 409: {}", r.body),
            },
            s => panic!("unexpected {s}: {}", r.body),
        }
    }
    held
}

/// What the store says of `h`'s order: its state, after checking that it
/// holds exactly the tickets its 200 said.
async fn order_state(c: &TestClient, at: SocketAddr, h: &Held) -> String {
    let r = send(
        c,
        Method::GET,
        at,
        &format!("/orders/{}?user={}", h.order, h.buyer),
        &[],
    )
    .await
    .expect("order");
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = json(&r.body);
    assert_eq!(v["quantity"], h.tickets.len(), "{}", r.body);
    let tickets: Vec<u64> = v["tickets"]
        .as_array()
        .unwrap_or_else(|| panic!("no tickets in {}", r.body))
        .iter()
        .map(|t| t.as_u64().expect("number"))
        .collect();
    assert_eq!(tickets, h.tickets, "{}", r.body);
    v["state"].as_str().expect("state").to_string()
}

fn count(held: &[Held]) -> u64 {
    held.iter().map(|h| h.tickets.len() as u64).sum()
}

async fn audit_clean(store: &Store) {
    let audit = store.audit().await.expect("audit");
    assert!(
        audit.problems().is_empty(),
        "audit: {:?}\n{:?}",
        audit.problems(),
        audit.snapshot
    );
}

/// The issue's figure: purchases of 1 to 4 tickets, 20× oversubscribed,
/// at three nodes at once. The 200s add up to the total exactly, no answer
/// sells part of what it asked, every order holds the tickets its 200
/// said, and the audit (which counts tickets, not orders) passes.
async fn mixed_quantities_sell_exactly_the_total(redis: Option<&RedisServer>) {
    const TOTAL: u64 = 100;
    let sale = InProcessSale::start(&file(TOTAL, 4, 4, None, redis, 3)).await;
    let c = client();
    let nodes = sale.addrs();
    let bought = storm(&c, &nodes, TOTAL, 20, "b").await;
    let mut seen = HashSet::new();
    let held = check_answers(&bought, &mut seen);
    assert_eq!(count(&held), TOTAL, "the 200s must add up to the total");
    for (i, h) in held.iter().enumerate() {
        assert_eq!(order_state(&c, nodes[i % nodes.len()], h).await, "sold");
    }
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert_eq!((snap.sold, snap.tickets_held), (TOTAL, TOTAL));
    assert_eq!(snap.orders, held.len() as u64, "one order per 200");
    audit_clean(&sale.store).await;
    sale.stop().await;
}

against_both_stores!(mixed_quantities_sell_exactly_the_total);

/// With a payment window: the mixed storm reserves the whole sale; a
/// third of the orders are paid, a third cancelled, a third left to
/// expire, each returning exactly its quantity; then a second storm
/// resells exactly what came back.
async fn reservations_return_their_quantity(redis: Option<&RedisServer>) {
    const TOTAL: u64 = 60;
    let sale = InProcessSale::start(&file(TOTAL, 4, 4, Some("4s"), redis, 3)).await;
    let c = client();
    let nodes = sale.addrs();
    let mut seen = HashSet::new();
    let held = check_answers(&storm(&c, &nodes, TOTAL, 20, "r").await, &mut seen);
    assert_eq!(count(&held), TOTAL, "the reservations add up to the total");

    // Pay a third, cancel a third, at once, over every node.
    let mut tasks = Vec::new();
    for (i, h) in held.iter().enumerate() {
        let op = match i % 3 {
            0 => "pay",
            1 => "cancel",
            _ => continue,
        };
        let (c, h, at) = (c.clone(), h.clone(), nodes[i % nodes.len()]);
        tasks.push(tokio::spawn(async move {
            let r = send(
                &c,
                Method::POST,
                at,
                &format!("/orders/{}/{op}?user={}", h.order, h.buyer),
                &[],
            )
            .await
            .expect("order call");
            let v = json(&r.body);
            // (On a machine slow enough for the window to pass first, the
            // order expired: the states below account for it.)
            assert!(
                r.status == StatusCode::OK
                    || (r.status == StatusCode::CONFLICT && v["state"] == "expired"),
                "{op}: {}",
                r.body
            );
            assert_eq!(v["quantity"], h.tickets.len(), "{}", r.body);
        }));
    }
    for t in tasks {
        t.await.expect("order task");
    }
    // Whatever the clock did meanwhile, the store holds exactly the
    // tickets of the orders still reserved or paid.
    let mut states: HashMap<String, Vec<&Held>> = HashMap::new();
    for (i, h) in held.iter().enumerate() {
        let s = order_state(&c, nodes[i % nodes.len()], h).await;
        states.entry(s).or_default().push(h);
    }
    let tickets_in = |s: &str, states: &HashMap<String, Vec<&Held>>| -> u64 {
        states
            .get(s)
            .map_or(0, |v| v.iter().map(|h| h.tickets.len() as u64).sum())
    };
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert_eq!(
        snap.sold,
        tickets_in("reserved", &states) + tickets_in("paid", &states),
        "{states:?}"
    );
    assert_eq!(
        snap.released,
        tickets_in("cancelled", &states) + tickets_in("expired", &states)
    );
    let paid = tickets_in("paid", &states);
    assert!(
        paid > 0 && tickets_in("cancelled", &states) > 0,
        "{states:?}"
    );

    // The rest expire: each returns its quantity.
    common::wait_for(
        "the unpaid reservations to expire",
        Duration::from_secs(15),
        async || sale.store.snapshot().await.expect("snapshot").reserved == 0,
    )
    .await;
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert_eq!(snap.sold, paid, "only the paid tickets are held");
    assert_eq!(snap.released, TOTAL - paid);
    for (i, h) in held.iter().enumerate() {
        let s = order_state(&c, nodes[i % nodes.len()], h).await;
        assert!(
            matches!(s.as_str(), "paid" | "cancelled" | "expired"),
            "{s}"
        );
    }

    // Resold: the second storm's 200s add up to what came back, exactly.
    // (A node answering sold_out from memory hears of the returned
    // tickets within a quarter of a second.)
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = check_answers(&storm(&c, &nodes, TOTAL, 20, "s").await, &mut seen);
    assert_eq!(count(&again), TOTAL - paid, "resold exactly what came back");
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert_eq!(snap.sold, TOTAL);
    audit_clean(&sale.store).await;
    sale.stop().await;
}

against_both_stores!(reservations_return_their_quantity);

/// One buyer at a time, every rule of a quantity: out-of-range and
/// malformed quantities are 400s; a key's replay is the same N-ticket
/// order, the key with another quantity a 422; the limit counts tickets;
/// fewer left than asked is `too_few_left` with how many remain, selling
/// nothing.
async fn a_purchase_is_all_or_nothing(redis: Option<&RedisServer>) {
    let sale = InProcessSale::start(&file(10, 3, 3, None, redis, 1)).await;
    let c = client();
    let at = sale.addrs()[0];
    for bad in ["0", "4", "-1", "x", "", "1.5", "99999999999999999999999"] {
        let r = buy(&c, at, "z", bad, "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
        assert!(r.body.contains("quantity"), "{}", r.body);
    }
    let sold = |r: &Reply, n: u64| -> Vec<u64> {
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        tickets_of(&json(&r.body), n, &r.body)
    };
    let conflict = |r: &Reply, status: &str| -> serde_json::Value {
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
        let v = json(&r.body);
        assert_eq!(v["status"], status, "{}", r.body);
        v
    };

    let first = buy(&c, at, "a", "3", "ka").await;
    assert_eq!(sold(&first, 3), [1, 2, 3]);
    let replay = buy(&c, at, "a", "3", "ka").await;
    assert_eq!(sold(&replay, 3), [1, 2, 3]);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(json(&replay.body)["order"], json(&first.body)["order"]);
    let other = buy(&c, at, "a", "1", "ka").await;
    assert_eq!(
        other.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        other.body
    );
    assert!(other.body.contains("quantity"), "{}", other.body);

    // No quantity is one ticket, as before.
    let one = buy(&c, at, "b", "1", "").await;
    assert_eq!(sold(&one, 1), [4]);
    let plain = send(&c, Method::GET, at, "/buy/ticket?user=b", &[])
        .await
        .expect("buy");
    assert_eq!(sold(&plain, 1), [5]);
    let v = conflict(&buy(&c, at, "b", "2", "").await, "over_limit");
    assert_eq!(v["may_buy"], 1, "b holds 2 of 3");
    assert_eq!(sold(&buy(&c, at, "b", "1", "").await, 1), [6]);
    conflict(&buy(&c, at, "b", "1", "").await, "already_bought");

    assert_eq!(sold(&buy(&c, at, "c", "3", "").await, 3), [7, 8, 9]);
    for n in ["3", "2"] {
        let r = buy(&c, at, "d", n, "").await;
        let v = conflict(&r, "too_few_left");
        assert_eq!(v["remaining"], 1, "{}", r.body);
        assert!(r.headers.get("spike-sold-out").is_none(), "{}", r.body);
    }
    assert_eq!(sale.store.snapshot().await.expect("snapshot").sold, 9);
    assert_eq!(sold(&buy(&c, at, "d", "1", "").await, 1), [10]);
    for n in ["1", "3"] {
        conflict(&buy(&c, at, "e", n, "").await, "sold_out");
    }
    // The order read back says what it holds.
    let id = json(&first.body)["order"].as_str().expect("id").to_string();
    let r = send(&c, Method::GET, at, &format!("/orders/{id}?user=a"), &[])
        .await
        .expect("order");
    let v = json(&r.body);
    assert_eq!(
        (v["quantity"].clone(), v["tickets"].clone()),
        (3.into(), serde_json::json!([1, 2, 3]))
    );
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert_eq!((snap.sold, snap.orders, snap.most_by_one_buyer), (10, 6, 3));
    audit_clean(&sale.store).await;
    sale.stop().await;
}

against_both_stores!(a_purchase_is_all_or_nothing);

/// Through `spike up`'s balancer: fewer tickets left than asked is never
/// `sold_out`, neither from a node nor from the edge, however often it is
/// asked; once the last ticket sells, the edge answers `sold_out` for any
/// quantity, and a quantity a node would refuse still goes to a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_says_sold_out_only_when_nothing_is_left() {
    let (text, ports) = common::up::up_config(5, 2, None);
    let text = text.replace(
        "per_user_limit = 1\n",
        "per_user_limit = 4\nmax_per_purchase = 4\n",
    );
    let (mut up, path) = common::up::start_up(&text, &ports);
    let c = client();
    let at = ports.balancer;
    let r = buy(&c, at, "a", "4", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for round in 0..3 {
        for i in 0..10 {
            let r = buy(&c, at, &format!("b{round}x{i}"), "2", "").await;
            assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
            assert_eq!(json(&r.body)["status"], "too_few_left", "{}", r.body);
            assert!(r.headers.get("spike-sold-out").is_none(), "{}", r.body);
        }
        // Time for the edge's poll to see the sale, were it to think it over.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let r = buy(&c, at, "c", "1", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    common::wait_for(
        "the edge to answer sold out",
        Duration::from_secs(10),
        async || {
            let r = buy(&c, at, "d", "2", "").await;
            assert_eq!(json(&r.body)["status"], "sold_out", "{}", r.body);
            let (_, status) = common::http::get(&c, ports.admin, "/status")
                .await
                .expect("status");
            json(&status)["edge"]["answering"] == true
        },
    )
    .await;
    for q in ["1", "4"] {
        let r = buy(&c, at, "e", q, "").await;
        assert_eq!(json(&r.body)["status"], "sold_out", "{}", r.body);
    }
    for bad in ["5", "x"] {
        let r = buy(&c, at, "e", bad, "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
    }
    up.stop("TERM", Duration::from_secs(10));
    common::spike::remove_config(&path);
}
