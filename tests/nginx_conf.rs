//! `spike nginx-conf` against the real Nginx: every generated file must pass
//! `nginx -t`, and one must actually balance traffic the way spike would.
//!
//! Nginx is a required test dependency (Debian's `nginx` package): a missing
//! binary fails the test instead of skipping it.

mod balancer_support;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::backend::Backend;
use common::spike::{remove_config, run, wait_listening, write_config};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The Nginx binary, or a failure that says how to get it.
fn nginx() -> PathBuf {
    let debian = PathBuf::from("/usr/sbin/nginx");
    if debian.is_file() {
        return debian;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nginx");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "nginx must be installed for these tests (run scripts/test.sh, or apt-get install nginx)"
    );
}

/// Runs `spike nginx-conf --config CONFIG ARGS` and writes its output next to
/// the config as `nginx.conf`; returns the prefix dir.
fn generate(config: &Path, extra: &[&str]) -> PathBuf {
    let config_arg = config.to_str().expect("utf-8 temp path");
    let mut args = vec!["nginx-conf", "--config", config_arg];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(
        out.status.success(),
        "spike nginx-conf failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = config.parent().expect("config dir").to_path_buf();
    std::fs::write(dir.join("nginx.conf"), &out.stdout).expect("write nginx.conf");
    dir
}

fn conf_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("nginx.conf")).expect("read nginx.conf")
}

/// `nginx -t` on the generated file, with everything under `dir`.
fn nginx_t(dir: &Path) {
    let out = Command::new(nginx())
        .arg("-t")
        .arg("-p")
        .arg(dir)
        .args(["-c", "nginx.conf", "-e", "stderr"])
        .output()
        .expect("run nginx -t");
    assert!(
        out.status.success(),
        "nginx -t refused the generated file:\n{}\n--- nginx.conf ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        conf_text(dir)
    );
}

fn balancer_config(strategy: &str, port: u16, upstreams: &str) -> String {
    format!(
        "[balancer]\nlisten = \"127.0.0.1:{port}\"\nstrategy = \"{strategy}\"\nadmin = \"127.0.0.1:0\"\n{upstreams}"
    )
}

const THREE: &str = r#"
[[balancer.upstream]]
addr = "127.0.0.1:3001"
weight = 2
max_fails = 3
fail_timeout = "30s"
[[balancer.upstream]]
addr = "127.0.0.1:3002"
weight = 3
down = true
[[balancer.upstream]]
addr = "127.0.0.1:3003"
max_fails = 0
fail_timeout = "1500ms"
"#;

const BACKUP: &str = r#"
[[balancer.upstream]]
addr = "127.0.0.1:3004"
backup = true
"#;

fn check_strategy(strategy: &str, with_backup: bool) -> String {
    let ups = if with_backup {
        format!("{THREE}{BACKUP}")
    } else {
        THREE.to_string()
    };
    let config = write_config(&balancer_config(strategy, common::free_port(), &ups));
    let dir = generate(&config, &["--workers", "2"]);
    nginx_t(&dir);
    let text = conf_text(&dir);
    remove_config(&config);
    text
}

#[test]
fn weighted_round_robin_passes_nginx_t() {
    let c = check_strategy("weighted_round_robin", true);
    assert!(
        c.contains("server 127.0.0.1:3001 weight=2 max_fails=3 fail_timeout=30s;"),
        "{c}"
    );
    assert!(
        c.contains("server 127.0.0.1:3002 weight=3 max_fails=1 fail_timeout=10s down;"),
        "{c}"
    );
    assert!(
        c.contains("server 127.0.0.1:3003 weight=1 max_fails=0 fail_timeout=2s;"),
        "{c}"
    );
    assert!(
        c.contains("server 127.0.0.1:3004 weight=1 max_fails=1 fail_timeout=10s backup;"),
        "{c}"
    );
    assert!(c.contains("worker_processes 2;"), "{c}");
}

#[test]
fn round_robin_passes_nginx_t() {
    let c = check_strategy("round_robin", true);
    assert!(!c.contains("weight=2") && !c.contains("weight=3"), "{c}");
}

#[test]
fn ip_hash_passes_nginx_t() {
    let c = check_strategy("ip_hash", false);
    assert!(c.contains("    ip_hash;"), "{c}");
}

#[test]
fn least_conn_passes_nginx_t() {
    let c = check_strategy("least_conn", true);
    assert!(c.contains("    least_conn;"), "{c}");
}

