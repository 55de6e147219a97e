//! Reservations (issue 12): with `[sale] pay_within`, a purchase holds a
//! ticket until its deadline; paid, it is the buyer's; cancelled or unpaid,
//! it goes back on sale. Real redis-server processes, real `spike`
//! processes where the behaviour is about processes (a balancer, nodes
//! killed, Redis stopped), and the embedded store where it applies.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::auth::TestAuth;
use common::http::{Reply, TestClient, client, json, send};
use common::redis::RedisServer;
use common::sale::{InProcessSale, sale_config};
use common::spike::{SpikeProcess, bin, run, wait_listening, write_config};
use hyper::{Method, StatusCode};
use spike::node::Store;

async fn buy(c: &TestClient, at: SocketAddr, user: &str) -> Reply {
    send(c, Method::GET, at, &format!("/buy/ticket?user={user}"), &[])
        .await
        .unwrap_or_else(|e| panic!("buy for {user}: {e}"))
}

/// `op` is "pay", "cancel" or "" (read).
async fn order(c: &TestClient, at: SocketAddr, id: &str, op: &str, query: &str) -> Reply {
    let (method, path) = match op {
        "" => (Method::GET, format!("/orders/{id}?{query}")),
        op => (Method::POST, format!("/orders/{id}/{op}?{query}")),
    };
    send(c, method, at, &path, &[])
        .await
        .unwrap_or_else(|e| panic!("{op} {id}: {e}"))
}

fn order_id(r: &Reply) -> String {
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    json(&r.body)["order"]
        .as_str()
        .unwrap_or_else(|| panic!("no order in {}", r.body))
        .to_string()
}

/// The balancer's front door as a buyer (and the payment service) meet
/// it: without `[auth]` a buyer is `?user=`; with it, their token, and a
/// payment is the payment service's signature.
struct Door<'a> {
    c: &'a TestClient,
    at: SocketAddr,
    auth: Option<&'a TestAuth>,
}

