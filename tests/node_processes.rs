//! The node and `spike stock` as a user runs them: real `spike` processes, a
//! real redis-server, real HTTP.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::http::{client, json};
use common::redis::RedisServer;
use common::sale::{count, sale_config, storm};
use common::spike::{SpikeProcess, remove_config, run, wait_listening, write_config};
use hyper::StatusCode;

fn cfg(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn stdout_json(out: &std::process::Output) -> serde_json::Value {
    json(String::from_utf8_lossy(&out.stdout).trim())
}

fn node_addrs(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.strip_prefix("listen = \""))
        .map(|a| a.trim_end_matches('"').parse().expect("addr"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_node_processes_sell_exactly_the_total() {
    let redis = RedisServer::start();
    let text = sale_config(
        "G1234-2026-02-10",
        1000,
        1,
        &[1, 2, 3, 4],
        Some(&redis.url()),
        "",
    );
    let path = write_config(&text);
    let c = cfg(&path);

    let init = run(&["stock", "init", "--trust-client-buyer-ids", "--config", c]);
    assert!(init.status.success(), "{init:?}");
    let addrs = node_addrs(&text);
    let _nodes: Vec<SpikeProcess> = (1..=4)
        .map(|i| SpikeProcess::start(&["node", "--config", c, "--name", &format!("n{i}")]))
        .collect();
    for a in &addrs {
        wait_listening(&a.to_string(), Duration::from_secs(10));
    }

    let answers = storm(&client(), &addrs, 20_000, 5_000, 256, "buyer").await;
    assert!(
        answers.iter().all(|a| a.status.is_some()),
        "transport errors"
    );
    // Every ticket holder was told 200, except a reply that outran the Redis
    // timeout on a loaded machine: that buyer was told only 503s.
    let holders: HashMap<String, String> = redis.hash("spike:{G1234-2026-02-10}:buyer_order");
    let lost_replies = holders
        .keys()
        .filter(|b| {
            let theirs: Vec<_> = answers.iter().filter(|a| &a.buyer == *b).collect();
            let lost = theirs
                .iter()
                .all(|a| a.status == Some(StatusCode::SERVICE_UNAVAILABLE));
            let answered = theirs.iter().any(|a| a.status == Some(StatusCode::OK));
            assert!(lost || answered, "{b} holds a ticket: {theirs:?}");
            lost
        })
        .count();
    assert_eq!(count(&answers, StatusCode::OK) + lost_replies, 1000);
    let mut per_buyer: HashMap<&str, usize> = HashMap::new();
    for a in answers.iter().filter(|a| a.status == Some(StatusCode::OK)) {
        *per_buyer.entry(&a.buyer).or_default() += 1;
    }
    assert!(per_buyer.values().all(|&n| n == 1), "a buyer bought twice");
    // Every node took part, in proportion to its weight (loosely: the storm
    // sends each node the same number of requests).
    let by_node: HashMap<String, usize> = answers
        .iter()
        .filter(|a| a.status == Some(StatusCode::OK))
        .fold(HashMap::new(), |mut m, a| {
            *m.entry(json(&a.body)["node"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
            m
        });
    assert_eq!(by_node.len(), 4, "{by_node:?}");

    let show = run(&["stock", "show", "--config", c]);
    assert!(show.status.success(), "{show:?}");
    let snap = stdout_json(&show);
    assert_eq!(snap["event"], "G1234-2026-02-10");
    assert_eq!(snap["total"], 1000);
    assert_eq!(snap["sold"], 1000);
    assert_eq!(snap["remaining"], 0);
    assert_eq!(snap["orders"], 1000);

    let audit = run(&["stock", "audit", "--config", c]);
    assert!(audit.status.success(), "{audit:?}");
    assert_eq!(stdout_json(&audit)["ok"], true);

    // A started sale is not overwritten by accident...
    let again = run(&["stock", "init", "--trust-client-buyer-ids", "--config", c]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "{again:?}"
    );
    // ...but is reset on purpose.
    let forced = run(&[
        "stock",
        "init",
        "--trust-client-buyer-ids",
        "--config",
        c,
        "--force",
    ]);
    assert!(forced.status.success(), "{forced:?}");
    let snap = stdout_json(&run(&["stock", "show", "--config", c]));
    assert_eq!(snap["sold"], 0);
    assert_eq!(snap["orders"], 0);
    assert_eq!(snap["buyers"], 0);
    remove_config(&path);
}

#[test]
fn audit_fails_on_a_broken_sale() {
    let redis = RedisServer::start();
    let text = sale_config("broken", 5, 1, &[1], Some(&redis.url()), "");
    let path = write_config(&text);
    let c = cfg(&path);
    assert!(
        run(&["stock", "init", "--trust-client-buyer-ids", "--config", c])
            .status
            .success()
    );
    assert!(run(&["stock", "audit", "--config", c]).status.success());
    // Something outside spike sells a ticket without an order record.
    let mut conn = redis.connection().expect("redis");
    let _: i64 = redis::cmd("HINCRBY")
        .arg("spike:{broken}:stock")
        .arg("sold")
        .arg(6)
        .query(&mut conn)
        .expect("HINCRBY");
    let audit = run(&["stock", "audit", "--config", c]);
    assert!(!audit.status.success(), "audit must fail: {audit:?}");
    let report = stdout_json(&audit);
    assert_eq!(report["ok"], false);
    let problems = report["problems"].to_string();
    assert!(problems.contains("oversold"), "{problems}");
    assert!(problems.contains("order records"), "{problems}");
    remove_config(&path);
}

#[test]
fn a_node_stops_cleanly_on_sigterm() {
    let redis = RedisServer::start();
    let text = sale_config("term", 5, 1, &[1], Some(&redis.url()), "");
    let path = write_config(&text);
    let c = cfg(&path);
    assert!(
        run(&["stock", "init", "--trust-client-buyer-ids", "--config", c])
            .status
            .success()
    );
    let mut node = SpikeProcess::start(&["node", "--config", c, "--name", "n1"]);
    wait_listening(&node_addrs(&text)[0].to_string(), Duration::from_secs(10));
    node.stop("TERM", Duration::from_secs(10));
    remove_config(&path);
}

/// Each bad file is refused with the file, the key and the line, and a
/// non-zero exit, by every command that reads it.
#[test]
fn bad_config_files_are_refused_with_file_key_and_line() {
    let node = "[[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:3001\"\n";
    let sale = "[sale]\nevent = \"e\"\ntotal = 10\n";
    let cases: Vec<(String, &str, usize)> = vec![
        (format!("{sale}colour = \"red\"\n{node}"), "sale.colour", 4),
        (
            format!("{sale}[[node]]\nname = \"n1\"\nlisten = \"localhost\"\n"),
            "node[0].listen",
            6,
        ),
        (
            format!("{sale}[[node]]\nname = \"n1\"\nlisten = \"300.1.1.1:80\"\n"),
            "node[0].listen",
            6,
        ),
        (
            format!("{sale}{node}[[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:3002\"\n"),
            "node[1].name",
            8,
        ),
        (format!("{sale}{node}weight = 0\n"), "node[0].weight", 7),
        (format!("{sale}{node}threads = 0\n"), "node[0].threads", 7),
        (
            format!("[sale]\nevent = \"e\"\ntotal = 0\n{node}"),
            "sale.total",
            3,
        ),
        (
            format!("[sale]\nevent = \"e\"\ntotal = -4\n{node}"),
            "sale.total",
            3,
        ),
        (
            format!("{sale}{node}[redis]\nurl = \"http://x\"\n"),
            "redis.url",
            8,
        ),
        (
            "[sale]\nevent = \"e\"\ntotal = \n".to_string(),
            "sale.total",
            3,
        ),
    ];
    for (text, key, line) in cases {
        let path = write_config(&text);
        let c = cfg(&path);
        for args in [
            vec!["node", "--config", c, "--name", "n1"],
            vec!["stock", "show", "--config", c],
        ] {
            let out = run(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} accepted:\n{text}");
            let want = format!("{c}:{line}: `{key}`");
            assert!(
                err.contains(&want),
                "{args:?}: want {want:?} in {err}\n--- file:\n{text}"
            );
        }
        remove_config(&path);
    }
    // A missing file names itself.
    let out = run(&[
        "node",
        "--config",
        "/nonexistent/spike.toml",
        "--name",
        "n1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/spike.toml"));
}

#[test]
fn separate_node_processes_refuse_the_embedded_store() {
    let text = sale_config("emb", 10, 1, &[1, 1], None, "");
    let path = write_config(&text);
    let out = run(&["node", "--config", cfg(&path), "--name", "n1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[redis]") && err.contains("spike up"), "{err}");
    let out = run(&["stock", "show", "--config", cfg(&path)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("GET /sale"));
    remove_config(&path);
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["node", "--help"],
        vec!["balancer", "--help"],
        vec!["up", "--help"],
        vec!["stock", "--help"],
        vec!["stock", "init", "--trust-client-buyer-ids", "--help"],
        vec!["stock", "show", "--help"],
        vec!["stock", "audit", "--help"],
        vec!["nginx-conf", "--help"],
    ] {
        let out = run(&args);
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: spike"), "{args:?}: {text}");
    }
}

/// SIGTERM while a purchase is in flight (Redis is stalled, so the purchase
/// is waiting on it): the node stops accepting, lets the purchase finish, and
/// exits 0. The buyer gets an answer, and the store agrees with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_purchase_finish() {
    let redis = RedisServer::start();
    let text = sale_config("inflight", 5, 1, &[1], Some(&redis.url()), "")
        .replace("timeout = \"1s\"", "timeout = \"3s\"");
    let path = write_config(&text);
    let c = cfg(&path);
    assert!(
        run(&["stock", "init", "--trust-client-buyer-ids", "--config", c])
            .status
            .success()
    );
    let mut node = SpikeProcess::start(&["node", "--config", c, "--name", "n1"]);
    let addr = node_addrs(&text)[0];
    wait_listening(&addr.to_string(), Duration::from_secs(10));
    let http = client();
    // Warm the connection pool so the in-flight request is already accepted.
    let (status, _) = common::http::get(&http, addr, "/healthz")
        .await
        .expect("healthz");
    assert_eq!(status, StatusCode::OK);

    redis.signal("STOP");
    let buying = {
        let http = http.clone();
        tokio::spawn(
            async move { common::http::get(&http, addr, "/buy/ticket?user=inflight").await },
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Stopped accepting: a new connection is refused while the purchase waits.
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err());
    redis.signal("CONT");
    let (status, body) = buying
        .await
        .expect("task")
        .expect("the in-flight buyer gets an answer");
    assert_eq!(status, StatusCode::OK, "{body}");
    let exit = node.wait_exit(Duration::from_secs(10)).expect("node exits");
    assert!(exit.success(), "{exit:?}");
    let snap = stdout_json(&run(&["stock", "show", "--config", c]));
    assert_eq!(snap["sold"], 1);
    assert_eq!(snap["orders"], 1);
    remove_config(&path);
}

/// `threads` sets how many runtime threads a `spike node` process runs
/// (one per CPU without it), as the process's own thread list shows.
#[test]
fn node_threads_sets_the_runtime_threads() {
    for threads in [1usize, 3] {
        let port = common::free_port();
        let text = format!(
            "[sale]\nevent = \"threads{threads}\"\ntotal = 5\n[[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:{port}\"\nthreads = {threads}\n"
        );
        let path = write_config(&text);
        let mut node = SpikeProcess::start(&["node", "--config", cfg(&path), "--name", "n1"]);
        wait_listening(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
        let workers = std::fs::read_dir(format!("/proc/{}/task", node.child.id()))
            .expect("/proc task list")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            // tokio names its worker threads so (older versions "tokio-runtime-worker").
            .filter(|name| {
                name.starts_with("tokio-rt-worker") || name.starts_with("tokio-runtime-w")
            })
            .count();
        assert_eq!(workers, threads, "threads = {threads}");
        node.stop("TERM", Duration::from_secs(10));
        remove_config(&path);
    }
}
