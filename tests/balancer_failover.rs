//! Backends dying under traffic: idempotent requests never see an error, a
//! revived backend gets traffic again after `fail_timeout`, backups take over
//! when every primary is gone and hand back when one returns; with nothing
//! left the client gets a JSON 502.

mod balancer_support;
mod common;

use std::time::Duration;

use balancer_support::*;
use common::backend::Backend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_invisible_and_revived_one_comes_back() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let lb = Running::start(&config_text(
        "weighted_round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(a.addr, 1), up(b.addr, 1), up(c.addr, 1)],
    ))
    .await;
    let load = Load::start(lb.url("/"), 4);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b_addr = b.stop();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "client-visible errors: {errors:?}");
    assert!(ok > 100, "traffic flowed: {ok}");

    // Back on the same port; after fail_timeout (1s) it is probed and used.
    let b = Backend::start_on(b_addr, "b").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let client = http();
    for _ in 0..30 {
        get_ok(&client, &lb.url("/")).await;
    }
    assert!(b.hits() >= 5, "revived backend got {} requests", b.hits());
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_take_over_and_hand_back() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let spare = Backend::start("spare").await;
    let lb = Running::start(&config_text(
        "weighted_round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[
            up(a.addr, 1),
            up(b.addr, 1),
            Up {
                addr: spare.addr,
                weight: 1,
                extra: "backup = true",
            },
        ],
    ))
    .await;
    let client = http();
    for _ in 0..20 {
        get_ok(&client, &lb.url("/")).await;
    }
    assert_eq!(spare.hits(), 0, "a backup idles while primaries answer");

    let load = Load::start(lb.url("/"), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a_addr = a.stop();
    let _b_addr = b.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "client-visible errors: {errors:?}");
    assert!(ok > 50);
    let before = spare.hits();
    for _ in 0..20 {
        assert_eq!(get_ok(&client, &lb.url("/")).await, "spare");
    }
    assert_eq!(spare.hits(), before + 20);

    // One primary returns: after fail_timeout it is probed and takes over.
    let a = Backend::start_on(a_addr, "a").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..10 {
        get_ok(&client, &lb.url("/")).await;
    }
    let spare_then = spare.hits();
    let a_then = a.hits();
    for _ in 0..50 {
        assert_eq!(get_ok(&client, &lb.url("/")).await, "a");
    }
    assert_eq!(spare.hits(), spare_then, "the backup handed back");
    assert_eq!(a.hits(), a_then + 50);
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_left_is_a_json_502() {
    let (_held, dead) = common::refusing_addr();
    let lb = Running::start(&config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(dead, 1)],
    ))
    .await;
    let res = raw(
        None,
        lb.addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 502"), "{res}");
    assert!(
        res.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{res}"
    );
    assert!(
        body_of(&res).contains("\"status\":\"bad_gateway\""),
        "{res}"
    );
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_goes_to_the_next_upstream_when_connect_fails() {
    let (_held, dead) = common::refusing_addr();
    let live = Backend::start("live").await;
    let lb = Running::start(&config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(dead, 1), up(live.addr, 1)],
    ))
    .await;
    // The first pick is the dead one: the small body is replayed to the next.
    let res = raw(
        None,
        lb.addr,
        b"POST /buy HTTP/1.1\r\nHost: t\r\nContent-Length: 12\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"user\":\"u\"}",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(body_of(&res), "live");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_is_a_504() {
    // Accepts connections and reads, but never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let text = config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(silent_addr, 1)],
    )
    .replace("response_timeout = \"5s\"", "response_timeout = \"300ms\"");
    let lb = Running::start(&text).await;
    let started = std::time::Instant::now();
    let res = raw(
        None,
        lb.addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 504"), "{res}");
    assert!(body_of(&res).contains("gateway_timeout"), "{res}");
    assert!(started.elapsed() < Duration::from_secs(3));
    holder.abort();
    lb.shutdown().await;
}
