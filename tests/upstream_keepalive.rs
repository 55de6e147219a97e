//! Keep-alive to upstreams (Nginx's `keepalive N`): a connection is reused
//! request after request, at most `keepalive` stay idle per upstream and
//! worker, idle ones close after `keepalive_timeout`, and an upstream that
//! closes its idle connections costs the client nothing.

mod balancer_support;
mod common;

use std::time::{Duration, Instant};

use balancer_support::*;
use common::backend::Backend;

/// Waits until `cond` holds, for at most `limit`.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

fn keepalive_config(backend: &Backend, keepalive: usize, timeout: &str) -> String {
    config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(backend.addr, 1)],
    )
    .replace(
        "[balancer]\n",
        &format!("[balancer]\nkeepalive = {keepalive}\nkeepalive_timeout = \"{timeout}\"\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_capped_and_expired() {
    let backend = Backend::start("b").await;
    let lb = Running::start(&keepalive_config(&backend, 2, "2s")).await;

    // One client, one request after another: one upstream connection.
    let client = http();
    for _ in 0..200 {
        assert_eq!(get_ok(&client, &lb.url("/")).await, "b");
    }
    assert_eq!(backend.hits(), 200);
    assert_eq!(backend.accepts(), 1, "the upstream connection was reused");

    // Eight at once need more connections; afterwards at most two stay.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = lb.url("/");
        tasks.push(tokio::spawn(async move {
            let client = http();
            for _ in 0..25 {
                assert_eq!(get_ok(&client, &url).await, "b");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(backend.hits(), 400);
    let accepted = backend.accepts();
    assert!(accepted > 1, "concurrent requests opened more connections");
    assert!(
        eventually(Duration::from_secs(2), || backend.open() <= 2).await,
        "{} upstream connections left open, keepalive is 2",
        backend.open()
    );
    assert!(backend.open() >= 1, "the idle ones are kept");
    let (_, status) = get(&client, &format!("http://{}/status", lb.admin))
        .await
        .expect("status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    let idle = status["upstreams"][0]["idle_connections"].as_u64();
    assert!(matches!(idle, Some(1..=2)), "/status: {status}");

    // Idle past keepalive_timeout (2s; expiry looks every second): closed,
    // with no request coming along to notice.
    assert!(
        eventually(Duration::from_secs(6), || backend.open() == 0).await,
        "{} idle upstream connections outlived keepalive_timeout",
        backend.open()
    );
    assert_eq!(get_ok(&client, &lb.url("/")).await, "b");
    assert_eq!(
        backend.accepts(),
        accepted + 1,
        "a new connection after expiry"
    );
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_keeps_no_upstream_connection() {
    let backend = Backend::start("b").await;
    let lb = Running::start(&keepalive_config(&backend, 0, "60s")).await;
    let client = http();
    for _ in 0..20 {
        assert_eq!(get_ok(&client, &lb.url("/")).await, "b");
    }
    assert_eq!(backend.accepts(), 20, "one connection per request");
    assert!(eventually(Duration::from_secs(2), || backend.open() == 0).await);
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_idle_connections_costs_the_client_nothing() {
    let backend = Backend::start("b").await;
    let lb = Running::start(&keepalive_config(&backend, 8, "60s")).await;
    let client = http();
    for round in 0..20 {
        assert_eq!(get_ok(&client, &lb.url("/")).await, "b");
        backend.hang_up_all();
        assert!(eventually(Duration::from_secs(2), || backend.open() == 0).await);
        // A POST is not retried once sent; it must go on a live connection.
        let answer = raw(
            None,
            lb.addr,
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "round {round}: {answer}"
        );
        assert_eq!(body_of(&answer), "b", "round {round}");
    }
    assert_eq!(backend.hits(), 40);
    // No failure was counted against the upstream: it stayed usable.
    let (_, status) = get(&client, &format!("http://{}/status", lb.admin))
        .await
        .expect("status");
    assert!(!status.contains("\"failed\""), "{status}");
    lb.shutdown().await;
}
