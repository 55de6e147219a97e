//! Hostile and broken input at a real `spike balancer` process: a forged
//! X-Forwarded-For, malformed HTTP, a bad file at start, an admin listener
//! off loopback.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::backend::Backend;
use common::http::client;
use common::spike::{SpikeProcess, bin, remove_config, run, wait_listening, write_config};
use http_body_util::{BodyExt, Empty};

fn balancer_config(listen: SocketAddr, admin: &str, extra: &str, backends: &[&Backend]) -> String {
    let mut t = format!(
        "[balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\nstrategy = \"ip_hash\"\n{extra}\n"
    );
    for b in backends {
        t.push_str(&format!("[[balancer.upstream]]\naddr = \"{}\"\n", b.addr));
    }
    t
}

/// Which backend answered each forged X-Forwarded-For.
async fn picks_by_forwarded_for(
    balancer: SocketAddr,
    forged: &[String],
) -> HashMap<String, String> {
    let c = client();
    let mut picks = HashMap::new();
    for ip in forged {
        let req = hyper::Request::get(format!("http://{balancer}/"))
            .header("X-Forwarded-For", ip.as_str())
            .body(Empty::new())
            .expect("request");
        let res = c.request(req).await.expect("answer");
        let body = res.into_body().collect().await.expect("body").to_bytes();
        picks.insert(ip.clone(), String::from_utf8_lossy(&body).into_owned());
    }
    picks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
        Backend::start("d").await,
    ];
    let refs: Vec<&Backend> = backends.iter().collect();
    let forged: Vec<String> = (0..60)
        .map(|i| format!("{}.{i}.{}.7", 10 + i % 5, (i * 7 + 1) % 256))
        .collect();

    // Untrusted: every forged address is ignored; all come from 127.0.0.1.
    let listen = common::free_addr();
    let path = write_config(&balancer_config(
        listen,
        &common::free_addr().to_string(),
        "",
        &refs,
    ));
    let lb = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("path")]);
    wait_listening(&listen.to_string(), Duration::from_secs(10));
    let picks = picks_by_forwarded_for(listen, &forged).await;
    let distinct: HashSet<&String> = picks.values().collect();
    assert_eq!(
        distinct.len(),
        1,
        "a forged X-Forwarded-For moved ip_hash: {picks:?}"
    );
    drop(lb);
    remove_config(&path);

    // Trusted: the forged (now believed) addresses spread over the
    // upstreams, and each sticks.
    let listen = common::free_addr();
    let path = write_config(&balancer_config(
        listen,
        &common::free_addr().to_string(),
        "trusted_proxies = [\"127.0.0.0/8\"]",
        &refs,
    ));
    let _lb = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("path")]);
    wait_listening(&listen.to_string(), Duration::from_secs(10));
    let first = picks_by_forwarded_for(listen, &forged).await;
    let again = picks_by_forwarded_for(listen, &forged).await;
    assert_eq!(first, again, "a believed client address must stick");
    // And each is the upstream Nginx's ip_hash gives for that address.
    for (ip, got) in &first {
        let octets: Vec<u32> = ip.split('.').map(|o| o.parse().expect("octet")).collect();
        let hash = octets[..3].iter().fold(89u32, |h, &b| (h * 113 + b) % 6271);
        let want = ["a", "b", "c", "d"][(hash % 4) as usize];
        assert_eq!(got, want, "{ip}");
    }
    let distinct: HashSet<&String> = first.values().collect();
    assert_eq!(distinct.len(), 4, "{distinct:?}");
    remove_config(&path);
}

fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_4xx_and_the_balancer_keeps_serving() {
    let backend = Backend::start("only").await;
    let listen = common::free_addr();
    let path = write_config(&balancer_config(
        listen,
        &common::free_addr().to_string(),
        "",
        &[&backend],
    ));
    let _lb = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("path")]);
    wait_listening(&listen.to_string(), Duration::from_secs(10));
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "h".repeat(120_000)
    );
    assert_eq!(raw(listen, huge.as_bytes()).get(9..12), Some("431"));
    assert_eq!(
        raw(listen, b"NOT HTTP AT ALL\r\n\r\n").get(9..12),
        Some("400")
    );
    let ok = raw(
        listen,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(ok.get(9..12), Some("200"), "{ok}");
    assert!(ok.ends_with("only"), "{ok}");
    remove_config(&path);
}

#[test]
fn a_bad_balancer_file_is_refused_at_start_with_key_and_line() {
    let path = write_config(
        "[balancer]\nlisten = \"127.0.0.1:0\"\nstrategy = \"fastest\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\n",
    );
    let out = run(&["balancer", "--config", path.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":3: `balancer.strategy`"), "{err}");
    remove_config(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_off_loopback_is_said_in_the_log() {
    let backend = Backend::start("x").await;
    let listen = common::free_addr();
    let admin = format!("0.0.0.0:{}", common::free_port());
    let path = write_config(&balancer_config(listen, &admin, "", &[&backend]));
    let child = Command::new(bin())
        .args(["balancer", "--config", path.to_str().expect("path")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_listening(&listen.to_string(), Duration::from_secs(10));
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("reachable from other machines"), "{log}");
    remove_config(&path);
}
