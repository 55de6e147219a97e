//! Readiness and drain (issue 25, point 4): `/ready` on the admin address
//! says whether a balancer should get traffic (what the health check of an
//! L4 balancer in front asks), `/healthz` only that the process is alive;
//! on SIGTERM a balancer fails `/ready` at once, serves on for
//! `drain_delay`, then stops accepting and finishes what is in flight.

mod balancer_support;
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use balancer_support::*;
use common::backend::Backend;
use common::spike::{SpikeProcess, wait_listening, write_config};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Status and JSON body of `GET path` on `admin`.
async fn admin_get(admin: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = get(&http(), &format!("http://{admin}{path}"))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert!(body.ends_with('\n'), "{path}: {body:?}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(v["status"].is_string(), "{path}: {body}");
    (status, v)
}

/// Sends one GET on `s` and reads its answer (Content-Length framed).
async fn ask(s: &mut TcpStream, close: bool) -> String {
    let request = if close {
        "GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    } else {
        "GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    };
    if s.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    read_response(s).await
}

/// A real `spike balancer` with `drain_delay = delay` in front of one
/// backend (kept alive with it), once both its listeners accept: the
/// backend, the process, its client and admin addresses.
async fn draining_balancer(delay: &str) -> (Backend, SpikeProcess, SocketAddr, SocketAddr) {
    let backend = Backend::start("b").await;
    let listen = common::free_addr();
    let admin = common::free_addr();
    let text = config_text_with(
        "round_robin",
        &listen.to_string(),
        &admin.to_string(),
        &[up(backend.addr, 1)],
        &format!("drain_delay = \"{delay}\""),
    );
    let path = write_config(&text);
    let lb = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("path")]);
    wait_listening(&listen.to_string(), Duration::from_secs(15));
    wait_listening(&admin.to_string(), Duration::from_secs(5));
    (backend, lb, listen, admin)
}

/// A real `spike balancer`: `/ready` is 200 while it serves; on SIGTERM it
/// is 503 `draining` at once while `/healthz` stays 200, clients (new ones
/// and a keep-alive one from before) are still served for `drain_delay`,
/// each answer asking to close; then the port refuses and the process
/// exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_ready_at_once_serves_for_drain_delay_then_stops() {
    let (backend, mut lb, listen, admin) = draining_balancer("2s").await;

    let (status, v) = admin_get(admin, "/ready").await;
    assert_eq!((status, v["status"].as_str()), (200, Some("ready")), "{v}");
    assert!(v["reason"].is_string(), "{v}");
    let mut kept = TcpStream::connect(listen).await.expect("connect");
    let first = ask(&mut kept, false).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        !first.to_ascii_lowercase().contains("connection: close"),
        "{first}"
    );

    lb.signal("TERM");
    let signalled = Instant::now();
    common::wait_for("/ready to fail", Duration::from_millis(500), async || {
        admin_get(admin, "/ready").await.0 == 503
    })
    .await;
    let (_, v) = admin_get(admin, "/ready").await;
    assert_eq!(v["status"], "draining", "{v}");
    assert!(v["reason"].is_string(), "{v}");
    assert_eq!(admin_get(admin, "/healthz").await.0, 200);

    // Served on, new clients and old, each asked to close.
    let mut new = TcpStream::connect(listen)
        .await
        .expect("connect while draining");
    let answer = ask(&mut new, false).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    let again = ask(&mut kept, false).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    assert!(
        again.to_ascii_lowercase().contains("connection: close"),
        "{again}"
    );
    assert!(
        signalled.elapsed() < Duration::from_millis(1800),
        "the checks took too long to prove anything: {:?}",
        signalled.elapsed()
    );

    // Then no new connections, and a clean exit.
    let refused = loop {
        if TcpStream::connect(listen).await.is_err() {
            break signalled.elapsed();
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(8),
            "still accepting {:?} after SIGTERM",
            signalled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        refused >= Duration::from_millis(1900),
        "stopped accepting after {refused:?}, before drain_delay"
    );
    lb.expect_clean_exit(Duration::from_secs(15));
    assert!(backend.hits() >= 3, "{}", backend.hits());
}

