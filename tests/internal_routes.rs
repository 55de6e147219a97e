//! Issue 29: the nodes' internal routes (`/holders`, `/stats`, `/metrics`,
//! `/sale`, `/sold_out`, `/healthz`) are not public through the balancer.
//! Real `spike node` and `spike balancer` processes over a real Redis,
//! under every strategy and on both of the balancer's paths: those routes
//! answer 404 on the public port before and after the sale sells out (and
//! every odd spelling of them too, answered by the balancer itself), while
//! the edge still answers the sold-out flood from memory and the health
//! checks still take a dead node out. The nodes serve their internal
//! routes on `[[node]] internal`, where the balancer's health checks and
//! edge ask for them; their public port answers 404 for them.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::http::{TestClient, client, get, json};
use common::redis::RedisServer;
use common::routes::{INTERNAL, TRICKY};
use common::spike::{SpikeProcess, remove_config, run, wait_listening, write_config};
use hyper::StatusCode;

/// `spike_balancer_local_responses_total{code="404"}` on the admin port.
async fn local_404s(c: &TestClient, admin: SocketAddr) -> u64 {
    let (_, metrics) = get(c, admin, "/metrics").await.expect("metrics");
    common::up::sample(
        &metrics,
        "spike_balancer_local_responses_total{code=\"404\"}",
    )
}

/// Every internal route and every tricky spelling of one answers 404 on
/// `balancer`, each the balancer's own (none reached a node).
async fn all_closed(c: &TestClient, balancer: SocketAddr, admin: SocketAddr, when: &str) {
    let before = local_404s(c, admin).await;
    for path in INTERNAL {
        let (status, body) = get(c, balancer, path).await.expect("get");
        assert_eq!(status, StatusCode::NOT_FOUND, "{when}: {path}: {body}");
        assert!(!body.contains("buyers"), "{when}: {path}: {body}");
    }
    for line in TRICKY {
        let (status, body) = common::routes::raw(balancer, line).await;
        assert_eq!(status, "404", "{when}: {line}: {body}");
    }
    let after = local_404s(c, admin).await;
    assert_eq!(
        after - before,
        (INTERNAL.len() + TRICKY.len()) as u64,
        "{when}: every 404 is the balancer's own"
    );
}

