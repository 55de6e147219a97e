//! The traffic split through a real balancer to real backends: Nginx's smooth
//! weighted order and exact totals (sequential and concurrent), ip_hash
//! stickiness from 200 loopback source addresses, HTTP/1.0 clients, and the
//! admin endpoints.

mod balancer_support;
mod common;

use std::net::IpAddr;
use std::time::Duration;

use balancer_support::*;
use common::backend::Backend;

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

async fn four_backends() -> Vec<Backend> {
    let mut v = Vec::new();
    for n in NAMES {
        v.push(Backend::start(n).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_is_nginx_smooth_order_and_exact_split() {
    let backends = four_backends().await;
    let ups: Vec<Up> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| up(b.addr, i as u32 + 1))
        .collect();
    let lb = Running::start(&config_text(
        "weighted_round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &ups,
    ))
    .await;
    let client = http();
    let url = lb.url("/buy");
    let mut first = Vec::new();
    for i in 0..10_000 {
        let name = get_ok(&client, &url).await;
        if i < 20 {
            first.push(name);
        }
    }
    // Nginx's sequence for weights 1,2,3,4, worked by hand from
    // ngx_http_upstream_get_peer (current += weight; max wins; winner -= 10):
    // d c b d a c d b c d, then again.
    let by_hand = "d c b d a c d b c d d c b d a c d b c d";
    let independent: Vec<&str> = nginx_smooth_order(&[1, 2, 3, 4], 20)
        .into_iter()
        .map(|i| NAMES[i])
        .collect();
    assert_eq!(independent.join(" "), by_hand);
    assert_eq!(first.join(" "), by_hand);
    let hits: Vec<u64> = backends.iter().map(|b| b.hits()).collect();
    assert_eq!(hits, vec![1000, 2000, 3000, 4000]);
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_totals_are_exact_with_8_concurrent_clients() {
    let backends = four_backends().await;
    let ups: Vec<Up> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| up(b.addr, i as u32 + 1))
        .collect();
    let lb = Running::start(&config_text(
        "weighted_round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &ups,
    ))
    .await;
    let url = lb.url("/");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = http();
                for _ in 0..1250 {
                    get_ok(&client, &url).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
    let hits: Vec<u64> = backends.iter().map(|b| b.hits()).collect();
    assert_eq!(hits, vec![1000, 2000, 3000, 4000]);
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_sticks_per_client_and_matches_nginx() {
    let backends = four_backends().await;
    let weights = [1u32, 2, 3, 1];
    let ups: Vec<Up> = backends
        .iter()
        .zip(weights)
        .map(|(b, w)| up(b.addr, w))
        .collect();
    let lb = Running::start(&config_text("ip_hash", "127.0.0.1:0", "127.0.0.1:0", &ups)).await;
    let w64: Vec<u64> = weights.iter().map(|&w| w as u64).collect();
    // 50 /24 networks inside 127.0.0.0/8, 4 addresses in each: 200 clients.
    let mut per_net: std::collections::HashMap<[u8; 3], &str> = Default::default();
    let mut used = std::collections::HashSet::new();
    for g in 0..50u8 {
        for j in 0..4u8 {
            let ip = [127, 1 + g % 5, g.wrapping_mul(5), 2 + j * 60];
            let expect = NAMES[nginx_ip_hash(ip, &w64)];
            for _ in 0..3 {
                let res = raw(
                    Some(IpAddr::from(ip)),
                    lb.addr,
                    b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                )
                .await;
                assert!(res.starts_with("HTTP/1.1 200"), "{res}");
                assert_eq!(body_of(&res), expect, "client {ip:?}");
            }
            let net = [ip[0], ip[1], ip[2]];
            let first = *per_net.entry(net).or_insert(expect);
            assert_eq!(first, expect, "clients of one /24 share an upstream");
            used.insert(expect);
        }
    }
    assert!(used.len() >= 3, "the hash spreads clients: {used:?}");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_clients_with_and_without_keep_alive() {
    let b = Backend::start("only").await;
    let lb = Running::start(&config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(b.addr, 1)],
    ))
    .await;
    // As `ab` sends it: HTTP/1.0, no keep-alive; the server must close.
    let res = raw(
        None,
        lb.addr,
        b"GET /buy HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1."), "{res}");
    assert!(res[..12].ends_with("200"), "{res}");
    assert_eq!(body_of(&res), "only");

    // `ab -k`: HTTP/1.0 with Connection: Keep-Alive, two requests on one
    // connection; needs Content-Length and a keep-alive answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(lb.addr)
        .await
        .expect("connect");
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
                .await
                .expect("answer in time")
                .expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        assert!(head.contains("content-length: 4"), "{head}");
        assert!(head.contains("connection: keep-alive"), "{head}");
        while buf.len() < head_end + 4 {
            let n = s.read(&mut chunk).await.expect("read body");
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(&buf[head_end..], b"only");
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_status_and_metrics() {
    let a = Backend::start("a").await;
    // Refuses for the whole test: a free port could be taken meanwhile by a
    // backend of a test running beside this one (it was, once, in CI-like
    // runs: the "dead" upstream answered 200).
    let (_held, dead) = common::refusing_addr();
    let lb = Running::start(&config_text(
        "least_conn",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(a.addr, 3), up(dead, 1)],
    ))
    .await;
    let client = http();
    for _ in 0..10 {
        get_ok(&client, &lb.url("/")).await;
    }
    let admin = format!("http://{}", lb.admin);
    let (code, body) = get(&client, &format!("{admin}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(code, 200);
    assert!(body.contains("ok"));
    let (code, body) = get(&client, &format!("{admin}/status"))
        .await
        .expect("status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["strategy"], "least_conn");
    assert_eq!(v["version"], 1);
    assert_eq!(v["upstreams"][0]["address"], a.addr.to_string());
    assert_eq!(v["upstreams"][0]["weight"], 3);
    assert_eq!(v["upstreams"][0]["state"], "up");
    assert_eq!(v["upstreams"][1]["state"], "failed", "{body}");
    assert!(v["upstreams"][1]["failures"].as_u64().expect("n") >= 1);
    let (code, text) = get(&client, &format!("{admin}/metrics"))
        .await
        .expect("metrics");
    assert_eq!(code, 200);
    let line = format!(
        "spike_balancer_requests_total{{upstream=\"{}\",code=\"200\"}} 10",
        a.addr
    );
    assert!(text.contains(&line), "{text}");
    assert!(
        text.contains("spike_balancer_upstream_latency_seconds_count 10"),
        "{text}"
    );
    assert!(
        text.contains("spike_balancer_upstream_errors_total"),
        "{text}"
    );
    assert!(text.contains("spike_balancer_active_connections"), "{text}");
    lb.shutdown().await;
}
