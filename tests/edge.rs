//! Sold out at the edge (issue 14): once the nodes say the sale is sold
//! out, `spike balancer` answers the late buyers itself, and lets go as soon
//! as stock may come back. Real `spike up` processes over a real Redis.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::http::{TestClient, client, get, json, send};
use common::redis::RedisServer;
use common::spike::{SpikeProcess, run, wait_listening, write_config};
use hyper::{Method, StatusCode};

/// A `spike up` file over Redis: a round-robin balancer, three nodes.
fn up_file(event: &str, total: u64, redis: &str, extra_sale: &str) -> (String, Vec<SocketAddr>) {
    let addrs: Vec<SocketAddr> = (0..5).map(|_| common::free_addr()).collect();
    let mut t = format!(
        "[sale]\nevent = \"{event}\"\ntotal = {total}\nper_user_limit = 1\n{extra_sale}\n\n\
         [redis]\nurl = \"{redis}\"\n\n\
         [balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"round_robin\"\n",
        addrs[0], addrs[1]
    );
    for (i, a) in addrs[2..].iter().enumerate() {
        t.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\nlisten = \"{a}\"\n",
            i + 1
        ));
    }
    (t, addrs)
}

async fn node_sold_out_answers(c: &TestClient, nodes: &[SocketAddr]) -> u64 {
    let mut n = 0;
    for a in nodes {
        let (_, body) = get(c, *a, "/stats").await.expect("stats");
        n += json(&body)["sold_out_answers"].as_u64().expect("count");
    }
    n
}

async fn edge(c: &TestClient, admin: SocketAddr) -> serde_json::Value {
    let (_, body) = get(c, admin, "/status").await.expect("status");
    json(&body)["edge"].clone()
}

/// 3,000 buyers after the last ticket: every one hears `409 sold_out`, at
/// most 1% of them reach a node, and a ticket holder still gets
/// `already_bought` with the order, from the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sold_out_flood_is_answered_at_the_edge() {
    let redis = RedisServer::start();
    let (text, addrs) = up_file("flood", 40, &redis.url(), "");
    let path = write_config(&text);
    let _up = SpikeProcess::start(&["up", "--config", path.to_str().expect("path")]);
    for a in &addrs {
        wait_listening(&a.to_string(), Duration::from_secs(15));
    }
    let (b, admin, nodes) = (addrs[0], addrs[1], &addrs[2..]);
    let c = client();
    let mut holder = None;
    for i in 0..40 {
        let (status, body) = get(&c, b, &format!("/buy/ticket?user=h{i}"))
            .await
            .expect("buy");
        assert_eq!(status, StatusCode::OK, "{body}");
        holder = Some((
            format!("h{i}"),
            json(&body)["order"].as_str().expect("order").to_string(),
        ));
    }
    let (status, _) = get(&c, b, "/buy/ticket?user=first-late")
        .await
        .expect("buy");
    assert_eq!(status, StatusCode::CONFLICT);
    common::wait_for("the edge to answer", Duration::from_secs(3), async || {
        edge(&c, admin).await["answering"] == true
    })
    .await;

    let before = node_sold_out_answers(&c, nodes).await;
    let answers = common::sale::storm(&c, &[b], 3000, 3000, 20, "late").await;
    let after = node_sold_out_answers(&c, nodes).await;
    for a in &answers {
        assert_eq!(a.status, Some(StatusCode::CONFLICT), "{}", a.body);
        assert_eq!(json(&a.body)["status"], "sold_out", "{}", a.body);
    }
    let reached = after - before;
    eprintln!("{reached} of 3000 sold-out answers came from a node");
    assert!(reached <= 30, "{reached} of 3000 reached the nodes");
    let e = edge(&c, admin).await;
    assert!(
        e["sold_out_answers"].as_u64().expect("count") >= 2970,
        "{e}"
    );

    let (user, order) = holder.expect("a holder");
    let (status, body) = get(&c, b, &format!("/buy/ticket?user={user}"))
        .await
        .expect("buy");
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let v = json(&body);
    assert_eq!(
        (v["status"].as_str(), v["order"].as_str()),
        (Some("already_bought"), Some(order.as_str()))
    );
    assert!(edge(&c, admin).await["already_bought_answers"].as_u64() >= Some(1));
    let out = run(&["stock", "audit", "--config", path.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    common::spike::remove_config(&path);
}

/// Buys through the balancer until a 200, for at most `limit`.
async fn buy_within(
    c: &TestClient,
    b: SocketAddr,
    user: &str,
    limit: Duration,
) -> (StatusCode, String, Duration) {
    let start = Instant::now();
    loop {
        let (status, body) = get(c, b, &format!("/buy/ticket?user={user}"))
            .await
            .expect("buy");
        if status == StatusCode::OK || start.elapsed() > limit {
            return (status, body, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The edge never says `sold_out` for long while the store has stock: a
/// cancelled reservation reopens it within about a second and the ticket
/// sells through the balancer; so does a reset (`stock init --force`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_stock_and_a_reset_reopen_the_edge_within_a_second() {
    let redis = RedisServer::start();
    let (text, addrs) = up_file("reopen", 3, &redis.url(), "pay_within = \"60s\"");
    let path = write_config(&text);
    let _up = SpikeProcess::start(&["up", "--config", path.to_str().expect("path")]);
    for a in &addrs {
        wait_listening(&a.to_string(), Duration::from_secs(15));
    }
    let (b, admin) = (addrs[0], addrs[1]);
    let c = client();
    let mut first = None;
    for i in 0..3 {
        let (status, body) = get(&c, b, &format!("/buy/ticket?user=r{i}"))
            .await
            .expect("buy");
        assert_eq!(status, StatusCode::OK, "{body}");
        first.get_or_insert(json(&body)["order"].as_str().expect("order").to_string());
    }
    let _ = get(&c, b, "/buy/ticket?user=late").await;
    common::wait_for("the edge to answer", Duration::from_secs(3), async || {
        edge(&c, admin).await["answering"] == true
    })
    .await;

    let id = first.expect("an order");
    let r = send(
        &c,
        Method::POST,
        b,
        &format!("/orders/{id}/cancel?user=r0"),
        &[],
    )
    .await
    .expect("cancel");
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let (status, body, took) = buy_within(&c, b, "after-cancel", Duration::from_millis(2500)).await;
    eprintln!("the cancelled ticket sold through the balancer after {took:?}");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(took < Duration::from_millis(1500), "{took:?}");

    // Sold out again, then a reset.
    let _ = get(&c, b, "/buy/ticket?user=late2").await;
    common::wait_for(
        "the edge to answer again",
        Duration::from_secs(3),
        async || edge(&c, admin).await["answering"] == true,
    )
    .await;
    let out = run(&[
        "stock",
        "init",
        "--trust-client-buyer-ids",
        "--force",
        "--config",
        path.to_str().expect("path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body, took) = buy_within(&c, b, "after-reset", Duration::from_millis(2500)).await;
    eprintln!("after the reset a ticket sold through the balancer after {took:?}");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    common::spike::remove_config(&path);
}
