//! Holders that scale (issue 26): a sold-out node keeps who holds what
//! current from the release itself (the order stream's events since its
//! last read), not by reading every holder again each time a reservation
//! expires. What must hold through that churn: a buyer whose reservation
//! went back is never told `already_bought`; the buyers who took those
//! tickets are, with their own orders; a key that bought is replayed
//! exactly, one that did not is not; never more sold than the total.
//! Real redis-server processes on free ports, nodes in this process, many
//! more buyers than tickets, at once.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::http::{Reply, TestClient, client, get, json, send};
use common::redis::RedisServer;
use common::sale::{Answer, InProcessSale, count, sale_config, storm};
use hyper::{Method, StatusCode};

const TOTAL: usize = 10;

/// How often Redis ran `command` (`INFO commandstats`).
fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let mut c = redis.connection().expect("redis");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .expect("INFO");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn stats(c: &TestClient, node: SocketAddr) -> serde_json::Value {
    let (_, body) = get(c, node, "/stats").await.expect("stats");
    json(&body)
}

/// The winners of a storm: buyer → order.
fn winners(answers: &[Answer]) -> HashMap<String, String> {
    answers
        .iter()
        .filter(|a| a.status == Some(StatusCode::OK))
        .map(|a| {
            let order = json(&a.body)["order"].as_str().expect("order").to_string();
            (a.buyer.clone(), order)
        })
        .collect()
}

/// Until every node answers `sold_out` from memory with its holders
/// current (its `/holders` is served only then).
async fn holders_current(c: &TestClient, sale: &InProcessSale) {
    for node in sale.addrs() {
        common::wait_for(
            "the node's holders to be current",
            Duration::from_secs(10),
            async || {
                get(c, node, "/holders")
                    .await
                    .is_ok_and(|(status, _)| status == StatusCode::OK)
            },
        )
        .await;
    }
}

/// Until every reservation expired (the sweeps) and every node sells again.
async fn all_released(c: &TestClient, sale: &InProcessSale, released: u64) {
    common::wait_for(
        "the reservations to expire",
        Duration::from_secs(10),
        async || {
            let snap = sale.store.snapshot().await.expect("snapshot");
            snap.released >= released && snap.sold == 0
        },
    )
    .await;
    for node in sale.addrs() {
        common::wait_for("the node to reopen", Duration::from_secs(5), async || {
            stats(c, node).await["sold_out"] == false
        })
        .await;
    }
}

