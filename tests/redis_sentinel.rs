//! A sale through Sentinel (`redis-sentinel://`, fred's URL form) with
//! `[redis] replicas = 1`: the primary is SIGKILLed mid-sale, Sentinel
//! promotes the replica, and every buyer who heard 200 still holds that
//! exact order on the new primary; the sale goes on (once the old primary
//! is back, as the new one's replica, sales are acknowledged again) and
//! never sells past the total. With `[auth]` on, as in production: every
//! buyer buys with their own token.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::auth::TestAuth;
use common::http::{Reply, client, get, json};
use common::redis::RedisServer;
use common::sentinel::{Sentinel, wait_until};
use common::spike::{SpikeProcess, run, wait_listening, write_config};
use hyper::Method;
use hyper::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_survives_a_sentinel_failover_with_every_answered_order() {
    const TOTAL: u64 = 150;
    const SERVICE: &str = "sale";
    let mut primary = RedisServer::start_primary_for(1);
    let args = RedisServer::replicated_args(1, 10);
    let replica = RedisServer::start_replica_with(
        &primary,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::start(SERVICE, primary.port))
        .collect();
    wait_until(
        "the sentinels to find each other and the replica",
        Duration::from_secs(30),
        || sentinels.iter().all(|s| s.settled(SERVICE)),
    );

    let node = common::free_addr();
    let url = format!(
        "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={SERVICE}&node=127.0.0.1:{}&node=127.0.0.1:{}",
        sentinels[0].port, sentinels[1].port, sentinels[2].port
    );
    let auth = Arc::new(TestAuth::new("failover"));
    let text = format!(
        "[sale]\nevent = \"failover\"\ntotal = {TOTAL}\nper_user_limit = 1\n\n{}\
         [redis]\nurl = \"{url}\"\ntimeout = \"500ms\"\nreplicas = 1\n\n\
         [[node]]\nname = \"n1\"\nlisten = \"{node}\"\n",
        auth.section()
    );
    let path = write_config(&text);
    let cfg = path.to_str().expect("path").to_string();
    let init = run(&["stock", "init", "--config", &cfg]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let _node = SpikeProcess::start(&["node", "--config", &cfg, "--name", "n1"]);
    wait_listening(&node.to_string(), Duration::from_secs(10));

    // Buyers one after another on 8 lanes; a buyer told 503 asks again
    // (same buyer: with a limit of 1, a sale made but not acknowledged
    // comes back as already_bought with its order).
    let c = client();
    let answered: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let after_failover = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sold_after = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut lanes = Vec::new();
    for lane in 0..8u64 {
        let (c, auth, answered, after, sold_after) = (
            c.clone(),
            auth.clone(),
            answered.clone(),
            after_failover.clone(),
            sold_after.clone(),
        );
        lanes.push(tokio::spawn(async move {
            let started = Instant::now();
            for b in (lane..).step_by(8) {
                let buyer = format!("f{b}");
                loop {
                    assert!(
                        started.elapsed() < Duration::from_secs(90),
                        "the sale did not end"
                    );
                    let Ok(Reply { status, body, .. }) =
                        auth.buy(&c, Method::POST, node, &buyer, None).await
                    else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let v = json(&body);
                    match (status, v["status"].as_str()) {
                        (StatusCode::OK, _) | (StatusCode::CONFLICT, Some("already_bought")) => {
                            // A 200, or the order of a sale made but not
                            // acknowledged in time (its 503, then this):
                            // either way the buyer now holds it.
                            let order = v["order"].as_str().expect("order").to_string();
                            if after.load(std::sync::atomic::Ordering::Relaxed) {
                                sold_after.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            answered
                                .lock()
                                .expect("answered")
                                .insert(buyer.clone(), order);
                            break;
                        }
                        (StatusCode::CONFLICT, Some("sold_out")) => return,
                        (StatusCode::SERVICE_UNAVAILABLE, _) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        _ => panic!("unexpected {status}: {body}"),
                    }
                }
            }
        }));
    }

    let sold_now = || answered.lock().expect("answered").len() as u64;
    let start = Instant::now();
    while sold_now() < TOTAL / 3 {
        assert!(start.elapsed() < Duration::from_secs(30), "no sales");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old_port = primary.port;
    primary.kill();
    let before_failover = sold_now();
    wait_until(
        "Sentinel to promote the replica",
        Duration::from_secs(30),
        || sentinels[0].primary(SERVICE) == Some(replica.port),
    );
    after_failover.store(true, std::sync::atomic::Ordering::Relaxed);
    // The old primary comes back; Sentinel makes it the new one's replica,
    // so `replicas = 1` can be met again.
    primary.restart();
    assert_eq!(primary.port, old_port);
    for lane in lanes {
        lane.await.expect("buyers");
    }
    assert!(
        sold_after.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the sale went on after the failover ({before_failover} sold before it)"
    );

    // Every buyer told 200 (or told its order after a 503) still holds that
    // exact order on the new primary.
    let answered = answered.lock().expect("answered").clone();
    for (buyer, order) in &answered {
        let Reply { status, body, .. } = auth
            .buy(&c, Method::POST, node, buyer, None)
            .await
            .expect("ask again");
        assert_eq!(status, StatusCode::CONFLICT, "{buyer}: {body}");
        let v = json(&body);
        assert_eq!(v["status"], "already_bought", "{buyer}: {body}");
        assert_eq!(
            v["order"],
            order.as_str(),
            "{buyer} lost their order: {body}"
        );
    }
    let show = run(&["stock", "show", "--config", &cfg]);
    let snap = json(&String::from_utf8_lossy(&show.stdout));
    assert!(snap["sold"].as_u64().expect("sold") <= TOTAL, "{snap}");
    let audit = run(&["stock", "audit", "--config", &cfg]);
    assert!(
        audit.status.success(),
        "{}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
}

/// `[redis] replicas = 1` through a Sentinel failover, with `replicas`
/// replicas behind the primary, every server refusing writes while fewer
/// than one replica is within reach (`min-replicas-to-write 1`, which
/// `stock init` asks for). Buyers come one at a time, each asking once;
/// the primary is SIGKILLed between two of them. Returns what the buyers
/// heard after the kill: `(told 200, told 503)`, once every buyer told 503
/// was checked to hold no ticket on the new primary and every buyer told
/// 200 to hold theirs.
async fn buyers_through_a_failover(replicas: usize, after: Duration) -> (usize, usize) {
    const SERVICE: &str = "held";
    let args = RedisServer::replicated_args(1, 10);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut primary = RedisServer::start_with(&args);
    let standby: Vec<RedisServer> = (0..replicas)
        .map(|_| RedisServer::start_replica_with(&primary, &args))
        .collect();
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::start(SERVICE, primary.port))
        .collect();
    wait_until(
        "the sentinels to find each other and the replicas",
        Duration::from_secs(30),
        || {
            sentinels
                .iter()
                .all(|s| s.settled_with(SERVICE, replicas as u64))
        },
    );
    let node = common::free_addr();
    let url = format!(
        "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={SERVICE}&node=127.0.0.1:{}&node=127.0.0.1:{}",
        sentinels[0].port, sentinels[1].port, sentinels[2].port
    );
    let event = format!("held-{replicas}");
    let auth = TestAuth::new(&event);
    let text = format!(
        "[sale]\nevent = \"{event}\"\ntotal = 1000\nper_user_limit = 1\n\n{}\
         [redis]\nurl = \"{url}\"\ntimeout = \"1s\"\nreplicas = 1\n\n\
         [[node]]\nname = \"n1\"\nlisten = \"{node}\"\n",
        auth.section()
    );
    let path = write_config(&text);
    let cfg = path.to_str().expect("path").to_string();
    let init = run(&["stock", "init", "--config", &cfg]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let _node = SpikeProcess::start(&["node", "--config", &cfg, "--name", "n1"]);
    wait_listening(&node.to_string(), Duration::from_secs(10));
    let c = client();
    let (_, health) = get(&c, node, "/healthz").await.expect("healthz");
    assert_eq!(
        json(&health)["replicas"],
        format!("{replicas} of 1"),
        "{health}"
    );

    let mut next = 0u64;
    let mut buy = async || {
        next += 1;
        let buyer = format!("h{next}");
        let key = format!("key-{next}");
        let reply = auth.buy(&c, Method::POST, node, &buyer, Some(&key)).await;
        (buyer, reply.map(|r| (r.status, r.body)))
    };
    for _ in 0..10 {
        let (buyer, reply) = buy().await;
        let (status, body) = reply.expect("before the failover");
        assert_eq!(status, StatusCode::OK, "{buyer}: {body}");
    }
    primary.kill();
    let mut told_200 = Vec::new();
    let mut told_503 = Vec::new();
    let mut degraded_seen = false;
    let start = Instant::now();
    while start.elapsed() < after {
        let (buyer, reply) = buy().await;
        match reply {
            Ok((StatusCode::OK, _)) => told_200.push(buyer),
            Ok((StatusCode::SERVICE_UNAVAILABLE, _)) => told_503.push(buyer),
            Ok((status, body)) => panic!("{buyer}: unexpected {status}: {body}"),
            Err(_) => told_503.push(buyer),
        }
        if !degraded_seen && sentinels[0].primary(SERVICE) != Some(primary.port) {
            let (status, body) = get(&c, node, "/healthz").await.expect("healthz");
            degraded_seen = status == StatusCode::SERVICE_UNAVAILABLE
                && json(&body)["replicas"] == "0 of 1"
                && json(&body)["status"] == "degraded";
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = sentinels[0].primary(SERVICE).expect("a primary");
    let new_primary = standby
        .iter()
        .find(|r| r.port == promoted)
        .expect("a replica was promoted");
    let buyers: HashMap<String, u64> = new_primary.hash(&format!("spike:{{{event}}}:buyers"));
    for b in &told_503 {
        assert!(
            !buyers.contains_key(b),
            "{b} was told 503 yet holds a ticket ({} replicas)",
            replicas
        );
    }
    for b in &told_200 {
        assert_eq!(
            buyers.get(b),
            Some(&1),
            "{b} was told 200 but holds nothing"
        );
    }
    if replicas == 1 {
        assert!(
            degraded_seen,
            "the node's /healthz never said `replicas: 0 of 1` (degraded)"
        );
    }
    (told_200.len(), told_503.len())
}

/// One replica is not enough to keep selling through a failover: the
/// promoted replica has none of its own, so Redis refuses every sale (503,
/// nothing sold) and the node says it is degraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_replica_a_failover_stops_the_sale_and_no_503_holds_a_ticket() {
    let (sold, refused) = buyers_through_a_failover(1, Duration::from_secs(12)).await;
    assert_eq!(sold, 0, "sales were acknowledged with no replica left");
    assert!(refused > 0);
}

/// With two replicas the promoted one keeps the other, and the sale goes
/// on; still, no buyer told 503 holds a ticket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_the_sale_goes_on_through_a_failover_and_no_503_holds_a_ticket() {
    let (sold, _) = buyers_through_a_failover(2, Duration::from_secs(20)).await;
    assert!(sold > 0, "no sale after the failover");
}