#[test]
fn nodes_trusted_proxies_ipv6_and_listen_flag_pass_nginx_t() {
    let port = common::free_port();
    let config = write_config(
        r#"
[balancer]
strategy = "ip_hash"
trusted_proxies = ["10.0.0.0/8", "::1", "192.168.1.7"]
connect_timeout = "250ms"
response_timeout = "3s"
keepalive = 0

[[node]]
name = "a"
listen = "127.0.0.1:3101"
weight = 1
[[node]]
name = "b"
listen = "[::1]:3102"
weight = 4
"#,
    );
    let listen = format!("127.0.0.1:{port}");
    let dir = generate(&config, &["--listen", &listen]);
    nginx_t(&dir);
    let c = conf_text(&dir);
    remove_config(&config);
    assert!(c.contains(&format!("listen {listen};")), "{c}");
    assert!(c.contains("server [::1]:3102 weight=4"), "{c}");
    assert!(c.contains("set_real_ip_from ::1/128;"), "{c}");
    assert!(c.contains("set_real_ip_from 192.168.1.7/32;"), "{c}");
    assert!(c.contains("real_ip_recursive on;"), "{c}");
    assert!(c.contains("proxy_connect_timeout 250ms;"), "{c}");
    assert!(c.contains("proxy_read_timeout 3s;"), "{c}");
    assert!(!c.contains("keepalive 0"), "{c}");
}

/// `proxy_protocol = true` becomes `listen … proxy_protocol` with the
/// header's address as the client (realip from the trusted proxies), and
/// the file passes `nginx -t`.
#[test]
fn proxy_protocol_listens_with_proxy_protocol_and_passes_nginx_t() {
    let config = write_config(&balancer_config(
        "ip_hash",
        common::free_port(),
        &format!("proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]\n{THREE}"),
    ));
    let dir = generate(&config, &[]);
    nginx_t(&dir);
    let c = conf_text(&dir);
    remove_config(&config);
    for expected in [
        " proxy_protocol;",
        "set_real_ip_from 10.0.0.0/8;",
        "real_ip_header proxy_protocol;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    ] {
        assert!(c.contains(expected), "{expected} missing:\n{c}");
    }
    assert!(!c.contains("real_ip_header X-Forwarded-For"), "{c}");
}

#[test]
fn bad_config_exits_non_zero_with_file_line_and_key() {
    let config = write_config(
        "[balancer]\nstrategy = \"fastest\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:1\"\n",
    );
    let path = config.to_str().expect("utf-8 temp path");
    let out = run(&["nginx-conf", "--config", path]);
    remove_config(&config);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no half config on stdout");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{path}:2: `balancer.strategy`")),
        "{err}"
    );
}

#[test]
fn zero_workers_is_refused() {
    let config = write_config(&balancer_config("round_robin", 1, THREE));
    let path = config.to_str().expect("utf-8 temp path");
    let out = run(&["nginx-conf", "--config", path, "--workers", "0"]);
    remove_config(&config);
    assert!(!out.status.success());
}

