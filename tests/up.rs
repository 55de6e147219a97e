//! `spike up` as a new user runs it: one process, a balancer in front of
//! every node, a whole sale, and a clean stop on Ctrl-C.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::http::{client, get, json};
use common::redis::RedisServer;
use common::sale::{count, storm};
use common::spike::{
    SpikeProcess, committed, committed_config, remove_config, run, wait_listening, write_config,
};
use common::up::up_config;
use hyper::StatusCode;

fn closed(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_a_whole_sale_with_the_embedded_store_and_stops_cleanly() {
    let (text, ports) = up_config(500, 4, None);
    let (mut up, path) = common::up::start_up(&text, &ports);
    let c = client();
    let answers = storm(&c, &[ports.balancer], 3000, 1500, 64, "up-buyer").await;
    assert!(
        answers.iter().all(|a| a.status.is_some()),
        "transport errors through the balancer"
    );
    assert_eq!(count(&answers, StatusCode::OK), 500);
    // The sale, read from a node (the embedded store lives in this
    // process). Its /sale may be up to 500 ms old (a cache the balancer's
    // own once-a-second read may just have filled): read until it settles.
    let mut sale = serde_json::Value::Null;
    for _ in 0..20 {
        let (status, body) = get(&c, ports.nodes[0], "/sale").await.expect("sale");
        assert_eq!(status, StatusCode::OK);
        sale = json(&body);
        if sale["sold"] == 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sale["sold"], 500);
    assert_eq!(sale["orders"], 500);
    // Every node sold some: the balancer spread the buyers by weight.
    let mut by_node = std::collections::HashMap::new();
    for a in answers.iter().filter(|a| a.status == Some(StatusCode::OK)) {
        *by_node
            .entry(json(&a.body)["node"].as_str().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(by_node.len(), 4, "{by_node:?}");
    let (status, _) = get(&c, ports.admin, "/status").await.expect("admin");
    assert_eq!(status, StatusCode::OK);

    up.stop("INT", Duration::from_secs(15));
    assert!(closed(ports.balancer));
    for n in &ports.nodes {
        assert!(closed(*n), "node {n} still listening");
    }
    remove_config(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_redis_initialises_once_and_never_wipes_a_started_sale() {
    let redis = RedisServer::start();
    let (text, ports) = up_config(50, 4, Some(&redis.url()));
    let path = write_config(&text);
    let cfg = path.to_str().expect("path");
    let c = client();
    {
        let _up = SpikeProcess::start(&["up", "--config", cfg]);
        wait_listening(&ports.balancer.to_string(), Duration::from_secs(15));
        let answers = storm(&c, &[ports.balancer], 20, 20, 4, "first").await;
        assert_eq!(count(&answers, StatusCode::OK), 20);
    }
    // A second `spike up` over the same Redis continues the sale.
    let mut up = SpikeProcess::start(&["up", "--config", cfg]);
    wait_listening(&ports.balancer.to_string(), Duration::from_secs(15));
    let show = run(&["stock", "show", "--config", cfg]);
    let snap = json(String::from_utf8_lossy(&show.stdout).trim());
    assert_eq!(snap["sold"], 20, "the restart must not reset the sale");
    let answers = storm(&c, &[ports.balancer], 200, 200, 16, "second").await;
    assert_eq!(count(&answers, StatusCode::OK), 30);
    let audit = run(&["stock", "audit", "--config", cfg]);
    assert!(audit.status.success(), "{audit:?}");
    up.stop("TERM", Duration::from_secs(15));
    remove_config(&path);
}

#[test]
fn up_refuses_a_taken_port_by_name() {
    // A port picked as free can be taken (by another test's outgoing
    // connection, say) before we bind it: then pick again.
    let (text, ports, _holder) = (0..20)
        .find_map(|_| {
            let (text, ports) = up_config(10, 4, None);
            let holder = std::net::TcpListener::bind(ports.nodes[2]).ok()?;
            Some((text, ports, holder))
        })
        .expect("take the port");
    let path = write_config(&text);
    let out = run(&["up", "--config", path.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&ports.nodes[2].to_string()) && err.contains("node n3"),
        "{err}"
    );
    remove_config(&path);
}

#[test]
fn the_committed_config_runs_with_up() {
    // The README's first command runs config.toml as it is; check it loads
    // and names a balancer and four nodes (ports are fixed there, so it is
    // not started here, where tests run in parallel).
    let path = write_config(&committed_config());
    let out = run(&["nginx-conf", "--config", path.to_str().expect("path")]);
    assert!(out.status.success(), "{out:?}");
    let conf = String::from_utf8_lossy(&out.stdout);
    assert_eq!(conf.matches("server 127.0.0.1:300").count(), 4, "{conf}");
    remove_config(&path);
}

/// The config.toml the README tells a new user to run must stay valid.
#[test]
fn the_committed_config_toml_is_valid() {
    let path = write_config(&committed_config());
    let c = spike::config::Config::load(&path).expect("config.toml must validate");
    assert_eq!(c.nodes.len(), 4);
    assert!(
        c.redis.is_none(),
        "the example runs with no Redis installed"
    );
    assert_eq!(c.balancer.expect("balancer").upstreams.len(), 4);
    remove_config(&path);
}

/// The copy the tests read where git is not available is the committed
/// example (both as committed: neither working copy is read).
#[test]
fn the_copy_of_the_example_config_is_the_committed_one() {
    let (Some(example), Some(copy)) = (
        committed("config.toml"),
        committed("tests/data/config.toml"),
    ) else {
        // Without git, or before the copy is committed, there is nothing
        // to compare; the other tests read the copy then.
        return;
    };
    assert!(
        example == copy,
        "tests/data/config.toml differs from config.toml: cp config.toml tests/data/config.toml"
    );
}

/// `spike up` follows its file on SIGHUP: a `[[node]]` added is started and
/// then routed to; one removed is taken out of the balancer, then stopped
/// (its port closes); a file whose new node cannot listen is refused with
/// the reason. Buyers keep coming all along and none gets a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_reload_starts_added_nodes_and_stops_removed_ones() {
    let (text, ports) = up_config(100_000, 2, None);
    let (up, path) = common::up::start_up(&text, &ports);
    let c = client();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let buyers = {
        let (c, stop, lb) = (c.clone(), stop.clone(), ports.balancer);
        tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let got = get(&c, lb, &format!("/buy/ticket?user=r{i}")).await;
                answers.push(got.map(|(s, b)| (s, json(&b)["node"].clone())));
                i += 1;
            }
            answers
        })
    };
    let version = async |c: &common::http::TestClient| {
        let (_, body) = get(c, ports.admin, "/status").await.expect("status");
        json(&body)
    };

    // Add n3.
    let n3 = common::free_addr();
    let with_n3 = format!("{text}{}", common::up::node_entry(3, n3));
    std::fs::write(&path, &with_n3).expect("write");
    up.signal("HUP");
    common::wait_for("version 2", Duration::from_secs(10), async || {
        version(&c).await["version"] == 2
    })
    .await;
    let (status, _) = get(&c, n3, "/healthz").await.expect("n3 answers");
    assert_eq!(status, StatusCode::OK);

    // Remove n2.
    let n2 = ports.nodes[1];
    let without_n2: String = with_n3.replace(&common::up::node_entry(2, n2), "");
    assert_ne!(without_n2, with_n3);
    std::fs::write(&path, &without_n2).expect("write");
    up.signal("HUP");
    common::wait_for("version 3", Duration::from_secs(10), async || {
        version(&c).await["version"] == 3
    })
    .await;
    common::wait_for("n2's port closes", Duration::from_secs(15), async || {
        closed(n2)
    })
    .await;

    // A new node whose port is taken: refused, nothing changes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr");
    std::fs::write(
        &path,
        format!("{without_n2}{}", common::up::node_entry(4, taken_addr)),
    )
    .expect("write");
    up.signal("HUP");
    common::wait_for("the refusal", Duration::from_secs(10), async || {
        version(&c).await["last_reload"]["ok"] == false
    })
    .await;
    let v = version(&c).await;
    assert_eq!(v["version"], 3, "{v}");
    let error = v["last_reload"]["error"].as_str().unwrap_or("");
    assert!(error.contains("node n4 cannot listen"), "{v}");
    let addrs: Vec<&str> = v["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .filter_map(|u| u["address"].as_str())
        .collect();
    assert_eq!(addrs, [ports.nodes[0].to_string(), n3.to_string()], "{v}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = buyers.await.expect("buyers");
    assert!(answers.len() > 20, "{}", answers.len());
    let mut from_n3 = 0;
    for a in &answers {
        let (status, node) = a.as_ref().expect("no transport error");
        assert_eq!(*status, StatusCode::OK, "{node}");
        if node == "n3" {
            from_n3 += 1;
        }
    }
    assert!(from_n3 > 0, "the balancer routed to the added node");
    remove_config(&path);
}

/// One rule for every way a sale starts: `spike up` with `[redis]` on a
/// Redis that may forget answered orders (no append-only file) refuses to
/// start the sale, naming the problem, as `spike stock init` does, unless
/// `--allow-volatile`; and it initialises nothing when it refuses.
#[test]
fn up_refuses_a_volatile_redis_as_stock_init_does() {
    let redis = RedisServer::start_volatile();
    let (text, ports) = up_config(50, 2, Some(&redis.url()));
    let path = write_config(&text);
    let cfg = path.to_str().expect("path");
    let out = run(&["up", "--config", cfg]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("appendonly is off"), "{err}");
    assert!(err.contains("--allow-volatile"), "{err}");
    assert!(closed(ports.balancer), "nothing may be left listening");
    let show = run(&["stock", "show", "--config", cfg]);
    let snap = json(String::from_utf8_lossy(&show.stdout).trim());
    assert_eq!(
        snap["initialised"], false,
        "refused, yet initialised: {snap}"
    );

    let (mut up, out) = SpikeProcess::start_captured(&["up", "--config", cfg, "--allow-volatile"]);
    wait_listening(&ports.balancer.to_string(), Duration::from_secs(15));
    out.wait_for("appendonly is off", Duration::from_secs(5));
    up.stop("TERM", Duration::from_secs(15));
    remove_config(&path);
}

/// `[sale]` is the store's: over a sale already in Redis, `spike up`
/// prints the stored figures (not the file's) and says that the file's
/// differ and how to change them; a reload that changes only `[sale]` says
/// the same instead of "config unchanged".
#[test]
fn up_over_a_stored_sale_prints_the_stored_figures_and_says_sale_is_the_stores() {
    let redis = RedisServer::start();
    let (stored_text, _ports) = up_config(50, 2, Some(&redis.url()));
    let path = write_config(&stored_text);
    let cfg = path.to_str().expect("path");
    assert!(
        run(&["stock", "init", "--trust-client-buyer-ids", "--config", cfg])
            .status
            .success()
    );
    let file_text = stored_text
        .replace("total = 50\n", "total = 20000\n")
        .replace("per_user_limit = 1\n", "per_user_limit = 3\n");
    assert_ne!(file_text, stored_text);
    std::fs::write(&path, &file_text).expect("write");

    let (mut up, out) = SpikeProcess::start_captured(&["up", "--config", cfg]);
    out.wait_for("Ctrl-C stops everything", Duration::from_secs(15));
    let banner = out.stdout();
    assert!(
        banner.contains("selling 50 tickets") && banner.contains("at most 1 per buyer"),
        "the banner must show the stored sale: {banner}"
    );
    let first = banner.lines().next().unwrap_or("");
    assert!(
        !first.contains("20000") && !first.contains("at most 3"),
        "the file's figures are not the sale's: {banner}"
    );
    assert!(banner.contains("[sale] is the store's"), "{banner}");
    assert!(banner.contains("spike stock"), "{banner}");

    // Raise the total in the file and reload.
    std::fs::write(
        &path,
        file_text.replace("total = 20000\n", "total = 30000\n"),
    )
    .expect("write");
    up.signal("HUP");
    out.wait_for("a reload does not change the sale", Duration::from_secs(10));
    // The reload that read the change warned of it, and none before it
    // called the file unchanged. (The file watcher may reload it too, and
    // whichever of the two comes second rightly finds nothing new.)
    let stderr = out.stderr();
    let warned = stderr
        .find("a reload does not change the sale")
        .expect("the warning");
    assert!(!stderr[..warned].contains("config unchanged"), "{stderr}");
    up.stop("TERM", Duration::from_secs(15));
    remove_config(&path);
}

/// A SIGHUP sent the moment the ports answer reloads; it does not end the
/// process. (Before, `spike up`, `spike balancer` and `spike node` bound
/// their ports before they caught SIGHUP, whose default action is to end
/// the process: a supervisor's or a test's early reload could kill them.)
#[test]
fn a_sighup_as_soon_as_the_ports_answer_does_not_end_the_process() {
    for round in 0..5 {
        let (text, ports) = up_config(10, 1, None);
        let path = write_config(&text);
        let mut up = SpikeProcess::start(&["up", "--config", path.to_str().expect("path")]);
        // Poll the admin port as fast as it can be polled, then signal.
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(ports.admin).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "up never listened"
            );
        }
        up.signal("HUP");
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            up.wait_exit(Duration::from_millis(10)).is_none(),
            "round {round}: spike up ended on an early SIGHUP"
        );
        up.stop("TERM", Duration::from_secs(15));
        remove_config(&path);
    }
}
