//! `spike haproxy-conf` against the real HAProxy (Debian's `haproxy`
//! package, installed by scripts/test.sh): every strategy's file passes
//! `haproxy -c`, and one balances traffic over real backends by the weights.

mod balancer_support;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::backend::Backend;
use common::haproxy::{HaProxy, haproxy};
use common::http::{client, get};
use common::spike::{remove_config, run, wait_listening, write_config};
use hyper::StatusCode;

fn balancer_file(strategy: &str, port: u16, upstreams: &str) -> PathBuf {
    write_config(&format!(
        "[balancer]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{}\"\nstrategy = \"{strategy}\"\n{upstreams}",
        common::free_port()
    ))
}

/// Runs `spike haproxy-conf` and writes its output next to the config.
fn generate(config: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec!["haproxy-conf", "--config", config.to_str().expect("path")];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(
        out.status.success(),
        "spike haproxy-conf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = config.with_extension("cfg");
    std::fs::write(&path, &out.stdout).expect("write haproxy.cfg");
    path
}

/// The file at `cfg`, after `haproxy -c` accepted it (`what` names it if not).
fn checked(cfg: &Path, what: &str) -> String {
    let out = Command::new(haproxy())
        .arg("-c")
        .arg("-f")
        .arg(cfg)
        .output()
        .expect("run haproxy -c");
    let text = std::fs::read_to_string(cfg).expect("read");
    assert!(
        out.status.success(),
        "{what}: haproxy -c refused it:\n{}{}\n--- haproxy.cfg ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn every_strategy_passes_haproxy_c() {
    let upstreams = "[[balancer.upstream]]\naddr = \"127.0.0.1:3001\"\nweight = 2\n\
                     [[balancer.upstream]]\naddr = \"127.0.0.1:3002\"\nweight = 5000\nmax_fails = 0\n";
    for strategy in [
        "round_robin",
        "weighted_round_robin",
        "ip_hash",
        "least_conn",
    ] {
        let config = balancer_file(strategy, common::free_port(), upstreams);
        let cfg = generate(&config, &[]);
        let text = checked(&cfg, strategy);
        assert!(text.contains(&format!("# strategy = {strategy}")), "{text}");
        let _ = std::fs::remove_file(&cfg);
        remove_config(&config);
    }
}

/// Admission and health checks map to HAProxy's own `maxconn`, `timeout
/// queue`, `option httpchk` with `check inter fall rise`, and `slowstart`,
/// and the result passes `haproxy -c`.
#[test]
fn admission_and_health_checks_pass_haproxy_c() {
    let upstreams = "queue = 10\nqueue_timeout = \"3s\"\nhealth_check = \"/healthz\"\n\
                     health_interval = \"2s\"\nhealth_fails = 3\nhealth_passes = 2\nslow_start = \"20s\"\n\
                     [[balancer.upstream]]\naddr = \"127.0.0.1:3001\"\nmax_conns = 4\n\
                     [[balancer.upstream]]\naddr = \"127.0.0.1:3002\"\n";
    let config = balancer_file("least_conn", common::free_port(), upstreams);
    let cfg = generate(&config, &[]);
    let text = checked(&cfg, "least_conn with admission and checks");
    for expected in [
        "option httpchk GET /healthz",
        "timeout queue 3000ms",
        "check inter 2000ms fall 3 rise 2",
        "maxconn 4",
        "slowstart 20000ms",
    ] {
        assert!(text.contains(expected), "{expected} missing:\n{text}");
    }
    let _ = std::fs::remove_file(&cfg);
    remove_config(&config);
}

/// `proxy_protocol = true` becomes `bind … accept-proxy`, and only the
/// trusted proxies may connect (`tcp-request connection` sees the real
/// peer); the file passes `haproxy -c`.
#[test]
fn proxy_protocol_accepts_proxy_from_trusted_proxies_only() {
    let upstreams = "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n\
                     [[balancer.upstream]]\naddr = \"127.0.0.1:3001\"\n";
    let config = balancer_file("ip_hash", common::free_port(), upstreams);
    let cfg = generate(&config, &[]);
    let text = checked(&cfg, "proxy_protocol");
    assert!(text.contains(" accept-proxy\n"), "{text}");
    assert!(
        text.contains("tcp-request connection reject unless { src 10.0.0.0/8 ::1/128 }"),
        "{text}"
    );
    let _ = std::fs::remove_file(&cfg);
    remove_config(&config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_haproxy_honours_the_weights() {
    let light = Backend::start("light").await;
    let heavy = Backend::start("heavy").await;
    let port = common::free_port();
    let config = balancer_file(
        "weighted_round_robin",
        port,
        &format!(
            "[[balancer.upstream]]\naddr = \"{}\"\nweight = 1\n[[balancer.upstream]]\naddr = \"{}\"\nweight = 3\n",
            light.addr, heavy.addr
        ),
    );
    let cfg = generate(&config, &["--threads", "1"]);
    let _haproxy = HaProxy::start(&cfg);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    tokio::task::spawn_blocking(move || wait_listening(&addr.to_string(), Duration::from_secs(10)))
        .await
        .expect("wait for haproxy");
    let c = client();
    let (mut light_answers, mut heavy_answers) = (0, 0);
    for i in 0..400 {
        let (status, body) = get(&c, addr, "/")
            .await
            .unwrap_or_else(|e| panic!("request {i} through haproxy: {e}"));
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
        match body.as_str() {
            "light" => light_answers += 1,
            "heavy" => heavy_answers += 1,
            other => panic!("unexpected body {other:?}"),
        }
    }
    // HAProxy's round-robin gives the weights' exact shares over whole
    // cycles (its own interleaving, not Nginx's smooth one).
    assert_eq!((light_answers, heavy_answers), (100, 300));
    let _ = std::fs::remove_file(&cfg);
    remove_config(&config);
}

/// The per-client limits become a stick table that `haproxy -c` takes,
/// per second and per minute; and a real HAProxy running it, sent the
/// issue's settings' first wave (100 requests at once from one client),
/// lets through what Nginx does (1 + the burst of 40) and answers the rest
/// with spike's 429: `Retry-After` and the JSON reason. (Its later waves
/// differ: a sliding window, not a leaky bucket; the file says so.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_limits_pass_haproxy_c_and_refuse_as_spike_does() {
    let backend = Backend::start("b").await;
    let per_minute = balancer_file(
        "round_robin",
        common::free_port(),
        "limit_rate = \"30r/m\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:3001\"\n",
    );
    let cfg = generate(&per_minute, &[]);
    let text = checked(&cfg, "limit_rate per minute");
    assert!(text.contains("store http_req_rate(60s)\n"), "{text}");
    let _ = std::fs::remove_file(&cfg);
    remove_config(&per_minute);

    let port = common::free_port();
    let config = balancer_file(
        "round_robin",
        port,
        &format!(
            "limit_rate = \"20r/s\"\nlimit_burst = 40\nlimit_nodelay = true\nlimit_conns = 50\n\
             [[balancer.upstream]]\naddr = \"{}\"\n",
            backend.addr
        ),
    );
    let cfg = generate(&config, &["--threads", "1"]);
    let text = checked(&cfg, "the issue's limits");
    assert!(text.contains("sc_http_req_rate(0) gt 41"), "{text}");
    let _haproxy = HaProxy::start(&cfg);
    let addr = format!("127.0.0.1:{port}");
    tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || wait_listening(&addr, Duration::from_secs(10))
    })
    .await
    .expect("wait for haproxy");

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conns = Vec::new();
    for _ in 0..100 {
        conns.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    let go = std::sync::Arc::new(tokio::sync::Barrier::new(conns.len()));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let go = go.clone();
            tokio::spawn(async move {
                go.wait().await;
                s.write_all(b"GET / HTTP/1.1\r\nHost: spike\r\nConnection: close\r\n\r\n")
                    .await
                    .expect("write");
                let mut out = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
                String::from_utf8_lossy(&out).into_owned()
            })
        })
        .collect();
    let (mut accepted, mut limited) = (0, 0);
    for t in tasks {
        let answer = t.await.expect("task");
        if answer.starts_with("HTTP/1.1 200") {
            accepted += 1;
        } else if answer.starts_with("HTTP/1.1 429") {
            limited += 1;
            assert!(
                answer
                    .to_ascii_lowercase()
                    .contains("\r\nretry-after: 1\r\n"),
                "{answer}"
            );
            let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            assert!(body.ends_with("}\n"), "{body:?}");
            let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
            assert_eq!(v["status"], "too_many_requests", "{body}");
        } else {
            panic!("neither 200 nor 429: {answer:?}");
        }
    }
    assert_eq!((accepted, limited), (41, 59));
    let _ = std::fs::remove_file(&cfg);
    remove_config(&config);
}

