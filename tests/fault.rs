//! A sale under fire: a live sale through a `spike balancer` process to four
//! `spike node` processes and a real Redis with append-only persistence,
//! while a node is SIGKILLed (and later restarted), Redis is stopped for
//! longer than the command timeout, Redis is restarted, and the balancer is
//! reloaded with a changed upstream list. Afterwards every promise is checked
//! from Redis and from every answer the buyers got. With `[auth]` on, as
//! in production: every buyer buys with their own token.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::auth::TestAuth;
use common::http::{client, get, json, send};
use common::redis::RedisServer;
use common::spike::{SpikeProcess, remove_config, run, wait_listening, write_config};
use hyper::Method;
use hyper::StatusCode;
use tokio::sync::Mutex;

const TOTAL: usize = 2000;
const BUYERS: usize = 20_000;
const WORKERS: usize = 16;
/// Far above the balancer's response timeout: an answer slower than this is a hang.
const HANG: Duration = Duration::from_secs(8);

struct Ports {
    balancer: SocketAddr,
    admin: SocketAddr,
    nodes: Vec<SocketAddr>,
}

fn config_text(redis: &str, ports: &Ports, upstreams: &[usize]) -> String {
    let mut t = format!(
        "[sale]\nevent = \"fault\"\ntotal = {TOTAL}\nper_user_limit = 1\n\n{}\
         [redis]\nurl = \"{redis}\"\ntimeout = \"300ms\"\n\n\
         [balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"weighted_round_robin\"\n\
         connect_timeout = \"500ms\"\nresponse_timeout = \"2s\"\n",
        TestAuth::new("fault").section(),
        ports.balancer,
        ports.admin
    );
    for &i in upstreams {
        t.push_str(&format!(
            "\n[[balancer.upstream]]\naddr = \"{}\"\nweight = {}\nmax_fails = 1\nfail_timeout = \"2s\"\n",
            ports.nodes[i],
            i + 1
        ));
    }
    for (i, a) in ports.nodes.iter().enumerate() {
        t.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\nlisten = \"{a}\"\nweight = {}\n",
            i + 1,
            i + 1
        ));
    }
    t
}