/// What `/status` says of the upstream at `addr`.
async fn state_of(c: &TestClient, admin: SocketAddr, addr: SocketAddr) -> String {
    let (_, body) = get(c, admin, "/status").await.expect("status");
    json(&body)["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .find(|u| u["address"] == addr.to_string())
        .and_then(|u| u["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

/// The sold-out answers the nodes gave, from their `/stats` (asked where
/// each node serves it).
async fn node_sold_out_answers(c: &TestClient, stats: &[SocketAddr]) -> u64 {
    let mut n = 0;
    for a in stats {
        let (_, body) = get(c, *a, "/stats").await.expect("stats");
        n += json(&body)["sold_out_answers"].as_u64().expect("count");
    }
    n
}

/// The whole story under `strategy`, on the fast path or hyper's.
async fn internal_routes_stay_inside(strategy: &str, fast_path: bool) {
    let redis = RedisServer::start();
    let (listen, admin) = (common::free_addr(), common::free_addr());
    let nodes: Vec<SocketAddr> = (0..3).map(|_| common::free_addr()).collect();
    let internal: Vec<SocketAddr> = (0..3).map(|_| common::free_addr()).collect();
    let mut text = format!(
        "[sale]\nevent = \"internal-{strategy}-{fast_path}\"\ntotal = 6\nper_user_limit = 1\n\n\
         [redis]\nurl = \"{}\"\n\n\
         [balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\nstrategy = \"{strategy}\"\n\
         fast_path = {fast_path}\nhealth_check = \"/healthz\"\nhealth_interval = \"200ms\"\n\
         health_timeout = \"500ms\"\n",
        redis.url()
    );
    for (i, (a, inside)) in nodes.iter().zip(&internal).enumerate() {
        text.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\nlisten = \"{a}\"\ninternal = \"{inside}\"\nweight = {}\nthreads = 1\n",
            i + 1,
            i + 1
        ));
    }
    let path = write_config(&text);
    let cfg = path.to_str().expect("utf-8 path");
    let init = run(&["stock", "init", "--trust-client-buyer-ids", "--config", cfg]);
    assert!(init.status.success(), "{init:?}");
    let mut procs: Vec<SpikeProcess> = (1..=3)
        .map(|i| SpikeProcess::start(&["node", "--config", cfg, "--name", &format!("n{i}")]))
        .collect();
    for a in nodes.iter().chain(&internal) {
        wait_listening(&a.to_string(), Duration::from_secs(10));
    }
    let _balancer = SpikeProcess::start(&["balancer", "--config", cfg]);
    wait_listening(&listen.to_string(), Duration::from_secs(10));
    wait_listening(&admin.to_string(), Duration::from_secs(10));
    let c = client();
    common::wait_for(
        "every node to pass its health check",
        Duration::from_secs(5),
        async || {
            for n in &nodes {
                if state_of(&c, admin, *n).await != "up" {
                    return false;
                }
            }
            true
        },
    )
    .await;

    all_closed(&c, listen, admin, "on sale").await;
    // Each node: its internal routes on its internal listener only, and
    // its public API on its public listener only.
    for (public, inside) in nodes.iter().zip(&internal) {
        for path in INTERNAL {
            let (status, _) = get(&c, *public, path).await.expect("public");
            assert_eq!(status, StatusCode::NOT_FOUND, "{public}{path}");
            let (status, body) = get(&c, *inside, path).await.expect("internal");
            let expected = if path == "/holders" {
                StatusCode::CONFLICT // not sold out yet
            } else {
                StatusCode::OK
            };
            assert_eq!(status, expected, "{inside}{path}: {body}");
        }
        let (status, _) = get(&c, *inside, "/buy/ticket?user=inside")
            .await
            .expect("internal");
        assert_eq!(status, StatusCode::NOT_FOUND, "{inside}");
    }

    // The public API still passes: purchases, and an order's own route.
    let mut order = String::new();
    for i in 0..6 {
        let (status, body) = get(&c, listen, &format!("/buy/ticket?user=u{i}"))
            .await
            .expect("buy");
        assert_eq!(status, StatusCode::OK, "{body}");
        order = json(&body)["order"].as_str().expect("order").to_string();
    }
    let (status, body) = get(&c, listen, &format!("/orders/{order}?user=u5"))
        .await
        .expect("order");
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = get(&c, listen, "/buy/ticket?user=late").await.expect("buy");
    assert_eq!(status, StatusCode::CONFLICT);
    common::wait_for("the edge to answer", Duration::from_secs(5), async || {
        let (_, body) = get(&c, admin, "/status").await.expect("status");
        json(&body)["edge"]["answering"] == true
    })
    .await;

    all_closed(&c, listen, admin, "sold out").await;

    // The flood is answered from the edge's memory.
    let before = node_sold_out_answers(&c, &internal).await;
    let answers = common::sale::storm(&c, &[listen], 300, 300, 10, "flood").await;
    for a in &answers {
        assert_eq!(a.status, Some(StatusCode::CONFLICT), "{}", a.body);
        assert_eq!(json(&a.body)["status"], "sold_out", "{}", a.body);
    }
    let reached = node_sold_out_answers(&c, &internal).await - before;
    assert!(
        reached <= 3,
        "{reached} of 300 sold-out answers came from a node"
    );

    // A dead node is taken out by its health check; the others stay in.
    procs[0].signal("KILL");
    let _ = procs[0].wait_exit(Duration::from_secs(5));
    common::wait_for(
        "the dead node to be taken out",
        Duration::from_secs(5),
        async || state_of(&c, admin, nodes[0]).await == "unhealthy",
    )
    .await;
    for n in &nodes[1..] {
        assert_eq!(state_of(&c, admin, *n).await, "up", "{n}");
    }
    all_closed(&c, listen, admin, "a node dead").await;
    let (status, body) = get(&c, listen, "/buy/ticket?user=later")
        .await
        .expect("buy");
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    drop(procs);
    remove_config(&path);
}

macro_rules! every_strategy_and_path {
    ($($name:ident: $strategy:literal, $fast:literal;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            internal_routes_stay_inside($strategy, $fast).await;
        }
    )*};
}

every_strategy_and_path! {
    round_robin_fast_path: "round_robin", true;
    round_robin_hyper_path: "round_robin", false;
    weighted_fast_path: "weighted_round_robin", true;
    weighted_hyper_path: "weighted_round_robin", false;
    ip_hash_fast_path: "ip_hash", true;
    ip_hash_hyper_path: "ip_hash", false;
    least_conn_fast_path: "least_conn", true;
    least_conn_hyper_path: "least_conn", false;
}

/// `spike up` with `[[node]] internal`: each node's internal routes are on
/// its internal listener only, the balancer's health checks, edge and
/// admin `/sale` read them there, and the banner points there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spike_up_serves_the_internal_routes_apart() {
    let (listen, admin) = (common::free_addr(), common::free_addr());
    let nodes: Vec<SocketAddr> = (0..2).map(|_| common::free_addr()).collect();
    let internal: Vec<SocketAddr> = (0..2).map(|_| common::free_addr()).collect();
    let mut text = format!(
        "[sale]\nevent = \"up-internal\"\ntotal = 4\nper_user_limit = 1\n\n\
         [balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\n\
         health_check = \"/healthz\"\nhealth_interval = \"200ms\"\n"
    );
    for (i, (a, inside)) in nodes.iter().zip(&internal).enumerate() {
        text.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\nlisten = \"{a}\"\ninternal = \"{inside}\"\n",
            i + 1
        ));
    }
    let path = write_config(&text);
    let (_up, out) =
        SpikeProcess::start_captured(&["up", "--config", path.to_str().expect("path")]);
    for a in [listen, admin].iter().chain(&nodes).chain(&internal) {
        wait_listening(&a.to_string(), Duration::from_secs(15));
    }
    out.wait_for(
        &format!("state:     curl -s http://{}/sale", internal[0]),
        Duration::from_secs(5),
    );
    out.wait_for(
        &format!("internal routes on http://{}", internal[1]),
        Duration::from_secs(5),
    );
    let c = client();
    common::wait_for(
        "every node to pass its health check",
        Duration::from_secs(5),
        async || {
            for n in &nodes {
                if state_of(&c, admin, *n).await != "up" {
                    return false;
                }
            }
            true
        },
    )
    .await;
    for (public, inside) in nodes.iter().zip(&internal) {
        let (status, _) = get(&c, *public, "/sale").await.expect("public");
        assert_eq!(status, StatusCode::NOT_FOUND, "{public}");
        let (status, body) = get(&c, *inside, "/sale").await.expect("internal");
        assert_eq!(status, StatusCode::OK, "{inside}: {body}");
    }
    let (status, body) = get(&c, admin, "/sale").await.expect("admin sale");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["total"], 4, "{body}");
    for i in 0..4 {
        let (status, body) = get(&c, listen, &format!("/buy/ticket?user=u{i}"))
            .await
            .expect("buy");
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let _ = get(&c, listen, "/buy/ticket?user=late").await;
    common::wait_for("the edge to answer", Duration::from_secs(5), async || {
        let (_, body) = get(&c, admin, "/status").await.expect("status");
        json(&body)["edge"]["answering"] == true
    })
    .await;
    let (status, body) = get(&c, listen, "/holders").await.expect("holders");
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = get(&c, listen, "/buy/ticket?user=u0").await.expect("buy");
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(json(&body)["status"], "already_bought", "{body}");
    remove_config(&path);
}