/// Issue 29: in front of a sale the generated HAProxy forwards only the
/// nodes' public API and `pass_paths`, as spike does: every internal route
/// and every odd spelling of one is a 404 that reaches no backend. A node's
/// internal address is where its health check goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_haproxy_passes_only_the_public_api_of_a_sale() {
    use common::routes::{INTERNAL, PUBLIC, TRICKY, raw};
    let backend = Backend::start("node").await;
    let health = Backend::start("health").await;
    let port = common::free_port();
    let config = write_config(&format!(
        "[sale]\nevent = \"e\"\ntotal = 10\n\n\
         [balancer]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{}\"\n\
         health_check = \"/healthz\"\npass_paths = [\"/extra/\"]\n\
         [[balancer.upstream]]\naddr = \"{}\"\ninternal = \"{}\"\n",
        common::free_port(),
        backend.addr,
        health.addr
    ));
    let cfg = generate(&config, &["--threads", "1"]);
    let text = checked(&cfg, "a sale");
    assert!(
        text.contains(&format!(
            "check inter 1000ms fall 1 rise 1 addr 127.0.0.1 port {}",
            health.addr.port()
        )),
        "{text}"
    );
    let _haproxy = HaProxy::start(&cfg);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    tokio::task::spawn_blocking(move || wait_listening(&addr.to_string(), Duration::from_secs(10)))
        .await
        .expect("wait for haproxy");
    // Its health check asks the internal address.
    common::wait_for("a health check", Duration::from_secs(5), async || {
        health.hits() > 0
    })
    .await;
    let mut passed = 0;
    for line in PUBLIC.iter().chain(&["GET /extra/x HTTP/1.1"]) {
        let (status, body) = raw(addr, line).await;
        assert_eq!((status.as_str(), body.as_str()), ("200", "node"), "{line}");
        passed += 1;
    }
    let internal: Vec<String> = INTERNAL
        .iter()
        .map(|p| format!("GET {p} HTTP/1.1"))
        .collect();
    for line in internal.iter().map(String::as_str).chain(TRICKY).chain([
        "GET /extra/../holders HTTP/1.1",
        "GET /extra//holders HTTP/1.1",
        "GET /extra/%2e%2E/holders HTTP/1.1",
        "GET /extra HTTP/1.1",
    ]) {
        let (status, body) = raw(addr, line).await;
        assert_eq!(status, "404", "{line}: {body}");
    }
    // The backend's own health checks are not requests through HAProxy.
    assert_eq!(
        backend.served.load(std::sync::atomic::Ordering::Relaxed),
        passed
    );
    let _ = std::fs::remove_file(&cfg);
    remove_config(&config);
}

