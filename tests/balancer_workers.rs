//! A balancer with several worker threads (what `spike balancer` runs: one
//! single-threaded runtime per CPU, each accepting on the same port with its
//! own keep-alive pools): every request answered while many connections
//! come and go and the file is reloaded, one strategy state for all workers
//! (the split stays exact), and the port closed once it has stopped.

mod balancer_support;
mod common;

use std::time::{Duration, Instant};

use balancer_support::*;
use common::backend::Backend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_serve_reload_and_stop() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let lb = Running::start_workers(
        &config_text(
            "weighted_round_robin",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &[up(a.addr, 1), up(b.addr, 3)],
        ),
        3,
    )
    .await;
    let addr = lb.addr;

    // Many short connections, so that every worker accepts some.
    for _ in 0..60 {
        let (status, body) = get(&http(), &lb.url("/")).await.expect("answer");
        assert_eq!(status, 200);
        assert!(body == "a" || body == "b", "{body}");
    }

    let load = Load::start(lb.url("/"), 16);
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(
        &lb.path,
        config_text(
            "round_robin",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &[up(a.addr, 1), up(b.addr, 3), up(c.addr, 1)],
        ),
    )
    .expect("rewrite config");
    let start = Instant::now();
    while lb.reloader.version() != 2 {
        assert!(start.elapsed() < Duration::from_secs(5), "no reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 100, "{ok}");

    // One picking state whatever worker a connection landed on: 300
    // requests on fresh connections split exactly a third each.
    let before = [a.hits(), b.hits(), c.hits()];
    for _ in 0..300 {
        get_ok(&http(), &lb.url("/")).await;
    }
    assert_eq!(
        [
            a.hits() - before[0],
            b.hits() - before[1],
            c.hits() - before[2]
        ],
        [100, 100, 100]
    );

    lb.shutdown().await;
    // Every worker's descriptor of the listening socket is closed.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the port still accepts after shutdown"
    );
}
