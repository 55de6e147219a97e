//! A sale that opens and closes on time, and can be paused, topped up and
//! closed while it runs (issue 27, point 1): `[sale] opens_at` and
//! `closes_at`, stored with the sale by `stock init` and decided by the
//! store in Redis's clock; before the opening every node and the
//! balancer's edge answer `not_open` from memory, and no health check
//! fails; `spike stock pause`, `resume`, `add N` and `close`, each an event
//! in the sale's stream. Real `spike` processes, real redis-server, with
//! `[auth]` on.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::auth::TestAuth;
use common::http::{Reply, TestClient, client, json, send};
use common::redis::RedisServer;
use common::spike::{remove_config, run};
use common::up::{Ports, start_up, up_config};
use hyper::{Method, StatusCode};

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// A `spike up` sale of `total` on `redis` (or the embedded store), with
/// `[auth]` and `extra` lines in `[sale]`.
fn sale(total: u64, redis: Option<&str>, extra: &str) -> (String, Ports, TestAuth) {
    let (text, ports) = up_config(total, 2, redis);
    let auth = TestAuth::new("up");
    let text = text
        .replace(
            "per_user_limit = 1\n",
            &format!("per_user_limit = 1\n{extra}"),
        )
        .replace("\n[balancer]", &format!("\n{}[balancer]", auth.section()));
    (text, ports, auth)
}

async fn buy(c: &TestClient, at: std::net::SocketAddr, auth: &TestAuth, buyer: &str) -> Reply {
    buy_with(c, at, auth, buyer, None).await
}

async fn buy_with(
    c: &TestClient,
    at: std::net::SocketAddr,
    auth: &TestAuth,
    buyer: &str,
    key: Option<&str>,
) -> Reply {
    auth.buy(c, Method::POST, at, buyer, key)
        .await
        .expect("an answer")
}

fn status_of(r: &Reply) -> String {
    json(&r.body)["status"].as_str().unwrap_or("").to_string()
}

fn show(cfg: &str) -> serde_json::Value {
    let out = run(&["stock", "show", "--config", cfg]);
    assert!(out.status.success(), "{out:?}");
    json(&String::from_utf8_lossy(&out.stdout))
}