/// A running Nginx master (daemon off, so this is the master's pid), stopped
/// with SIGTERM on drop: a SIGKILL would leave its workers holding the port.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    fn start(dir: &Path) -> Nginx {
        let log = std::fs::File::create(dir.join("nginx.stderr")).expect("log file");
        let child = Command::new(nginx())
            .arg("-p")
            .arg(dir)
            .args(["-c", "nginx.conf", "-e", "stderr", "-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nginx");
        Nginx {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nginx.stderr")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-worker Nginx from `spike nginx-conf` of `config`, listening on
/// `port`: it and its address, once it accepts.
async fn one_worker_nginx(config: &Path, port: u16) -> (Nginx, String) {
    let dir = generate(config, &["--workers", "1"]);
    let nginx = Nginx::start(&dir);
    let addr = format!("127.0.0.1:{port}");
    tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || wait_listening(&addr, Duration::from_secs(10))
    })
    .await
    .expect("wait for nginx");
    (nginx, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nginx_honours_the_weights() {
    let light = Backend::start("light").await;
    let heavy = Backend::start("heavy").await;
    let port = common::free_port();
    let config = write_config(&balancer_config(
        "weighted_round_robin",
        port,
        &format!(
            "[[balancer.upstream]]\naddr = \"{}\"\nweight = 1\n[[balancer.upstream]]\naddr = \"{}\"\nweight = 3\n",
            light.addr, heavy.addr
        ),
    ));
    let (nginx, addr) = one_worker_nginx(&config, port).await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: hyper::Uri = format!("http://{addr}/").parse().expect("uri");
    let (mut light_answers, mut heavy_answers) = (0, 0);
    for i in 0..400 {
        let resp = client
            .get(uri.clone())
            .await
            .unwrap_or_else(|e| panic!("request {i} through nginx failed: {e}\n{}", nginx.log()));
        assert_eq!(resp.status(), 200, "request {i}\n{}", nginx.log());
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        match &body[..] {
            b"light" => light_answers += 1,
            b"heavy" => heavy_answers += 1,
            other => panic!("unexpected body {:?}", String::from_utf8_lossy(other)),
        }
    }
    assert_eq!((light_answers, heavy_answers), (100, 300));
    assert_eq!((light.hits(), heavy.hits()), (100, 300));
    drop(nginx);
    remove_config(&config);
}

/// Only spike's balancer says it made a purchase's key (`Spike-Made-Key`,
/// issue 26): behind the Nginx `spike nginx-conf` writes, a client's claim
/// does not reach the node either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nginx_drops_a_clients_made_key_mark() {
    use balancer_support::recorder::{Recorder, Then};
    let node = Recorder::start("n", Then::Answer).await;
    let port = common::free_port();
    let config = write_config(&balancer_config(
        "round_robin",
        port,
        &format!("[[balancer.upstream]]\naddr = \"{}\"\n", node.addr),
    ));
    let (nginx, addr) = one_worker_nginx(&config, port).await;
    let res = balancer_support::raw(
        None,
        addr.parse().expect("addr"),
        b"GET /buy/ticket?user=u1 HTTP/1.1\r\nHost: t\r\nIdempotency-Key: k-1\r\nSpike-Made-Key: 1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}\n{}", nginx.log());
    let seen = node.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].keys, vec!["k-1".to_string()], "{seen:?}");
    assert!(
        !seen[0].head.to_ascii_lowercase().contains("spike-made-key"),
        "{}",
        seen[0].head
    );
    drop(nginx);
    remove_config(&config);
}

/// Admission and health checks: `max_conns` is Nginx OSS's own (on each
/// server line, and `nginx -t` takes it); the queue, active health checks,
/// slow start and the sold-out edge are not, and the file says so.
#[test]
fn admission_and_health_checks_are_mapped_or_named() {
    let ups = "[[balancer.upstream]]\naddr = \"127.0.0.1:3001\"\nmax_conns = 2\n\
               [[balancer.upstream]]\naddr = \"127.0.0.1:3002\"\n";
    let text = balancer_config("least_conn", common::free_port(), ups).replacen(
        "[[balancer.upstream]]",
        "queue = 50\nqueue_timeout = \"5s\"\nhealth_check = \"/healthz\"\nslow_start = \"10s\"\n\n[[balancer.upstream]]",
        1,
    );
    let config = write_config(&text);
    let dir = generate(&config, &["--workers", "2"]);
    nginx_t(&dir);
    let c = conf_text(&dir);
    assert!(
        c.contains("server 127.0.0.1:3001 weight=1 max_fails=1 fail_timeout=10s max_conns=2;"),
        "{c}"
    );
    for named in ["queue N timeout=T", "health_check uri=", "slow_start=T"] {
        assert!(c.contains(named), "{named} not named: {c}");
    }
    remove_config(&config);
}

/// What one wave of requests got: 200s, 429s, and how long the slowest
/// 200 took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wave {
    accepted: usize,
    limited: usize,
    slowest: Duration,
}

/// `n` requests at once from this machine's 127.0.0.1, each on its own
/// connection: every connection is opened first, then every request is
/// written at the same moment.
async fn wave(addr: &str, n: usize) -> Wave {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        conns.push(s);
    }
    let go = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let go = go.clone();
            tokio::spawn(async move {
                go.wait().await;
                let start = Instant::now();
                s.write_all(b"GET /limited HTTP/1.1\r\nHost: spike\r\nConnection: close\r\n\r\n")
                    .await
                    .expect("write");
                let mut out = Vec::new();
                tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
                    .await
                    .expect("an answer within 10 s")
                    .expect("read");
                let text = String::from_utf8_lossy(&out).into_owned();
                (text, start.elapsed())
            })
        })
        .collect();
    let mut w = Wave {
        accepted: 0,
        limited: 0,
        slowest: Duration::ZERO,
    };
    for t in tasks {
        let (text, took) = t.await.expect("request task");
        if text.starts_with("HTTP/1.1 200") {
            w.accepted += 1;
            w.slowest = w.slowest.max(took);
        } else if text.starts_with("HTTP/1.1 429") {
            assert!(
                text.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
                "{text}"
            );
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            assert!(body.ends_with("}\n"), "{text:?}");
            let v: serde_json::Value = serde_json::from_str(body).expect("a JSON 429");
            assert_eq!(v["status"], "too_many_requests", "{text}");
            assert!(v["reason"].is_string(), "{text}");
        } else {
            panic!("neither a 200 nor a 429: {text:?}");
        }
    }
    w.limited = n - w.accepted;
    w
}

