//! The PROXY protocol on the balancer's listener (issue 25, point 3): a
//! spike balancer behind an L4 tier (real HAProxy in TCP mode with
//! `send-proxy-v2`) takes each client's own address from the header, for
//! `ip_hash`, `X-Real-IP` and `X-Forwarded-For`, on both forwarding paths;
//! the tier health-checks `/ready`, so a balancer stopped under load costs
//! no request. Only `trusted_proxies` may speak it: any other peer, and any
//! malformed header, is closed before a request.

mod balancer_support;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use balancer_support::recorder::{Recorder, Then};
use balancer_support::{body_of, nginx_ip_hash, raw};
use common::haproxy::{HaProxy, haproxy};
use common::spike::{SpikeProcess, remove_config, wait_listening, write_config};

/// One `spike balancer` process speaking the PROXY protocol to HAProxy
/// (on 127.0.0.1), in front of `nodes` by `ip_hash`.
struct Balancer {
    process: SpikeProcess,
    listen: SocketAddr,
    admin: SocketAddr,
    path: PathBuf,
}

impl Balancer {
    fn start(nodes: &[SocketAddr], extra: &str) -> Balancer {
        let listen = common::free_addr();
        let admin = common::free_addr();
        let mut text = format!(
            "[balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\nstrategy = \"ip_hash\"\n\
             proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\ndrain_delay = \"2s\"\n{extra}\n"
        );
        for n in nodes {
            text.push_str(&format!("[[balancer.upstream]]\naddr = \"{n}\"\n"));
        }
        let path = write_config(&text);
        let process = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("path")]);
        wait_listening(&listen.to_string(), Duration::from_secs(15));
        wait_listening(&admin.to_string(), Duration::from_secs(5));
        Balancer {
            process,
            listen,
            admin,
            path,
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        remove_config(&self.path);
    }
}

