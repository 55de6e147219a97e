//! Per-client limits at the balancer (issue 24, point 3), on both
//! forwarding paths (`fast_path = true` and `false`): a client over
//! `limit_rate` and its burst, or with `limit_conns` requests in flight,
//! gets a 429 with `Retry-After` and a JSON reason that never reaches an
//! upstream, counted in `/metrics` and `/status`; another client address
//! (another source address, or another `X-Forwarded-For` behind a trusted
//! proxy) is not limited by the first. Real backends, a real balancer on
//! real sockets; client addresses vary by binding 127.0.0.2 and 127.0.0.3.
//! (That the counts are Nginx's own is `tests/nginx_conf.rs`.)

mod balancer_support;
mod common;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use balancer_support::*;
use common::backend::Backend;

const ONE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
const TWO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const PROXY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

async fn start(backend: &Backend, fast_path: bool, keys: &str) -> Running {
    let text = config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(backend.addr, 1)],
    )
    .replacen(
        "[balancer]\n",
        &format!("[balancer]\nfast_path = {fast_path}\ntrusted_proxies = [\"{PROXY}\"]\n{keys}\n"),
        1,
    );
    Running::start(&text).await
}

/// One GET from `source`, with `X-Forwarded-For: forwarded_for` when
/// given: the status, the raw response.
async fn get_from(lb: &Running, source: IpAddr, forwarded_for: Option<&str>) -> (u16, String) {
    let xff = forwarded_for
        .map(|v| format!("X-Forwarded-For: {v}\r\n"))
        .unwrap_or_default();
    let request = format!("GET /x HTTP/1.1\r\nHost: spike\r\n{xff}Connection: close\r\n\r\n");
    let text = raw(Some(source), lb.addr, request.as_bytes()).await;
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    (status, text)
}

/// A 429 as the balancer writes it: `Retry-After`, a JSON body with a
/// status and a reason, ending with a newline.
fn assert_too_many(text: &str, retry_after: &str, reason_has: &str) {
    assert!(text.starts_with("HTTP/1.1 429 "), "{text}");
    let head = text.split_once("\r\n\r\n").map(|(h, _)| h).unwrap_or("");
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains(&format!("\r\nretry-after: {retry_after}\r\n")),
        "{text}"
    );
    assert!(
        head.contains("\r\ncontent-type: application/json"),
        "{text}"
    );
    let body = body_of(text);
    assert!(body.ends_with("}\n"), "{body:?}");
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(v["status"], "too_many_requests", "{body}");
    let reason = v["reason"].as_str().expect("a reason");
    assert!(reason.contains(reason_has), "{reason}");
}

async fn admin(lb: &Running, path: &str) -> String {
    let (status, body) = get(&http(), &format!("http://{}{path}", lb.admin))
        .await
        .expect("admin");
    assert_eq!(status, 200, "{body}");
    body
}