/// Replaces the file in one step, so the balancer's file watcher never reads
/// half of it.
fn rewrite(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

#[derive(Debug)]
struct Answer {
    buyer: usize,
    status: Option<StatusCode>,
    body: String,
    took: Duration,
}

fn start_node(cfg: &str, i: usize) -> SpikeProcess {
    SpikeProcess::start(&["node", "--config", cfg, "--name", &format!("n{}", i + 1)])
}

async fn version(c: &common::http::TestClient, admin: SocketAddr) -> u64 {
    let (_, body) = get(c, admin, "/status").await.expect("status");
    json(&body)["version"].as_u64().expect("version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_survives_node_death_redis_stalls_restarts_and_reloads() {
    let mut redis = RedisServer::start_durable();
    let p = common::free_addr;
    let ports = Ports {
        balancer: p(),
        admin: p(),
        nodes: (0..4).map(|_| p()).collect(),
    };
    let path = write_config(&config_text(&redis.url(), &ports, &[0, 1, 2, 3]));
    let cfg = path.to_str().expect("path").to_string();
    assert!(run(&["stock", "init", "--config", &cfg]).status.success());
    let mut nodes: Vec<Option<SpikeProcess>> = (0..4).map(|i| Some(start_node(&cfg, i))).collect();
    for a in &ports.nodes {
        wait_listening(&a.to_string(), Duration::from_secs(10));
    }
    let balancer = SpikeProcess::start(&["balancer", "--config", &cfg]);
    wait_listening(&ports.balancer.to_string(), Duration::from_secs(10));

    let c = client();
    let auth = Arc::new(TestAuth::new("fault"));
    let sold = Arc::new(AtomicUsize::new(0));
    let next_buyer = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (c, auth, sold, next_buyer, stop, answers) = (
            c.clone(),
            auth.clone(),
            sold.clone(),
            next_buyer.clone(),
            stop.clone(),
            answers.clone(),
        );
        let target = ports.balancer;
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let buyer = next_buyer.fetch_add(1, Ordering::Relaxed);
                if buyer >= BUYERS {
                    break;
                }
                // A real buyer retries a 502/503 a few times, then gives up.
                let bearer = auth.bearer(&format!("f{buyer}"));
                let headers = [("Authorization", bearer.as_str())];
                for _attempt in 0..4 {
                    let start = Instant::now();
                    // Half the buyers POST, as a browser form would: the
                    // balancer keys every purchase, so a POST that dies
                    // with a node is retried on another like a GET.
                    let method = if buyer % 2 == 0 {
                        Method::GET
                    } else {
                        Method::POST
                    };
                    let sent = send(&c, method, target, "/buy/ticket", &headers);
                    let answer = match tokio::time::timeout(HANG, sent).await {
                        Ok(Ok(common::http::Reply { status, body, .. })) => Answer {
                            buyer,
                            status: Some(status),
                            body,
                            took: start.elapsed(),
                        },
                        Ok(Err(e)) => Answer {
                            buyer,
                            status: None,
                            body: e,
                            took: start.elapsed(),
                        },
                        Err(_) => Answer {
                            buyer,
                            status: None,
                            body: "hang".into(),
                            took: start.elapsed(),
                        },
                    };
                    let status = answer.status;
                    answers.lock().await.push(answer);
                    match status {
                        Some(StatusCode::OK) => {
                            sold.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Some(StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        _ => break,
                    }
                }
                // Pace the crowd while tickets remain, so the faults land in
                // the middle of the sale; after that, everyone else rushes in.
                if sold.load(Ordering::Relaxed) < TOTAL {
                    tokio::time::sleep(Duration::from_millis(8)).await;
                }
            }
        }));
    }

    let wait_for = |fraction: f64| {
        let sold = sold.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while (sold.load(Ordering::Relaxed) as f64) < fraction * TOTAL as f64 {
                assert!(
                    Instant::now() < deadline,
                    "the sale stalled before {fraction}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let mut faults = Vec::new();

    // 1. A node dies holding its allowance; the balancer is then reloaded
    //    without it.
    wait_for(0.10).await;
    let dead = 1; // n2, weight 2
    if let Some(mut n) = nodes[dead].take() {
        n.signal("KILL");
        n.wait_exit(Duration::from_secs(5));
    }
    faults.push(format!(
        "SIGKILL n2 at {} sold",
        sold.load(Ordering::Relaxed)
    ));
    let v0 = version(&c, ports.admin).await;
    rewrite(&path, &config_text(&redis.url(), &ports, &[0, 2, 3]));
    balancer.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while version(&c, ports.admin).await == v0 {
        assert!(Instant::now() < deadline, "the balancer did not reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    faults.push("balancer reloaded without n2".into());

    // 2. Redis stalls for longer than the command timeout.
    wait_for(0.30).await;
    redis.signal("STOP");
    faults.push(format!(
        "SIGSTOP redis for 1s at {} sold",
        sold.load(Ordering::Relaxed)
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.signal("CONT");

    // 3. Redis restarts (from its append-only file).
    wait_for(0.50).await;
    faults.push(format!(
        "redis restarted at {} sold",
        sold.load(Ordering::Relaxed)
    ));
    redis.restart();

    // 4. The dead node comes back (outside the balancer for now).
    wait_for(0.70).await;
    nodes[dead] = Some(start_node(&cfg, dead));
    wait_listening(&ports.nodes[dead].to_string(), Duration::from_secs(10));
    faults.push(format!(
        "n2 restarted at {} sold",
        sold.load(Ordering::Relaxed)
    ));

    // The crowd runs out or the sale completes.
    let deadline = Instant::now() + Duration::from_secs(90);
    while next_buyer.load(Ordering::Relaxed) < BUYERS {
        assert!(
            Instant::now() < deadline,
            "the sale did not complete in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }

    // 5. n2 rejoins the balancer; latecomers all hear "sold out".
    let v1 = version(&c, ports.admin).await;
    rewrite(&path, &config_text(&redis.url(), &ports, &[0, 1, 2, 3]));
    balancer.signal("HUP");
    while version(&c, ports.admin).await == v1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    faults.push("balancer reloaded with n2 back".into());
    let mut late = HashMap::new();
    for i in 0..200 {
        let common::http::Reply { status, body, .. } = auth
            .buy(&c, Method::GET, ports.balancer, &format!("late{i}"), None)
            .await
            .expect("late buyer");
        *late
            .entry((
                status.as_u16(),
                json(&body)["status"].as_str().unwrap_or("").to_string(),
            ))
            .or_insert(0) += 1;
    }
    assert_eq!(
        late.get(&(409, "sold_out".to_string())),
        Some(&200),
        "latecomers: {late:?}"
    );

    // ---- The record ----
    let answers = answers.lock().await;
    let mut by_status: HashMap<String, usize> = HashMap::new();
    for a in answers.iter() {
        let key = match a.status {
            Some(s) => format!(
                "{} {}",
                s.as_u16(),
                json(&a.body)["status"].as_str().unwrap_or("?")
            ),
            None => format!("error: {}", a.body),
        };
        *by_status.entry(key).or_default() += 1;
    }
    let hangs: Vec<_> = answers.iter().filter(|a| a.status.is_none()).collect();
    assert!(
        hangs.is_empty(),
        "transport errors or hangs: {:?}",
        &hangs[..hangs.len().min(5)]
    );
    let slowest = answers.iter().map(|a| a.took).max().unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(5),
        "an answer took {slowest:?}"
    );
    for a in answers.iter() {
        let s = a.status.map(|s| s.as_u16());
        assert!(
            matches!(s, Some(200 | 409 | 503)),
            "unexpected answer (a purchase that died with a node must go to another, not be a 502): {a:?}"
        );
    }

    let mut conn = redis.connection().expect("redis");
    let orders: HashSet<String> = redis::cmd("HKEYS")
        .arg("spike:{fault}:orders")
        .query(&mut conn)
        .expect("HKEYS");
    let holders: HashMap<String, String> = redis.hash("spike:{fault}:buyer_order");
    let mut ok_buyers = HashSet::new();
    for a in answers.iter().filter(|a| a.status == Some(StatusCode::OK)) {
        let v = json(&a.body);
        let order = v["order"].as_str().expect("order");
        assert!(
            orders.contains(order),
            "200 for order {order}, missing in redis"
        );
        assert!(
            ok_buyers.insert(a.buyer),
            "buyer f{} got two tickets",
            a.buyer
        );
    }
    // Anyone holding a ticket without a 200 got only 503s (a reply lost
    // after the script ran) or a 409; their order exists, and asking again
    // gives `already_bought` with exactly that order.
    let mut ambiguous = 0;
    for (buyer, order) in &holders {
        let id: usize = buyer.trim_start_matches('f').parse().expect("buyer id");
        if ok_buyers.contains(&id) {
            continue;
        }
        let theirs: Vec<_> = answers.iter().filter(|a| a.buyer == id).collect();
        assert!(
            theirs
                .iter()
                .all(|a| a.status == Some(StatusCode::SERVICE_UNAVAILABLE)
                    || a.status == Some(StatusCode::CONFLICT)),
            "{buyer} holds {order} with answers {theirs:?}"
        );
        assert!(orders.contains(order));
        let common::http::Reply { status, body, .. } = auth
            .buy(&c, Method::GET, ports.balancer, buyer, None)
            .await
            .expect("the holder asks again");
        let v = json(&body);
        assert_eq!(status, StatusCode::CONFLICT, "{buyer}: {body}");
        assert_eq!(v["status"], "already_bought", "{buyer}: {body}");
        assert_eq!(
            v["order"],
            order.as_str(),
            "{buyer} must get their own order back"
        );
        ambiguous += 1;
    }
    let show = run(&["stock", "show", "--config", &cfg]);
    let snap = json(String::from_utf8_lossy(&show.stdout).trim());
    let audit = run(&["stock", "audit", "--config", &cfg]);
    assert!(
        audit.status.success(),
        "audit: {}",
        String::from_utf8_lossy(&audit.stdout)
    );
    let sold_total = snap["sold"].as_u64().expect("sold") as usize;
    assert!(sold_total <= TOTAL, "oversold: {snap}");
    assert_eq!(sold_total, ok_buyers.len() + ambiguous);
    assert_eq!(snap["orders"].as_u64(), Some(sold_total as u64));
    assert_eq!(sold_total, TOTAL, "undersold with one node dead: {snap}");

    let mut statuses: Vec<_> = by_status.into_iter().collect();
    statuses.sort();
    eprintln!("\n=== fault test record ===");
    eprintln!(
        "buyers: {} distinct asked (of {BUYERS}), tickets: {TOTAL}",
        next_buyer.load(Ordering::Relaxed).min(BUYERS)
    );
    eprintln!("faults: {}", faults.join("; "));
    eprintln!("answers ({} requests):", answers.len());
    for (k, n) in &statuses {
        eprintln!("  {k}: {n}");
    }
    eprintln!("slowest answer: {slowest:?}");
    eprintln!(
        "sold: {sold_total}, orders: {}, answered 200: {}, sold with a lost reply: {ambiguous}, undersell: {}",
        snap["orders"],
        ok_buyers.len(),
        TOTAL - sold_total
    );
    eprintln!("latecomers after n2 rejoined: {late:?}");
    drop(nodes);
    remove_config(&path);
}

/// Sales in [`several_sales_survive_a_node_killed_mid_sale`].
const FAULT_SALES: usize = 4;
/// Tickets in each.
const FAULT_TOTAL: usize = 250;

/// Several sales under fire (issue 28): four sales sold through a `spike
/// balancer` to three `spike node` processes on a durable Redis, buyers
/// spread at random over the sales, each with one token whose `aud` lists
/// them all; a node is SIGKILLed mid-sale (holding leases of every sale it
/// sold in) and restarted later. Every sale sells exactly its total (the
/// dead node's leases come back after `lease_ttl`), every 200 is an order
/// in its sale, no buyer holds two tickets of one sale, a holder who heard
/// no 200 gets their own order back, and `stock audit --all` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_sales_survive_a_node_killed_mid_sale() {
    const BUYERS: u64 = 3000;
    let redis = RedisServer::start_durable();
    let p = common::free_addr;
    let ports = Ports {
        balancer: p(),
        admin: p(),
        nodes: (0..3).map(|_| p()).collect(),
    };
    let auth = TestAuth::new("unused");
    let mut text = String::new();
    for s in 0..FAULT_SALES {
        text.push_str(&format!(
            "[[sale]]\nevent = \"s{s}\"\ntotal = {FAULT_TOTAL}\nper_user_limit = 1\nlease_ttl = \"3s\"\n\n"
        ));
    }
    text.push_str(&auth.section());
    text.push_str(&format!(
        "[redis]\nurl = \"{}\"\ntimeout = \"300ms\"\n\n\
         [balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"round_robin\"\n\
         connect_timeout = \"500ms\"\nresponse_timeout = \"2s\"\n",
        redis.url(),
        ports.balancer,
        ports.admin
    ));
    for a in &ports.nodes {
        text.push_str(&format!(
            "\n[[balancer.upstream]]\naddr = \"{a}\"\nmax_fails = 1\nfail_timeout = \"2s\"\n"
        ));
    }
    for (i, a) in ports.nodes.iter().enumerate() {
        text.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\nlisten = \"{a}\"\n",
            i + 1
        ));
    }
    let path = write_config(&text);
    let cfg = path.to_str().expect("path").to_string();
    let init = run(&["stock", "init", "--all", "--config", &cfg]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut nodes: Vec<Option<SpikeProcess>> = (0..3).map(|i| Some(start_node(&cfg, i))).collect();
    for a in &ports.nodes {
        wait_listening(&a.to_string(), Duration::from_secs(10));
    }
    let _balancer = SpikeProcess::start(&["balancer", "--config", &cfg]);
    wait_listening(&ports.balancer.to_string(), Duration::from_secs(10));

    let key = spike::auth::BuyerKey::parse(&format!("k1:hs256:{}", common::auth::test_key(1)))
        .expect("key");
    let events: Vec<String> = (0..FAULT_SALES).map(|s| format!("s{s}")).collect();
    let exp = spike::auth::unix_now() + 3600;
    let bearers: Arc<Vec<String>> = Arc::new(
        (0..BUYERS)
            .map(|b| {
                let aud: Vec<&str> = events.iter().map(String::as_str).collect();
                let t =
                    spike::auth::mint_for(&key, &format!("m{b}"), &aud, exp, None).expect("mint");
                format!("Bearer {t}")
            })
            .collect(),
    );
    let c = client();
    let sold = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // (buyer, sale, status, body)
    let answers = Arc::new(Mutex::new(
        Vec::<(u64, usize, Option<StatusCode>, String)>::new(),
    ));
    let mut workers = Vec::new();
    for w in 0..WORKERS as u64 {
        let (c, bearers, sold, stop, answers) = (
            c.clone(),
            bearers.clone(),
            sold.clone(),
            stop.clone(),
            answers.clone(),
        );
        let target = ports.balancer;
        workers.push(tokio::spawn(async move {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let (buyer, sale) = (x % BUYERS, ((x >> 32) % FAULT_SALES as u64) as usize);
                let headers = [("Authorization", bearers[buyer as usize].as_str())];
                let path = format!("/events/s{sale}/buy");
                // A real buyer retries a 502/503 a few times, then gives up.
                for _ in 0..4 {
                    let method = if x.is_multiple_of(2) {
                        Method::GET
                    } else {
                        Method::POST
                    };
                    let sent = send(&c, method, target, &path, &headers);
                    let (status, body) = match tokio::time::timeout(HANG, sent).await {
                        Ok(Ok(r)) => (Some(r.status), r.body),
                        Ok(Err(e)) => (None, e),
                        Err(_) => (None, "hang".into()),
                    };
                    answers.lock().await.push((buyer, sale, status, body));
                    match status {
                        Some(StatusCode::OK) => {
                            sold.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Some(StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        _ => break,
                    }
                }
                // Paced, so that the kill lands mid-sale.
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        }));
    }
    let all = FAULT_SALES * FAULT_TOTAL;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sold.load(Ordering::Relaxed) < all * 3 / 10 {
        assert!(Instant::now() < deadline, "the sale stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = sold.load(Ordering::Relaxed);
    if let Some(mut n) = nodes[1].take() {
        n.signal("KILL");
        n.wait_exit(Duration::from_secs(5));
    }
    while sold.load(Ordering::Relaxed) < all * 6 / 10 {
        assert!(Instant::now() < deadline, "the sale stalled after the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nodes[1] = Some(start_node(&cfg, 1));
    wait_listening(&ports.nodes[1].to_string(), Duration::from_secs(10));
    // Until every sale has sold its total (the dead node's leases run
    // out and their units sell again), as the store says.
    let mut conn = redis.connection().expect("redis");
    loop {
        let sold_now: Vec<u64> = (0..FAULT_SALES)
            .map(|s| {
                let n: Option<u64> = redis::cmd("HLEN")
                    .arg(format!("spike:{{s{s}}}:orders"))
                    .query(&mut conn)
                    .expect("HLEN");
                n.unwrap_or(0)
            })
            .collect();
        if sold_now.iter().all(|&n| n == FAULT_TOTAL as u64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sales did not complete: {sold_now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }

    let answers = answers.lock().await;
    let mut by_status: HashMap<String, usize> = HashMap::new();
    for (_, _, status, body) in answers.iter() {
        let key = match status {
            Some(s) => format!(
                "{} {}",
                s.as_u16(),
                json(body)["status"].as_str().unwrap_or("?")
            ),
            None => format!("error: {body}"),
        };
        *by_status.entry(key).or_default() += 1;
    }
    eprintln!("killed n2 at {killed_at} sold; answers: {by_status:?}");
    for (buyer, sale, status, body) in answers.iter() {
        assert!(
            matches!(status.map(|s| s.as_u16()), Some(200 | 409 | 503)),
            "m{buyer} in s{sale}: {status:?} {body}"
        );
    }
    let c = client();
    for s in 0..FAULT_SALES {
        let event = format!("s{s}");
        let orders: HashSet<String> = redis::cmd("HKEYS")
            .arg(format!("spike:{{{event}}}:orders"))
            .query(&mut conn)
            .expect("HKEYS");
        assert_eq!(orders.len(), FAULT_TOTAL, "{event} sold exactly its total");
        let holders: HashMap<String, String> =
            redis.hash(&format!("spike:{{{event}}}:buyer_order"));
        let mut ok_buyers = HashSet::new();
        for (buyer, _, _, body) in answers
            .iter()
            .filter(|a| a.1 == s && a.2 == Some(StatusCode::OK))
        {
            let order = json(body)["order"].as_str().expect("order").to_string();
            let bare = order
                .strip_prefix(&format!("{event}:"))
                .unwrap_or_else(|| panic!("{order} names its sale {event}"));
            assert!(orders.contains(bare), "200 for {order}, missing in redis");
            assert!(
                ok_buyers.insert(*buyer),
                "m{buyer} got two tickets of {event}"
            );
        }
        // A holder without a 200 heard only 503s or 409s, and asking again
        // gets their own order.
        for (holder, order) in &holders {
            let id: u64 = holder.trim_start_matches('m').parse().expect("buyer id");
            if ok_buyers.contains(&id) {
                continue;
            }
            let theirs: Vec<_> = answers
                .iter()
                .filter(|a| a.0 == id && a.1 == s)
                .map(|a| a.2)
                .collect();
            assert!(
                theirs.iter().all(|st| matches!(
                    st,
                    Some(StatusCode::SERVICE_UNAVAILABLE | StatusCode::CONFLICT)
                )),
                "{holder} holds {order} of {event} with answers {theirs:?}"
            );
            let r = send(
                &c,
                Method::GET,
                ports.balancer,
                &format!("/events/{event}/buy"),
                &[("Authorization", bearers[id as usize].as_str())],
            )
            .await
            .expect("the holder asks again");
            let v = json(&r.body);
            assert_eq!(
                (v["status"].as_str(), v["order"].as_str()),
                (
                    Some("already_bought"),
                    Some(format!("{event}:{order}").as_str())
                ),
                "{holder} in {event}: {}",
                r.body
            );
        }
    }
    let audit = run(&["stock", "audit", "--all", "--config", &cfg]);
    assert!(
        audit.status.success(),
        "audit: {}",
        String::from_utf8_lossy(&audit.stdout)
    );
    drop(nodes);
    remove_config(&path);
}
