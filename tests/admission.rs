//! Bounded admission and active health checks (issue 14): per-upstream
//! `max_conns` with the balancer's queue, and `health_check` with
//! `slow_start`. Real backends on real sockets, a real balancer.

mod balancer_support;
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use balancer_support::*;
use common::backend::Backend;

fn with_balancer_keys(text: String, keys: &str) -> String {
    text.replacen("connect_timeout", &format!("{keys}\nconnect_timeout"), 1)
}

async fn status(lb: &Running) -> serde_json::Value {
    let (_, body) = get(&http(), &format!("http://{}/status", lb.admin))
        .await
        .expect("status");
    serde_json::from_str(&body).expect("status JSON")
}

/// `max_conns = 1` on a slow upstream: the first request goes through; of
/// two more, one waits in the queue (size 1) and is served when the first
/// ends, the other finds the queue full and gets 503 with Retry-After at
/// once; with a short `queue_timeout`, a waiting request gets its 503 when
/// the wait runs out. Never two requests at the upstream at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_queues_then_answers_503_with_retry_after() {
    let slow = Backend::start("slow").await;
    slow.delay_ms.store(600, Ordering::Relaxed);
    let text = config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[Up {
            addr: slow.addr,
            weight: 1,
            extra: "max_conns = 1",
        }],
    );
    let lb = Running::start(&with_balancer_keys(
        text,
        "queue = 1\nqueue_timeout = \"3s\"",
    ))
    .await;
    let send = |delay: u64| {
        let url = lb.url("/x");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let start = Instant::now();
            let client = http();
            let req = hyper::Request::get(&url)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            let res = client.request(req).await.expect("answer");
            let status = res.status().as_u16();
            let retry = res.headers().get("retry-after").cloned();
            let body = http_body_util::BodyExt::collect(res.into_body())
                .await
                .expect("body")
                .to_bytes();
            (
                status,
                retry,
                String::from_utf8_lossy(&body).into_owned(),
                start.elapsed(),
            )
        })
    };
    let first = send(0);
    let (b, c) = (send(150), send(150));
    let first = first.await.expect("first");
    let (b, c) = (b.await.expect("b"), c.await.expect("c"));
    assert_eq!(first.0, 200, "{first:?}");
    let (waited, refused) = if b.0 == 200 { (b, c) } else { (c, b) };
    assert_eq!(waited.0, 200, "{waited:?}");
    assert!(
        waited.3 >= Duration::from_millis(700),
        "served without waiting for the first: {waited:?}"
    );
    assert_eq!(refused.0, 503, "{refused:?}");
    assert_eq!(
        refused.1.as_ref().map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "{refused:?}"
    );
    assert!(refused.2.contains("queue is full"), "{refused:?}");
    assert!(
        refused.3 < Duration::from_millis(400),
        "a full queue answers at once: {refused:?}"
    );
    assert_eq!(slow.served.load(Ordering::Relaxed), 2);
    let s = status(&lb).await;
    assert_eq!(
        (&s["queue"]["queued"], &s["queue"]["full"]),
        (&1.into(), &1.into()),
        "{s}"
    );
    lb.shutdown().await;

    // A wait past queue_timeout.
    let text = config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[Up {
            addr: slow.addr,
            weight: 1,
            extra: "max_conns = 1",
        }],
    );
    let lb = Running::start(&with_balancer_keys(
        text,
        "queue = 5\nqueue_timeout = \"200ms\"",
    ))
    .await;
    let (client, url_a, url_b) = (http(), lb.url("/a"), lb.url("/b"));
    let (_, late) = tokio::join!(get(&client, &url_a), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let start = Instant::now();
        (get(&http(), &url_b).await, start.elapsed())
    });
    let (answer, took) = late;
    let (code, body) = answer.expect("answer");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("queue_timeout"), "{body}");
    assert!(took >= Duration::from_millis(180), "{took:?}");
    assert_eq!(status(&lb).await["queue"]["timed_out"], 1);
    lb.shutdown().await;
}

/// `health_check`: an upstream whose check starts failing is taken out
/// before it fails a buyer (here it then answers 500, and no buyer sees
/// one); when its check passes again it comes back with `slow_start`, its
/// share growing from a small part of the traffic to its whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_takes_an_upstream_out_and_it_comes_back_ramped() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let text = config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(a.addr, 1), up(b.addr, 1)],
    );
    let lb = Running::start(&with_balancer_keys(
        text,
        "health_check = \"/healthz\"\nhealth_interval = \"100ms\"\nhealth_fails = 2\nhealth_passes = 2\nslow_start = \"3s\"",
    ))
    .await;
    let load = Load::start(lb.url("/buy/ticket?user=x"), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.served.load(Ordering::Relaxed) > 10, "b takes traffic");

    // b's check fails: it is out within a few intervals.
    b.healthy.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = status(&lb).await;
    assert_eq!(s["upstreams"][1]["state"], "unhealthy", "{s}");
    // Then b breaks for real: nobody is sent to it any more.
    let before = b.served.load(Ordering::Relaxed);
    b.status.store(500, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        b.served.load(Ordering::Relaxed),
        before,
        "an unhealthy upstream was sent buyers"
    );

    // b is fine again: back in, ramped.
    b.status.store(200, Ordering::Relaxed);
    b.healthy.store(true, Ordering::Relaxed);
    common::wait_for("b back in", Duration::from_secs(3), async || {
        status(&lb).await["upstreams"][1]["state"] == "up"
    })
    .await;
    let share = |window: Duration| {
        let (a, b) = (&a, &b);
        async move {
            let (a0, b0) = (
                a.served.load(Ordering::Relaxed),
                b.served.load(Ordering::Relaxed),
            );
            tokio::time::sleep(window).await;
            let (da, db) = (
                a.served.load(Ordering::Relaxed) - a0,
                b.served.load(Ordering::Relaxed) - b0,
            );
            db as f64 / (da + db).max(1) as f64
        }
    };
    let early = share(Duration::from_millis(600)).await;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let late = share(Duration::from_millis(800)).await;
    let (ok, failed, errors) = load.finish().await;
    eprintln!("b's share: {early:.2} just back, {late:.2} after slow_start; {ok} answered");
    assert_eq!(failed, 0, "a buyer saw an error: {errors:?}");
    assert!(
        early < 0.35,
        "not ramped: b took {early:.2} just after coming back"
    );
    assert!(
        late > 0.4,
        "never ramped up: b took {late:.2} after slow_start"
    );
    lb.shutdown().await;
}