/// The issue's arrival pattern through whatever listens on `addr`: 100
/// requests at once from one client, then 20 more a second later (1.08 s
/// after the first wave began, so that no timing of a busy machine puts
/// the second wave across a boundary of a tenth of a second, where one
/// more request drains at 10r/s).
async fn the_pattern(addr: &str) -> (Wave, Wave) {
    let start = tokio::time::Instant::now();
    let first = wave(addr, 100).await;
    tokio::time::sleep_until(start + Duration::from_millis(1080)).await;
    let second = wave(addr, 20).await;
    (first, second)
}

/// Runs `[balancer]` `limits` (over `backends`) through a spike balancer
/// process and then through Nginx with the file `spike nginx-conf`
/// prints for it, each with the same arrival pattern; returns spike's
/// waves and Nginx's.
async fn spike_and_nginx(limits: &str, backends: &[&Backend]) -> ((Wave, Wave), (Wave, Wave)) {
    let port = common::free_port();
    let ups: String = backends
        .iter()
        .map(|b| format!("[[balancer.upstream]]\naddr = \"{}\"\n", b.addr))
        .collect();
    let text = balancer_config("round_robin", port, &ups).replacen(
        "[[balancer.upstream]]",
        &format!("{limits}\n[[balancer.upstream]]"),
        1,
    );
    let config = write_config(&text);
    let addr = format!("127.0.0.1:{port}");
    let path = config.to_str().expect("utf-8 temp path").to_string();

    let spike = common::spike::SpikeProcess::start(&["balancer", "--config", &path]);
    tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || wait_listening(&addr, Duration::from_secs(10))
    })
    .await
    .expect("wait for spike");
    let through_spike = the_pattern(&addr).await;
    drop(spike);
    tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            let start = Instant::now();
            while std::net::TcpStream::connect(&addr).is_ok() {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "spike still listening"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    })
    .await
    .expect("spike gone");

    let dir = generate(&config, &["--workers", "2"]);
    nginx_t(&dir);
    let nginx = Nginx::start(&dir);
    tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || wait_listening(&addr, Duration::from_secs(10))
    })
    .await
    .expect("wait for nginx");
    let through_nginx = the_pattern(&addr).await;
    drop(nginx);
    remove_config(&config);
    (through_spike, through_nginx)
}

/// Issue 24, point 3: the per-client limits are Nginx's, request for
/// request. The same arrival pattern (100 requests at once from one
/// client, 20 more a second later) goes through spike and through a real
/// Nginx running the printed `limit_req`/`limit_conn` lines, over the same
/// backends, and each wave gets the same number of 200s from both: with
/// `nodelay` (the first request is free, then the burst), without it
/// (the burst is delayed to the rate, not refused), and for `limit_conns`
/// against slow backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_limits_accept_what_nginx_accepts() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;

    let (spike, nginx) = spike_and_nginx(
        "limit_rate = \"10r/s\"\nlimit_burst = 20\nlimit_nodelay = true",
        &[&a, &b],
    )
    .await;
    eprintln!("10r/s burst 20 nodelay: spike {spike:?}, nginx {nginx:?}");
    let counts = |(x, y): (Wave, Wave)| (x.accepted, y.accepted);
    assert_eq!(
        counts(spike),
        counts(nginx),
        "spike {spike:?}\nnginx {nginx:?}"
    );
    // 1 free + 20 of burst; 1.08 s later ~10 have drained.
    assert_eq!(counts(spike), (21, 10));

    // The issue's own settings.
    let (spike, nginx) = spike_and_nginx(
        "limit_rate = \"20r/s\"\nlimit_burst = 40\nlimit_nodelay = true\nlimit_conns = 50",
        &[&a, &b],
    )
    .await;
    eprintln!("20r/s burst 40 nodelay, 50 conns: spike {spike:?}, nginx {nginx:?}");
    assert_eq!(
        counts(spike),
        counts(nginx),
        "spike {spike:?}\nnginx {nginx:?}"
    );
    assert_eq!(counts(spike), (41, 20));

    let (spike, nginx) =
        spike_and_nginx("limit_rate = \"10r/s\"\nlimit_burst = 5", &[&a, &b]).await;
    eprintln!("10r/s burst 5, delayed: spike {spike:?}, nginx {nginx:?}");
    assert_eq!(
        counts(spike),
        counts(nginx),
        "spike {spike:?}\nnginx {nginx:?}"
    );
    assert_eq!(counts(spike), (6, 6));
    // The fifth of the burst waited 5 × 100 ms, in both.
    for w in [spike.0, nginx.0] {
        assert!(
            w.slowest >= Duration::from_millis(450) && w.slowest < Duration::from_secs(2),
            "{w:?}"
        );
    }

    // Every answer takes 300 ms: 100 at once are 100 in flight.
    a.delay_ms.store(300, std::sync::atomic::Ordering::Relaxed);
    b.delay_ms.store(300, std::sync::atomic::Ordering::Relaxed);
    let (spike, nginx) = spike_and_nginx("limit_conns = 10", &[&a, &b]).await;
    eprintln!("limit_conns 10: spike {spike:?}, nginx {nginx:?}");
    assert_eq!(
        counts(spike),
        counts(nginx),
        "spike {spike:?}\nnginx {nginx:?}"
    );
    assert_eq!(counts(spike), (10, 10));
}