/// The sample of `name` (with its labels) in the Prometheus text.
fn sample(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `limit_rate = "1r/s"`, `limit_burst = 2`, `limit_nodelay = true`: a
/// client's first request and its burst of 2 go through, the next is a
/// 429 that never reaches the backend; another source address, and
/// another client behind the trusted proxy, each have their own bucket,
/// while the proxy's clients are not limited by the proxy's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_rate_is_a_counted_429_on_both_paths() {
    for fast_path in [true, false] {
        let backend = Backend::start("b").await;
        let lb = start(
            &backend,
            fast_path,
            "limit_rate = \"1r/s\"\nlimit_burst = 2\nlimit_nodelay = true",
        )
        .await;
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(get_from(&lb, ONE, None).await);
        }
        let statuses: Vec<u16> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(statuses, [200, 200, 200, 429], "fast_path = {fast_path}");
        assert_too_many(&got[3].1, "1", "limit_rate");
        assert_eq!(backend.hits(), 3, "the 429 never reached the backend");

        // Another address is not limited by the first.
        assert_eq!(get_from(&lb, TWO, None).await.0, 200);
        // Behind the trusted proxy, the client is the X-Forwarded-For
        // address: one client's burst, then its 429, and another client
        // of the same proxy is not limited by it.
        for _ in 0..3 {
            assert_eq!(get_from(&lb, PROXY, Some("10.9.9.9")).await.0, 200);
        }
        let (status, text) = get_from(&lb, PROXY, Some("10.9.9.9")).await;
        assert_eq!(status, 429, "{text}");
        assert_too_many(&text, "1", "limit_rate");
        assert_eq!(get_from(&lb, PROXY, Some("6.6.6.6, 10.9.9.8")).await.0, 200);
        assert_eq!(backend.hits(), 8);

        let metrics = admin(&lb, "/metrics").await;
        assert_eq!(
            sample(&metrics, "spike_balancer_limited_total{limit=\"rate\"}"),
            Some(2),
            "{metrics}"
        );
        assert_eq!(
            sample(&metrics, "spike_balancer_limited_total{limit=\"conns\"}"),
            Some(0),
            "{metrics}"
        );
        assert_eq!(
            sample(
                &metrics,
                "spike_balancer_local_responses_total{code=\"429\"}"
            ),
            Some(2),
            "{metrics}"
        );
        assert_eq!(
            sample(&metrics, "spike_balancer_limit_clients"),
            Some(4),
            "{metrics}"
        );
        let status: serde_json::Value =
            serde_json::from_str(&admin(&lb, "/status").await).expect("status JSON");
        let limits = &status["limits"];
        assert_eq!(limits["rate"], "1r/s", "{limits}");
        assert_eq!(limits["burst"], 2, "{limits}");
        assert_eq!(limits["nodelay"], true, "{limits}");
        assert_eq!(limits["rate_rejected"], 2, "{limits}");
        assert_eq!(limits["clients"], 4, "{limits}");
        assert_eq!(status["local"]["429"], 2, "{status}");
        lb.shutdown().await;
    }
}

/// `limit_conns = 2` over a slow backend: a client's third request while
/// two are in flight is a 429 at once (`Retry-After: 1`), another address
/// is served meanwhile, and once the two are done the client may send
/// again: the count went back to zero and no key is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_limited_per_client_on_both_paths() {
    for fast_path in [true, false] {
        let backend = Backend::start("slow").await;
        backend.delay_ms.store(700, Ordering::Relaxed);
        let lb = start(&backend, fast_path, "limit_conns = 2").await;
        let lb = std::sync::Arc::new(lb);
        let slow: Vec<_> = (0..2)
            .map(|_| {
                let lb = lb.clone();
                tokio::spawn(async move { get_from(&lb, ONE, None).await.0 })
            })
            .collect();
        common::wait_for(
            "two requests at the backend",
            Duration::from_secs(5),
            async || backend.hits() == 2,
        )
        .await;
        let started = Instant::now();
        let (status, text) = get_from(&lb, ONE, None).await;
        assert_eq!(status, 429, "fast_path = {fast_path}: {text}");
        assert!(started.elapsed() < Duration::from_millis(500), "at once");
        assert_too_many(&text, "1", "limit_conns");
        assert_eq!(get_from(&lb, TWO, None).await.0, 200);
        for s in slow {
            assert_eq!(s.await.expect("task"), 200);
        }
        assert_eq!(get_from(&lb, ONE, None).await.0, 200);

        let status: serde_json::Value =
            serde_json::from_str(&admin(&lb, "/status").await).expect("status JSON");
        let limits = &status["limits"];
        assert_eq!(limits["conns"], 2, "{limits}");
        assert_eq!(limits["rate"], serde_json::Value::Null, "{limits}");
        assert_eq!(limits["conns_rejected"], 1, "{limits}");
        assert_eq!(limits["clients_in_flight"], 0, "{limits}");
        let metrics = admin(&lb, "/metrics").await;
        assert_eq!(
            sample(&metrics, "spike_balancer_limited_total{limit=\"conns\"}"),
            Some(1),
            "{metrics}"
        );
        assert_eq!(backend.hits(), 4);
        if let Ok(lb) = std::sync::Arc::try_unwrap(lb) {
            lb.shutdown().await;
        }
    }
}

