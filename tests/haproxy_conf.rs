//! `spike haproxy-conf` against the real HAProxy (Debian's `haproxy`
//! package, installed by scripts/test.sh): every strategy's file passes
//! `haproxy -c`, and one balances traffic over real backends by the weights.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::backend::Backend;
use common::http::{client, get};
use common::spike::{remove_config, run, wait_listening, write_config};
use hyper::StatusCode;

fn haproxy() -> PathBuf {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("haproxy must be installed for these tests (run scripts/test.sh)")
}

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

/// A HAProxy process in the foreground, killed on drop.
struct HaProxy(Child);

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let _haproxy = HaProxy(
        Command::new(haproxy())
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start haproxy"),
    );
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
