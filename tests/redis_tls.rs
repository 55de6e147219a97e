//! TLS to Redis (`rediss://`): a sale over TLS through `spike stock init`,
//! `spike node` and a purchase (and through `spike up`), with the
//! operator's CA file, with a client certificate when Redis demands one,
//! and with the system's roots (here `SSL_CERT_FILE`) through `spike
//! orders tail` too; a certificate from the wrong CA, a missing client
//! certificate and a `rediss://` URL to a plaintext port each refused with
//! a clear error, never a plaintext fallback; a Sentinel and a Cluster
//! reached over TLS; and bad `tls_*` keys refused at load with file, key
//! and line. Real redis-server (its `--tls-port`), certificates made by
//! `openssl` at test time, real spike processes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::http::{client, get, json};
use common::redis::{RedisServer, TestPki};
use common::spike::{SpikeProcess, bin, wait_listening, write_config};
use hyper::StatusCode;

/// A sale file whose `[redis]` is `url` plus `tls_lines`, with one node.
fn sale_config(event: &str, url: &str, tls_lines: &str, node: std::net::SocketAddr) -> String {
    let text = format!(
        "[sale]\nevent = \"{event}\"\ntotal = 5\npay_within = \"10m\"\n\n[redis]\nurl = \"{url}\"\ntimeout = \"500ms\"\n{tls_lines}\n[[node]]\nname = \"n1\"\nlisten = \"{node}\"\n"
    );
    write_config(&text).to_str().expect("path").to_string()
}

