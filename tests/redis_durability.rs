//! A Redis that may forget answered orders is refused by `spike stock init`
//! (no append-only file, or an eviction policy that can drop the sale's
//! keys), reported by a node's `/healthz` and by `stock audit`; and a Redis
//! restarted from its append-only file mid-sale keeps every order it
//! answered. Real redis-server and spike processes throughout.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::http::{client, get, json};
use common::redis::RedisServer;
use common::spike::{SpikeProcess, run, wait_listening, write_config};
use hyper::StatusCode;

fn sale_file(event: &str, total: u64, redis: &RedisServer, node: std::net::SocketAddr) -> String {
    sale_file_with(event, total, redis, node, "timeout = \"500ms\"\n")
}

/// A sale file with `redis_extra` lines (its timeout among them) in its
/// `[redis]` section.
fn sale_file_with(
    event: &str,
    total: u64,
    redis: &RedisServer,
    node: std::net::SocketAddr,
    redis_extra: &str,
) -> String {
    let text = format!(
        "[sale]\nevent = \"{event}\"\ntotal = {total}\nper_user_limit = 1\n\n[redis]\nurl = \"{}\"\n{redis_extra}\n[[node]]\nname = \"n1\"\nlisten = \"{node}\"\n",
        redis.url()
    );
    write_config(&text).to_str().expect("path").to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn initialised(cfg: &str) -> bool {
    let show = run(&["stock", "show", "--config", cfg]);
    assert!(show.status.success(), "{}", stderr(&show));
    json(&String::from_utf8_lossy(&show.stdout))["initialised"]
        .as_bool()
        .expect("initialised")
}

#[test]
fn stock_init_refuses_a_redis_without_an_append_only_file_unless_allowed() {
    let volatile = RedisServer::start_volatile();
    let cfg = sale_file("volatile", 10, &volatile, common::free_addr());
    let refused = run(&[
        "stock",
        "init",
        "--trust-client-buyer-ids",
        "--config",
        &cfg,
    ]);
    assert!(!refused.status.success(), "a volatile redis was accepted");
    let said = stderr(&refused);
    assert!(said.contains("appendonly is off"), "{said}");
    assert!(said.contains("--appendonly yes"), "the fix: {said}");
    assert!(said.contains("--allow-volatile"), "{said}");
    assert!(!initialised(&cfg), "a refused init wrote the sale");

    let allowed = run(&[
        "stock",
        "init",
        "--trust-client-buyer-ids",
        "--allow-volatile",
        "--config",
        &cfg,
    ]);
    assert!(allowed.status.success(), "{}", stderr(&allowed));
    assert!(stderr(&allowed).contains("appendonly is off"));
    assert!(initialised(&cfg));

    // The audit reports the store's durability beside the sale's checks.
    let audit = run(&["stock", "audit", "--config", &cfg]);
    let report = json(&String::from_utf8_lossy(&audit.stdout));
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["durability"]["appendonly"], false, "{report}");
    assert_eq!(report["durability"]["maxmemory_policy"], "noeviction");
    assert!(
        report["durability_problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("appendonly")),
        "{report}"
    );
}

#[test]
fn stock_init_accepts_a_redis_with_an_append_only_file() {
    let durable = RedisServer::start();
    let cfg = sale_file("durable", 10, &durable, common::free_addr());
    let init = run(&[
        "stock",
        "init",
        "--trust-client-buyer-ids",
        "--config",
        &cfg,
    ]);
    assert!(init.status.success(), "{}", stderr(&init));
    assert_eq!(stderr(&init), "", "no warning for a durable redis");
    let audit = run(&["stock", "audit", "--config", &cfg]);
    let report = json(&String::from_utf8_lossy(&audit.stdout));
    assert_eq!(report["durability"]["appendonly"], true, "{report}");
    assert_eq!(report["durability"]["appendfsync"], "everysec", "{report}");
    assert_eq!(report["durability_problems"], serde_json::json!([]));
}

#[test]
fn stock_init_refuses_an_eviction_policy_that_can_drop_the_sale() {
    let evicting = RedisServer::start_with(&[
        "--save",
        "",
        "--appendonly",
        "yes",
        "--maxmemory-policy",
        "allkeys-lru",
    ]);
    let cfg = sale_file("evicting", 10, &evicting, common::free_addr());
    let refused = run(&[
        "stock",
        "init",
        "--trust-client-buyer-ids",
        "--config",
        &cfg,
    ]);
    assert!(!refused.status.success());
    let said = stderr(&refused);
    assert!(said.contains("maxmemory-policy is allkeys-lru"), "{said}");
    assert!(said.contains("noeviction"), "the fix: {said}");
    assert!(!initialised(&cfg));
}

#[test]
fn a_renamed_config_command_still_gives_the_policy_from_info() {
    // Managed Redis often renames CONFIG: the eviction policy comes from
    // INFO memory, and only appendfsync stays unknown.
    let managed = RedisServer::start_with(&[
        "--save",
        "",
        "--appendonly",
        "yes",
        "--rename-command",
        "CONFIG",
        "",
    ]);
    let cfg = sale_file("managed", 10, &managed, common::free_addr());
    let init = run(&[
        "stock",
        "init",
        "--trust-client-buyer-ids",
        "--config",
        &cfg,
    ]);
    assert!(init.status.success(), "{}", stderr(&init));
    let audit = run(&["stock", "audit", "--config", &cfg]);
    let report = json(&String::from_utf8_lossy(&audit.stdout));
    assert_eq!(report["durability"]["maxmemory_policy"], "noeviction");
    assert!(
        report["durability"].get("appendfsync").is_none(),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reports_a_volatile_redis_in_healthz() {
    let volatile = RedisServer::start_volatile();
    let addr = common::free_addr();
    let cfg = sale_file("healthz-volatile", 10, &volatile, addr);
    assert!(
        run(&[
            "stock",
            "init",
            "--trust-client-buyer-ids",
            "--allow-volatile",
            "--config",
            &cfg
        ])
        .status
        .success()
    );
    let _node = SpikeProcess::start(&["node", "--config", &cfg, "--name", "n1"]);
    wait_listening(&addr.to_string(), Duration::from_secs(10));
    let (status, body) = get(&client(), addr, "/healthz").await.expect("healthz");
    // Reported, not failed: the node can sell, the operator must fix Redis.
    assert_eq!(status, StatusCode::OK, "{body}");
    let health = json(&body);
    assert_eq!(health["durability"]["appendonly"], false, "{body}");
    assert!(
        health["durability_problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("appendonly is off")),
        "{body}"
    );
}

/// Redis SIGKILLed mid-sale and started again on the same directory (its
/// append-only file, Redis's default `appendfsync everysec`): every buyer
/// told 200 still has that order, and no order id is handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_from_its_append_only_file_keeps_every_answered_order() {
    // Enough that the sale is far from over when Redis is killed at a
    // third: with 300, CI once saw nothing sold after the restart, most
    // likely because the sale ended between the check and the kill.
    const TOTAL: u64 = 1500;
    let mut redis = RedisServer::start();
    let addr = common::free_addr();
    let event = "aof-restart";
    let cfg = sale_file(event, TOTAL, &redis, addr);
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
    let _node = SpikeProcess::start(&["node", "--config", &cfg, "--name", "n1"]);
    wait_listening(&addr.to_string(), Duration::from_secs(10));

    let c = client();
    let sold: Arc<std::sync::Mutex<Vec<(String, String)>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut buyers = Vec::new();
    for _ in 0..8 {
        let (c, sold, next, stop) = (c.clone(), sold.clone(), next.clone(), stop.clone());
        buyers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let buyer = format!("b{n}");
                let Ok((status, body)) = get(&c, addr, &format!("/buy/ticket?user={buyer}")).await
                else {
                    continue;
                };
                if status == StatusCode::OK {
                    let order = json(&body)["order"].as_str().expect("order").to_string();
                    sold.lock().expect("sold").push((buyer, order));
                } else if status == StatusCode::CONFLICT {
                    break;
                } else {
                    // 503 while Redis is down: not a sale; slow down a little.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    common::wait_for("a third of the sale", Duration::from_secs(30), async || {
        sold.lock().expect("sold").len() as u64 >= TOTAL / 3
    })
    .await;
    redis.kill();
    let answered_before = sold.lock().expect("sold").len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart();
    common::wait_for(
        "the sale to sell out",
        Duration::from_secs(60),
        async || buyers.iter().all(|b| b.is_finished()),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let answered = sold.lock().expect("sold").clone();
    assert!(
        answered.len() > answered_before,
        "the sale went on after the restart"
    );
    let orders: HashMap<String, String> = redis.hash(&format!("spike:{{{event}}}:orders"));
    let mut ids = HashSet::new();
    for (buyer, order) in &answered {
        assert!(ids.insert(order.clone()), "order id {order} answered twice");
        let stored = orders
            .get(order)
            .unwrap_or_else(|| panic!("answered order {order} of {buyer} lost in the restart"));
        assert_eq!(json(stored)["buyer"], buyer.as_str(), "{stored}");
    }
    // The stock hash holds numbers and the stream's start (an id).
    let stock: HashMap<String, String> = redis.hash(&format!("spike:{{{event}}}:stock"));
    let sold: u64 = stock["sold"].parse().expect("sold is a number");
    assert!(sold <= TOTAL, "{stock:?}");
    assert_eq!(sold, orders.len() as u64, "{stock:?}");
    let audit = run(&["stock", "audit", "--config", &cfg]);
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
}

/// `[redis] replicas = 1`: a 200 means the replica has the order; a replica
/// that does not acknowledge in time turns the sale into a 503 that says
/// so (counted in /stats), and the buyer's retry with the same key gets
/// the order that was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replicas_a_200_is_on_the_replica_and_an_unacknowledged_sale_is_a_503() {
    // Redis takes writes while the stopped replica is within the lag (60 s),
    // so the sale is made and its WAIT is what falls short.
    let args = RedisServer::replicated_args(1, 60);
    let primary = RedisServer::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let replica = RedisServer::start_replica_of(&primary);
    let addr = common::free_addr();
    let event = "wait-replica";
    // A longer timeout than the other tests: the WAIT must end (a quarter
    // of it early) well before the node's own timeout on a loaded machine.
    let cfg = sale_file_with(
        event,
        10,
        &primary,
        addr,
        "replicas = 1\ntimeout = \"2s\"\n",
    );
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
    let _node = SpikeProcess::start(&["node", "--config", &cfg, "--name", "n1"]);
    wait_listening(&addr.to_string(), Duration::from_secs(10));
    let c = client();
    let orders_key = format!("spike:{{{event}}}:orders");
    for i in 0..3 {
        let (status, body) = get(&c, addr, &format!("/buy/ticket?user=ok{i}"))
            .await
            .expect("buy");
        assert_eq!(status, StatusCode::OK, "{body}");
        let order = json(&body)["order"].as_str().expect("order").to_string();
        // Read at once from the replica: WAIT said it has the write.
        let mut r = replica.connection().expect("replica");
        let stored: Option<String> = redis::cmd("HGET")
            .arg(&orders_key)
            .arg(&order)
            .query(&mut r)
            .expect("HGET");
        assert!(
            stored.is_some(),
            "order {order} answered 200 but not on the replica"
        );
    }

    // A replica that stops acknowledging: the sale is made on the primary,
    // but its buyer hears 503 with the reason, not 200.
    replica.signal("STOP");
    let key = "k-unreplicated-1";
    let reply = common::http::send(
        &c,
        hyper::Method::GET,
        addr,
        "/buy/ticket?user=late",
        &[("Idempotency-Key", key)],
    )
    .await
    .expect("buy");
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.body
    );
    assert!(reply.body.contains("not replicated"), "{}", reply.body);
    let (_, stats) = get(&c, addr, "/stats").await.expect("stats");
    assert_eq!(json(&stats)["not_replicated"], 1, "{stats}");
    let buyers: HashMap<String, u64> = primary.hash(&format!("spike:{{{event}}}:buyers"));
    assert_eq!(
        buyers.get("late"),
        Some(&1),
        "the sale was made on the primary"
    );

    // Replication resumes; the retry with the same key learns its order.
    replica.signal("CONT");
    let retry = common::http::send(
        &c,
        hyper::Method::GET,
        addr,
        "/buy/ticket?user=late",
        &[("Idempotency-Key", key)],
    )
    .await
    .expect("retry");
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.body);
    let order = json(&retry.body)["order"]
        .as_str()
        .expect("order")
        .to_string();
    let orders: HashMap<String, String> = primary.hash(&orders_key);
    assert_eq!(json(&orders[&order])["buyer"], "late");
    assert_eq!(
        orders.len(),
        4,
        "one ticket for the ambiguous buyer, not two"
    );
}