/// Three rounds of a sale of 10 with a one-second payment window that
/// nobody meets: 100 buyers storm for the 10 tickets, the reservations
/// expire, the next 100 storm, and so on. After each round, with the nodes
/// answering from memory: every winner of the round is `already_bought`
/// with their order, every earlier winner (released) is `sold_out`, and no
/// store call is made for them. Redis: the holders are read in full once
/// (the nodes share them), every later round is taken in from the events
/// (no `HSCAN`).
async fn releases_are_taken_in_from_the_events(redis: Option<&RedisServer>) {
    let url = redis.map(|r| r.url());
    let text = sale_config(
        "churn",
        TOTAL as u64,
        1,
        &[1, 1],
        url.as_deref(),
        "pay_within = \"1s\"",
    );
    let sale = InProcessSale::start(&text).await;
    let c = client();
    let nodes = sale.addrs();
    let mut released: Vec<(String, String)> = Vec::new();
    let mut hscan_after_first = None;
    for round in 0..3u64 {
        if round > 0 {
            all_released(&c, &sale, round * TOTAL as u64).await;
        }
        let answers = storm(&c, &nodes, 400, 100, 64, &format!("r{round}-")).await;
        let won = winners(&answers);
        assert_eq!(
            won.len(),
            TOTAL,
            "round {round}: every free ticket sold, once"
        );
        assert_eq!(count(&answers, StatusCode::OK), TOTAL, "round {round}");
        holders_current(&c, &sale).await;
        if let Some(r) = redis
            && round == 0
        {
            hscan_after_first = Some(command_calls(r, "hscan"));
        }
        let calls_before: Vec<u64> = {
            let mut v = Vec::new();
            for n in &nodes {
                v.push(stats(&c, *n).await["store_calls"].as_u64().expect("calls"));
            }
            v
        };
        for (i, (buyer, order)) in won.iter().enumerate() {
            let node = nodes[i % nodes.len()];
            let (status, body) = get(&c, node, &format!("/buy/ticket?user={buyer}"))
                .await
                .expect("retry");
            assert_eq!(status, StatusCode::CONFLICT, "{body}");
            assert_eq!(json(&body)["status"], "already_bought", "{body}");
            assert_eq!(json(&body)["order"], order.as_str(), "{body}");
        }
        for (i, (buyer, order)) in released.iter().enumerate() {
            let node = nodes[i % nodes.len()];
            let (status, body) = get(&c, node, &format!("/buy/ticket?user={buyer}"))
                .await
                .expect("retry");
            assert_eq!(status, StatusCode::CONFLICT, "{body}");
            assert_eq!(
                json(&body)["status"],
                "sold_out",
                "{buyer}'s {order} went back on sale, yet: {body}"
            );
        }
        for (n, before) in nodes.iter().zip(calls_before) {
            let after = stats(&c, *n).await["store_calls"].as_u64().expect("calls");
            assert_eq!(before, after, "round {round}: answered from memory");
        }
        released.extend(won);
    }
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert!(snap.audit(None, None).is_empty(), "{snap:?}");
    assert_eq!(snap.sold, TOTAL as u64);
    assert_eq!(snap.released, 2 * TOTAL as u64);
    if let (Some(r), Some(first)) = (redis, hscan_after_first) {
        assert_eq!(
            command_calls(r, "hscan"),
            first,
            "a release made a node read every holder again"
        );
        // The two nodes share one store in this process, so one copy of
        // the holders: read in full once, by one of them.
        let (mut reads, mut changes) = (0, 0);
        for n in &nodes {
            let s = stats(&c, *n).await;
            reads += s["holder_reads"].as_u64().expect("holder_reads");
            changes += s["holder_changes"].as_u64().expect("holder_changes");
        }
        assert_eq!(reads, 1, "full reads of the holders");
        assert!(
            changes >= 2,
            "{changes} reads of the changes for two rounds"
        );
    }
    sale.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_are_taken_in_from_the_events_redis() {
    let redis = RedisServer::start();
    releases_are_taken_in_from_the_events(Some(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_are_taken_in_from_the_events_embedded() {
    releases_are_taken_in_from_the_events(None).await;
}

/// Keys through a release: a key whose reservation expired is still its
/// order's (a replay says `expired`, never a second ticket), for its buyer
/// only; a fresh key after sold out is `sold_out`; a key that bought in
/// the resale is replayed with its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stay_once_per_key_through_releases() {
    let redis = RedisServer::start();
    let text = sale_config(
        "churnkeys",
        TOTAL as u64,
        1,
        &[1, 1],
        Some(&redis.url()),
        "pay_within = \"1s\"",
    );
    let sale = InProcessSale::start(&text).await;
    let c = client();
    let nodes = sale.addrs();
    let buy = |node: SocketAddr, buyer: String, key: String| {
        let c = c.clone();
        async move { buy_with_key(&c, node, &buyer, &key).await }
    };
    // Round 0: 40 buyers with keys of their own for 10 tickets, at once.
    let held = sell_at_once(&nodes, 0, &buy).await;
    assert_eq!(held.len(), TOTAL);
    all_released(&c, &sale, TOTAL as u64).await;
    // Round 1: 40 others take the 10 tickets back.
    let resold = sell_at_once(&nodes, 1, &buy).await;
    assert_eq!(resold.len(), TOTAL);
    holders_current(&c, &sale).await;
    for (n, (i, order)) in held.iter().enumerate() {
        let node = nodes[n % nodes.len()];
        let r = buy(node, format!("k0-{i}"), format!("key0-{i}")).await;
        let v = json(&r.body);
        assert_eq!(v["order"], order.as_str(), "{}", r.body);
        assert_eq!(v["status"], "expired", "{}", r.body);
        let other = buy(node, "intruder".into(), format!("key0-{i}")).await;
        assert_eq!(
            other.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            other.body
        );
    }
    for (n, (i, order)) in resold.iter().enumerate() {
        let node = nodes[n % nodes.len()];
        let r = buy(node, format!("k1-{i}"), format!("key1-{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(json(&r.body)["order"], order.as_str(), "{}", r.body);
    }
    let fresh = buy(nodes[0], "late".into(), "key-late".into()).await;
    assert_eq!(fresh.status, StatusCode::CONFLICT, "{}", fresh.body);
    assert_eq!(json(&fresh.body)["status"], "sold_out", "{}", fresh.body);
    let snap = sale.store.snapshot().await.expect("snapshot");
    assert!(snap.audit(None, None).is_empty(), "{snap:?}");
    assert_eq!((snap.sold, snap.orders), (TOTAL as u64, 2 * TOTAL as u64));
    sale.stop().await;
}

async fn buy_with_key(c: &TestClient, node: SocketAddr, buyer: &str, key: &str) -> Reply {
    send(
        c,
        Method::POST,
        node,
        &format!("/buy/ticket?user={buyer}"),
        &[("Idempotency-Key", key)],
    )
    .await
    .expect("buy")
}

/// 40 buyers `k{round}-{i}`, each with key `key{round}-{i}`, at once
/// (tasks of their own): the winners, by index, with their orders.
async fn sell_at_once<F, Fut>(nodes: &[SocketAddr], round: usize, buy: &F) -> Vec<(usize, String)>
where
    F: Fn(SocketAddr, String, String) -> Fut,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let node = nodes[(i + round) % nodes.len()];
            tokio::spawn(buy(
                node,
                format!("k{round}-{i}"),
                format!("key{round}-{i}"),
            ))
        })
        .collect();
    let mut won = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.expect("buyer task");
        if r.status == StatusCode::OK {
            won.push((
                i,
                json(&r.body)["order"].as_str().expect("order").to_string(),
            ));
        } else {
            assert_eq!(json(&r.body)["status"], "sold_out", "{}", r.body);
        }
    }
    won
}
