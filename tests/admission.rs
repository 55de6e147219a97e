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
    // One slow upstream that takes one request at a time.
    let one_at_a_time = |queue: &str| {
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
        with_balancer_keys(text, queue)
    };
    let lb = Running::start(&one_at_a_time("queue = 1\nqueue_timeout = \"3s\"")).await;
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

    // Many at once on two worker threads, room for all in the queue: every
    // one is served, and never two at the upstream together.
    let lb =
        Running::start_workers(&one_at_a_time("queue = 100\nqueue_timeout = \"20s\""), 2).await;
    slow.delay_ms.store(5, Ordering::Relaxed);
    let burst: Vec<_> = (0..60)
        .map(|i| {
            let url = lb.url(&format!("/burst{i}"));
            tokio::spawn(async move { get(&http(), &url).await })
        })
        .collect();
    for t in burst {
        let (code, body) = t.await.expect("task").expect("answer");
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(
        slow.most_at_once.load(Ordering::Relaxed),
        1,
        "max_conns = 1 was passed"
    );
    lb.shutdown().await;
    slow.delay_ms.store(600, Ordering::Relaxed);

    // A wait past queue_timeout.
    let lb = Running::start(&one_at_a_time("queue = 5\nqueue_timeout = \"200ms\"")).await;
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

async fn node_sold(node: std::net::SocketAddr) -> u64 {
    let (_, body) = get(&http(), &format!("http://{node}/stats"))
        .await
        .expect("stats");
    let v: serde_json::Value = serde_json::from_str(&body).expect("stats JSON");
    v["sold"].as_u64().expect("sold")
}

/// Real processes: a `spike node` whose `/healthz` starts failing (its
/// wall clock drifts 5 s from Redis's, past `max_clock_offset`; libfaketime
/// moves it while it runs) is taken out by a `spike balancer`'s health check;
/// then it hangs (SIGSTOP) and no buyer notices, not even as a wait; fixed
/// and resumed, it comes back with a ramped share of the buyers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_failing_its_healthz_is_taken_out_and_comes_back_ramped() {
    use common::spike::{SpikeProcess, run, wait_listening, write_config};
    let redis = common::redis::RedisServer::start();
    let addrs: Vec<std::net::SocketAddr> = (0..4).map(|_| common::free_addr()).collect();
    let text = format!(
        "[sale]\nevent = \"health\"\ntotal = 100000000\nper_user_limit = 0\n\n\
         [redis]\nurl = \"{}\"\ntimeout = \"500ms\"\nmax_clock_offset = \"1s\"\n\n\
         [balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"round_robin\"\nresponse_timeout = \"3s\"\n\
         health_check = \"/healthz\"\nhealth_interval = \"100ms\"\nhealth_fails = 1\nhealth_passes = 2\nslow_start = \"3s\"\n\n\
         [[node]]\nname = \"n1\"\nlisten = \"{}\"\n\n[[node]]\nname = \"n2\"\nlisten = \"{}\"\n",
        redis.url(),
        addrs[0],
        addrs[1],
        addrs[2],
        addrs[3]
    );
    let path = write_config(&text);
    let cfg = path.to_str().expect("path").to_string();
    assert!(
        run(&[
            "stock",
            "init",
            "--trust-client-buyer-ids",
            "--config",
            &cfg
        ])
        .status
        .success()
    );
    let _n1 = SpikeProcess::start(&["node", "--config", &cfg, "--name", "n1"]);
    let shift = path.with_extension("faketime");
    let n2 =
        common::spike::start_with_clock_file(&["node", "--config", &cfg, "--name", "n2"], &shift);
    let _balancer = SpikeProcess::start(&["balancer", "--config", &cfg]);
    for a in &addrs {
        wait_listening(&a.to_string(), Duration::from_secs(10));
    }
    let admin = addrs[1];
    let upstream = |i: usize| async move {
        let (_, body) = get(&http(), &format!("http://{admin}/status"))
            .await
            .expect("status");
        let v: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
        v["upstreams"][i].clone()
    };
    let state = |i: usize| async move {
        upstream(i).await["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    common::wait_for(
        "both nodes checked healthy",
        Duration::from_secs(10),
        async || state(0).await == "up" && state(1).await == "up",
    )
    .await;
    let load = Load::start(format!("http://{}/buy/ticket", addrs[0]), 2);
    common::wait_for("n2 to sell", Duration::from_secs(10), async || {
        node_sold(addrs[3]).await > 20
    })
    .await;

    // n2's clock drifts: its /healthz fails, and the balancer takes it out.
    // The step is seen at once: the node maps Redis's time through its
    // monotonic clock, so a new wall-clock reading is the whole change (a
    // best-of-ten-samples offset kept the old one for up to ten seconds).
    std::fs::write(&shift, "+5").expect("faketime file");
    common::wait_for("n2 taken out", Duration::from_secs(3), async || {
        state(1).await == "unhealthy"
    })
    .await;
    // Then it hangs: with nobody sent to it, nobody waits for it.
    n2.signal("STOP");
    let n1_before = node_sold(addrs[2]).await;
    let sent_before = upstream(1).await["requests"].clone();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        node_sold(addrs[2]).await > n1_before + 20,
        "n1 took the buyers"
    );
    assert_eq!(
        upstream(1).await["requests"],
        sent_before,
        "a buyer was sent to the hung node"
    );

    // Fixed and resumed: back in, with a small share first.
    std::fs::write(&shift, "+0").expect("faketime file");
    n2.signal("CONT");
    common::wait_for("n2 back in", Duration::from_secs(4), async || {
        state(1).await == "up"
    })
    .await;
    let share = async || {
        let (a0, b0) = (node_sold(addrs[2]).await, node_sold(addrs[3]).await);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (a, b) = (
            node_sold(addrs[2]).await - a0,
            node_sold(addrs[3]).await - b0,
        );
        b as f64 / (a + b).max(1) as f64
    };
    let early = share().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let late = share().await;
    let (ok, failed, errors) = load.finish().await;
    eprintln!("n2's share: {early:.2} just back, {late:.2} after slow_start; {ok} sold");
    assert_eq!(failed, 0, "a buyer saw an error: {errors:?}");
    assert!(
        early < 0.35,
        "not ramped: n2 took {early:.2} just after coming back"
    );
    assert!(
        late > 0.4,
        "never ramped up: n2 took {late:.2} after slow_start"
    );
    common::spike::remove_config(&path);
}

