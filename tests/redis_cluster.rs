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
