//! The sale on a real three-master Redis Cluster (`redis-server
//! --cluster-enabled yes`, joined by `redis-cli --cluster create`): every key
//! of a sale shares one hash tag, so the scripts, `stock init|show|audit`
//! and the clock all run on the shard that owns the sale's slot, unchanged.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::{client, get, json};
use common::redis::RedisServer;
use common::spike::{SpikeProcess, run, wait_listening, write_config};
use hyper::StatusCode;

/// Three masters, no replicas, once every one says `cluster_state:ok`.
fn cluster() -> Vec<RedisServer> {
    let shards: Vec<RedisServer> = (0..3)
        .map(|_| {
            RedisServer::start_with(&[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
        })
        .collect();
    let addrs: Vec<String> = shards
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let created = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli must be installed (run scripts/test.sh)");
    assert!(
        created.status.success(),
        "redis-cli --cluster create: {}",
        String::from_utf8_lossy(&created.stdout)
    );
    let start = Instant::now();
    for shard in &shards {
        loop {
            let mut c = shard.connection().expect("shard connection");
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut c)
                .expect("CLUSTER INFO");
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the cluster did not form: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    shards
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_and_two_nodes_sell_exactly_the_total_on_a_cluster() {
    const TOTAL: usize = 200;
    const BUYERS: usize = 3 * TOTAL;
    let shards = cluster();
    let url = format!(
        "redis-cluster://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}",
        shards[0].port, shards[1].port, shards[2].port
    );
    let (balancer, admin) = (common::free_addr(), common::free_addr());
    let nodes = [common::free_addr(), common::free_addr()];
    let text = format!(
        "[sale]\nevent = \"cluster-sale\"\ntotal = {TOTAL}\nper_user_limit = 1\n\n\
         [redis]\nurl = \"{url}\"\ntimeout = \"1s\"\n\n\
         [balancer]\nlisten = \"{balancer}\"\nadmin = \"{admin}\"\n\n\
         [[node]]\nname = \"n1\"\nlisten = \"{}\"\n\n[[node]]\nname = \"n2\"\nlisten = \"{}\"\n",
        nodes[0], nodes[1]
    );
    let path = write_config(&text);
    let cfg = path.to_str().expect("path").to_string();
    let init = run(&[
        "stock",
        "init",
        "--trust-client-buyer-ids",
        "--config",
        &cfg,
    ]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let _n1 = SpikeProcess::start(&["node", "--config", &cfg, "--name", "n1"]);
    let _n2 = SpikeProcess::start(&["node", "--config", &cfg, "--name", "n2"]);
    for n in &nodes {
        wait_listening(&n.to_string(), Duration::from_secs(10));
    }
    let _balancer = SpikeProcess::start(&["balancer", "--config", &cfg]);
    wait_listening(&balancer.to_string(), Duration::from_secs(10));

    let c = client();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for b in (w..BUYERS).step_by(16) {
                let path = format!("/buy/ticket?user=cb{b}");
                // A 503 (a shard slow on a loaded machine) is not a sale:
                // the buyer tries again, as a real one would.
                for _ in 0..20 {
                    let (status, body) = get(&c, balancer, &path).await.expect("buy");
                    if status != StatusCode::SERVICE_UNAVAILABLE {
                        answers.push((status, body));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            answers
        }));
    }
    let mut orders = HashSet::new();
    let mut sold_out = 0;
    for t in tasks {
        for (status, body) in t.await.expect("buyers") {
            match status {
                StatusCode::OK => {
                    let order = json(&body)["order"].as_str().expect("order").to_string();
                    assert!(orders.insert(order.clone()), "order {order} sold twice");
                }
                StatusCode::CONFLICT => {
                    assert_eq!(json(&body)["status"], "sold_out", "{body}");
                    sold_out += 1;
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
    }
    assert_eq!(orders.len(), TOTAL, "exactly the total sold");
    assert_eq!(sold_out, BUYERS - TOTAL);

    let show = run(&["stock", "show", "--config", &cfg]);
    assert!(show.status.success());
    let snap = json(&String::from_utf8_lossy(&show.stdout));
    assert_eq!(snap["sold"], TOTAL, "{snap}");
    assert_eq!(snap["orders"], TOTAL, "{snap}");
    let audit = run(&["stock", "audit", "--config", &cfg]);
    let report = json(&String::from_utf8_lossy(&audit.stdout));
    assert!(audit.status.success(), "{report}");
    assert_eq!(report["buyers_checked"], true, "{report}");
    assert_eq!(report["durability"]["appendonly"], true, "{report}");
}

/// Many sales on the cluster (issue 28): 200 sales of 50 tickets, 20×
/// oversubscribed, buyers spread at random over the sales, through `spike
/// up` (a balancer and three nodes); mid-run a reload (SIGHUP) adds 50
/// sales, bought while the first 200 still sell: every sale sells exactly
/// its total within each buyer's limit (by the answers, and by the store's
/// `most_by_one_buyer`), `stock audit --all` passes, and each sale's keys
/// sit in its one slot while the sales spread over all three shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sales_sell_exactly_and_spread_over_the_shards() {
    use common::fleet::{self, Shape};
    const ADDED: usize = 50;
    let shape = Shape {
        sales: 200,
        total: 50,
        oversubscribed: 20,
        limit: 2,
        buyers: 400,
    };
    let shards = cluster();
    let url = format!(
        "redis-cluster://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}",
        shards[0].port, shards[1].port, shards[2].port
    );
    let ports = common::up::Ports {
        balancer: common::free_addr(),
        admin: common::free_addr(),
        nodes: (0..3).map(|_| common::free_addr()).collect(),
    };
    let mut tail = format!(
        "[redis]\nurl = \"{url}\"\ntimeout = \"2s\"\n\n\
         [balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"round_robin\"\n",
        ports.balancer, ports.admin
    );
    for (i, a) in ports.nodes.iter().enumerate() {
        tail.push_str(&common::up::node_entry(i + 1, *a));
    }
    let (up, path) = common::up::start_up(&fleet::config(shape, &tail), &ports);
    let cfg = path.to_str().expect("path").to_string();

    // Through the balancer and straight to the nodes, a quarter each (as
    // the Redis run does): the sales' keys and the cluster are what is
    // under test, and fewer hops keep the run short.
    let targets = [
        ports.balancer,
        ports.nodes[0],
        ports.nodes[1],
        ports.nodes[2],
    ];
    let seed = fleet::seed();
    let started = Instant::now();
    let first = tokio::spawn(async move { fleet::flood(shape, &targets, 64, seed).await });

    // Mid-run: the file gains 50 sales, which land on the shards that own
    // their slots.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = client();
    let (status, body) = get(
        &c,
        ports.balancer,
        &format!("/events/{}/buy?user=b1", fleet::event(shape.sales)),
    )
    .await
    .expect("answer");
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "not on sale before the reload: {body}"
    );
    let grown = shape.sales..shape.sales + ADDED;
    std::fs::write(&path, fleet::config_of(shape, 0..grown.end, &tail)).expect("rewrite");
    up.signal("HUP");
    common::wait_for("the reload", Duration::from_secs(20), async || {
        let (_, body) = get(&c, ports.admin, "/status").await.expect("status");
        json(&body)["version"] == 2
    })
    .await;
    assert!(
        !first.is_finished(),
        "the first 200 sales still sell while the reload adds 50 (make them slower)"
    );
    let added = fleet::flood_in(shape, grown.clone(), &targets, 64, seed ^ 0x5eed).await;
    let all = first.await.expect("the first flood");
    eprintln!(
        "{} purchases in {:?}",
        all.len() + added.len(),
        started.elapsed()
    );
    fleet::check_exact(shape, &all);
    fleet::check_exact_in(shape, grown.clone(), &added);

    let audit = run(&["stock", "audit", "--all", "--config", &cfg]);
    let out = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    let lines: Vec<serde_json::Value> = out.lines().map(json).collect();
    assert_eq!(lines.len(), grown.end);
    for l in &lines {
        assert_eq!(
            (l["ok"].as_bool(), l["sold"].as_u64()),
            (Some(true), Some(shape.total)),
            "{l}"
        );
        assert!(
            matches!(l["most_by_one_buyer"].as_u64(), Some(n) if n <= shape.limit),
            "{l}"
        );
    }

    // Each sale's keys in one slot (its hash tag's), on the shard that
    // owns it; and every shard holds some of the sales.
    let mut sales_on = Vec::new();
    let mut shard_of = std::collections::HashMap::new();
    for (n, shard) in shards.iter().enumerate() {
        let mut c = shard.connection().expect("shard connection");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("spike:{train-*")
            .query(&mut c)
            .expect("KEYS");
        let mut here = HashSet::new();
        for k in &keys {
            let event = k
                .strip_prefix("spike:{")
                .and_then(|r| r.split_once('}'))
                .map(|(e, _)| e.to_string())
                .expect("a sale's key");
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(k)
                .query(&mut c)
                .expect("KEYSLOT");
            let tag: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(format!("{{{event}}}"))
                .query(&mut c)
                .expect("KEYSLOT");
            assert_eq!(slot, tag, "{k} is outside its sale's slot");
            let first = *shard_of.entry(event.clone()).or_insert(n);
            assert_eq!(first, n, "{event}'s keys on two shards");
            here.insert(event);
        }
        sales_on.push(here.len());
    }
    eprintln!("sales per shard: {sales_on:?}");
    assert_eq!(shard_of.len(), grown.end, "every sale's keys found");
    assert!(
        sales_on.iter().all(|&n| n > 0),
        "sales on every shard: {sales_on:?}"
    );
    common::spike::remove_config(&path);
}

/// `spike check` on a Cluster asks every primary that holds a sale of the
/// file whether it keeps what it acknowledges, not only the first sale's:
/// a primary with `appendonly` off fails the check, named.
#[test]
fn check_asks_each_primary_of_a_cluster_of_its_durability() {
    let shards = cluster();
    let url = format!(
        "redis-cluster://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}",
        shards[0].port, shards[1].port, shards[2].port
    );
    let events: Vec<String> = (0..12).map(|i| format!("dur{i}")).collect();
    // The shard that owns a sale's keys answers for it; the others send
    // the client elsewhere (MOVED).
    let owner = |event: &str| {
        shards
            .iter()
            .position(|s| {
                let mut c = s.connection().expect("shard connection");
                redis::cmd("EXISTS")
                    .arg(format!("spike:{{{event}}}:stock"))
                    .query::<i64>(&mut c)
                    .is_ok()
            })
            .expect("a shard owns every slot")
    };
    let first = owner(&events[0]);
    let volatile = events
        .iter()
        .map(|e| owner(e))
        .find(|o| *o != first)
        .expect("the sales span two shards");
    let mut c = shards[volatile].connection().expect("shard connection");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("no")
        .query(&mut c)
        .expect("CONFIG SET");
    let mut text = String::new();
    for e in &events {
        text.push_str(&format!("[[sale]]\nevent = \"{e}\"\ntotal = 5\n\n"));
    }
    text.push_str(&format!(
        "[redis]\nurl = \"{url}\"\ntimeout = \"1s\"\n\n[[node]]\nname = \"n1\"\nlisten = \"{}\"\n",
        common::free_addr()
    ));
    let path = write_config(&text);
    let out = run(&["check", "--config", path.to_str().expect("path")]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "redis primary 127.0.0.1:{}: appendonly is off",
            shards[volatile].port
        )),
        "{said}"
    );
    common::spike::remove_config(&path);
}