/// Issue 22, point 4: once health checks have taken every upstream out (a
/// Redis outage fails every node's `/healthz`), a buyer is told 503 with
/// `Retry-After` and a `reason`, not a 502, on both forwarding paths; and
/// the body is JSON ending with a newline, like every answer of both roles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usable_upstream_is_a_503_with_retry_after_on_both_paths() {
    for fast in [true, false] {
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
            &format!(
                "fast_path = {fast}\nhealth_check = \"/healthz\"\nhealth_interval = \"100ms\"\nhealth_fails = 1\nhealth_passes = 2"
            ),
        ))
        .await;
        a.healthy.store(false, Ordering::Relaxed);
        b.healthy.store(false, Ordering::Relaxed);
        common::wait_for("both out", Duration::from_secs(5), async || {
            let s = status(&lb).await;
            s["upstreams"][0]["state"] == "unhealthy" && s["upstreams"][1]["state"] == "unhealthy"
        })
        .await;
        let served = a.served.load(Ordering::Relaxed) + b.served.load(Ordering::Relaxed);
        let res = raw(
            None,
            lb.addr,
            b"POST /buy/ticket?user=u HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(res.starts_with("HTTP/1.1 503"), "fast_path = {fast}: {res}");
        assert!(
            res.to_ascii_lowercase().contains("\r\nretry-after: "),
            "fast_path = {fast}: {res}"
        );
        let body = body_of(&res);
        assert!(body.ends_with('\n'), "fast_path = {fast}: {body:?}");
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(v["status"], "unavailable", "fast_path = {fast}: {v}");
        assert!(
            v["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "fast_path = {fast}: {v}"
        );
        assert!(v.get("error").is_none(), "fast_path = {fast}: {v}");
        assert_eq!(
            a.served.load(Ordering::Relaxed) + b.served.load(Ordering::Relaxed),
            served,
            "fast_path = {fast}: an unhealthy upstream was sent the buyer"
        );
        lb.shutdown().await;
    }
}

/// Issue 22, point 4, as reported: real processes, `health_check =
/// "/healthz"` as the README advises, and Redis goes away. Every node's
/// check fails, and a buyer is told 503 with `Retry-After` and a `reason`
/// (not a 502), which is the same answer a node gives when Redis is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_a_503_with_retry_after_through_the_balancer() {
    use common::spike::{SpikeProcess, run, wait_listening, write_config};
    let mut redis = common::redis::RedisServer::start();
    let addrs: Vec<std::net::SocketAddr> = (0..4).map(|_| common::free_addr()).collect();
    let text = format!(
        "[sale]\nevent = \"outage\"\ntotal = 1000\nper_user_limit = 1\n\n\
         [redis]\nurl = \"{}\"\ntimeout = \"300ms\"\n\n\
         [balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"round_robin\"\n\
         health_check = \"/healthz\"\nhealth_interval = \"100ms\"\nhealth_fails = 1\nhealth_passes = 2\n\n\
         [[node]]\nname = \"n1\"\nlisten = \"{}\"\n\n[[node]]\nname = \"n2\"\nlisten = \"{}\"\n",
        redis.url(),
        addrs[0],
        addrs[1],
        addrs[2],
        addrs[3]
    );
    let path = write_config(&text);
    let cfg = path.to_str().expect("path").to_string();
    assert!(
        run(&[
            "stock",
            "init",
            "--trust-client-buyer-ids",
            "--config",
            &cfg
        ])
        .status
        .success()
    );
    let _n1 = SpikeProcess::start(&["node", "--config", &cfg, "--name", "n1"]);
    let _n2 = SpikeProcess::start(&["node", "--config", &cfg, "--name", "n2"]);
    let _balancer = SpikeProcess::start(&["balancer", "--config", &cfg]);
    for a in &addrs {
        wait_listening(&a.to_string(), Duration::from_secs(10));
    }
    let buy = |user: &'static str| {
        let to = addrs[0];
        async move {
            let request = format!(
                "POST /buy/ticket?user={user} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            raw(None, to, request.as_bytes()).await
        }
    };
    common::wait_for(
        "a sale through the balancer",
        Duration::from_secs(10),
        async || buy("before").await.starts_with("HTTP/1.1 200"),
    )
    .await;

    redis.kill();
    let admin = addrs[1];
    common::wait_for("both nodes out", Duration::from_secs(10), async || {
        let Ok((_, body)) = get(&http(), &format!("http://{admin}/status")).await else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["upstreams"][0]["state"] == "unhealthy" && v["upstreams"][1]["state"] == "unhealthy"
    })
    .await;
    let res = buy("during").await;
    assert!(res.starts_with("HTTP/1.1 503"), "{res}");
    assert!(
        res.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{res}"
    );
    let v: serde_json::Value = serde_json::from_str(body_of(&res)).expect("JSON body");
    assert_eq!(v["status"], "unavailable", "{v}");
    assert!(v["reason"].is_string(), "{v}");
}
