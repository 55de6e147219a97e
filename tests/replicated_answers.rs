//! `[redis] replicas = N`: every answer that tells a buyer they hold a
//! ticket (a sale, a replay of its `Idempotency-Key`, `already_bought` with
//! the order, from the store or from a node's memory) is acknowledged by N
//! replicas, or is the 503 that says it is not. A replay used to skip the
//! `WAIT` (it writes nothing, so the connection's `WAIT` covered nothing),
//! and a Sentinel failover then lost an order its buyer had been told of.
//! Real redis-server, Sentinel and `spike node` processes throughout.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::http::{Reply, TestClient, client, get_bytes, json, send};
use common::redis::RedisServer;
use common::sentinel::{Sentinel, wait_until};
use common::spike::{SpikeProcess, run, wait_listening, write_config};
use hyper::{Method, StatusCode};

/// A sale of `total` (limit 1) sold by two nodes, `replicas = 1`.
fn two_node_sale(event: &str, total: u64, url: &str, n1: SocketAddr, n2: SocketAddr) -> String {
    // A timeout long enough that the WAIT (which ends a quarter early)
    // gives its own answer on a loaded machine.
    let text = format!(
        "[sale]\nevent = \"{event}\"\ntotal = {total}\nper_user_limit = 1\n\n\
         [redis]\nurl = \"{url}\"\ntimeout = \"2s\"\nreplicas = 1\n\n\
         [[node]]\nname = \"n1\"\nlisten = \"{n1}\"\n\n\
         [[node]]\nname = \"n2\"\nlisten = \"{n2}\"\n"
    );
    write_config(&text).to_str().expect("path").to_string()
}

fn start_nodes(cfg: &str, n1: SocketAddr, n2: SocketAddr) -> (SpikeProcess, SpikeProcess) {
    let init = run(&["stock", "init", "--trust-client-buyer-ids", "--config", cfg]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let p1 = SpikeProcess::start(&["node", "--config", cfg, "--name", "n1"]);
    let p2 = SpikeProcess::start(&["node", "--config", cfg, "--name", "n2"]);
    wait_listening(&n1.to_string(), Duration::from_secs(10));
    wait_listening(&n2.to_string(), Duration::from_secs(10));
    (p1, p2)
}

async fn buy(c: &TestClient, node: SocketAddr, buyer: &str, key: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
    send(
        c,
        Method::POST,
        node,
        &format!("/buy/ticket?user={buyer}"),
        &headers,
    )
    .await
    .expect("buy")
}

/// The answer a buyer must get while the replica cannot acknowledge: the
/// 503 that says so, never an order.
fn assert_not_replicated(reply: &Reply, what: &str) {
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: {}",
        reply.body
    );
    assert!(
        reply.body.contains("not replicated"),
        "{what}: {}",
        reply.body
    );
    assert!(!reply.body.contains("\"order\""), "{what}: {}", reply.body);
}

/// Fills the replication link to a stopped replica (48 MiB), standing in
/// for a slow link or a partition: what the primary writes next stays in
/// its own output buffer and dies with it.
fn fill_replication_link(primary: &RedisServer) {
    let mut c = primary.connection().expect("primary");
    let junk = vec![b'x'; 1 << 20];
    for i in 0..48 {
        let _: () = redis::cmd("SET")
            .arg(format!("junk:{i}"))
            .arg(&junk)
            .query(&mut c)
            .expect("SET junk");
    }
}