/// Under `spike up`, a reload that adds a node with `internal` starts it
/// there, and one that moves a running node's `internal` is refused with
/// the reason (the node keeps serving where it does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spike_up_reload_starts_internal_listeners_and_refuses_moving_one() {
    let (text, ports) = common::up::up_config(100, 1, None);
    let (up, path) = common::up::start_up(&text, &ports);
    let c = client();
    let status = async |c: &TestClient| {
        let (_, body) = get(c, ports.admin, "/status").await.expect("status");
        json(&body)
    };
    let (n2, inside) = (common::free_addr(), common::free_addr());
    let with_n2 =
        format!("{text}\n[[node]]\nname = \"n2\"\nlisten = \"{n2}\"\ninternal = \"{inside}\"\n");
    std::fs::write(&path, &with_n2).expect("write");
    up.signal("HUP");
    common::wait_for("version 2", Duration::from_secs(10), async || {
        status(&c).await["version"] == 2
    })
    .await;
    let (code, _) = get(&c, inside, "/healthz").await.expect("internal");
    assert_eq!(code, StatusCode::OK);
    let (code, _) = get(&c, n2, "/healthz").await.expect("public");
    assert_eq!(code, StatusCode::NOT_FOUND);

    let moved = with_n2.replace(&inside.to_string(), &common::free_addr().to_string());
    std::fs::write(&path, &moved).expect("write");
    up.signal("HUP");
    common::wait_for("the refusal", Duration::from_secs(10), async || {
        status(&c).await["last_reload"]["ok"] == false
    })
    .await;
    let v = status(&c).await;
    assert_eq!(v["version"], 2, "{v}");
    let error = v["last_reload"]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("node n2: `internal` changes only with a restart"),
        "{v}"
    );
    let (code, _) = get(&c, inside, "/sale").await.expect("still there");
    assert_eq!(code, StatusCode::OK);
    drop(up);
    remove_config(&path);
}