/// Before `opens_at`, the balancer and every node answer `409 not_open`
/// (with `opens_at` and a `Retry-After`) from memory: no purchase reaches
/// the store, every node passes its health check and stays in the
/// balancer. At the opening the sale sells; after `closes_at` it answers
/// `closed`, but a purchase sent again with its key still gets its order.
async fn opens_and_closes_on_time(redis: Option<&RedisServer>) {
    let url = redis.map(RedisServer::url);
    let opens = SystemTime::now() + Duration::from_secs(6);
    let closes = opens + Duration::from_secs(4);
    let (text, ports, auth) = sale(
        10,
        url.as_deref(),
        &format!(
            "opens_at = \"{}\"\ncloses_at = \"{}\"\n",
            rfc3339(opens),
            rfc3339(closes)
        ),
    );
    // The balancer checks its nodes' health as it would in production:
    // a node that failed its check before the opening would be taken out.
    let text = text.replace(
        "[balancer]\nlisten",
        "[balancer]\nhealth_check = \"/healthz\"\nhealth_interval = \"100ms\"\nlisten",
    );
    assert!(text.contains("health_check"), "{text}");
    let (up, path) = start_up(&text, &ports);
    let c = client();

    for (i, at) in [ports.balancer, ports.nodes[0], ports.nodes[1]]
        .into_iter()
        .enumerate()
    {
        let r = buy(&c, at, &auth, &format!("early{i}")).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
        let v = json(&r.body);
        assert_eq!(v["status"], "not_open", "{}", r.body);
        assert_eq!(v["opens_at"], rfc3339(opens), "{}", r.body);
        assert!(v["reason"].is_string(), "{}", r.body);
        let after: u64 = r
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Retry-After: {:?}", r.headers));
        assert!((1..=7).contains(&after), "Retry-After {after}");
        // With a key of its own too: nothing can have sold before the
        // opening, so no key has an order to replay; answered from memory.
        let keyed = buy_with(&c, at, &auth, &format!("early{i}"), Some(&format!("ek{i}"))).await;
        assert_eq!(
            (keyed.status, status_of(&keyed)),
            (StatusCode::CONFLICT, "not_open".to_string()),
            "{}",
            keyed.body
        );
    }
    for n in &ports.nodes {
        let h = send(&c, Method::GET, *n, "/healthz", &[])
            .await
            .expect("healthz");
        assert_eq!(h.status, StatusCode::OK, "{}", h.body);
        let stats = send(&c, Method::GET, *n, "/stats", &[])
            .await
            .expect("stats");
        let s = json(&stats.body);
        assert_eq!(s["store_calls"], 0, "a purchase reached the store: {s}");
        assert_eq!(s["not_selling"], 2, "{s}");
    }
    let status = json(
        &send(&c, Method::GET, ports.admin, "/status", &[])
            .await
            .expect("status")
            .body,
    );
    assert_eq!(status["edge"]["not_selling_answers"], 2, "{status}");
    for u in status["upstreams"].as_array().expect("upstreams") {
        assert_eq!(u["state"], "up", "{u}");
    }
    // Many health checks later, still before the opening: every node
    // passes them, and the balancer is ready.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        SystemTime::now() < opens,
        "the checks took past the opening"
    );
    let status = json(
        &send(&c, Method::GET, ports.admin, "/status", &[])
            .await
            .expect("status")
            .body,
    );
    for u in status["upstreams"].as_array().expect("upstreams") {
        assert_eq!(
            u["state"], "up",
            "a health check failed before the opening: {u}"
        );
    }
    let ready = send(&c, Method::GET, ports.admin, "/ready", &[])
        .await
        .expect("ready");
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);

    // The opening: the sale sells, in the store's clock.
    while SystemTime::now() < opens + Duration::from_millis(50) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut first = None;
    let start = Instant::now();
    while first.is_none() {
        let r = buy_with(&c, ports.balancer, &auth, "b1", Some("key-b1")).await;
        match r.status {
            StatusCode::OK => first = Some(json(&r.body)["order"].clone()),
            // A node whose clock runs a little behind the store's may
            // still say not_open for a moment.
            StatusCode::CONFLICT if status_of(&r) == "not_open" => {
                assert!(start.elapsed() < Duration::from_secs(2), "{}", r.body);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => panic!("{}: {}", r.status, r.body),
        }
    }
    for i in 2..=4 {
        let r = buy(&c, ports.balancer, &auth, &format!("b{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }

    // The closing.
    while SystemTime::now() < closes + Duration::from_millis(50) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for at in [ports.balancer, ports.nodes[0], ports.nodes[1]] {
        let r = buy(&c, at, &auth, "late").await;
        assert_eq!(
            (r.status, status_of(&r)),
            (StatusCode::CONFLICT, "closed".to_string()),
            "{}",
            r.body
        );
    }
    // The same purchase sent again, with its key: its order, not "closed",
    // through the balancer and straight to each node, and again once the
    // nodes have read the holders of the closed sale.
    for round in 0..2 {
        for at in [ports.balancer, ports.nodes[0], ports.nodes[1]] {
            let again = buy_with(&c, at, &auth, "b1", Some("key-b1")).await;
            assert_eq!(
                again.status,
                StatusCode::OK,
                "round {round}: {}",
                again.body
            );
            assert_eq!(Some(json(&again.body)["order"].clone()), first);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }

    if redis.is_some() {
        let cfg = path.to_str().expect("path");
        let snap = show(cfg);
        assert_eq!(snap["sold"], 4, "{snap}");
        assert_eq!(
            snap["opens_at_ms"].as_u64(),
            Some(
                opens
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .expect("after 1970")
                    .as_millis() as u64
            ),
            "{snap}"
        );
        let audit = run(&["stock", "audit", "--config", cfg]);
        assert!(audit.status.success(), "{audit:?}");
    }
    drop(up);
    remove_config(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_opens_and_closes_on_time_redis() {
    let redis = RedisServer::start();
    opens_and_closes_on_time(Some(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_opens_and_closes_on_time_embedded() {
    opens_and_closes_on_time(None).await;
}

/// The store, not a node's file, decides: a sale whose stored `opens_at`
/// is still ahead refuses a purchase from a node whose file has no opening
/// (so it does not answer from memory), in Redis's clock, and sells
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_decides_the_opening_in_its_own_clock() {
    let redis = RedisServer::start();
    let opens = SystemTime::now() + Duration::from_secs(60);
    let (text, ports, auth) = sale(
        10,
        Some(&redis.url()),
        &format!("opens_at = \"{}\"\n", rfc3339(opens)),
    );
    let stored = common::spike::write_config(&text);
    let cfg = stored.to_str().expect("path");
    let init = run(&["stock", "init", "--config", cfg]);
    assert!(init.status.success(), "{init:?}");
    // The nodes run a file without the opening.
    let plain = text.replace(&format!("opens_at = \"{}\"\n", rfc3339(opens)), "");
    assert_ne!(plain, text);
    let (up, path) = start_up(&plain, &ports);
    let c = client();
    let r = buy(&c, ports.nodes[0], &auth, "early").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(status_of(&r), "not_open", "{}", r.body);
    assert_eq!(json(&r.body)["opens_at"], rfc3339(opens), "{}", r.body);
    let stats = json(
        &send(&c, Method::GET, ports.nodes[0], "/stats", &[])
            .await
            .expect("stats")
            .body,
    );
    // It asked the store (a lease request, which the store refused).
    assert!(stats["redis_calls"].as_u64() >= Some(1), "{stats}");
    assert_eq!(stats["not_selling"], 1, "{stats}");
    assert_eq!(show(cfg)["sold"], 0);
    drop(up);
    remove_config(&path);
    remove_config(&stored);
}

/// `spike stock pause` mid-sale: no sale is made while paused (checked in
/// the store), buyers hear `paused` with a `Retry-After`; `resume` and the
/// sale goes on; `stock add 100` to a sold-out sale sells exactly 100 more;
/// `stock close` ends it; each change is an event in the stream, `stock
/// audit` counts them, and a change that makes no sense is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_add_and_close_a_running_sale() {
    let redis = RedisServer::start();
    let (text, ports, auth) = sale(20, Some(&redis.url()), "pay_within = \"15m\"\n");
    let (up, path) = start_up(&text, &ports);
    let cfg = path.to_str().expect("path").to_string();
    let c = client();
    let mut next = 0;
    let mut buyer = || {
        next += 1;
        format!("b{next}")
    };
    for _ in 0..10 {
        let r = buy(&c, ports.balancer, &auth, &buyer()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }

    let stock = |args: &[&str]| {
        let mut all = vec!["stock"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", &cfg]);
        run(&all)
    };
    let out = stock(&["resume"]);
    assert!(!out.status.success(), "resume of a running sale: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not paused"),
        "{out:?}"
    );
    let out = stock(&["pause"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        json(&String::from_utf8_lossy(&out.stdout))["paused"],
        true,
        "{out:?}"
    );
    for _ in 0..20 {
        let r = buy(&c, ports.balancer, &auth, &buyer()).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
        assert_eq!(status_of(&r), "paused", "{}", r.body);
        assert_eq!(
            r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("5")
        );
    }
    assert_eq!(show(&cfg)["sold"], 10, "sold while paused");
    let out = stock(&["pause"]);
    assert!(!out.status.success(), "paused twice: {out:?}");

    let out = stock(&["resume"]);
    assert!(out.status.success(), "{out:?}");
    // The store sells at once; the balancer and the nodes, which answer a
    // pause from memory, hear of the resume within about a second.
    let mut sold = 10;
    let resumed = Instant::now();
    while sold < 20 {
        let r = buy(&c, ports.balancer, &auth, &buyer()).await;
        if r.status == StatusCode::OK {
            sold += 1;
            continue;
        }
        assert_eq!(status_of(&r), "paused", "after resume: {}", r.body);
        assert!(
            resumed.elapsed() < Duration::from_secs(3),
            "still paused {:?} after the resume",
            resumed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = buy(&c, ports.balancer, &auth, &buyer()).await;
    assert_eq!(status_of(&r), "sold_out", "{}", r.body);

    // A hundred more tickets into the sold-out sale: exactly a hundred
    // more sell, through every node (each learns within about a second).
    let out = stock(&["add", "100"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&String::from_utf8_lossy(&out.stdout))["total"], 120);
    let mut more = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let r = buy(&c, ports.balancer, &auth, &buyer()).await;
        match (r.status, status_of(&r).as_str()) {
            (StatusCode::OK, _) => more += 1,
            (StatusCode::CONFLICT, "sold_out") => {
                if more == 100 {
                    // Every node has had time to hear of the stock; any
                    // still selling would be selling past the total.
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    if status_of(&buy(&c, ports.balancer, &auth, &buyer()).await) == "sold_out" {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => panic!("{}: {}", r.status, r.body),
        }
    }
    assert_eq!(more, 100, "stock add 100 sold {more}");
    assert_eq!(show(&cfg)["sold"], 120);

    let out = stock(&["close"]);
    assert!(out.status.success(), "{out:?}");
    // Every node hears of it within about a second (its poll), and the
    // balancer's edge, which answered `sold_out`, lets the nodes say it.
    common::wait_for("closed everywhere", Duration::from_secs(5), async || {
        let mut all = true;
        for at in [ports.balancer, ports.nodes[0], ports.nodes[1]] {
            all &= status_of(&buy(&c, at, &auth, "late").await) == "closed";
        }
        all
    })
    .await;
    let out = stock(&["add", "10"]);
    assert!(!out.status.success(), "add to a closed sale: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("closed"),
        "{out:?}"
    );
    assert_eq!(show(&cfg)["total"], 120);

    // Every change is in the stream, and the audit accounts for it.
    let mut conn = redis.connection().expect("redis");
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("spike:{up}:events")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .expect("XRANGE");
    let kinds: Vec<String> = entries
        .iter()
        .filter_map(|(_, f)| f.iter().find(|(k, _)| k == "type").map(|(_, v)| v.clone()))
        .filter(|k| ["paused", "resumed", "added", "closed"].contains(&k.as_str()))
        .collect();
    assert_eq!(kinds, ["paused", "resumed", "added", "closed"]);
    let audit = stock(&["audit"]);
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
    drop(up);
    remove_config(&path);
}

/// A purchase sent again with its `Idempotency-Key` while the sale is
/// paused gets its order's answer, as `deduct.lua` gives it (a key's
/// replay sells nothing, so a pause does not stop it): through the
/// balancer and straight to each node, before and after the nodes hear of
/// the pause. A new purchase, keyed or not, hears `paused`, and the store
/// sells nothing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_replay_gets_its_order_while_paused_redis() {
    let redis = RedisServer::start();
    let (text, ports, auth) = sale(10, Some(&redis.url()), "");
    let (up, path) = start_up(&text, &ports);
    let cfg = path.to_str().expect("path").to_string();
    let c = client();
    let first = buy_with(&c, ports.balancer, &auth, "b1", Some("key-b1")).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let order = json(&first.body)["order"].clone();

    let out = run(&["stock", "pause", "--config", &cfg]);
    assert!(out.status.success(), "{out:?}");
    // Every door has heard of the pause (the nodes' poll, the edge's read).
    common::wait_for("paused everywhere", Duration::from_secs(5), async || {
        let mut all = true;
        for at in [ports.balancer, ports.nodes[0], ports.nodes[1]] {
            all &= status_of(&buy(&c, at, &auth, "late").await) == "paused";
        }
        all
    })
    .await;
    for at in [ports.balancer, ports.nodes[0], ports.nodes[1]] {
        let again = buy_with(&c, at, &auth, "b1", Some("key-b1")).await;
        assert_eq!(again.status, StatusCode::OK, "{at}: {}", again.body);
        assert_eq!(json(&again.body)["order"], order, "{at}: {}", again.body);
        assert_eq!(
            again
                .headers
                .get("idempotent-replayed")
                .and_then(|v| v.to_str().ok()),
            Some("true"),
            "{at}: {:?}",
            again.headers
        );
        // A new key is a new purchase: paused.
        let fresh = buy_with(&c, at, &auth, "b2", Some("key-b2")).await;
        assert_eq!(
            (fresh.status, status_of(&fresh)),
            (StatusCode::CONFLICT, "paused".to_string()),
            "{at}: {}",
            fresh.body
        );
    }
    assert_eq!(show(&cfg)["sold"], 1, "sold while paused");
    drop(up);
    remove_config(&path);
}

/// `stock close` before the opening closes the sale (it is not "not open
/// yet" until the opening), at every node and the balancer, by the store's
/// word over the files; `stock init --force` then starts another sale that
/// sells at once (the files have no opening any more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_before_the_opening_then_reset() {
    let redis = RedisServer::start();
    let opens = SystemTime::now() + Duration::from_secs(120);
    let line = format!("opens_at = \"{}\"\n", rfc3339(opens));
    let (text, ports, auth) = sale(10, Some(&redis.url()), &line);
    let (up, path) = start_up(&text, &ports);
    let cfg = path.to_str().expect("path").to_string();
    let c = client();
    let r = buy(&c, ports.balancer, &auth, "early").await;
    assert_eq!(status_of(&r), "not_open", "{}", r.body);
    let out = run(&["stock", "close", "--config", &cfg]);
    assert!(out.status.success(), "{out:?}");
    common::wait_for("closed everywhere", Duration::from_secs(5), async || {
        let mut all = true;
        for at in [ports.balancer, ports.nodes[0], ports.nodes[1]] {
            all &= status_of(&buy(&c, at, &auth, "early").await) == "closed";
        }
        all
    })
    .await;
    let out = run(&["stock", "pause", "--config", &cfg]);
    assert!(!out.status.success(), "pausing a closed sale: {out:?}");

    // Another sale, without the opening, over the closed one.
    std::fs::write(&path, text.replace(&line, "")).expect("rewrite");
    let out = run(&["stock", "init", "--force", "--config", &cfg]);
    assert!(out.status.success(), "{out:?}");
    common::wait_for(
        "selling again everywhere",
        Duration::from_secs(5),
        async || {
            let mut all = true;
            for (i, at) in [ports.balancer, ports.nodes[0], ports.nodes[1]]
                .into_iter()
                .enumerate()
            {
                let r = buy(&c, at, &auth, &format!("after{i}")).await;
                all &= r.status == StatusCode::OK || status_of(&r) == "already_bought";
            }
            all
        },
    )
    .await;
    assert!(show(&cfg)["sold"].as_u64() >= Some(3));
    drop(up);
    remove_config(&path);
}

/// A bad moment names the key and the line.
#[test]
fn a_bad_opening_names_the_key_and_the_line() {
    for (extra, key, line) in [
        ("opens_at = \"tomorrow at ten\"\n", "sale.opens_at", ":5"),
        (
            "opens_at = \"2030-01-01T10:00:00Z\"\ncloses_at = \"2030-01-01T09:00:00Z\"\n",
            "sale.closes_at",
            ":6",
        ),
    ] {
        let (text, _, _) = sale(10, None, extra);
        let path = common::spike::write_config(&text);
        let out = run(&["check", "--config", path.to_str().expect("path")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra}: {out:?}");
        assert!(err.contains(key), "{extra}: {err}");
        assert!(err.contains(line), "{extra}: the line: {err}");
        remove_config(&path);
    }
}

/// A sale open from an hour ago to an hour from now, on `redis`, sold by
/// node n1 at `node` (and, with `balancer`, through a balancer at its
/// listen and admin addresses); `stock init` done.
fn open_sale(
    redis: &RedisServer,
    event: &str,
    node: std::net::SocketAddr,
    balancer: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
) -> std::path::PathBuf {
    let hour = Duration::from_secs(3600);
    let front = balancer.map_or(String::new(), |(listen, admin)| {
        format!(
            "[balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\nready_before_open = false\n\n"
        )
    });
    let text = format!(
        "[sale]\nevent = \"{event}\"\ntotal = 10\nper_user_limit = 1\n\
         opens_at = \"{}\"\ncloses_at = \"{}\"\n\n\
         [redis]\nurl = \"{}\"\n\n{front}[[node]]\nname = \"n1\"\nlisten = \"{node}\"\n",
        rfc3339(SystemTime::now() - hour),
        rfc3339(SystemTime::now() + hour),
        redis.url(),
    );
    common::spike::write_and_init(&text)
}

/// The steps a host's clock takes in these tests: two hours either way,
/// past the closing and before the opening; the buyer for each, and the
/// store's clock minus the host's then (ms).
const STEPS: [(&str, &str, i64); 2] = [
    ("+7200", "ahead", -7_200_000),
    ("-7200", "behind", 7_200_000),
];

/// `GET /buy/ticket?user={buyer}` at `at`, with no token (the tests below
/// run sales whose buyers the client names).
async fn buy_as(c: &TestClient, at: std::net::SocketAddr, buyer: &str) -> Reply {
    send(
        c,
        Method::GET,
        at,
        &format!("/buy/ticket?user={buyer}"),
        &[],
    )
    .await
    .expect("an answer")
}

/// Whether `offset` (ms) is `expected` to within 100 s (the steps are two
/// hours; the clocks agree to a few ms).
fn near(offset: Option<i64>, expected: i64) -> bool {
    offset.is_some_and(|o| (o - expected).abs() < 100_000)
}

/// A node's wall clock stepped mid-sale (NTP, `date`; libfaketime here)
/// changes nothing: the opening and the closing are read in Redis's clock,
/// carried on the node's monotonic clock. Before, the node added an offset
/// to Redis measured before the step to its stepped wall clock, and for up
/// to ten seconds (until every older `TIME` sample left its window) a node
/// two hours ahead answered `closed` from memory, and one two hours behind
/// `not_open`, in the middle of a sale open to everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stepped_node_clock_neither_opens_nor_closes_the_sale() {
    let redis = RedisServer::start();
    let node = common::free_addr();
    let path = open_sale(&redis, "stepped", node, None);
    let cfg = path.to_str().expect("path");
    let shift = path.with_extension("faketime");
    let _node =
        common::spike::start_with_clock_file(&["node", "--config", cfg, "--name", "n1"], &shift);
    common::spike::wait_listening(&node.to_string(), Duration::from_secs(10));
    let c = client();
    let buy = async |buyer: &str| buy_as(&c, node, buyer).await;
    // Open, with the node's clock right: it sells (and has read Redis's
    // clock, which `/healthz` shows).
    let r = buy("before").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for (step, buyer, offset) in STEPS {
        std::fs::write(&shift, step).expect("faketime file");
        // The step shows in the offset at once.
        let health = send(&c, Method::GET, node, "/healthz", &[])
            .await
            .expect("healthz");
        assert!(
            near(json(&health.body)["clock_offset_ms"].as_i64(), offset),
            "{step}: {}",
            health.body
        );
        let r = buy(buyer).await;
        assert_eq!(r.status, StatusCode::OK, "{step}: {}", r.body);
        assert_eq!(status_of(&r), "sold", "{step}: {}", r.body);
    }
    assert_eq!(show(cfg)["sold"], 3);
    remove_config(&path);
}

/// The same for a balancer: its edge answers `not_open` and `closed` from
/// memory, by the sale's moments as a node gave them, but it read them
/// against its own host's wall clock. A balancer stepped two hours ahead
/// answered `closed` to every buyer of an open sale, and `/ready` was 503
/// `not_open` on one stepped two hours behind. Now it reads them in the
/// store's clock as the node gives it (`/sold_out`'s `store_now_ms`),
/// carried on its own monotonic clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stepped_balancer_clock_neither_opens_nor_closes_the_sale() {
    // With the edge on, and off (then only `/ready` reads the moments).
    for at_edge in [true, false] {
        let redis = RedisServer::start();
        let (node, listen, admin) = (
            common::free_addr(),
            common::free_addr(),
            common::free_addr(),
        );
        let path = open_sale(&redis, "stepped-lb", node, Some((listen, admin)));
        let text = std::fs::read_to_string(&path).expect("config");
        let text = text.replace(
            "ready_before_open = false\n",
            &format!("ready_before_open = false\nsold_out_at_edge = {at_edge}\n"),
        );
        std::fs::write(&path, text).expect("config");
        let cfg = path.to_str().expect("path");
        let _node = common::spike::SpikeProcess::start(&["node", "--config", cfg, "--name", "n1"]);
        let shift = path.with_extension("faketime");
        let _balancer =
            common::spike::start_with_clock_file(&["balancer", "--config", cfg], &shift);
        for a in [node, listen, admin] {
            common::spike::wait_listening(&a.to_string(), Duration::from_secs(10));
        }
        let c = client();
        let buy = async |buyer: &str| buy_as(&c, listen, buyer).await;
        let r = buy("before").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        // The balancer has heard the store's clock from the node (it asks
        // as it starts, then every second while the sale is open).
        common::wait_for(
            "the balancer to hear a node",
            Duration::from_secs(5),
            async || {
                let status = send(&c, Method::GET, admin, "/status", &[])
                    .await
                    .expect("status");
                json(&status.body)["edge"]["store_clock_offset_ms"].is_i64()
            },
        )
        .await;
        for (step, buyer, offset) in STEPS {
            std::fs::write(&shift, step).expect("faketime file");
            // The operator sees the balancer's clock off the store's.
            let status = send(&c, Method::GET, admin, "/status", &[])
                .await
                .expect("status");
            assert!(
                near(
                    json(&status.body)["edge"]["store_clock_offset_ms"].as_i64(),
                    offset
                ),
                "at_edge {at_edge}, {step}: {}",
                status.body
            );
            let r = buy(buyer).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "at_edge {at_edge}, {step}: {}",
                r.body
            );
            assert_eq!(
                status_of(&r),
                "sold",
                "at_edge {at_edge}, {step}: {}",
                r.body
            );
            let r = send(&c, Method::GET, admin, "/ready", &[])
                .await
                .expect("ready");
            assert_eq!(
                r.status,
                StatusCode::OK,
                "at_edge {at_edge}, {step}: {}",
                r.body
            );
        }
        assert_eq!(show(cfg)["sold"], 3);
        remove_config(&path);
    }
}