/// A sale made on the primary but not acknowledged is a 503 at the node
/// that made it; its key replayed at another node, the buyer asking again
/// without the key (already bought), and the holders another node reads
/// into memory after sold out (its `/holders`, the balancer's edge) are
/// not answers either until the replica has it. Once it has, they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_names_an_order_the_replica_does_not_have() {
    // The stopped replica stays within Redis's lag (60 s) for the whole
    // test, so Redis takes the writes and the WAITs are what fall short.
    let args = RedisServer::replicated_args(1, 60);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let primary = RedisServer::start_with(&args);
    let replica = RedisServer::start_replica_with(&primary, &args);
    let (n1, n2) = (common::free_addr(), common::free_addr());
    let event = "replay-ack";
    let cfg = two_node_sale(event, 2, &primary.url(), n1, n2);
    let (_p1, _p2) = start_nodes(&cfg, n1, n2);
    let c = client();

    let first = buy(&c, n1, "a", None).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);

    replica.signal("STOP");
    let made = buy(&c, n1, "b", Some("b-key")).await;
    assert_not_replicated(&made, "the sale itself");
    let buyers: HashMap<String, u64> = primary.hash(&format!("spike:{{{event}}}:buyers"));
    assert_eq!(
        buyers.get("b"),
        Some(&1),
        "the sale was made on the primary"
    );

    // The key replayed at the other node: the store's replay (code 6).
    let replay = buy(&c, n2, "b", Some("b-key")).await;
    assert_not_replicated(&replay, "the key replayed at another node");
    // The buyer without the key: the store's already_bought (code 3).
    let again = buy(&c, n2, "b", None).await;
    assert_not_replicated(&again, "already_bought from the store");
    // The sale is sold out (2 of 2 on the primary): n2 learns it and reads
    // the holders into memory; those it cannot have acknowledged are not
    // answered from memory, nor handed to a balancer's edge.
    let other = buy(&c, n2, "c", None).await;
    assert_eq!(other.status, StatusCode::CONFLICT, "{}", other.body);
    assert_eq!(json(&other.body)["status"], "sold_out", "{}", other.body);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let from_memory = buy(&c, n2, "b", None).await;
    assert_not_replicated(&from_memory, "already_bought from memory");
    let replay = buy(&c, n2, "b", Some("b-key")).await;
    assert_not_replicated(&replay, "the key replayed from memory");
    let (_, holders) = get_bytes(&c, n2, "/holders").await.expect("holders");
    // Served only once current and acknowledged: not yet (a 503), or
    // without b.
    let listed = spike::protocol::HoldersView::decode(&holders)
        .ok()
        .and_then(|v| v.order_of("b"));
    assert!(
        listed.is_none(),
        "holders not acknowledged were handed out: {}",
        String::from_utf8_lossy(&holders)
    );

    // The replica catches up: every way of asking now names the order.
    replica.signal("CONT");
    let order: HashMap<String, String> = primary.hash(&format!("spike:{{{event}}}:buyer_order"));
    let order = order.get("b").expect("b's order").clone();
    let mut replay = buy(&c, n2, "b", Some("b-key")).await;
    for _ in 0..50 {
        if replay.status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        replay = buy(&c, n2, "b", Some("b-key")).await;
    }
    assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
    assert_eq!(json(&replay.body)["order"], order.as_str());
    common::wait_for(
        "n2 to read the acknowledged holders",
        Duration::from_secs(20),
        async || {
            let (_, holders) = get_bytes(&c, n2, "/holders").await.expect("holders");
            spike::protocol::HoldersView::decode(&holders)
                .is_ok_and(|v| v.order_of("b").as_deref() == Some(order.as_str()))
        },
    )
    .await;
    let mine = buy(&c, n2, "b", None).await;
    assert_eq!(mine.status, StatusCode::CONFLICT, "{}", mine.body);
    assert_eq!(json(&mine.body)["order"], order.as_str(), "{}", mine.body);
}

