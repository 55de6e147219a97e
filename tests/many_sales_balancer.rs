//! The balancer in front of several sales (issue 28, milestone 3), through
//! `spike up`:
//! - the edge per sale: the balancer answers the late buyers of a
//!   sold-out sale itself, and only that sale's: the other sales' buyers
//!   still buy, and a ticket that comes back (a cancel, an expiry) reopens
//!   its sale; on both forwarding paths (the fast path, and hyper's with
//!   `fast_path = false`), on a real Redis;
//! - buyer tokens whose `aud` lists sales;
//! - the waiting room per sale: a line per sale, each in order, and a
//!   pass good for its own sale only;
//! - under every strategy, each sale exact with every purchase sent twice
//!   by its `Idempotency-Key`, and reservations paid and cancelled.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{Reply, TestClient, client, get, json, send};
use common::redis::RedisServer;
use common::spike::{remove_config, run};
use hyper::{Method, StatusCode};

/// Three sales behind a round-robin balancer with three nodes: `a` (3
/// tickets, reservations a minute long), `b` (40), `c` (1, reservations
/// that expire in 2 s).
fn fleet(redis: &str, fast_path: bool) -> (String, common::up::Ports) {
    let p = common::free_addr;
    let ports = common::up::Ports {
        balancer: p(),
        admin: p(),
        nodes: (0..3).map(|_| p()).collect(),
    };
    let mut text = String::new();
    for (event, total, pay) in [("a", 3, "60s"), ("b", 40, ""), ("c", 1, "2s")] {
        text.push_str(&format!(
            "[[sale]]\nevent = \"{event}\"\ntotal = {total}\nper_user_limit = 1\n"
        ));
        if !pay.is_empty() {
            text.push_str(&format!("pay_within = \"{pay}\"\n"));
        }
        text.push('\n');
    }
    text.push_str(&format!(
        "[redis]\nurl = \"{redis}\"\n\n[balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"round_robin\"\nfast_path = {fast_path}\n",
        ports.balancer, ports.admin
    ));
    for (i, a) in ports.nodes.iter().enumerate() {
        text.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\nlisten = \"{a}\"\n",
            i + 1
        ));
    }
    (text, ports)
}

async fn buy(c: &TestClient, b: SocketAddr, path: &str) -> Reply {
    send(c, Method::GET, b, path, &[]).await.expect("answer")
}

/// A `sold_out` answer the balancer made itself: a node's names its sale
/// (`Spike-Event`), the edge's does not.
fn from_edge(r: &Reply) -> bool {
    r.status == StatusCode::CONFLICT
        && json(&r.body)["status"] == "sold_out"
        && !r.headers.contains_key("spike-event")
}

fn from_node(r: &Reply, event: &str) -> bool {
    r.status == StatusCode::CONFLICT
        && json(&r.body)["status"] == "sold_out"
        && r.headers.get("spike-event").and_then(|v| v.to_str().ok()) == Some(event)
}

async fn edge(c: &TestClient, admin: SocketAddr) -> serde_json::Value {
    let (_, body) = get(c, admin, "/status").await.expect("status");
    json(&body)["edge"].clone()
}

/// The nodes' `sold_out` answers in `event`, all nodes together.
async fn node_sold_out(c: &TestClient, nodes: &[SocketAddr], event: &str) -> u64 {
    let mut n = 0;
    for a in nodes {
        let (_, body) = get(c, *a, "/stats").await.expect("stats");
        n += json(&body)["by_event"][event]["sold_out_answers"]
            .as_u64()
            .unwrap_or(0);
    }
    n
}