/// `/ready` is 503 `unavailable` while no upstream can be picked (the only
/// one fails its health check), and 200 again when one can; `/healthz`
/// stays 200 throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_fails_while_no_upstream_can_be_picked() {
    let backend = Backend::start("b").await;
    let lb = Running::start(
        &config_text(
            "round_robin",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &[up(backend.addr, 1)],
        )
        .replace(
            "[balancer]\n",
            "[balancer]\nhealth_check = \"/healthz\"\nhealth_interval = \"100ms\"\n",
        ),
    )
    .await;
    common::wait_for("ready", Duration::from_secs(5), async || {
        admin_get(lb.admin, "/ready").await.0 == 200
    })
    .await;
    let (_, v) = admin_get(lb.admin, "/ready").await;
    assert_eq!(v["status"], "ready", "{v}");
    backend
        .healthy
        .store(false, std::sync::atomic::Ordering::SeqCst);
    common::wait_for("not ready", Duration::from_secs(5), async || {
        admin_get(lb.admin, "/ready").await.0 == 503
    })
    .await;
    let (_, v) = admin_get(lb.admin, "/ready").await;
    assert_eq!(v["status"], "unavailable", "{v}");
    assert!(v["reason"].is_string(), "{v}");
    assert_eq!(admin_get(lb.admin, "/healthz").await.0, 200);
    backend
        .healthy
        .store(true, std::sync::atomic::Ordering::SeqCst);
    common::wait_for("ready again", Duration::from_secs(5), async || {
        admin_get(lb.admin, "/ready").await.0 == 200
    })
    .await;
    lb.shutdown().await;
}

/// A second SIGTERM during the drain ends it at once (an operator who
/// means "now" says it twice): the port closes and the process exits
/// long before `drain_delay`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain() {
    let (_backend, mut lb, _listen, admin) = draining_balancer("60s").await;
    lb.signal("TERM");
    common::wait_for("/ready to fail", Duration::from_secs(2), async || {
        admin_get(admin, "/ready").await.0 == 503
    })
    .await;
    let started = Instant::now();
    lb.signal("TERM");
    lb.expect_clean_exit(Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// With `ready_before_open = false` (issue 25, point 4: "before it opens if
/// asked to"), `/ready` is 503 `not_open`, naming the opening, until the
/// sale's `opens_at`, then 200; `/healthz` is 200 throughout. Left at its
/// default, a balancer of the same sale is ready before the opening (its
/// edge answers the early crowd from memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_opening_only_when_asked() {
    let backend = Backend::start("b").await;
    let opens = std::time::SystemTime::now() + Duration::from_secs(3);
    let opens_text = humantime::format_rfc3339_millis(opens).to_string();
    let start = |asked: bool| {
        let listen = common::free_addr();
        let admin = common::free_addr();
        let text = format!(
            "[sale]\nevent = \"ready-{}\"\ntotal = 10\nopens_at = \"{opens_text}\"\n\n{}",
            listen.port(),
            config_text(
                "round_robin",
                &listen.to_string(),
                &admin.to_string(),
                &[up(backend.addr, 1)],
            )
        );
        let text = if asked {
            text.replace("[balancer]\n", "[balancer]\nready_before_open = false\n")
        } else {
            text
        };
        let path = write_config(&text);
        let lb = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("path")]);
        wait_listening(&admin.to_string(), Duration::from_secs(15));
        (lb, admin)
    };
    let (_asked, admin) = start(true);
    let (_default, default_admin) = start(false);

    let (status, v) = admin_get(admin, "/ready").await;
    assert_eq!(
        (status, v["status"].as_str()),
        (503, Some("not_open")),
        "{v}"
    );
    assert!(
        v["opens_at"]
            .as_str()
            .is_some_and(|s| s.starts_with(&opens_text[..19])),
        "{v} (opens at {opens_text})"
    );
    assert_eq!(admin_get(admin, "/healthz").await.0, 200);
    let (status, v) = admin_get(default_admin, "/ready").await;
    assert_eq!((status, v["status"].as_str()), (200, Some("ready")), "{v}");

    common::wait_for("ready at the opening", Duration::from_secs(8), async || {
        admin_get(admin, "/ready").await.0 == 200
    })
    .await;
    assert!(
        std::time::SystemTime::now() >= opens,
        "ready before the opening"
    );
    let (_, v) = admin_get(admin, "/ready").await;
    assert_eq!(v["status"], "ready", "{v}");
}
