//! Purchases through the balancer carry an `Idempotency-Key`: one is added
//! when the client sent none (the same on every attempt), a client's own is
//! passed on unchanged, and a purchase whose node closed the connection
//! after reading it (a node SIGKILLed after its script ran) is sent again
//! to another node with the same key, GET or POST; so is one whose node
//! never answers, and one whose pooled connection went stale is sent again
//! to the same node with its key. Other POSTs are still never sent twice.

mod balancer_support;
mod common;

use std::net::SocketAddr;

use balancer_support::recorder::{Recorder, Then};
use balancer_support::*;

fn is_generated_key(k: &str) -> bool {
    k.len() == 32
        && k.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

async fn balancer(ups: &[SocketAddr]) -> Running {
    let ups: Vec<Up> = ups.iter().map(|a| up(*a, 1)).collect();
    Running::start(&config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &ups,
    ))
    .await
}

const GET_BUY: &[u8] =
    b"GET /buy/ticket?user=alice HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
const POST_BUY: &[u8] = b"POST /buy/ticket HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 16\r\nConnection: close\r\n\r\n{\"user\":\"alice\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_get_a_fresh_key_and_a_client_key_passes_unchanged() {
    let node = Recorder::start("n", Then::Answer).await;
    let lb = balancer(&[node.addr]).await;

    for req in [GET_BUY, POST_BUY, GET_BUY] {
        let res = raw(None, lb.addr, req).await;
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    }
    // A client's claim that the balancer made its key is not passed on.
    let client_key = b"POST /buy/ticket HTTP/1.1\r\nHost: t\r\nIdempotency-Key: \"buyer-7:try_1@a.b\"\r\nSpike-Made-Key: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let res = raw(None, lb.addr, client_key).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    // Not a purchase: no key added.
    let res = raw(
        None,
        lb.addr,
        b"GET /buy/tickets HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");

    let seen = node.seen();
    assert_eq!(seen.len(), 5, "{seen:?}");
    let generated: Vec<&str> = seen[..3]
        .iter()
        .map(|s| {
            assert_eq!(s.keys.len(), 1, "{s:?}");
            s.keys[0].as_str()
        })
        .collect();
    for k in &generated {
        assert!(is_generated_key(k), "{k:?}");
    }
    // The balancer says which keys it made: the node may keep those with
    // their order alone (`deduct.lua`).
    let marked = |s: &balancer_support::recorder::Seen| {
        s.head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("spike-made-key:"))
            .count()
    };
    for s in &seen[..3] {
        assert_eq!(marked(s), 1, "{s:?}");
    }
    assert_eq!(marked(&seen[3]), 0, "{:?}", seen[3]);
    assert_ne!(generated[0], generated[1]);
    assert_ne!(generated[1], generated[2]);
    assert_ne!(generated[0], generated[2]);
    assert_eq!(seen[1].body, b"{\"user\":\"alice\"}");
    assert_eq!(seen[3].keys, vec!["\"buyer-7:try_1@a.b\"".to_string()]);
    assert_eq!(seen[4].request_line, "GET /buy/tickets HTTP/1.1");
    assert!(seen[4].keys.is_empty(), "{:?}", seen[4]);
    lb.shutdown().await;
}

/// A purchase whose first node read it and died is answered by the next
/// node, which sees the same key as the first.
async fn purchase_survives_a_node_that_dies_mid_request(request: &[u8], client_key: Option<&str>) {
    let dies = Recorder::start("dies", Then::Drop).await;
    let lives = Recorder::start("lives", Then::Answer).await;
    // round_robin picks the first upstream first.
    let lb = balancer(&[dies.addr, lives.addr]).await;
    let res = raw(None, lb.addr, request).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(body_of(&res), "lives");

    let (first, second) = (dies.seen(), lives.seen());
    // One attempt on the node that died: its connection was fresh, so the
    // failure is its own and is not repeated there.
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(first[0].request_line, second[0].request_line);
    assert_eq!(first[0].body, second[0].body);
    assert_eq!(first[0].keys.len(), 1, "{first:?}");
    assert_eq!(first[0].keys, second[0].keys, "the retry keeps the key");
    match client_key {
        Some(k) => assert_eq!(first[0].keys[0], k),
        None => assert!(is_generated_key(&first[0].keys[0]), "{first:?}"),
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_purchase_is_retried_on_another_node_with_the_same_key() {
    purchase_survives_a_node_that_dies_mid_request(GET_BUY, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_purchase_is_retried_on_another_node_with_the_same_key() {
    purchase_survives_a_node_that_dies_mid_request(POST_BUY, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_purchase_with_a_client_key_is_retried_with_that_key() {
    purchase_survives_a_node_that_dies_mid_request(
        b"POST /buy/ticket HTTP/1.1\r\nHost: t\r\nIdempotency-Key: k-42\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        Some("k-42"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_posts_are_still_not_sent_twice() {
    for request in [
        &b"POST /buy HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"[..],
        // A purchase whose key the node would refuse is not keyed.
        b"POST /buy/ticket HTTP/1.1\r\nHost: t\r\nIdempotency-Key: a b\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    ] {
        let dies = Recorder::start("dies", Then::Drop).await;
        let lives = Recorder::start("lives", Then::Answer).await;
        let lb = balancer(&[dies.addr, lives.addr]).await;
        let res = raw(None, lb.addr, request).await;
        assert!(res.starts_with("HTTP/1.1 502"), "{res}");
        assert_eq!(dies.seen().len(), 1);
        assert!(lives.seen().is_empty(), "{:?}", lives.seen());
        assert!(dies.seen()[0].request_line.starts_with("POST /buy"));
        lb.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_purchase_on_a_stale_connection_is_sent_again_with_its_key() {
    // Answers the first request of each connection, then reads the next
    // and drops it: the second purchase finds its pooled connection stale.
    let node = Recorder::start("n", Then::AnswerThenDrop(1)).await;
    let lb = balancer(&[node.addr]).await;
    for _ in 0..2 {
        let res = raw(None, lb.addr, POST_BUY).await;
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    }
    let seen = node.seen();
    // The first purchase; the second, dropped; the second again.
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        seen[1].keys, seen[2].keys,
        "the same key on the new connection"
    );
    assert_ne!(seen[0].keys, seen[1].keys, "two purchases, two keys");
    assert!(is_generated_key(&seen[1].keys[0]), "{seen:?}");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_purchase_whose_node_never_answers_goes_to_the_next_with_its_key() {
    let silent = Recorder::start("silent", Then::Stall(b"")).await;
    let lives = Recorder::start("lives", Then::Answer).await;
    let text = config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(silent.addr, 1), up(lives.addr, 1)],
    )
    .replace("response_timeout = \"5s\"", "response_timeout = \"300ms\"");
    let lb = Running::start(&text).await;
    let res = raw(None, lb.addr, POST_BUY).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(body_of(&res), "lives");
    let (first, second) = (silent.seen(), lives.seen());
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(first[0].keys, second[0].keys);
    assert!(is_generated_key(&first[0].keys[0]), "{first:?}");
    lb.shutdown().await;
}