/// Without `limit_nodelay`, a burst is spaced out at the rate instead of
/// refused: at 10r/s with a burst of 3, four requests at once all get a
/// 200, the last about 300 ms after the first, and a fifth is a 429
/// saying when to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nodelay_a_burst_is_delayed_to_the_rate() {
    for fast_path in [true, false] {
        let backend = Backend::start("b").await;
        let lb = std::sync::Arc::new(
            start(
                &backend,
                fast_path,
                "limit_rate = \"10r/s\"\nlimit_burst = 3",
            )
            .await,
        );
        let started = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let lb = lb.clone();
                tokio::spawn(async move {
                    let (status, _) = get_from(&lb, ONE, None).await;
                    (status, Instant::now())
                })
            })
            .collect();
        // Behind four at once, the fifth finds the burst full.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, text) = get_from(&lb, ONE, None).await;
        assert_eq!(status, 429, "{text}");
        assert_too_many(&text, "1", "limit_rate");
        let mut last = started;
        for t in tasks {
            let (status, at) = t.await.expect("task");
            assert_eq!(status, 200, "fast_path = {fast_path}");
            last = last.max(at);
        }
        let took = last - started;
        assert!(
            took >= Duration::from_millis(280) && took < Duration::from_secs(2),
            "fast_path = {fast_path}: {took:?}"
        );
        let status: serde_json::Value =
            serde_json::from_str(&admin(&lb, "/status").await).expect("status JSON");
        assert_eq!(status["limits"]["delayed"], 3, "{status}");
        assert_eq!(status["limits"]["nodelay"], false, "{status}");
    }
}

/// With `[auth]` the rate also counts by the verified buyer: one buyer's
/// token sent from a second address is refused once the buyer's bucket is
/// spent, while another buyer from a third address passes; a token that
/// does not verify limits nobody by name (its address's bucket only). On
/// both forwarding paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_one_buyer_from_two_addresses_is_one_bucket() {
    use base64::Engine as _;
    const THREE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 4));
    const FOUR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 5));
    let secret = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let key = spike::auth::BuyerKey::parse(&format!("k1:hs256:{secret}")).expect("key");
    let exp = spike::auth::unix_now() + 3600;
    let token = |buyer: &str| spike::auth::mint_with(&key, buyer, "lim", exp, None).expect("mint");
    let (alice, bob) = (token("alice"), token("bob"));
    for fast_path in [true, false] {
        let backend = Backend::start("b").await;
        let text = config_text(
            "round_robin",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &[up(backend.addr, 1)],
        )
        .replacen(
            "[balancer]\n",
            &format!(
                "[sale]\nevent = \"lim\"\ntotal = 10\n\n[auth]\nbuyer_keys = [\"k1:hs256:{secret}\"]\n\n\
                 [balancer]\nfast_path = {fast_path}\nlimit_rate = \"1r/m\"\n"
            ),
            1,
        );
        let lb = Running::start(&text).await;
        let buy = async |source: IpAddr, token: &str| {
            let request = format!(
                "GET /buy/ticket HTTP/1.1\r\nHost: spike\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
            );
            raw(Some(source), lb.addr, request.as_bytes()).await
        };
        let what = format!("fast_path = {fast_path}");
        assert!(buy(ONE, &alice).await.starts_with("HTTP/1.1 200"), "{what}");
        // A new address, but alice's bucket is spent.
        let again = buy(TWO, &alice).await;
        assert!(again.starts_with("HTTP/1.1 429 "), "{what}: {again}");
        assert!(again.contains("\"too_many_requests\""), "{what}: {again}");
        // Bob from a third address: his own bucket, and the address's.
        assert!(buy(THREE, &bob).await.starts_with("HTTP/1.1 200"), "{what}");
        // A forged token that claims alice counts only against its address.
        let forged = format!("{}x", &alice[..alice.len() - 1]);
        assert!(
            buy(FOUR, &forged).await.starts_with("HTTP/1.1 200"),
            "{what}"
        );
        // (The backend's own count also has the balancer's reads of the
        // sale, which go to it here: not compared.)
        lb.shutdown().await;
    }
}