/// Buys `path` through the balancer until a 200, for at most `limit`.
async fn buy_within(
    c: &TestClient,
    b: SocketAddr,
    path: &str,
    limit: Duration,
) -> (Reply, Duration) {
    let start = Instant::now();
    loop {
        let r = buy(c, b, path).await;
        if r.status == StatusCode::OK || start.elapsed() > limit {
            return (r, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn one_sale_sold_out_is_answered_at_the_edge_and_only_it(fast_path: bool) {
    let redis = RedisServer::start();
    let (text, ports) = fleet(&redis.url(), fast_path);
    let (_up, path) = common::up::start_up(&text, &ports);
    let (b, admin, nodes) = (ports.balancer, ports.admin, &ports.nodes[..]);
    let c = client();

    // `a` sells out; its first late buyer hears it from a node, which
    // names the sale.
    let mut orders = Vec::new();
    for i in 0..3 {
        let r = buy(&c, b, &format!("/events/a/buy?user=a{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        orders.push(json(&r.body)["order"].as_str().expect("order").to_string());
    }
    let r = buy(&c, b, "/events/a/buy?user=late").await;
    assert!(from_node(&r, "a"), "{:?} {}", r.headers, r.body);
    common::wait_for(
        "the edge to answer for a",
        Duration::from_secs(5),
        async || from_edge(&buy(&c, b, "/buy/ticket?event=a&user=late").await),
    )
    .await;

    // The flood of `a`'s late buyers (both ways of naming the sale) is
    // answered at the edge; `b`'s buyers buy meanwhile, at the nodes.
    let before_nodes = node_sold_out(&c, nodes, "a").await;
    let before_edge = edge(&c, admin).await["sold_out_answers"]
        .as_u64()
        .expect("count");
    let c2 = Arc::new(c.clone());
    let mut tasks = Vec::new();
    for w in 0..10 {
        let c = c2.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..30 {
                let late = if i % 2 == 0 {
                    format!("/events/a/buy?user=l{w}-{i}")
                } else {
                    format!("/buy/ticket?user=l{w}-{i}&event=a")
                };
                out.push(("a", buy(&c, b, &late).await));
                if i % 10 == 0 {
                    let p = format!("/events/b/buy?user=b{w}-{i}");
                    out.push(("b", buy(&c, b, &p).await));
                }
            }
            out
        }));
    }
    let mut bought_b = 0;
    for t in tasks {
        for (sale, r) in t.await.expect("buyers") {
            match sale {
                "a" => assert_eq!(json(&r.body)["status"], "sold_out", "{}", r.body),
                _ => {
                    assert_eq!(r.status, StatusCode::OK, "b: {}", r.body);
                    bought_b += 1;
                }
            }
        }
    }
    assert_eq!(bought_b, 30);
    let reached = node_sold_out(&c, nodes, "a").await - before_nodes;
    let answered = edge(&c, admin).await["sold_out_answers"]
        .as_u64()
        .expect("count")
        - before_edge;
    eprintln!(
        "of 300 late buyers of a, {reached} reached a node, {answered} were answered at the edge"
    );
    assert!(reached <= 6, "{reached} of 300 reached the nodes");
    assert!(answered >= 294, "{answered}");

    // A holder of `a` hears `already_bought` with their order, named by
    // its sale, from the edge.
    let r = buy(&c, b, "/events/a/buy?user=a1").await;
    let v = json(&r.body);
    assert_eq!(
        (v["status"].as_str(), v["order"].as_str()),
        (Some("already_bought"), Some(orders[1].as_str())),
        "{}",
        r.body
    );
    assert!(edge(&c, admin).await["already_bought_answers"].as_u64() >= Some(1));

    // A cancel in `a` reopens it: the ticket sells through the balancer.
    let r = send(
        &c,
        Method::POST,
        b,
        &format!("/orders/{}/cancel?user=a0", orders[0]),
        &[],
    )
    .await
    .expect("cancel");
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let (r, took) = buy_within(
        &c,
        b,
        "/events/a/buy?user=after-cancel",
        Duration::from_secs(3),
    )
    .await;
    eprintln!("a's cancelled ticket sold through the balancer after {took:?}");
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // Sold out again; `stock add` for `a` reopens it, and only it.
    common::wait_for(
        "the edge to answer for a again",
        Duration::from_secs(5),
        async || from_edge(&buy(&c, b, "/events/a/buy?user=late-again").await),
    )
    .await;
    let out = run(&[
        "stock",
        "add",
        "--event",
        "a",
        "1",
        "--config",
        path.to_str().expect("path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (r, took) = buy_within(
        &c,
        b,
        "/events/a/buy?user=after-add",
        Duration::from_secs(3),
    )
    .await;
    eprintln!("a's added ticket sold through the balancer after {took:?}");
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // `c` sells out, the edge answers for it, and the expiry of its
    // unpaid reservation reopens it.
    let r = buy(&c, b, "/buy/ticket?event=c&user=c0").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let reserved_at = Instant::now();
    common::wait_for(
        "the edge to answer for c",
        Duration::from_secs(3),
        async || from_edge(&buy(&c, b, "/events/c/buy?user=c-late").await),
    )
    .await;
    // Still open: `b` is never answered at the edge.
    let r = buy(&c, b, "/events/b/buy?user=b-last").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let (r, took) = buy_within(
        &c,
        b,
        "/events/c/buy?user=after-expiry",
        Duration::from_secs(8),
    )
    .await;
    eprintln!(
        "c's expired ticket sold through the balancer {:?} after its reservation",
        reserved_at.elapsed()
    );
    assert_eq!(r.status, StatusCode::OK, "{} after {took:?}", r.body);

    let out = run(&[
        "stock",
        "audit",
        "--all",
        "--config",
        path.to_str().expect("path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    remove_config(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_answers_one_sold_out_sale_of_several_on_the_fast_path() {
    one_sale_sold_out_is_answered_at_the_edge_and_only_it(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_answers_one_sold_out_sale_of_several_on_hypers_path() {
    one_sale_sold_out_is_answered_at_the_edge_and_only_it(false).await;
}

/// `spike token` for one sale's buyer.
fn token(path: &std::path::Path, buyer: &str, events: &[&str]) -> String {
    let mut args = vec![
        "token",
        "--config",
        path.to_str().expect("path"),
        "--buyer",
        buyer,
    ];
    for e in events {
        args.extend(["--event", e]);
    }
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn buy_as(c: &TestClient, at: SocketAddr, path: &str, token: &str) -> Reply {
    let bearer = format!("Bearer {token}");
    send(c, Method::POST, at, path, &[("Authorization", &bearer)])
        .await
        .expect("answer")
}

/// A token's `aud` is one sale or a list (`spike token --event a --event
/// b`, or `--event b,c`): it buys in each sale it names, at a node and
/// through the balancer, and is refused in any other; the edge answers
/// `already_bought` only to a token for the sale asked about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_buys_in_the_sales_its_aud_lists_and_no_other() {
    let p = common::free_addr;
    let ports = common::up::Ports {
        balancer: p(),
        admin: p(),
        nodes: vec![p(), p()],
    };
    let mut text = String::new();
    for (event, total) in [("a", 1), ("b", 5), ("c", 5)] {
        text.push_str(&format!(
            "[[sale]]\nevent = \"{event}\"\ntotal = {total}\nper_user_limit = 1\n\n"
        ));
    }
    text.push_str(&common::auth::TestAuth::new("unused").section());
    text.push_str(&format!(
        "[balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"round_robin\"\n",
        ports.balancer, ports.admin
    ));
    for (i, a) in ports.nodes.iter().enumerate() {
        text.push_str(&common::up::node_entry(i + 1, *a));
    }
    let (_up, path) = common::up::start_up(&text, &ports);
    let (b, node) = (ports.balancer, ports.nodes[0]);
    let c = client();

    let dora_ab = token(&path, "dora", &["a", "b"]);
    let eve_bc = token(&path, "eve", &["b,c"]);
    let dora_c = token(&path, "dora", &["c"]);
    // A sale the file does not have is no token.
    let out = run(&[
        "token",
        "--config",
        path.to_str().expect("path"),
        "--buyer",
        "x",
        "--event",
        "a,nope",
    ]);
    assert!(!out.status.success());

    // Through the balancer and at a node: each sale the token names.
    let r = buy_as(&c, b, "/events/a/buy", &dora_ab).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let order_a = json(&r.body)["order"].as_str().expect("order").to_string();
    let r = buy_as(&c, node, "/buy/ticket?event=b", &dora_ab).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = buy_as(&c, node, "/events/c/buy", &eve_bc).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = buy_as(&c, b, "/events/b/buy", &eve_bc).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // And no other.
    for (at, path, token) in [
        (b, "/events/c/buy", &dora_ab),
        (node, "/events/c/buy", &dora_ab),
        (b, "/events/a/buy", &eve_bc),
        (node, "/buy/ticket?event=a", &dora_c),
    ] {
        let r = buy_as(&c, at, path, token).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}: {}", r.body);
        assert!(r.body.contains("another sale"), "{}", r.body);
    }
    let r = buy_as(&c, b, "/events/c/buy", &dora_c).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // `a` is sold out: the edge answers for it once a node said so.
    let eve_a = token(&path, "eve", &["a"]);
    let r = buy_as(&c, b, "/events/a/buy", &eve_a).await;
    assert!(from_node(&r, "a"), "{:?} {}", r.headers, r.body);
    common::wait_for(
        "the edge to answer for a",
        Duration::from_secs(5),
        async || from_edge(&buy_as(&c, b, "/events/a/buy", &eve_a).await),
    )
    .await;
    let before = edge(&c, ports.admin).await["already_bought_answers"]
        .as_u64()
        .expect("count");
    // The holder, with a token for `a`, hears of their order from the edge.
    let r = buy_as(&c, b, "/events/a/buy", &dora_ab).await;
    let v = json(&r.body);
    assert_eq!(
        (v["status"].as_str(), v["order"].as_str()),
        (Some("already_bought"), Some(order_a.as_str())),
        "{}",
        r.body
    );
    let after = edge(&c, ports.admin).await["already_bought_answers"]
        .as_u64()
        .expect("count");
    assert_eq!(after, before + 1, "answered at the edge");
    // The holder's id in a token for another sale learns nothing of it.
    let r = buy_as(&c, b, "/events/a/buy", &dora_c).await;
    assert_eq!(json(&r.body)["status"], "sold_out", "{}", r.body);
    remove_config(&path);
}

/// A buyer with a token for sales `a`, `b` and `c`, and a browser's
/// cookie jar.
struct RoomBuyer {
    bearer: String,
    jar: std::collections::BTreeMap<String, String>,
}

impl RoomBuyer {
    fn new(name: &str, key: &spike::auth::BuyerKey) -> RoomBuyer {
        let exp = spike::auth::unix_now() + 3600;
        let token = spike::auth::mint_for(key, name, &["a", "b", "c"], exp, None).expect("mint");
        RoomBuyer {
            bearer: format!("Bearer {token}"),
            jar: Default::default(),
        }
    }

    /// `GET /events/{event}/buy` with every cookie of the jar; keeps those
    /// the answer sets.
    async fn ask(&mut self, c: &TestClient, at: SocketAddr, event: &str) -> Reply {
        let cookie: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let cookie = cookie.join("; ");
        let mut headers = vec![("Authorization", self.bearer.as_str())];
        if !cookie.is_empty() {
            headers.push(("Cookie", cookie.as_str()));
        }
        let r = send(
            c,
            Method::GET,
            at,
            &format!("/events/{event}/buy"),
            &headers,
        )
        .await
        .expect("an answer");
        for v in r.headers.get_all("set-cookie") {
            let pair = v.to_str().expect("ascii").split(';').next().expect("pair");
            let (k, v) = pair.split_once('=').expect("name=value");
            self.jar.insert(k.to_string(), v.to_string());
        }
        r
    }
}

/// `[waiting_room]` in front of two sales: each has its own line (places
/// from 1 in each, admitted in order within each), a pass names its sale
/// (`spike_pass_a`), and a pass of sale `a` is refused in sale `b`, where
/// it buys nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sale_has_its_own_line_and_a_pass_is_its_sales_only() {
    let redis = RedisServer::start();
    let auth = common::auth::TestAuth::new("unused");
    let p = common::free_addr;
    let ports = common::up::Ports {
        balancer: p(),
        admin: p(),
        nodes: vec![p(), p()],
    };
    let mut text = String::new();
    for (event, total) in [("a", 20), ("b", 20), ("c", 1), ("d", 5)] {
        text.push_str(&format!(
            "[[sale]]\nevent = \"{event}\"\ntotal = {total}\nper_user_limit = 1\n\n"
        ));
    }
    text.push_str(&auth.section());
    text.push_str(&format!(
        "[redis]\nurl = \"{}\"\n\n[waiting_room]\nadmit = \"4/s\"\npass_ttl = \"60s\"\n\n\
         [balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"round_robin\"\n",
        redis.url(),
        ports.balancer,
        ports.admin
    ));
    for (i, a) in ports.nodes.iter().enumerate() {
        text.push_str(&common::up::node_entry(i + 1, *a));
    }
    let (_up, path) = common::up::start_up(&text, &ports);
    let b = ports.balancer;
    let c = client();
    let key = spike::auth::BuyerKey::parse(&format!("k1:hs256:{}", common::auth::test_key(1)))
        .expect("key");

    // Five buyers join `a`'s line in turn, five others `b`'s: each line
    // gives places from 1.
    let mut lines: Vec<(&str, Vec<RoomBuyer>)> = vec![
        (
            "a",
            (1..=5)
                .map(|i| RoomBuyer::new(&format!("pa{i}"), &key))
                .collect(),
        ),
        (
            "b",
            (1..=5)
                .map(|i| RoomBuyer::new(&format!("pb{i}"), &key))
                .collect(),
        ),
    ];
    // (A buyer the line has reached as they join is admitted at once, and
    // given the sale's pass in place of a place: round 0 below.)
    let mut admitted_in: Vec<Vec<Option<usize>>> = vec![vec![None; 5]; 2];
    for (l, (event, buyers)) in lines.iter_mut().enumerate() {
        for (i, buyer) in buyers.iter_mut().enumerate() {
            let r = buyer.ask(&c, b, event).await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
            let v = json(&r.body);
            assert_eq!(
                v["position"].as_u64(),
                Some(i as u64 + 1),
                "{event}: {}",
                r.body
            );
            let cookie = if v["status"] == "admitted" {
                admitted_in[l][i] = Some(0);
                format!("spike_pass_{event}")
            } else {
                format!("spike_queue_{event}")
            };
            assert!(buyer.jar.contains_key(&cookie), "{:?}", buyer.jar);
        }
    }
    // Everybody asks again, round after round, until admitted: within each
    // line nobody is admitted in an earlier round than a buyer ahead.
    let start = Instant::now();
    let mut round = 0;
    while admitted_in.iter().flatten().any(Option::is_none) {
        assert!(start.elapsed() < Duration::from_secs(20), "{admitted_in:?}");
        round += 1;
        for (l, (event, buyers)) in lines.iter_mut().enumerate() {
            for (i, buyer) in buyers.iter_mut().enumerate() {
                if admitted_in[l][i].is_some() {
                    continue;
                }
                let r = buyer.ask(&c, b, event).await;
                assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
                if json(&r.body)["status"] == "admitted" {
                    admitted_in[l][i] = Some(round);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("admitted in rounds: {admitted_in:?}");
    for rounds in &admitted_in {
        assert!(
            rounds.windows(2).all(|w| w[0] <= w[1]),
            "admitted out of order: {rounds:?}"
        );
    }

    // `a`'s first buyer's pass, presented to sale `b` (under `b`'s name, and
    // under its own), is no pass there: the buyer is put in `b`'s line.
    let refused_before = json(&get(&c, ports.admin, "/status").await.expect("status").1)
        ["waiting_room"]["passes_refused"]
        .as_u64()
        .expect("count");
    let pass_a = lines[0].1[0].jar["spike_pass_a"].clone();
    let mut copied = RoomBuyer::new("pa1", &key);
    copied.jar.insert("spike_pass_b".into(), pass_a.clone());
    let r = copied.ask(&c, b, "b").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(json(&r.body)["status"], "waiting", "{}", r.body);
    let refused_after = json(&get(&c, ports.admin, "/status").await.expect("status").1)
        ["waiting_room"]["passes_refused"]
        .as_u64()
        .expect("count");
    assert_eq!(refused_after, refused_before + 1);
    let mut own_name = RoomBuyer::new("pa1", &key);
    own_name.jar.insert("spike_pass_a".into(), pass_a);
    let r = own_name.ask(&c, b, "b").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let sale_b = json(
        &get(&c, ports.nodes[0], "/sale?event=b")
            .await
            .expect("sale")
            .1,
    );
    assert_eq!(sale_b["sold"].as_u64(), Some(0), "{sale_b}");

    // `c` sold out before its line was ever heard here (its one ticket
    // bought at a node): its first buyer through the balancer hears so,
    // with no place in a line that admits nobody.
    let mut early = RoomBuyer::new("pc1", &key);
    let r = send(
        &c,
        Method::POST,
        ports.nodes[0],
        "/events/c/buy",
        &[("Authorization", early.bearer.as_str())],
    )
    .await
    .expect("answer");
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let mut late = RoomBuyer::new("pc2", &key);
    let r = late.ask(&c, b, "c").await;
    assert_eq!(
        (r.status, json(&r.body)["status"].as_str()),
        (StatusCode::CONFLICT, Some("sold_out")),
        "{}",
        r.body
    );
    let r = early.ask(&c, b, "c").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);

    // A purchase naming no sale of the fleet, or two, passes no line.
    let mut other = RoomBuyer::new("px", &key);
    let r = other.ask(&c, b, "nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let bearer = other.bearer.clone();
    for path in ["/buy/ticket?event=a&event=b", "/events/a/buy?event=b"] {
        let r = send(
            &c,
            Method::GET,
            b,
            path,
            &[("Authorization", bearer.as_str())],
        )
        .await
        .expect("answer");
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.body);
    }

    // A token for `a` alone hears nothing of another sale at the gate: not
    // `c`'s sold_out, not a place in `d`'s line, which is not even made
    // (a line is a Redis loop for two minutes): the node's 401.
    let exp = spike::auth::unix_now() + 3600;
    let only_a = spike::auth::mint_for(&key, "pa9", &["a"], exp, None).expect("mint");
    let only_a = format!("Bearer {only_a}");
    for event in ["c", "d"] {
        let r = send(
            &c,
            Method::GET,
            b,
            &format!("/events/{event}/buy"),
            &[("Authorization", only_a.as_str())],
        )
        .await
        .expect("answer");
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{event}: {}", r.body);
    }
    let mut redis_conn = redis.connection().expect("redis");
    let d_line: i64 = redis::cmd("EXISTS")
        .arg("spike:{d}:line")
        .arg("spike:{d}:line_pre")
        .arg("spike:{d}:line_marks")
        .query(&mut redis_conn)
        .expect("exists");
    assert_eq!(d_line, 0, "a refused token made d's line");
    // A purchase naming no sale is refused at the gate (before, it passed
    // every line and relied on the node's own file listing several).
    let r = send(
        &c,
        Method::GET,
        b,
        "/buy/ticket",
        &[("Authorization", bearer.as_str())],
    )
    .await
    .expect("answer");
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        r.body.contains("name one") && !r.body.contains("order by its id"),
        "not the gate's answer: {}",
        r.body
    );

    // In its own sale the pass buys.
    let r = lines[0].1[0].ask(&c, b, "a").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = lines[1].1[0].ask(&c, b, "b").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    remove_config(&path);
}

/// A reload that adds a sale gives it a line in the waiting room: its
/// buyers take places, and none passes without one (before, the room kept
/// the sales of its start, and a sale added later was its 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_added_by_a_reload_gets_its_line() {
    let redis = RedisServer::start();
    let auth = common::auth::TestAuth::new("unused");
    let p = common::free_addr;
    let ports = common::up::Ports {
        balancer: p(),
        admin: p(),
        nodes: vec![p()],
    };
    let file = |events: &[&str]| {
        let mut text = String::new();
        for event in events {
            text.push_str(&format!(
                "[[sale]]\nevent = \"{event}\"\ntotal = 5\nper_user_limit = 1\n\n"
            ));
        }
        text.push_str(&auth.section());
        text.push_str(&format!(
            "[redis]\nurl = \"{}\"\n\n[waiting_room]\nadmit = \"100/s\"\n\n\
             [balancer]\nlisten = \"{}\"\nadmin = \"{}\"\n",
            redis.url(),
            ports.balancer,
            ports.admin
        ));
        text.push_str(&common::up::node_entry(1, ports.nodes[0]));
        text
    };
    let (up, path) = common::up::start_up(&file(&["a", "b"]), &ports);
    let c = client();
    let key = spike::auth::BuyerKey::parse(&format!("k1:hs256:{}", common::auth::test_key(1)))
        .expect("key");
    let exp = spike::auth::unix_now() + 3600;
    let token = spike::auth::mint_for(&key, "rd", &["a", "b", "d"], exp, None).expect("mint");
    let bearer = format!("Bearer {token}");
    let ask = async |event: &str| {
        send(
            &c,
            Method::GET,
            ports.balancer,
            &format!("/events/{event}/buy"),
            &[("Authorization", bearer.as_str())],
        )
        .await
        .expect("answer")
    };
    let r = ask("d").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    std::fs::write(&path, file(&["a", "b", "d"])).expect("rewrite");
    up.signal("HUP");
    common::wait_for("the node to sell d", Duration::from_secs(10), async || {
        get(&c, ports.nodes[0], "/sale?event=d")
            .await
            .is_ok_and(|(s, _)| s == StatusCode::OK)
    })
    .await;
    common::wait_for("d's line", Duration::from_secs(10), async || {
        ask("d").await.status == StatusCode::ACCEPTED
    })
    .await;
    remove_config(&path);
}

/// One purchase by its `Idempotency-Key`: the key's order when it bought
/// one (first send or replay), and what became of it.
struct Keyed {
    sale: usize,
    buyer: u64,
    order: Option<String>,
    tickets: Vec<u64>,
    cancelled: bool,
}

/// POST `path` with `key` at `to`, sent again with the same key while the
/// answer is a 503 (a store slow on a loaded machine: the key makes the
/// retry safe, whatever the first try did).
async fn buy_keyed(c: &TestClient, to: SocketAddr, path: &str, key: &str) -> Reply {
    for _ in 0..40 {
        if let Ok(r) = send(c, Method::POST, to, path, &[("Idempotency-Key", key)]).await
            && r.status != StatusCode::SERVICE_UNAVAILABLE
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no answer but 503 to {path} ({key}) at {to}");
}

/// Issue 28: "everything of the other issues holds per sale", under every
/// strategy: 6 sales of 40 tickets (3 with reservations), 4× oversubscribed
/// through `spike up` on Redis. Every purchase carries an `Idempotency-Key`
/// and is sent twice, the second time by the other path spelling, to the
/// balancer or straight to a node: a key that bought is answered its order
/// again, and is one purchase. Early reservations are paid or cancelled
/// (the replay then says so, with the order), a cancelled ticket sells
/// again in its own sale; each sale ends with exactly its total held, no
/// buyer over its limit, and `stock audit --all` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_sells_each_sale_exactly_once_per_key_with_reservations() {
    use common::fleet::Rng;
    const SALES: usize = 6;
    const TOTAL: u64 = 40;
    const LIMIT: u64 = 2;
    const BUYERS: u64 = 60;
    const WORKERS: usize = 16;
    const PER_WORKER: usize = SALES * TOTAL as usize * 4 / WORKERS;
    let event = |i: usize| format!("s{i}");
    let reserving = |i: usize| i.is_multiple_of(2);
    let seed = common::fleet::seed();
    for strategy in [
        "round_robin",
        "weighted_round_robin",
        "ip_hash",
        "least_conn",
    ] {
        let redis = RedisServer::start();
        let p = common::free_addr;
        let ports = common::up::Ports {
            balancer: p(),
            admin: p(),
            nodes: (0..3).map(|_| p()).collect(),
        };
        let mut text = String::new();
        for i in 0..SALES {
            text.push_str(&format!(
                "[[sale]]\nevent = \"{}\"\ntotal = {TOTAL}\nper_user_limit = {LIMIT}\n",
                event(i)
            ));
            if reserving(i) {
                text.push_str("pay_within = \"5m\"\n");
            }
            text.push('\n');
        }
        text.push_str(&format!(
            "[redis]\nurl = \"{}\"\ntimeout = \"5s\"\n\n[balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"{strategy}\"\n",
            redis.url(),
            ports.balancer,
            ports.admin
        ));
        for (i, a) in ports.nodes.iter().enumerate() {
            text.push_str(&common::up::node_entry(i + 1, *a));
        }
        let (mut up, path) = common::up::start_up(&text, &ports);
        let cfg = path.to_str().expect("path").to_string();
        let c = client();
        let targets = Arc::new(
            std::iter::once(ports.balancer)
                .chain(ports.nodes.iter().copied())
                .collect::<Vec<_>>(),
        );
        let lb = ports.balancer;

        let mut tasks = Vec::new();
        for w in 0..WORKERS {
            let (c, targets) = (c.clone(), targets.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let mut out = Vec::with_capacity(PER_WORKER);
                for i in 0..PER_WORKER {
                    let sale = (rng.next() % SALES as u64) as usize;
                    let buyer = rng.next() % BUYERS;
                    let key = format!("{strategy}-{w}-{i}");
                    let e = event(sale);
                    let to = targets[(rng.next() % targets.len() as u64) as usize];
                    let path = format!("/events/{e}/buy?user=b{buyer}");
                    let again = format!("/buy/ticket?event={e}&user=b{buyer}");
                    // A quarter of the keys are sent twice at once (a client
                    // that retried before its first answer): the store
                    // decides them one after the other, never twice.
                    let at_once = rng.next().is_multiple_of(4);
                    let (first, replay) = if at_once {
                        tokio::join!(
                            buy_keyed(&c, lb, &path, &key),
                            buy_keyed(&c, to, &again, &key)
                        )
                    } else {
                        let first = buy_keyed(&c, lb, &path, &key).await;
                        (first, buy_keyed(&c, to, &again, &key).await)
                    };
                    let what = format!("{strategy} {key} {e} b{buyer} (at once: {at_once})");
                    let replayed = |r: &Reply| {
                        r.headers
                            .get("idempotent-replayed")
                            .and_then(|v| v.to_str().ok())
                            == Some("true")
                    };
                    let (v1, v2) = (json(&first.body), json(&replay.body));
                    let bought = match (first.status, replay.status) {
                        // Sent at once, the copy the store decided first may
                        // have been refused (nothing free then) and the other
                        // bought a ticket a cancel freed just after: two
                        // attempts, one purchase; the refusal is not of the
                        // key's order.
                        (StatusCode::OK, StatusCode::CONFLICT) if at_once => {
                            let st = v2["status"].as_str().unwrap_or_default();
                            assert!(matches!(st, "sold_out" | "already_bought"), "{what}: {v2}");
                            assert_ne!(v1["order"], v2["order"], "{what}: {v2}");
                            Some(v1)
                        }
                        (StatusCode::OK, s) => {
                            assert_eq!(s, StatusCode::OK, "{what}: {v1} then {v2}");
                            assert_eq!(v1["order"], v2["order"], "{what}: {}", replay.body);
                            assert_eq!(v1["tickets"], v2["tickets"], "{what}");
                            // One of the two decided, the other is its replay.
                            let (r1, r2) = (replayed(&first), replayed(&replay));
                            if at_once {
                                assert!(r1 != r2, "{what}: replayed {r1} and {r2}");
                            } else {
                                assert!(!r1 && r2, "{what}: replayed {r1} and {r2}");
                            }
                            Some(v1)
                        }
                        (StatusCode::CONFLICT, s) => {
                            let st = v1["status"].as_str().unwrap_or_default();
                            assert!(matches!(st, "sold_out" | "already_bought"), "{what}: {v1}");
                            // A key that did not buy is a new attempt when
                            // sent again (a cancel may have freed a ticket);
                            // but a refusal is never of the key's own order.
                            match s {
                                StatusCode::OK => {
                                    assert_ne!(v1["order"], v2["order"], "{what}: {v1}");
                                    Some(v2)
                                }
                                StatusCode::CONFLICT => {
                                    let st = v2["status"].as_str().unwrap_or_default();
                                    assert!(
                                        matches!(st, "sold_out" | "already_bought"),
                                        "{what}: {v2}"
                                    );
                                    None
                                }
                                other => panic!("{what}: replay {other}: {v2}"),
                            }
                        }
                        (other, _) => panic!("{what}: {other}: {v1}"),
                    };
                    let Some(v) = bought else {
                        out.push(Keyed {
                            sale,
                            buyer,
                            order: None,
                            tickets: Vec::new(),
                            cancelled: false,
                        });
                        continue;
                    };
                    let order = v["order"].as_str().expect("order").to_string();
                    assert!(order.starts_with(&format!("{e}:")), "{what}: {v}");
                    let tickets: Vec<u64> = v["tickets"]
                        .as_array()
                        .expect("tickets")
                        .iter()
                        .map(|t| t.as_u64().expect("ticket"))
                        .collect();
                    let mut cancelled = false;
                    if reserving(sale) {
                        assert_eq!(v["state"], "reserved", "{what}: {v}");
                        // The first third of each worker's purchases pay or
                        // cancel: a cancelled ticket has the rest of the run
                        // to sell again.
                        if i < PER_WORKER / 3 && rng.next().is_multiple_of(2) {
                            let at = targets[(rng.next() % targets.len() as u64) as usize];
                            let (act, state) = if rng.next().is_multiple_of(2) {
                                ("cancel", "cancelled")
                            } else {
                                ("pay", "paid")
                            };
                            let r = send(
                                &c,
                                Method::POST,
                                at,
                                &format!("/orders/{order}/{act}?user=b{buyer}"),
                                &[],
                            )
                            .await
                            .expect("answer");
                            assert_eq!(r.status, StatusCode::OK, "{what} {act}: {}", r.body);
                            assert_eq!(json(&r.body)["state"], state, "{what}: {}", r.body);
                            cancelled = act == "cancel";
                            // The key, sent again, is still that order, in
                            // its state now.
                            let r = buy_keyed(&c, at, &again, &key).await;
                            let v = json(&r.body);
                            let want = if cancelled {
                                StatusCode::CONFLICT
                            } else {
                                StatusCode::OK
                            };
                            assert_eq!(r.status, want, "{what} after {act}: {v}");
                            assert_eq!(v["order"], order.as_str(), "{what} after {act}: {v}");
                            if cancelled {
                                assert_eq!(v["status"], "cancelled", "{what}: {v}");
                            } else {
                                assert_eq!(v["state"], "paid", "{what}: {v}");
                            }
                        }
                    }
                    out.push(Keyed {
                        sale,
                        buyer,
                        order: Some(order),
                        tickets,
                        cancelled,
                    });
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("worker"));
        }

        // A ticket cancelled late in the run may still be free: fresh
        // buyers take what the store says is left, so that the check below
        // is of exactness, not of the crowd's timing.
        for sale in 0..SALES {
            let e = event(sale);
            for n in 0.. {
                let show = run(&["stock", "show", "--config", &cfg, "--event", &e]);
                let left = json(&String::from_utf8_lossy(&show.stdout))["remaining"]
                    .as_u64()
                    .expect("remaining");
                if left == 0 {
                    break;
                }
                assert!(n < 100, "{strategy}: {e} keeps {left} free");
                let key = format!("{strategy}-top-{sale}-{n}");
                let r = buy_keyed(&c, lb, &format!("/events/{e}/buy?user=top{n}"), &key).await;
                if r.status == StatusCode::OK {
                    let v = json(&r.body);
                    all.push(Keyed {
                        sale,
                        buyer: BUYERS + n,
                        order: Some(v["order"].as_str().expect("order").to_string()),
                        tickets: v["tickets"]
                            .as_array()
                            .expect("tickets")
                            .iter()
                            .map(|t| t.as_u64().expect("ticket"))
                            .collect(),
                        cancelled: false,
                    });
                } else {
                    // The nodes hear of a returned ticket within about a
                    // quarter of a second.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }

        // Each key one purchase, each order one key's; per sale exactly the
        // total held, in distinct tickets, no buyer over the limit. (A
        // returned ticket sells again under a new number: numbers go up to
        // the total plus the tickets released.)
        let mut orders = std::collections::HashSet::new();
        let mut tickets = vec![std::collections::HashSet::new(); SALES];
        let mut held = std::collections::HashMap::new();
        let (mut cancels, mut keys_bought) = (0, 0);
        for k in &all {
            let Some(order) = &k.order else { continue };
            keys_bought += 1;
            assert!(
                orders.insert(order.clone()),
                "{strategy}: {order} under two keys"
            );
            if k.cancelled {
                cancels += 1;
                continue;
            }
            for t in &k.tickets {
                assert!(
                    *t >= 1 && tickets[k.sale].insert(*t),
                    "{strategy}: ticket {t} of {} held twice",
                    event(k.sale)
                );
            }
            *held.entry((k.sale, k.buyer)).or_insert(0u64) += k.tickets.len() as u64;
        }
        eprintln!(
            "{strategy}: {} keys, {keys_bought} bought, {cancels} cancelled",
            all.len()
        );
        assert!(cancels > 0, "{strategy}: some reservations cancelled");
        for (sale, t) in tickets.iter().enumerate() {
            assert_eq!(t.len() as u64, TOTAL, "{strategy}: {}", event(sale));
        }
        for ((sale, buyer), n) in &held {
            assert!(
                *n <= LIMIT,
                "{strategy}: b{buyer} holds {n} in {}",
                event(*sale)
            );
        }
        let audit = run(&["stock", "audit", "--all", "--config", &cfg]);
        let out = String::from_utf8_lossy(&audit.stdout);
        assert!(
            audit.status.success(),
            "{strategy}: {out}\n{}",
            String::from_utf8_lossy(&audit.stderr)
        );
        let lines: Vec<serde_json::Value> = out.lines().map(json).collect();
        assert_eq!(lines.len(), SALES, "{strategy}: {out}");
        for l in &lines {
            assert_eq!(
                (l["ok"].as_bool(), l["sold"].as_u64()),
                (Some(true), Some(TOTAL)),
                "{strategy}: {l}"
            );
            assert!(
                matches!(l["most_by_one_buyer"].as_u64(), Some(n) if n <= LIMIT),
                "{strategy}: {l}"
            );
        }
        up.stop("TERM", Duration::from_secs(15));
        remove_config(&path);
    }
}