/// With TLS: the generated file passes `haproxy -c` (once the keys are
/// where `spike haproxy-conf` says HAProxy looks for them), and the real
/// HAProxy serves what spike serves: HTTP/2 by ALPN (`curl --http2`), the
/// default certificate, and the other one for its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_haproxy_serves_the_same_tls_h2_and_sni() {
    use balancer_support::tls::{Certs, serves_https_as_spike_does};
    let certs = Certs::new();
    let backend = Backend::start("b").await;
    let port = common::free_port();
    let config = balancer_file("round_robin", port, &certs.with_upstream(backend.addr));
    let args = [
        "haproxy-conf",
        "--config",
        config.to_str().expect("path"),
        "--threads",
        "1",
    ];
    let out = run(&args);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    // The keys are in files of their own: each note says how to link it.
    let links: Vec<&str> = said
        .lines()
        .filter_map(|l| l.split_once(": ln -s ").map(|(_, l)| l))
        .collect();
    assert_eq!(links.len(), 2, "{said}");
    for link in links {
        let (key, name) = link.split_once(' ').expect("two paths");
        std::os::unix::fs::symlink(key, name).expect("link");
    }
    let cfg = generate(&config, &["--threads", "1"]);
    let text = checked(&cfg, "tls");
    assert!(text.contains(" ssl crt "), "{text}");
    assert!(text.contains("alpn h2,http/1.1"), "{text}");
    let _haproxy = HaProxy::start(&cfg);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    tokio::task::spawn_blocking(move || wait_listening(&addr.to_string(), Duration::from_secs(10)))
        .await
        .expect("wait for haproxy");
    // Blocking calls in the test's task: the backend runs on the other
    // worker thread.
    serves_https_as_spike_does(&certs, addr, "b");
    let _ = std::fs::remove_file(&cfg);
    remove_config(&config);
}