/// The reproduction: the replica stopped and its link full, a sale
/// answered 503 at node 1, its key retried at node 2; then the primary is
/// SIGKILLed and Sentinel promotes the replica. No buyer was told of an
/// order the new primary lacks, and no order id is told to two buyers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_purchase_is_not_answered_before_a_failover_can_lose_it() {
    const SERVICE: &str = "replay";
    let args = RedisServer::replicated_args(1, 10);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut primary = RedisServer::start_with(&args);
    let replica = RedisServer::start_replica_with(&primary, &args);
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::start(SERVICE, primary.port))
        .collect();
    wait_until(
        "the sentinels to find each other and the replica",
        Duration::from_secs(30),
        || sentinels.iter().all(|s| s.settled(SERVICE)),
    );
    let url = format!(
        "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={SERVICE}&node=127.0.0.1:{}&node=127.0.0.1:{}",
        sentinels[0].port, sentinels[1].port, sentinels[2].port
    );
    let (n1, n2) = (common::free_addr(), common::free_addr());
    let event = "replay-failover";
    let cfg = two_node_sale(event, 100, &url, n1, n2);
    let (_p1, _p2) = start_nodes(&cfg, n1, n2);
    let c = client();
    // Every order id a buyer was told, with the buyer told it.
    let mut told: HashMap<String, String> = HashMap::new();
    let mut tell = |reply: &Reply, buyer: &str| {
        let order = json(&reply.body)["order"]
            .as_str()
            .expect("order")
            .to_string();
        if let Some(other) = told.insert(order.clone(), buyer.to_string()) {
            assert_eq!(
                other, buyer,
                "order {order} was told to {other} and {buyer}"
            );
        }
    };
    for b in ["w0", "w1"] {
        let r = buy(&c, n1, b, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        tell(&r, b);
    }

    replica.signal("STOP");
    fill_replication_link(&primary);
    let made = buy(&c, n1, "victim", Some("victim-key")).await;
    assert_not_replicated(&made, "the sale at node 1");
    let replay = buy(&c, n2, "victim", Some("victim-key")).await;
    assert_not_replicated(&replay, "the retry at node 2");

    primary.kill();
    replica.signal("CONT");
    wait_until(
        "Sentinel to promote the replica",
        Duration::from_secs(30),
        || sentinels[0].primary(SERVICE) == Some(replica.port),
    );
    // The old primary comes back as the new one's replica (its copy of
    // the lost order is replaced by a full sync), so `replicas = 1` can be
    // met again.
    primary.restart();

    // The victim retries with their key until the sale is acknowledged;
    // then the next buyers. None may be told an order id told before.
    let retry_until_answered = async |node: SocketAddr, buyer: &str, key: Option<&str>| {
        for _ in 0..300 {
            let r = buy(&c, node, buyer, key).await;
            if r.status != StatusCode::SERVICE_UNAVAILABLE {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{buyer} was never answered after the failover");
    };
    let victim = retry_until_answered(n2, "victim", Some("victim-key")).await;
    assert_eq!(victim.status, StatusCode::OK, "{}", victim.body);
    tell(&victim, "victim");
    for (i, b) in ["next0", "next1", "next2"].iter().enumerate() {
        let node = if i % 2 == 0 { n1 } else { n2 };
        let r = retry_until_answered(node, b, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        tell(&r, b);
    }
    let again = retry_until_answered(n1, "victim", Some("victim-key")).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(
        json(&again.body)["order"],
        json(&victim.body)["order"],
        "victim-key bought twice"
    );

    // Every order told is on the new primary, with the buyer told it.
    let orders: HashMap<String, String> = replica.hash(&format!("spike:{{{event}}}:orders"));
    for (order, buyer) in &told {
        let stored = orders
            .get(order)
            .unwrap_or_else(|| panic!("{buyer} was told {order}, which the failover lost"));
        assert_eq!(json(stored)["buyer"], buyer.as_str(), "{order}: {stored}");
    }
}

/// A key sent again with another quantity is answered with the order the
/// key bought (422 `idempotency_key_reused`, its quantity): an answer about
/// that order, held for the replicas as a replay is. It was sent at once,
/// before any replica had the order (found in review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_quantity_of_an_unreplicated_key_waits_for_the_replicas() {
    let primary = RedisServer::start_primary_for(1);
    let replica = RedisServer::start_replica_of(&primary);
    let text = format!(
        "[sale]\nevent = \"rq\"\ntotal = 10\nper_user_limit = 4\nmax_per_purchase = 4\n\
         [redis]\nurl = \"{}\"\ntimeout = \"2s\"\nreplicas = 1\n\
         [[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:{}\"\n",
        primary.url(),
        common::free_port()
    );
    let sale = common::sale::InProcessSale::start(&text).await;
    let c = client();
    let at = sale.addrs()[0];
    let buy = async |quantity: &str| {
        send(
            &c,
            Method::POST,
            at,
            &format!("/buy/ticket?user=v&quantity={quantity}"),
            &[("Idempotency-Key", "vk")],
        )
        .await
        .expect("buy")
    };
    replica.signal("STOP");
    // Fill the replication link, so that nothing written now reaches the
    // replica before it is continued.
    let mut conn = primary.connection().expect("primary");
    let junk = vec![b'x'; 1 << 20];
    for i in 0..48 {
        let _: () = redis::cmd("SET")
            .arg(format!("junk:{i}"))
            .arg(&junk)
            .query(&mut conn)
            .expect("SET");
    }
    let made = buy("2").await;
    assert_eq!(
        made.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        made.body
    );
    let replay = buy("2").await;
    assert_eq!(
        replay.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "same quantity: {}",
        replay.body
    );
    let other = buy("1").await;
    replica.signal("CONT");
    assert_eq!(
        other.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "an answer about the key's unreplicated order: {}",
        other.body
    );
    sale.stop().await;
}