/// `spike ARGS` to completion, with `env`.
fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run spike")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `stock init`, a node, one purchase and `stock show`, all over TLS.
async fn sell_one(cfg: &str, node: std::net::SocketAddr, env: &[(&str, &str)]) {
    let init = run_env(
        &["stock", "init", "--trust-client-buyer-ids", "--config", cfg],
        env,
    );
    assert!(init.status.success(), "stock init: {}", stderr(&init));
    let child = Command::new(bin())
        .args(["node", "--config", cfg, "--name", "n1"])
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn spike node");
    let _node = SpikeProcess { child };
    wait_listening(&node.to_string(), Duration::from_secs(10));
    let (status, body) = get(&client(), node, "/buy/ticket?user=alice")
        .await
        .expect("buy");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(json(&body)["order"].is_string(), "{body}");
    let show = run_env(&["stock", "show", "--config", cfg], env);
    assert!(show.status.success(), "stock show: {}", stderr(&show));
    let snap = json(&String::from_utf8_lossy(&show.stdout));
    assert_eq!(snap["sold"], 1, "{snap}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_over_tls_with_the_operators_ca_file() {
    let pki = TestPki::new();
    let (_redis, tls_port) = RedisServer::start_tls(&pki, false);
    let node = common::free_addr();
    let cfg = sale_config(
        "tls-ca",
        &format!("rediss://127.0.0.1:{tls_port}"),
        "tls_ca_file = \"ca.crt\"\n",
        node,
    );
    // A relative path is from the config file's folder.
    let dir = std::path::Path::new(&cfg).parent().expect("dir");
    std::fs::copy(pki.file("ca.crt"), dir.join("ca.crt")).expect("copy ca");
    sell_one(&cfg, node, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_when_redis_demands_one() {
    let pki = TestPki::new();
    let (_redis, tls_port) = RedisServer::start_tls(&pki, true);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let ca = format!("tls_ca_file = \"{}\"\n", pki.file("ca.crt"));

    // Without one, the handshake is refused, and the error says what to set.
    let without = sale_config("tls-client", &url, &ca, common::free_addr());
    let out = run_env(&["stock", "show", "--config", &without], &[]);
    assert!(
        !out.status.success(),
        "connected without a client certificate"
    );
    let said = stderr(&out);
    assert!(said.contains("client certificate"), "{said}");
    assert!(said.contains("tls_cert_file"), "{said}");
    assert!(said.contains(&url) && said.contains(&without), "{said}");

    let node = common::free_addr();
    let with = sale_config(
        "tls-client",
        &url,
        &format!(
            "{ca}tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            pki.file("client.crt"),
            pki.file("client.key")
        ),
        node,
    );
    sell_one(&with, node, &[]).await;
}

/// No `tls_ca_file`: the system's roots, which `SSL_CERT_FILE` replaces
/// here with the test's CA. `spike orders tail` connects the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_file_the_system_roots_are_trusted_by_every_command() {
    let pki = TestPki::new();
    let (_redis, tls_port) = RedisServer::start_tls(&pki, false);
    let node = common::free_addr();
    let cfg = sale_config(
        "tls-system",
        &format!("rediss://127.0.0.1:{tls_port}"),
        "",
        node,
    );
    let ca = pki.file("ca.crt");
    // The machine's own roots do not know the test's CA.
    let unknown = run_env(&["stock", "show", "--config", &cfg], &[]);
    assert!(
        !unknown.status.success(),
        "a certificate of an unknown CA was accepted"
    );
    assert!(
        stderr(&unknown).contains("certificate"),
        "{}",
        stderr(&unknown)
    );

    let env = [("SSL_CERT_FILE", ca.as_str())];
    sell_one(&cfg, node, &env).await;

    let mut tail = Command::new(bin())
        .args(["orders", "tail", "--config", &cfg])
        .env("SSL_CERT_FILE", &ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn orders tail");
    let out = tail.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let line = lines.recv_timeout(Duration::from_secs(10));
    let _ = tail.kill();
    let _ = tail.wait();
    let line = line.expect("orders tail printed the sale's event over TLS");
    assert!(json(&line)["order"].is_string(), "{line}");
}

#[test]
fn a_wrong_ca_and_a_plaintext_port_are_refused_clearly() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let (redis, tls_port) = RedisServer::start_tls(&pki, false);

    let wrong = sale_config(
        "tls-wrong",
        &format!("rediss://127.0.0.1:{tls_port}"),
        &format!("tls_ca_file = \"{}\"\n", other.file("ca.crt")),
        common::free_addr(),
    );
    let out = run_env(
        &[
            "stock",
            "init",
            "--trust-client-buyer-ids",
            "--config",
            &wrong,
        ],
        &[],
    );
    assert!(
        !out.status.success(),
        "a certificate of the wrong CA was accepted"
    );
    let said = stderr(&out);
    assert!(said.contains("certificate was refused"), "{said}");
    assert!(said.contains("tls_ca_file"), "{said}");
    assert!(said.contains(&wrong), "the config file: {said}");

    // rediss:// to the plaintext port: no answer to the handshake, said
    // as such, and nothing sent in plaintext instead.
    let started = Instant::now();
    let plain = sale_config(
        "tls-plain",
        &format!("rediss://127.0.0.1:{}", redis.port),
        &format!("tls_ca_file = \"{}\"\n", pki.file("ca.crt")),
        common::free_addr(),
    );
    let out = run_env(
        &[
            "stock",
            "init",
            "--trust-client-buyer-ids",
            "--config",
            &plain,
        ],
        &[],
    );
    assert!(
        !out.status.success(),
        "rediss:// worked on a plaintext port"
    );
    let said = stderr(&out);
    assert!(said.contains("tls-port"), "{said}");
    assert!(said.contains(&plain), "the config file: {said}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let stock: std::collections::HashMap<String, String> = redis.hash("{tls-plain}:stock");
    assert!(
        stock.is_empty(),
        "the sale was written in plaintext: {stock:?}"
    );
}

/// Each bad `tls_*` setting is refused at load: non-zero exit, and
/// `FILE:LINE: `key`: why`, before anything connects.
#[test]
fn bad_tls_settings_are_refused_with_file_key_and_line() {
    let pki = TestPki::new();
    let junk = pki.dir.join("junk.pem");
    std::fs::write(&junk, "not PEM at all\n").expect("write junk");
    let junk = junk.to_str().expect("path").to_string();
    let missing = pki.file("absent.crt");
    let tls_url = "rediss://127.0.0.1:1";
    // [redis] starts on line 6: url on 7, timeout on 8, the tls_* from 9.
    let cases: Vec<(&str, String, &str, usize, &str)> = vec![
        (
            "redis://127.0.0.1:1",
            format!("tls_ca_file = \"{}\"\n", pki.file("ca.crt")),
            "redis.tls_ca_file",
            9,
            "needs a TLS URL",
        ),
        (
            tls_url,
            format!("tls_ca_file = \"{missing}\"\n"),
            "redis.tls_ca_file",
            9,
            "cannot read",
        ),
        (
            tls_url,
            format!("tls_ca_file = \"{junk}\"\n"),
            "redis.tls_ca_file",
            9,
            "no PEM certificate",
        ),
        (
            tls_url,
            format!("tls_cert_file = \"{}\"\n", pki.file("client.crt")),
            "redis.tls_cert_file",
            9,
            "needs `tls_key_file`",
        ),
        (
            tls_url,
            format!(
                "tls_cert_file = \"{}\"\ntls_key_file = \"{junk}\"\n",
                pki.file("client.crt")
            ),
            "redis.tls_key_file",
            10,
            "no PEM private key",
        ),
        (
            tls_url,
            // The server's key does not go with the client's certificate.
            format!(
                "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
                pki.file("client.crt"),
                pki.file("server.key")
            ),
            "redis.tls_key_file",
            10,
            "not usable with the certificate",
        ),
    ];
    for (url, lines, key, line, why) in cases {
        let cfg = sale_config("tls-bad", url, &lines, common::free_addr());
        let out = run_env(&["stock", "show", "--config", &cfg], &[]);
        assert!(!out.status.success(), "{lines} was accepted");
        let said = stderr(&out);
        assert!(
            said.contains(&format!("{cfg}:{line}: `{key}`: ")),
            "{lines}: {said}"
        );
        assert!(said.contains(why), "{lines}: {said}");
    }
}

/// A Sentinel that listens on TLS only and watches `primary`'s TLS port
/// over TLS (`tls-replication`), its certificate from `pki`; killed on drop.
struct TlsSentinel {
    child: std::process::Child,
    port: u16,
}

impl TlsSentinel {
    fn start(pki: &TestPki, service: &str, primary: u16) -> TlsSentinel {
        let port = common::free_port();
        // Sentinel rewrites its file, so each has its own.
        let conf = pki.dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n\
                 tls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor {service} 127.0.0.1 {primary} 1\n",
                dir = pki.dir.display(),
                cert = pki.file("server.crt"),
                key = pki.file("server.key"),
                ca = pki.file("ca.crt"),
            ),
        )
        .expect("sentinel conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (run scripts/test.sh)");
        wait_listening(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
        TlsSentinel { child, port }
    }
}

impl Drop for TlsSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `rediss-sentinel://`: the Sentinel and the primary it names are both
/// reached over TLS with the same `[redis]` files.
#[test]
fn a_sale_through_sentinel_over_tls() {
    let pki = TestPki::new();
    let (_redis, tls_port) = RedisServer::start_tls(&pki, false);
    let sentinel = TlsSentinel::start(&pki, "sale", tls_port);
    let cfg = sale_config(
        "tls-sentinel",
        &format!(
            "rediss-sentinel://127.0.0.1:{}/0?sentinelServiceName=sale",
            sentinel.port
        ),
        &format!("tls_ca_file = \"{}\"\n", pki.file("ca.crt")),
        common::free_addr(),
    );
    let init = run_env(
        &[
            "stock",
            "init",
            "--trust-client-buyer-ids",
            "--config",
            &cfg,
        ],
        &[],
    );
    assert!(init.status.success(), "stock init: {}", stderr(&init));
    let show = run_env(&["stock", "show", "--config", &cfg], &[]);
    assert!(show.status.success(), "stock show: {}", stderr(&show));
    let snap = json(&String::from_utf8_lossy(&show.stdout));
    assert_eq!(snap["initialised"], true, "{snap}");
    assert_eq!(snap["total"], 5, "{snap}");
}

/// `spike up` with a `rediss://` `[redis]`: the one-machine sale reaches
/// Redis over TLS as the separate commands do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spike_up_sells_over_tls() {
    let pki = TestPki::new();
    let (_redis, tls_port) = RedisServer::start_tls(&pki, false);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let (text, ports) = common::up::up_config(5, 1, Some(&url));
    let text = text.replace(
        &format!("url = \"{url}\"\n"),
        &format!(
            "url = \"{url}\"\ntls_ca_file = \"{}\"\n",
            pki.file("ca.crt")
        ),
    );
    let (_up, _path) = common::up::start_up(&text, &ports);
    let (status, body) = get(&client(), ports.balancer, "/buy/ticket?user=bob")
        .await
        .expect("buy");
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// `spike orders tail` with `tls_ca_file`. Ignored until orders_tail.rs
/// builds its client from `spike::redis_client::fred_config` (it calls
/// fred's `Config::from_url` itself, so it trusts the system's roots only
/// and refuses this Redis's certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_tail_reads_the_ca_file() {
    let pki = TestPki::new();
    let (_redis, tls_port) = RedisServer::start_tls(&pki, false);
    let node = common::free_addr();
    let cfg = sale_config(
        "tls-tail",
        &format!("rediss://127.0.0.1:{tls_port}"),
        &format!("tls_ca_file = \"{}\"\n", pki.file("ca.crt")),
        node,
    );
    sell_one(&cfg, node, &[]).await;
    let out = Command::new(bin())
        .args(["orders", "tail", "--config", &cfg])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn orders tail");
    let start = Instant::now();
    let mut tail = SpikeProcess { child: out };
    let stdout = tail.child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let line = lines
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no event within {:?}", start.elapsed()));
    assert!(json(&line)["order"].is_string(), "{line}");
}

/// `rediss-cluster://`: three masters that speak TLS to clients and to
/// each other (`tls-cluster yes`, so `CLUSTER SLOTS` names their TLS
/// ports), joined by `redis-cli --tls --cluster create`; `stock init` and
/// `stock show` reach the shard of the sale over TLS.
#[test]
fn a_sale_on_a_cluster_over_tls() {
    let pki = TestPki::new();
    let (cert, key, ca) = (
        pki.file("server.crt"),
        pki.file("server.key"),
        pki.file("ca.crt"),
    );
    let shards: Vec<(RedisServer, u16)> = (0..3)
        .map(|_| {
            // The cluster bus listens 10000 above the TLS port.
            let tls_port = loop {
                let p = common::free_port();
                if p <= 55535 {
                    break p;
                }
            };
            let redis = RedisServer::start_with(&[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--tls-port",
                &tls_port.to_string(),
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ]);
            (redis, tls_port)
        })
        .collect();
    let addrs: Vec<String> = shards
        .iter()
        .map(|(_, p)| format!("127.0.0.1:{p}"))
        .collect();
    let created = Command::new("redis-cli")
        .args(["--tls", "--cacert", &ca, "--cluster", "create"])
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
    for (shard, _) in &shards {
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
    let cfg = sale_config(
        "tls-cluster",
        &format!(
            "rediss-cluster://{}?node={}&node={}",
            addrs[0], addrs[1], addrs[2]
        ),
        &format!("tls_ca_file = \"{ca}\"\n"),
        common::free_addr(),
    );
    let init = run_env(
        &[
            "stock",
            "init",
            "--trust-client-buyer-ids",
            "--config",
            &cfg,
        ],
        &[],
    );
    assert!(init.status.success(), "stock init: {}", stderr(&init));
    let show = run_env(&["stock", "show", "--config", &cfg], &[]);
    assert!(show.status.success(), "stock show: {}", stderr(&show));
    let snap = json(&String::from_utf8_lossy(&show.stdout));
    assert_eq!(snap["initialised"], true, "{snap}");
    assert_eq!(snap["total"], 5, "{snap}");
}