impl Door<'_> {
    async fn buy(&self, user: &str) -> Reply {
        let Some(auth) = self.auth else {
            return buy(self.c, self.at, user).await;
        };
        auth.buy(self.c, Method::GET, self.at, user, None)
            .await
            .unwrap_or_else(|e| panic!("buy for {user}: {e}"))
    }

    /// `op` as for [`order`]; `user` is the buyer asking (or, for a
    /// payment without `[auth]`, the one paying).
    async fn order(&self, id: &str, op: &str, user: &str, reference: Option<&str>) -> Reply {
        let Some(auth) = self.auth else {
            let query = match reference {
                Some(r) => format!("user={user}&ref={r}"),
                None => format!("user={user}"),
            };
            return order(self.c, self.at, id, op, &query).await;
        };
        let (method, path) = match (op, reference) {
            ("", _) => (Method::GET, format!("/orders/{id}")),
            (op, Some(r)) => (Method::POST, format!("/orders/{id}/{op}?ref={r}")),
            (op, None) => (Method::POST, format!("/orders/{id}/{op}")),
        };
        let header = if op == "pay" {
            ("Spike-Signature", auth.pay_signature(&path))
        } else {
            ("Authorization", auth.bearer(user))
        };
        send(
            self.c,
            method,
            self.at,
            &path,
            &[(header.0, header.1.as_str())],
        )
        .await
        .unwrap_or_else(|e| panic!("{op} {id}: {e}"))
    }

    async fn buy_until_sold(&self, user: &str, limit: Duration) -> Reply {
        let start = Instant::now();
        loop {
            let r = self.buy(user).await;
            if r.status == StatusCode::OK || start.elapsed() > limit {
                return r;
            }
            assert_eq!(json(&r.body)["status"], "sold_out", "{}", r.body);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Buys for `user` until a 200, for at most `limit` (a node that said
/// `sold_out` from memory learns that stock came back at its next poll).
async fn buy_until_sold(c: &TestClient, at: SocketAddr, user: &str, limit: Duration) -> Reply {
    let start = Instant::now();
    loop {
        let r = buy(c, at, user).await;
        if r.status == StatusCode::OK || start.elapsed() > limit {
            return r;
        }
        assert_eq!(json(&r.body)["status"], "sold_out", "{}", r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn millis(rfc3339: &str) -> u64 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// A `spike up` file: a round-robin balancer (the strategy that used to say
/// `sold_out` with tickets left) over two nodes.
fn up_file(
    event: &str,
    total: u64,
    window: &str,
    redis: Option<&str>,
) -> (String, Vec<SocketAddr>) {
    let addrs: Vec<SocketAddr> = (0..4).map(|_| common::free_addr()).collect();
    let mut t = format!(
        "[sale]\nevent = \"{event}\"\ntotal = {total}\nper_user_limit = 1\npay_within = \"{window}\"\n\n\
         [balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"round_robin\"\n",
        addrs[0], addrs[1]
    );
    if let Some(url) = redis {
        t.push_str(&format!("\n[redis]\nurl = \"{url}\"\n"));
    }
    for (i, a) in addrs[2..].iter().enumerate() {
        t.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\nlisten = \"{a}\"\n",
            i + 1
        ));
    }
    (t, addrs)
}

/// The sale of 5 through the balancer, `pay_within = "2s"`: five
/// reservations; two paid (one twice); one cancelled, whose ticket sells
/// again at once; two unpaid, which expire and sell again; then sold out,
/// and paying an expired order is 409.
async fn sale_of_five(redis: Option<&RedisServer>, auth: Option<&TestAuth>) {
    let url = redis.map(|r| r.url());
    let (text, addrs) = up_file("five", 5, "2s", url.as_deref());
    let text = match auth {
        Some(auth) => text.replace("\n[balancer]", &format!("\n{}[balancer]", auth.section())),
        None => text,
    };
    let path = write_config(&text);
    let _up = SpikeProcess::start(&["up", "--config", path.to_str().expect("path")]);
    for a in &addrs {
        wait_listening(&a.to_string(), Duration::from_secs(15));
    }
    let (b, c) = (addrs[0], client());
    let door = Door { c: &c, at: b, auth };

    let mut ids = Vec::new();
    for i in 1..=5 {
        let r = door.buy(&format!("b{i}")).await;
        let v = json(&r.body);
        assert_eq!(
            (r.status, &v["state"]),
            (StatusCode::OK, &"reserved".into()),
            "{}",
            r.body
        );
        let pay_by = millis(v["pay_by"].as_str().expect("pay_by"));
        let left = pay_by as i64 - now_ms() as i64;
        assert!(
            (1000..=2100).contains(&left),
            "pay_by {left} ms away: {}",
            r.body
        );
        ids.push(order_id(&r));
    }
    let r = door.buy("b6").await;
    assert_eq!(
        (r.status, json(&r.body)["status"].clone()),
        (StatusCode::CONFLICT, "sold_out".into())
    );

    // Paid, and paid again: one payment, the same answer.
    let first = door.order(&ids[0], "pay", "b1", Some("tx-1")).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let v = json(&first.body);
    assert_eq!(
        (v["status"].as_str(), v["payment_ref"].as_str()),
        (Some("paid"), Some("tx-1"))
    );
    let again = door.order(&ids[0], "pay", "b1", Some("tx-2")).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(json(&again.body)["paid_at"], v["paid_at"], "{}", again.body);
    assert_eq!(
        json(&again.body)["payment_ref"],
        "tx-1",
        "the first payment stands"
    );
    assert_eq!(
        door.order(&ids[1], "pay", "b2", None).await.status,
        StatusCode::OK
    );
    // Someone else's order is not theirs to pay or cancel.
    assert_eq!(
        door.order(&ids[2], "cancel", "b1", None).await.status,
        StatusCode::FORBIDDEN
    );

    // Cancelled: the ticket sells again at once.
    let cancelled = door.order(&ids[2], "cancel", "b3", None).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    assert_eq!(json(&cancelled.body)["status"], "cancelled");
    let asked = Instant::now();
    let r = door.buy_until_sold("b6", Duration::from_millis(1500)).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the cancelled ticket did not sell again: {}",
        r.body
    );
    eprintln!("a cancelled ticket sold again after {:?}", asked.elapsed());
    let b6 = order_id(&r);
    assert_eq!(
        door.order(&b6, "pay", "b6", None).await.status,
        StatusCode::OK
    );
    let r = door.order(&ids[2], "pay", "b3", None).await;
    assert_eq!(
        (r.status, json(&r.body)["status"].clone()),
        (StatusCode::CONFLICT, "cancelled".into())
    );
    let r = door.order(&ids[0], "cancel", "b1", None).await;
    assert_eq!(
        (r.status, json(&r.body)["status"].clone()),
        (StatusCode::CONFLICT, "paid".into())
    );

    // b4 and b5 never pay: they expire, by the sweep, within a second or
    // two of their deadline, without anyone asking about them.
    for (i, id) in ids.iter().enumerate().skip(3) {
        let user = format!("b{}", i + 1);
        let start = Instant::now();
        loop {
            // Read through a node's /sale would do too; the order shows it.
            let v = json(&door.order(id, "", &user, None).await.body);
            if v["state"] == "expired" {
                let late = millis(v["expired_at"].as_str().expect("expired_at"))
                    .saturating_sub(millis(v["pay_by"].as_str().expect("pay_by")));
                assert!(late <= 2000, "expired {late} ms after its deadline: {v}");
                break;
            }
            assert_eq!(v["state"], "reserved", "{v}");
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "never expired: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for user in ["b7", "b8"] {
        let r = door.buy_until_sold(user, Duration::from_millis(1500)).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "an expired ticket did not sell again: {}",
            r.body
        );
    }
    let r = door.buy("b9").await;
    assert_eq!(
        (r.status, json(&r.body)["status"].clone()),
        (StatusCode::CONFLICT, "sold_out".into())
    );
    let r = door.order(&ids[3], "pay", "b4", None).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(json(&r.body)["status"], "expired");
    // A buyer whose reservation expired may buy again (and here finds it
    // sold out).
    let r = door.buy("b4").await;
    assert_eq!(json(&r.body)["status"], "sold_out", "{}", r.body);

    // A node's /sale may be up to 500 ms old (its cache, which the
    // balancer's own once-a-second read may just have filled): read until
    // it has the last purchase.
    let mut sale = serde_json::Value::Null;
    for _ in 0..20 {
        sale = json(
            &common::http::get(&c, addrs[2], "/sale")
                .await
                .expect("/sale")
                .1,
        );
        if sale["seq"] == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        (
            &sale["sold"],
            &sale["reserved"],
            &sale["paid"],
            &sale["released"],
            &sale["seq"]
        ),
        (&5.into(), &2.into(), &3.into(), &3.into(), &8.into()),
        "{sale}"
    );
    if redis.is_some() {
        let out = run(&["stock", "audit", "--config", path.to_str().expect("path")]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "audit: {text}");
        let audit = json(&text);
        assert_eq!(audit["events_checked"], true, "{text}");
        assert_eq!(audit["events"]["created"], 8, "{text}");
        assert_eq!(audit["events"]["paid"], 3, "{text}");
        assert_eq!(audit["events"]["released"], 3, "{text}");
    }
    common::spike::remove_config(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_of_five_with_payments_through_the_balancer_embedded() {
    sale_of_five(None, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_of_five_with_payments_through_the_balancer_redis() {
    let redis = RedisServer::start();
    sale_of_five(Some(&redis), None).await;
}

/// The same sale with `[auth]` on, as in production: buyers buy, read and
/// cancel with their own tokens, and the payment service pays with its
/// signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_of_five_with_tokens_and_signed_payments_redis() {
    let redis = RedisServer::start();
    sale_of_five(Some(&redis), Some(&TestAuth::new("five"))).await;
}

/// Orders paid concurrently right at their deadline: each ends paid (and
/// its payment said 200) or expired (and its payment said 409), never
/// both, and exactly the expired ones sell again.
async fn paying_at_the_deadline(redis: Option<&RedisServer>) {
    const N: usize = 40;
    let url = redis.map(|r| r.url());
    let text = sale_config(
        "deadline",
        N as u64,
        1,
        &[1, 1],
        url.as_deref(),
        "pay_within = \"1s\"",
    );
    let sale = InProcessSale::start(&text).await;
    let nodes = sale.addrs();
    let c = client();
    let mut orders = Vec::new();
    for i in 0..N {
        let r = buy(&c, nodes[i % 2], &format!("p{i}")).await;
        let pay_by = millis(json(&r.body)["pay_by"].as_str().expect("pay_by"));
        orders.push((order_id(&r), pay_by));
    }
    // Payments from 40 ms before to 40 ms after each deadline, all at once.
    let mut tasks = Vec::new();
    for (i, (id, pay_by)) in orders.iter().cloned().enumerate() {
        let (c, node) = (c.clone(), nodes[(i + 1) % 2]);
        let at = pay_by as i64 - 40 + (i as i64 * 80 / N as i64);
        tasks.push(tokio::spawn(async move {
            let wait = at - now_ms() as i64;
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
            let r = order(&c, node, &id, "pay", &format!("user=p{i}")).await;
            (id, i, r.status, r.body)
        }));
    }
    let mut expired = 0;
    for t in tasks {
        let (id, i, status, body) = t.await.expect("payer");
        let now = json(
            &order(&c, nodes[0], &id, "", &format!("user=p{i}"))
                .await
                .body,
        );
        match status {
            StatusCode::OK => assert_eq!(now["state"], "paid", "paid said 200: {body} / {now}"),
            StatusCode::CONFLICT => {
                assert_eq!(json(&body)["status"], "expired", "{body}");
                assert_eq!(now["state"], "expired", "{now}");
                expired += 1;
            }
            other => panic!("payment answered {other}: {body}"),
        }
    }
    eprintln!("{} paid, {expired} expired at the deadline", N - expired);
    assert!(
        expired > 0 && expired < N,
        "the race had one side only: {expired} expired of {N}"
    );
    // Exactly the expired tickets sell again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut sold_again = 0;
    for i in 0..(expired + 10) {
        if buy(&c, nodes[i % 2], &format!("q{i}")).await.status == StatusCode::OK {
            sold_again += 1;
        }
    }
    assert_eq!(sold_again, expired);
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert_eq!(
        (snap.paid, snap.released, snap.sold),
        ((N - expired) as u64, expired as u64, N as u64)
    );
    assert_eq!(
        snap.audit(None, sale.store.tally_events().await.expect("events")),
        Vec::<String>::new()
    );
    sale.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_at_the_deadline_has_one_winner_redis() {
    let redis = RedisServer::start();
    paying_at_the_deadline(Some(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_at_the_deadline_has_one_winner_embedded() {
    paying_at_the_deadline(None).await;
}

/// Cancels sent twice per order through different nodes, right at the
/// deadline, while three nodes sweep: every order is released once (one
/// stream event each), and the counters, the buyers and the stream agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cancels_expiry_and_sweeps_release_each_ticket_once() {
    const N: usize = 60;
    let redis = RedisServer::start();
    let text = sale_config(
        "release",
        N as u64,
        1,
        &[1, 1, 1],
        Some(&redis.url()),
        "pay_within = \"1s\"",
    );
    let sale = InProcessSale::start(&text).await;
    let nodes = sale.addrs();
    let c = client();
    let mut orders = Vec::new();
    for i in 0..N {
        let r = buy(&c, nodes[i % 3], &format!("r{i}")).await;
        let pay_by = millis(json(&r.body)["pay_by"].as_str().expect("pay_by"));
        orders.push((order_id(&r), pay_by));
    }
    let mut tasks = Vec::new();
    for (i, (id, pay_by)) in orders.iter().cloned().enumerate() {
        for k in 0..2 {
            let (c, id, node) = (c.clone(), id.clone(), nodes[(i + k) % 3]);
            let at = pay_by as i64 - 20 + (i as i64 % 40);
            tasks.push(tokio::spawn(async move {
                let wait = at - now_ms() as i64;
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                }
                let r = order(&c, node, &id, "cancel", &format!("user=r{i}")).await;
                (id, r.status)
            }));
        }
    }
    let mut cancelled = HashSet::new();
    for t in tasks {
        let (id, status) = t.await.expect("canceller");
        match status {
            StatusCode::OK => {
                cancelled.insert(id);
            }
            StatusCode::CONFLICT => {}
            other => panic!("cancel answered {other}"),
        }
    }
    // Let the sweeps finish whatever the cancels did not take.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (i, (id, _)) in orders.iter().enumerate() {
        let v = json(
            &order(&c, nodes[0], id, "", &format!("user=r{i}"))
                .await
                .body,
        );
        let want = if cancelled.contains(id) {
            "cancelled"
        } else {
            "expired"
        };
        assert_eq!(v["state"], want, "{v}");
    }
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert_eq!(
        (snap.released, snap.sold, snap.reserved, snap.tickets_held),
        (N as u64, 0, 0, 0),
        "{snap:?}"
    );
    assert_eq!(snap.buyers, 0, "every buyer's count went back to nothing");
    let Store::Redis(r) = &sale.store else {
        unreachable!("a redis sale")
    };
    let mut released: HashMap<String, usize> = HashMap::new();
    for (kind, id) in r.events().await.expect("events") {
        if kind == "cancelled" || kind == "expired" {
            *released.entry(id).or_default() += 1;
        }
    }
    assert_eq!(released.len(), N);
    assert!(released.values().all(|&n| n == 1), "{released:?}");
    let tally = sale.store.tally_buyers().await.expect("buyers");
    let events = sale.store.tally_events().await.expect("events");
    assert_eq!(snap.audit(Some(tally), events), Vec::<String>::new());
    eprintln!(
        "{} cancelled, {} expired",
        cancelled.len(),
        N - cancelled.len()
    );
    sale.stop().await;
}

fn node_file(event: &str, total: u64, redis: &str, nodes: &[SocketAddr]) -> String {
    let mut t = format!(
        "[sale]\nevent = \"{event}\"\ntotal = {total}\nper_user_limit = 1\npay_within = \"1s\"\n\n\
         [redis]\nurl = \"{redis}\"\ntimeout = \"500ms\"\n"
    );
    for (i, a) in nodes.iter().enumerate() {
        t.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\nlisten = \"{a}\"\n",
            i + 1
        ));
    }
    t
}

fn start_node(path: &std::path::Path, name: &str, at: SocketAddr) -> SpikeProcess {
    let p = SpikeProcess::start(&[
        "node",
        "--config",
        path.to_str().expect("path"),
        "--name",
        name,
    ]);
    wait_listening(&at.to_string(), Duration::from_secs(10));
    p
}

fn stock_field(redis: &RedisServer, event: &str, field: &str) -> u64 {
    redis
        .hash::<String>(&format!("spike:{{{event}}}:stock"))
        .get(field)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Expiry that cannot be lost: with Redis stopped past the deadlines, and
/// with every node down past them, the orders expire once it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_catches_up_after_redis_and_every_node_were_down() {
    let redis = RedisServer::start();
    let at = common::free_addr();
    let path = write_config(&node_file("outage", 3, &redis.url(), &[at]));
    assert!(
        run(&[
            "stock",
            "init",
            "--trust-client-buyer-ids",
            "--config",
            path.to_str().expect("path")
        ])
        .status
        .success()
    );
    let mut node = start_node(&path, "n1", at);
    let c = client();
    for i in 0..3 {
        assert_eq!(buy(&c, at, &format!("o{i}")).await.status, StatusCode::OK);
    }
    // Redis stopped from before the deadlines to well after them.
    redis.signal("STOP");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    redis.signal("CONT");
    let back = Instant::now();
    common::wait_for(
        "expiry after Redis came back",
        Duration::from_secs(3),
        async || stock_field(&redis, "outage", "released") == 3,
    )
    .await;
    eprintln!("expired {:?} after Redis came back", back.elapsed());

    // Every node down across the deadlines: nothing expires meanwhile...
    for i in 0..3 {
        let r = buy_until_sold(&c, at, &format!("p{i}"), Duration::from_secs(2)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    node.signal("KILL");
    let _ = node.wait_exit(Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        stock_field(&redis, "outage", "reserved"),
        3,
        "no node, no sweep"
    );
    // ...and everything due expires once one is back.
    let _node = start_node(&path, "n1", at);
    let back = Instant::now();
    common::wait_for(
        "expiry after a node came back",
        Duration::from_secs(3),
        async || stock_field(&redis, "outage", "released") == 6,
    )
    .await;
    eprintln!("expired {:?} after a node came back", back.elapsed());
    let out = run(&["stock", "audit", "--config", path.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    common::spike::remove_config(&path);
}

/// A node SIGKILLed while it sweeps a few hundred expiries: each batch is
/// one script, so nothing is half done, and the other node finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_sweep_leaves_nothing_half_done() {
    const N: usize = 300;
    let redis = RedisServer::start();
    let addrs = [common::free_addr(), common::free_addr()];
    let path = write_config(&node_file("midsweep", N as u64, &redis.url(), &addrs));
    assert!(
        run(&[
            "stock",
            "init",
            "--trust-client-buyer-ids",
            "--config",
            path.to_str().expect("path")
        ])
        .status
        .success()
    );
    let mut n1 = start_node(&path, "n1", addrs[0]);
    let n2 = start_node(&path, "n2", addrs[1]);
    // n2 stopped: n1 alone sweeps when the deadlines come.
    n2.signal("STOP");
    let c = client();
    // Three waves 400 ms apart, so the deadlines come in three bunches and
    // the kill lands after the first bunch's sweep, before the others'.
    for wave in 0..3 {
        let answers =
            common::sale::storm(&c, &addrs[..1], N / 3, N / 3, 32, &format!("m{wave}-")).await;
        assert_eq!(common::sale::count(&answers, StatusCode::OK), N / 3);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    common::wait_for("the first sweep", Duration::from_secs(5), async || {
        stock_field(&redis, "midsweep", "released") > 0
    })
    .await;
    n1.signal("KILL");
    let _ = n1.wait_exit(Duration::from_secs(5));
    let at_kill = stock_field(&redis, "midsweep", "released");
    eprintln!("{at_kill} of {N} expired when the sweeping node was killed");
    assert!(at_kill < N as u64, "the sweep had finished before the kill");
    assert_eq!(
        stock_field(&redis, "midsweep", "released") + stock_field(&redis, "midsweep", "reserved"),
        N as u64,
        "a sweep cut off by the kill left an order neither reserved nor released"
    );
    n2.signal("CONT");
    common::wait_for(
        "the other node to finish the sweep",
        Duration::from_secs(5),
        async || stock_field(&redis, "midsweep", "released") == N as u64,
    )
    .await;
    assert_eq!(stock_field(&redis, "midsweep", "sold"), 0);
    assert_eq!(stock_field(&redis, "midsweep", "reserved"), 0);
    let out = run(&["stock", "audit", "--config", path.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    common::spike::remove_config(&path);
}

/// A running `spike orders tail` that prints to a pipe, one JSON line an event.
struct Tail {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Tail {
    fn start(path: &std::path::Path) -> Tail {
        let mut child = Command::new(bin())
            .args(["orders", "tail", "--config", path.to_str().expect("path")])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn orders tail");
        let out = child.stdout.take().expect("stdout");
        // A small pipe, and a reader that takes a line only when the test
        // asks for one: once the test stops asking, the tail blocks in the
        // middle of printing a batch it has not acknowledged, as a tail
        // whose reader stalls does.
        {
            use std::os::fd::AsRawFd;
            // SAFETY: F_SETPIPE_SZ on a pipe this process owns.
            unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        }
        let (tx, lines) = std::sync::mpsc::sync_channel(0);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Tail { child, lines }
    }

    /// SIGKILL, then every line it had written to the pipe before dying
    /// (printed, and maybe acknowledged: a reader of the pipe has them).
    fn kill_and_drain(mut self, ids: &mut Vec<String>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            ids.push(json(&line)["id"].as_str().expect("id").to_string());
        }
    }

    /// Event ids printed until `enough` holds (or 10 s pass).
    fn read_until(&self, ids: &mut Vec<String>, enough: impl Fn(&[String]) -> bool) {
        let start = Instant::now();
        while !enough(ids) && start.elapsed() < Duration::from_secs(10) {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                let v = json(&line);
                assert!(v["type"].is_string() && v["order"].is_string(), "{line}");
                ids.push(v["id"].as_str().expect("id").to_string());
            }
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `spike orders tail` killed mid-stream (while the sale goes on) and
/// started again: every event printed, none lost, and only events it had
/// not acknowledged printed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_tail_restarted_mid_stream_loses_and_repeats_nothing_acknowledged() {
    let redis = RedisServer::start();
    let text = sale_config(
        "tail",
        400,
        1,
        &[1],
        Some(&redis.url()),
        "pay_within = \"30s\"",
    );
    let sale = InProcessSale::start(&text).await;
    let path = write_config(&text);
    let c = client();
    let node = sale.addrs()[0];
    let first_wave = common::sale::storm(&c, &[node], 200, 200, 16, "t").await;

    let first = Tail::start(&path);
    let mut before = Vec::new();
    first.read_until(&mut before, |ids| ids.len() >= 100);
    // The sale goes on while the tail is killed and while it is down.
    let more = {
        let c = c.clone();
        tokio::spawn(async move { common::sale::storm(&c, &[node], 200, 200, 4, "u").await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    first.kill_and_drain(&mut before);
    let mut conn = redis.connection().expect("redis");
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg("spike:{tail}:events")
        .arg("spike-orders")
        .arg("-")
        .arg("+")
        .arg(1000)
        .query(&mut conn)
        .expect("XPENDING");
    let pending: HashSet<String> = pending.into_iter().map(|p| p.0).collect();
    let second_wave = more.await.expect("storm");
    for a in first_wave.iter().chain(second_wave.iter()).step_by(8) {
        let id = json(&a.body)["order"].as_str().expect("order").to_string();
        let paid = order(&c, node, &id, "pay", &format!("user={}", a.buyer)).await;
        assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
    }
    let all: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("spike:{tail}:events")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .expect("XRANGE");
    assert_eq!(all.len(), 450, "400 reservations and 50 payments");
    assert!(
        before.len() < all.len(),
        "the tail was not stopped mid-stream"
    );

    let second = Tail::start(&path);
    let mut after = Vec::new();
    let seen_before: HashSet<String> = before.iter().cloned().collect();
    assert_eq!(
        seen_before.len(),
        before.len(),
        "a run printed an event twice"
    );
    second.read_until(&mut after, |ids| {
        seen_before.union(&ids.iter().cloned().collect()).count() >= all.len()
    });
    second.kill_and_drain(&mut after);
    let seen_after: HashSet<&String> = after.iter().collect();
    assert_eq!(
        seen_after.len(),
        after.len(),
        "a run printed an event twice"
    );
    let printed: HashSet<&String> = before.iter().chain(after.iter()).collect();
    for (id, _) in &all {
        assert!(printed.contains(id), "event {id} was never printed");
    }
    let repeated: Vec<&String> = after
        .iter()
        .filter(|id| seen_before.contains(*id))
        .collect();
    for id in &repeated {
        assert!(
            pending.contains(*id),
            "event {id} was acknowledged, yet printed again"
        );
    }
    eprintln!(
        "{} printed before the kill, {} pending, {} printed again, {} after",
        before.len(),
        pending.len(),
        repeated.len(),
        after.len()
    );
    common::spike::remove_config(&path);
    sale.stop().await;
}

/// 20 buyers for every ticket, 30% of whom reserve and never pay: the
/// others keep trying, buy what expires, and at the end every ticket is paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_times_oversubscribed_with_non_payers_ends_fully_paid() {
    const TOTAL: usize = 20;
    const BUYERS: usize = 20 * TOTAL;
    let redis = RedisServer::start();
    let text = sale_config(
        "rush",
        TOTAL as u64,
        1,
        &[1, 1, 1],
        Some(&redis.url()),
        "pay_within = \"1s\"",
    );
    let sale = InProcessSale::start(&text).await;
    let nodes = sale.addrs();
    let c = client();
    let paid = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..BUYERS {
        let (c, paid, node) = (c.clone(), paid.clone(), nodes[i % 3]);
        tasks.push(tokio::spawn(async move {
            let user = format!("u{i}");
            let pays = i % 10 >= 3;
            let start = Instant::now();
            while paid.load(Ordering::Acquire) < TOTAL && start.elapsed() < Duration::from_secs(30)
            {
                let r = buy(&c, node, &user).await;
                match r.status {
                    StatusCode::OK if !pays => return (i, Some(order_id(&r)), false),
                    StatusCode::OK => {
                        let id = order_id(&r);
                        let p = order(&c, node, &id, "pay", &format!("user={user}")).await;
                        let ok = p.status == StatusCode::OK;
                        if ok {
                            paid.fetch_add(1, Ordering::AcqRel);
                        }
                        return (i, Some(id), ok);
                    }
                    StatusCode::CONFLICT => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    other => panic!("buy answered {other}: {}", r.body),
                }
            }
            (i, None, false)
        }));
    }
    let mut payers_paid = 0;
    for t in tasks {
        let (i, _, ok) = t.await.expect("buyer");
        if ok {
            assert!(i % 10 >= 3);
            payers_paid += 1;
        }
    }
    assert_eq!(payers_paid, TOTAL);
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert_eq!(
        (snap.paid, snap.sold, snap.reserved),
        (TOTAL as u64, TOTAL as u64, 0),
        "{snap:?}"
    );
    assert!(snap.finished, "{snap:?}");
    assert!(
        snap.released > 0,
        "no non-payer's ticket came back: {snap:?}"
    );
    let tally = sale.store.tally_buyers().await.expect("buyers");
    let events = sale.store.tally_events().await.expect("events");
    assert_eq!(snap.audit(Some(tally), events), Vec::<String>::new());
    eprintln!(
        "{} reservations for {TOTAL} tickets, {} released",
        snap.seq, snap.released
    );
    sale.stop().await;
}

/// A purchase's `Idempotency-Key` sent again: the same order in its state
/// now: 200 while reserved (and past its deadline, expired even before a
/// sweep), 200 once paid, 409 `expired` once it went back on sale; never a
/// second ticket.
async fn a_key_replays_the_order_in_its_state(redis: Option<&RedisServer>) {
    let url = redis.map(|r| r.url());
    let text = sale_config(
        "replay",
        10,
        0,
        &[1, 1],
        url.as_deref(),
        "pay_within = \"1s\"",
    );
    let sale = InProcessSale::start(&text).await;
    let nodes = sale.addrs();
    let c = client();
    let buy_with = |key: &'static str, node: SocketAddr| {
        let c = c.clone();
        async move {
            send(
                &c,
                Method::GET,
                node,
                "/buy/ticket?user=kim",
                &[("Idempotency-Key", key)],
            )
            .await
            .expect("buy")
        }
    };
    let first = buy_with("k-paid", nodes[0]).await;
    let id = order_id(&first);
    let again = buy_with("k-paid", nodes[1]).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    let v = json(&again.body);
    assert_eq!(
        (v["order"].as_str(), v["state"].as_str()),
        (Some(id.as_str()), Some("reserved"))
    );
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(
        order(&c, nodes[0], &id, "pay", "user=kim").await.status,
        StatusCode::OK
    );
    let paid = buy_with("k-paid", nodes[1]).await;
    assert_eq!(
        (paid.status, json(&paid.body)["state"].clone()),
        (StatusCode::OK, "paid".into())
    );

    let unpaid = order_id(&buy_with("k-unpaid", nodes[0]).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let late = buy_with("k-unpaid", nodes[1]).await;
    assert_eq!(late.status, StatusCode::CONFLICT, "{}", late.body);
    let v = json(&late.body);
    assert_eq!(
        (v["status"].as_str(), v["order"].as_str()),
        (Some("expired"), Some(unpaid.as_str()))
    );
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert_eq!(snap.seq, 2, "a replay sold a second ticket: {snap:?}");
    sale.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_replays_the_order_in_its_state_redis() {
    let redis = RedisServer::start();
    a_key_replays_the_order_in_its_state(Some(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_replays_the_order_in_its_state_embedded() {
    a_key_replays_the_order_in_its_state(None).await;
}

/// With `[redis] replicas = 1`, a payment is answered 200 only once the
/// replica has it: with the replica stopped, the payer hears 503 (the
/// payment is on the primary), and the same payment sent again once it is
/// back gets 200, the same payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replicas_a_payment_is_answered_once_replicated() {
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let mut text = sale_config(
        "paywait",
        5,
        1,
        &[1],
        Some(&primary.url()),
        "pay_within = \"30s\"",
    );
    text = text.replace("timeout = \"1s\"\n", "timeout = \"2s\"\nreplicas = 1\n");
    let sale = InProcessSale::start(&text).await;
    let node = sale.addrs()[0];
    let c = client();
    let id = order_id(&buy(&c, node, "pat").await);
    replica.signal("STOP");
    let r = order(&c, node, &id, "pay", "user=pat&ref=p1").await;
    replica.signal("CONT");
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert!(
        json(&r.body)["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not replicated"),
        "{}",
        r.body
    );
    let r = order(&c, node, &id, "pay", "user=pat&ref=p1").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(json(&r.body)["payment_ref"], "p1");
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert_eq!((snap.paid, snap.reserved), (1, 0));
    sale.stop().await;
}

/// A sale written by the version before reservations (no `seq`, no event
/// stream) goes on: order ids continue after the last one, never reused,
/// and the audit does not count a stream that did not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_started_before_reservations_goes_on_without_reusing_ids() {
    let redis = RedisServer::start();
    let text = sale_config("legacy", 10, 1, &[1], Some(&redis.url()), "");
    let sale = InProcessSale::start(&text).await;
    let node = sale.addrs()[0];
    let c = client();
    let mut ids = HashSet::new();
    for i in 0..3 {
        ids.insert(order_id(&buy(&c, node, &format!("old{i}")).await));
    }
    // What the old init and deduct left: no seq, no stream, no bound.
    let mut conn = redis.connection().expect("redis");
    let _: () = redis::cmd("HDEL")
        .arg("spike:{legacy}:stock")
        .arg("seq")
        .arg("stream_max")
        .query(&mut conn)
        .expect("HDEL");
    let _: () = redis::cmd("DEL")
        .arg("spike:{legacy}:events")
        .query(&mut conn)
        .expect("DEL");
    for i in 0..3 {
        let id = order_id(&buy(&c, node, &format!("new{i}")).await);
        assert!(ids.insert(id.clone()), "order id {id} handed out twice");
    }
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert_eq!((snap.sold, snap.orders, snap.seq), (6, 6, 6), "{snap:?}");
    let events = sale.store.tally_events().await.expect("events");
    assert_eq!(snap.audit(None, events), Vec::<String>::new());
    sale.stop().await;
}