/// HAProxy in TCP mode on `port`, sending PROXY v2 to `balancers` and
/// health-checking each one's `/ready` on its admin address (without a
/// PROXY header: HAProxy sends none to a check `port` of its own).
fn start_haproxy(port: u16, balancers: &[&Balancer]) -> (HaProxy, PathBuf) {
    let mut cfg = format!(
        "global\n  maxconn 2000\n\
         defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  retries 3\n  option redispatch\n\
         frontend l4\n  bind 127.0.0.1:{port}\n  default_backend spikes\n\
         backend spikes\n  balance roundrobin\n  option httpchk GET /ready\n\
           default-server send-proxy-v2 check inter 100ms fall 1 rise 1\n"
    );
    for (i, b) in balancers.iter().enumerate() {
        cfg.push_str(&format!(
            "  server b{i} {} check port {}\n",
            b.listen,
            b.admin.port()
        ));
    }
    let path = write_config(&cfg).with_file_name("haproxy.cfg");
    std::fs::write(&path, cfg).expect("write haproxy.cfg");
    let child = Command::new(haproxy())
        .arg("-f")
        .arg(&path)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start haproxy");
    wait_listening(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
    (HaProxy(child), path)
}

/// The value of header `name` in a recorded request head.
fn header<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

/// Clients from 24 loopback addresses in different /24s (`ip_hash` keys
/// on the first three bytes, as Nginx's) go through HAProxy to two
/// balancers (one on the fast path, one on hyper's): each node sees every
/// one of its clients' own addresses in `X-Real-IP` and `X-Forwarded-For`
/// (never HAProxy's), each client lands on the node Nginx's `ip_hash`
/// gives it whichever balancer carried it, and both nodes get clients.
/// Then a load client (examples/crowd.rs) sends steady load through HAProxy while one balancer gets
/// SIGTERM: HAProxy's check of `/ready` takes it out within the drain
/// delay, and not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_send_proxy_v2_every_node_sees_the_real_clients() {
    let n1 = Recorder::start("n1", Then::Answer).await;
    let n2 = Recorder::start("n2", Then::Answer).await;
    let nodes = [n1.addr, n2.addr];
    let mut fast = Balancer::start(&nodes, "");
    let hyper = Balancer::start(&nodes, "fast_path = false");
    let port = common::free_port();
    let (_haproxy, cfg) = start_haproxy(port, &[&fast, &hyper]);
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    common::wait_for(
        "both balancers up in HAProxy",
        Duration::from_secs(10),
        async || {
            let mut seen = BTreeSet::new();
            for _ in 0..4 {
                let r = raw(
                    None,
                    front,
                    b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                )
                .await;
                seen.insert(r.starts_with("HTTP/1.1 200"));
            }
            seen == BTreeSet::from([true])
        },
    )
    .await;

    let clients: Vec<Ipv4Addr> = (1..=24u8).map(|i| Ipv4Addr::new(127, i, i, 7)).collect();
    let mut expected: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for ip in &clients {
        let node = ["n1", "n2"][nginx_ip_hash(ip.octets(), &[1, 1])];
        expected.entry(node).or_default().insert(ip.to_string());
        // Four connections: HAProxy's round robin takes them to both
        // balancers.
        for _ in 0..4 {
            let r = raw(
                Some(IpAddr::V4(*ip)),
                front,
                b"GET /who HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert!(r.starts_with("HTTP/1.1 200"), "{ip}: {r}");
            assert_eq!(body_of(&r), node, "{ip} went to the wrong node");
        }
    }
    assert_eq!(
        expected.len(),
        2,
        "the addresses all hash to one node: {expected:?}"
    );
    for (name, node) in [("n1", &n1), ("n2", &n2)] {
        let mut real_ips = BTreeSet::new();
        for seen in node
            .seen()
            .iter()
            .filter(|s| s.request_line.starts_with("GET /who"))
        {
            let real = header(&seen.head, "x-real-ip");
            let forwarded = header(&seen.head, "x-forwarded-for");
            assert_eq!(real.len(), 1, "{}", seen.head);
            assert_eq!(
                forwarded, real,
                "X-Forwarded-For is the client's alone: {}",
                seen.head
            );
            real_ips.insert(real[0].to_string());
        }
        assert_eq!(
            Some(&real_ips),
            expected.get(name),
            "{name} saw other client addresses than its own (HAProxy's is 127.0.0.1)"
        );
    }

    // Steady load through HAProxy; one balancer stopped in the middle.
    // examples/crowd.rs, oha's shape and JSON (one request in flight on
    // each of 8 keep-alive connections, for 6 s), already built by
    // scripts/test.sh: every request a GET of /load?user=N.
    let url = format!("http://{front}/load");
    let buyers = std::env::temp_dir().join(format!("spike-pp-load-{}", std::process::id()));
    let lines: String = (0..300_000).map(|i| format!("b{i} -\n")).collect();
    std::fs::write(&buyers, lines).expect("write the load's list");
    let list = buyers.clone();
    let load = std::thread::spawn(move || {
        Command::new(common::spike::crowd_bin())
            .args(["--send", "query", "-z", "6s", "-c", "8", "--buyers"])
            .arg(&list)
            .arg(&url)
            .output()
            .expect("run examples/crowd.rs")
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fast.process.signal("TERM");
    fast.process.expect_clean_exit(Duration::from_secs(15));
    let out = tokio::task::spawn_blocking(move || load.join().expect("the load thread"))
        .await
        .expect("join");
    let _ = std::fs::remove_file(&buyers);
    assert!(
        out.status.success(),
        "the load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the load's JSON");
    let codes = report["statusCodeDistribution"]
        .as_object()
        .expect("codes")
        .clone();
    let errors = report["errorDistribution"]
        .as_object()
        .expect("errors")
        .clone();
    let ok = codes
        .get("200")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    assert!(
        errors.is_empty(),
        "failed requests: {errors:?} (codes {codes:?})"
    );
    assert_eq!(codes.len(), 1, "non-200 answers: {codes:?}");
    assert!(ok > 500, "too little load to prove anything: {ok}");
    // After the stop, the load went on through the other balancer.
    let r = raw(
        None,
        front,
        b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    drop(hyper);
    let _ = std::fs::remove_file(cfg);
}

/// Sends `bytes` from `source` to `to` and reads until the server closes
/// (a reset, which a close with unread bytes in the socket gives, ends it
/// too): what was read.
async fn exchange(source: &str, to: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    let source: IpAddr = source.parse().expect("ip");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind source");
    let mut stream = socket.connect(to).await.expect("connect");
    // The server may close before it all went out.
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("{source}: the server neither answered nor closed"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A PROXY protocol version 2 header for an IPv4 client.
fn v2(command: u8, client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h.push(0x11);
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

/// Straight at a real balancer with `proxy_protocol = true` and
/// `trusted_proxies = ["127.0.0.1"]`, on both paths: version 1 and
/// version 2 headers from the trusted address give the node the header's
/// client; version 2's LOCAL the socket's own address; a header in two
/// pieces is waited for. A request without a header, a garbage header, or
/// a good header from an address not trusted is closed without an answer
/// and reaches no node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_trusted_peers_may_send_a_header_and_a_bad_one_closes() {
    for path in ["", "fast_path = false"] {
        let node = Recorder::start("n", Then::Answer).await;
        let lb = Balancer::start(&[node.addr], path);
        let get = b"GET /who HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

        let v1 = [
            b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\n".as_slice(),
            get,
        ]
        .concat();
        let r = exchange("127.0.0.1", lb.listen, &v1).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
        let r = exchange(
            "127.0.0.1",
            lb.listen,
            &[v2(1, [198, 51, 100, 4], 7), get.to_vec()].concat(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
        let r = exchange(
            "127.0.0.1",
            lb.listen,
            &[v2(0, [198, 51, 100, 5], 7), get.to_vec()].concat(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
        // In two pieces, 50 ms apart.
        let mut s = tokio::net::TcpStream::connect(lb.listen)
            .await
            .expect("connect");
        let pieces = v2(1, [192, 0, 2, 77], 9);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(&pieces[..10]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(&[&pieces[10..], get.as_slice()].concat())
            .await
            .expect("write");
        let mut r = String::new();
        s.read_to_string(&mut r).await.expect("read");
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");

        for (source, bytes) in [
            ("127.0.0.1", get.to_vec()),
            (
                "127.0.0.1",
                [b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n".as_slice(), get].concat(),
            ),
            (
                "127.0.0.1",
                [
                    &v2(1, [1, 2, 3, 4], 1)[..13],
                    b"\x77\x00\x0cGARBAGE".as_slice(),
                    get,
                ]
                .concat(),
            ),
            ("127.0.0.2", v1.clone()),
            (
                "127.0.0.2",
                [v2(1, [198, 51, 100, 4], 7), get.to_vec()].concat(),
            ),
        ] {
            let r = exchange(source, lb.listen, &bytes).await;
            assert_eq!(
                r,
                "",
                "{path}: from {source}, {:?} was answered",
                String::from_utf8_lossy(&bytes)
            );
        }
        let real: Vec<String> = node
            .seen()
            .iter()
            .map(|s| header(&s.head, "x-real-ip").join(","))
            .collect();
        assert_eq!(
            real,
            ["203.0.113.9", "198.51.100.4", "127.0.0.1", "192.0.2.77"],
            "{path}: the node saw these clients"
        );
        drop(lb);
    }
}