/// Issue 29: in front of a sale the generated Nginx forwards only the
/// nodes' public API and `pass_paths`, as spike does: every internal route
/// and every odd spelling of one is a 404 that reaches no backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nginx_passes_only_the_public_api_of_a_sale() {
    use common::routes::{INTERNAL, PUBLIC, TRICKY, raw};
    let backend = Backend::start("node").await;
    let port = common::free_port();
    let text = format!(
        "[sale]\nevent = \"e\"\ntotal = 10\n\n{}",
        balancer_config(
            "round_robin",
            port,
            &format!(
                "pass_paths = [\"/extra/\"]\n[[balancer.upstream]]\naddr = \"{}\"\n",
                backend.addr
            ),
        )
    );
    let config = write_config(&text);
    let dir = generate(&config, &["--workers", "1"]);
    nginx_t(&dir);
    let nginx = Nginx::start(&dir);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    tokio::task::spawn_blocking(move || wait_listening(&addr.to_string(), Duration::from_secs(10)))
        .await
        .expect("wait for nginx");
    let mut passed = 0;
    for line in PUBLIC.iter().chain(&["GET /extra/x HTTP/1.1"]) {
        let (status, body) = raw(addr, line).await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("200", "node"),
            "{line}\n{}",
            nginx.log()
        );
        passed += 1;
    }
    let internal: Vec<String> = INTERNAL
        .iter()
        .map(|p| format!("GET {p} HTTP/1.1"))
        .collect();
    for line in internal
        .iter()
        .map(String::as_str)
        .chain(TRICKY)
        .chain(["GET /extra/../holders HTTP/1.1", "GET /extra HTTP/1.1"])
    {
        let (status, body) = raw(addr, line).await;
        assert_eq!(status, "404", "{line}: {body}\n{}", nginx.log());
    }
    assert_eq!(
        backend.hits(),
        passed,
        "only the public API reached the backend"
    );
    drop(nginx);
    remove_config(&config);
}

/// With TLS: the generated file passes `nginx -t`, and the real Nginx
/// serves what spike serves: HTTP/2 by ALPN (`curl --http2`), the default
/// certificate, and the `[[balancer.tls_sni]]` one for its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nginx_serves_the_same_tls_h2_and_sni() {
    use balancer_support::tls::{API, Certs, serves_https_as_spike_does};
    let certs = Certs::new();
    let backend = Backend::start("b").await;
    let port = common::free_port();
    let text = balancer_config("round_robin", port, &certs.with_upstream(backend.addr));
    let config = write_config(&text);
    let dir = generate(&config, &["--workers", "1"]);
    nginx_t(&dir);
    let conf = conf_text(&dir);
    assert!(
        conf.contains(&format!("listen 127.0.0.1:{port} ssl http2;")),
        "{conf}"
    );
    assert!(conf.contains(&format!("server_name {API};")), "{conf}");
    let nginx = Nginx::start(&dir);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    tokio::task::spawn_blocking(move || wait_listening(&addr.to_string(), Duration::from_secs(10)))
        .await
        .expect("wait for nginx");
    // Blocking calls in the test's task: the backend runs on the other
    // worker thread.
    serves_https_as_spike_does(&certs, addr, "b");
    drop(nginx);
    remove_config(&config);
}
