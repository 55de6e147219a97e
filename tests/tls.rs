//! HTTPS and HTTP/2 on the balancer's listener (issue 25, points 1 and 2),
//! with real clients: `openssl s_client` for ALPN, SNI, TLS 1.2 and 1.3,
//! session resumption and a certificate swapped by a reload; `curl
//! --http2` for a purchase end to end through `spike up`; hyper's HTTP/2
//! client for the strategies, the per-client limits and the queue, beside
//! the same requests over HTTP/1.1. Certificates are made with `openssl`
//! (EC P-256) in a temp dir.

mod balancer_support;
mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use balancer_support::tls::{
    API, Certs, SHOP, Transport, curl_h2, h2_send, s_client, served_certificate,
};
use balancer_support::{Running, Up, config_text, read_response, up};
use common::backend::Backend;
use common::spike::{SpikeProcess, wait_listening, write_config};
use tokio::io::AsyncWriteExt;

/// A `spike balancer` process with TLS in front of `backend`.
fn tls_balancer(
    certs: &Certs,
    backend: SocketAddr,
) -> (SpikeProcess, SocketAddr, SocketAddr, std::path::PathBuf) {
    let (addr, admin) = (common::free_addr(), common::free_addr());
    let text = format!(
        "[balancer]\nlisten = \"{addr}\"\nadmin = \"{admin}\"\n{}",
        certs.with_upstream(backend)
    );
    let path = write_config(&text);
    let p = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("path")]);
    wait_listening(&addr.to_string(), Duration::from_secs(15));
    (p, addr, admin, path)
}

/// ALPN picks `h2` or `http/1.1` as the client offers; SNI picks the
/// `[[balancer.tls_sni]]` certificate for its name and the default one
/// for any other name or none; TLS 1.2 and 1.3 both; a TLS 1.3 (and 1.2)
/// session saved with `-sess_out` is resumed with `-sess_in`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_sees_alpn_sni_both_versions_and_resumption() {
    let certs = Certs::new();
    let backend = Backend::start("b").await;
    let (_lb, addr, _, path) = tls_balancer(&certs, backend.addr);
    let ca = certs.pki.file("ca.crt");
    let verified = ["-CAfile", ca.as_str(), "-verify_return_error"];

    let h2 = s_client(
        addr,
        &[
            &verified[..],
            &["-servername", SHOP, "-alpn", "h2,http/1.1"],
        ]
        .concat(),
        "",
    );
    assert!(h2.contains("ALPN protocol: h2"), "{h2}");
    assert!(h2.contains("Verify return code: 0 (ok)"), "{h2}");
    let h1 = s_client(
        addr,
        &[&verified[..], &["-servername", SHOP, "-alpn", "http/1.1"]].concat(),
        "",
    );
    assert!(h1.contains("ALPN protocol: http/1.1"), "{h1}");

    assert!(served_certificate(addr, API).contains("CN = api.test"));
    assert!(served_certificate(addr, SHOP).contains("CN = shop.test"));
    assert!(served_certificate(addr, "other.test").contains("CN = shop.test"));
    let no_sni = s_client(addr, &["-noservername"], "");
    assert!(no_sni.contains("CN = shop.test"), "{no_sni}");

    for (version, shown) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let dir = certs.pki.dir.join(format!("session{version}"));
        let sess = dir.to_str().expect("path");
        let first = s_client(
            addr,
            &[
                &verified[..],
                &["-servername", SHOP, version, "-sess_out", sess],
            ]
            .concat(),
            "GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        );
        assert!(first.contains(&format!("New, {shown}")), "{first}");
        assert!(first.contains("HTTP/1.1 200"), "{first}");
        let again = s_client(
            addr,
            &[
                &verified[..],
                &["-servername", SHOP, version, "-sess_in", sess],
            ]
            .concat(),
            "GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        );
        assert!(
            again.contains(&format!("Reused, {shown}")),
            "{version}: {again}"
        );
        assert!(again.contains("HTTP/1.1 200"), "{again}");
    }
    common::spike::remove_config(&path);
}

/// A renewed certificate under the same file names, then SIGHUP (or the
/// file watcher, which sees the certificate files too, whichever comes
/// first): new handshakes get it, a connection opened before goes on being
/// served.
/// A key that is not the certificate's is refused by the reload (said in
/// `/status`), and the certificate in force stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_reloaded_for_new_handshakes_and_open_ones_stay() {
    let certs = Certs::new();
    let backend = Backend::start("b").await;
    let (lb, addr, admin, path) = tls_balancer(&certs, backend.addr);
    let before = served_certificate(addr, SHOP);

    let mut open = certs.connect(addr, SHOP, &[b"http/1.1"]).await;
    let req = b"GET /kept HTTP/1.1\r\nHost: shop.test\r\n\r\n";
    open.write_all(req).await.expect("write");
    let first = read_response(&mut open).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    // Renewed: a new key and certificate, written over the old files.
    certs
        .pki
        .issue("renewed", "/CN=shop.test", "subjectAltName=DNS:shop.test");
    let dir = &certs.pki.dir;
    std::fs::copy(dir.join("renewed.key"), dir.join("shop.key")).expect("copy key");
    std::fs::copy(dir.join("renewed.crt"), dir.join("shop.crt")).expect("copy cert");
    lb.signal("HUP");
    let mut after = String::new();
    common::wait_for(
        "the renewed certificate",
        Duration::from_secs(10),
        async || {
            after = served_certificate(addr, SHOP);
            after != before
        },
    )
    .await;
    assert!(after.contains("CN = shop.test"), "{after}");

    open.write_all(req)
        .await
        .expect("write on the connection opened before");
    let second = read_response(&mut open).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");

    // A key of another certificate: refused, the renewed one stays.
    std::fs::copy(dir.join("api.key"), dir.join("shop.key")).expect("copy key");
    lb.signal("HUP");
    let c = common::http::client();
    common::wait_for(
        "the refusal in /status",
        Duration::from_secs(10),
        async || {
            let Ok((_, body)) = common::http::get(&c, admin, "/status").await else {
                return false;
            };
            common::http::json(&body)["last_reload"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("is not the private key of the certificate"))
        },
    )
    .await;
    assert_eq!(served_certificate(addr, SHOP), after);
    common::spike::remove_config(&path);
}

/// `curl --http2` through `spike up` with TLS: a purchase (200, over
/// HTTP/2), the same buyer again (409 `already_bought`), the last ticket,
/// a late buyer's `sold_out` from a node, and then the edge's: answered by
/// the balancer over HTTP/2 too.
#[test]
fn curl_http2_buys_a_ticket_end_to_end_and_hears_sold_out_from_the_edge() {
    let certs = Certs::new();
    let addrs: Vec<SocketAddr> = (0..4).map(|_| common::free_addr()).collect();
    let mut text = format!(
        "[sale]\nevent = \"h2-sale\"\ntotal = 2\nper_user_limit = 1\n\n\
         [balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"round_robin\"\n{}",
        addrs[0],
        addrs[1],
        certs.balancer_lines()
    );
    for (i, a) in addrs[2..].iter().enumerate() {
        text.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\nlisten = \"{a}\"\n",
            i + 1
        ));
    }
    let path = write_config(&text);
    let _up = SpikeProcess::start(&["up", "--config", path.to_str().expect("path")]);
    for a in &addrs {
        wait_listening(&a.to_string(), Duration::from_secs(20));
    }
    let curl = |method: &str, path: &str| curl_h2(&certs, addrs[0], method, path);
    let (status, body) = curl("POST", "/buy/ticket?user=alice");
    assert_eq!(status, "2 200", "{body}");
    assert_eq!(common::http::json(&body)["status"], "sold", "{body}");
    let (status, body) = curl("POST", "/buy/ticket?user=alice");
    assert_eq!(status, "2 409", "{body}");
    assert_eq!(
        common::http::json(&body)["status"],
        "already_bought",
        "{body}"
    );
    assert_eq!(curl("POST", "/buy/ticket?user=bob").0, "2 200");
    let (status, body) = curl("POST", "/buy/ticket?user=carol");
    assert_eq!(
        (
            status.as_str(),
            common::http::json(&body)["status"].as_str()
        ),
        ("2 409", Some("sold_out"))
    );
    // The edge takes over once the balancer has heard it.
    let admin = addrs[1];
    let edge_answers = || {
        let out = Command::new("curl")
            .args(["-s", &format!("http://{admin}/status")])
            .output()
            .expect("curl");
        common::http::json(&String::from_utf8_lossy(&out.stdout))["edge"]["sold_out_answers"]
            .as_u64()
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    loop {
        let (status, body) = curl("POST", "/buy/ticket?user=dave");
        assert_eq!(status, "2 409", "{body}");
        assert_eq!(common::http::json(&body)["status"], "sold_out", "{body}");
        if edge_answers() > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the edge never answered over h2"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    common::spike::remove_config(&path);
}

/// A balancer in front of `ups` with `extra` `[balancer]` keys, with TLS.
async fn balancer(certs: &Transport, strategy: &str, ups: &[Up], extra: &str) -> Running {
    let text = config_text(strategy, "127.0.0.1:0", "127.0.0.1:0", ups).replacen(
        "[balancer]\n",
        &format!("[balancer]\n{extra}\n"),
        1,
    );
    certs.start(&text).await
}

/// Every strategy picks over HTTP/2 as over HTTP/1.1 (on TLS both):
/// round robin alternates, ip_hash keeps one client on one upstream,
/// least_conn spreads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_picks_the_same_over_h2_as_over_h1() {
    let via = Transport::tls();
    let Transport::Tls(certs) = &via else {
        unreachable!()
    };
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    for strategy in [
        "round_robin",
        "weighted_round_robin",
        "ip_hash",
        "least_conn",
    ] {
        let lb = balancer(&via, strategy, &[up(a.addr, 1), up(b.addr, 1)], "").await;
        let mut h1 = Vec::new();
        for _ in 0..6 {
            let (status, body) = via.get(lb.addr, "/who").await.expect("h1");
            assert_eq!(status, 200);
            h1.push(body);
        }
        let mut h2 = Vec::new();
        let mut sender = certs.h2(lb.addr).await;
        for _ in 0..6 {
            let (status, body) = h2_send(&mut sender, "GET", "/who", &[], b"").await;
            assert_eq!(status, 200);
            h2.push(body);
        }
        let spread = |v: &[String]| {
            let a = v.iter().filter(|n| *n == "a").count();
            (a, v.len() - a)
        };
        match strategy {
            "round_robin" | "weighted_round_robin" => {
                assert_eq!(spread(&h1), (3, 3), "{strategy}: {h1:?}");
                assert_eq!(spread(&h2), (3, 3), "{strategy}: {h2:?}");
            }
            "ip_hash" => {
                assert!(
                    h1.iter().chain(&h2).all(|n| *n == h1[0]),
                    "{strategy}: {h1:?} {h2:?}"
                );
            }
            // One at a time, every upstream is as loaded as the other.
            _ => {
                assert!(
                    h1.iter().chain(&h2).all(|n| n == "a" || n == "b"),
                    "{strategy}"
                );
            }
        }
        lb.shutdown().await;
    }
}

/// The per-client limits count HTTP/2 requests as they count HTTP/1.1
/// ones: a burst, then a 429 with `Retry-After` that reaches no upstream;
/// and `limit_conns` counts streams in flight on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_limits_and_the_queue_hold_over_h2() {
    let via = Transport::tls();
    let Transport::Tls(certs) = &via else {
        unreachable!()
    };
    let a = Backend::start("a").await;
    let lb = balancer(
        &via,
        "round_robin",
        &[up(a.addr, 1)],
        "limit_rate = \"1r/m\"\nlimit_burst = 2\nlimit_nodelay = true",
    )
    .await;
    let mut sender = certs.h2(lb.addr).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(h2_send(&mut sender, "GET", "/x", &[], b"").await);
    }
    let codes: Vec<u16> = statuses.iter().map(|s| s.0).collect();
    assert_eq!(codes, [200, 200, 200, 429], "{statuses:?}");
    assert!(statuses[3].1.contains("limit_rate"), "{statuses:?}");
    assert_eq!(a.hits(), 3);
    lb.shutdown().await;

    // limit_conns = 1 over a slow upstream: the second stream of the same
    // connection while the first is in flight is a 429 at once.
    a.delay_ms.store(800, std::sync::atomic::Ordering::Relaxed);
    let lb = balancer(&via, "round_robin", &[up(a.addr, 1)], "limit_conns = 1").await;
    let sender = certs.h2(lb.addr).await;
    let (mut one, mut two) = (sender.clone(), sender);
    let first = tokio::spawn(async move { h2_send(&mut one, "GET", "/slow", &[], b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = h2_send(&mut two, "GET", "/slow", &[], b"").await;
    assert_eq!(second.0, 429, "{second:?}");
    assert_eq!(first.await.expect("first").0, 200);
    lb.shutdown().await;

    // max_conns = 1 with a queue of 1: of three streams at once, one is
    // served, one waits and is served, one finds the queue full: 503.
    let ups = [Up {
        addr: a.addr,
        weight: 1,
        extra: "max_conns = 1",
    }];
    let lb = balancer(
        &via,
        "round_robin",
        &ups,
        "queue = 1\nqueue_timeout = \"5s\"",
    )
    .await;
    let sender = certs.h2(lb.addr).await;
    let mut waits = Vec::new();
    for i in 0..3 {
        let mut s = sender.clone();
        waits.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150 * i)).await;
            h2_send(&mut s, "GET", "/slow", &[], b"").await
        }));
    }
    let mut codes = Vec::new();
    for w in waits {
        codes.push(w.await.expect("stream").0);
    }
    codes.sort_unstable();
    assert_eq!(codes, [200, 200, 503], "{codes:?}");
    lb.shutdown().await;
}

/// An HTTP/2 request without `:authority` or `Host` is refused as a
/// Host-less HTTP/1.1 one is (400), and one with `:authority` reaches the
/// upstream with that `Host`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_request_s_authority_is_the_upstream_s_host() {
    let via = Transport::tls();
    let Transport::Tls(certs) = &via else {
        unreachable!()
    };
    let node =
        balancer_support::recorder::Recorder::start("n", balancer_support::recorder::Then::Answer)
            .await;
    let lb = balancer(&via, "round_robin", &[up(node.addr, 1)], "").await;
    let mut sender = certs.h2(lb.addr).await;
    let (status, _) = h2_send(
        &mut sender,
        "GET",
        "/a",
        &[("cookie", "a=1"), ("cookie", "b=2")],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    let head = node.seen()[0].head.to_ascii_lowercase();
    assert!(head.contains("\r\nhost: shop.test\r\n"), "{head}");
    assert!(head.contains("\r\ncookie: a=1; b=2\r\n"), "{head}");
    assert!(head.starts_with("get /a http/1.1\r\n"), "{head}");
    lb.shutdown().await;
}

/// Refused at load, with the file, the key and its line: a key that is
/// not the certificate's, a file that is not there, a certificate
/// without its key, a name the certificate does not cover.
#[test]
fn bad_certificates_are_refused_with_file_key_and_line() {
    let certs = Certs::new();
    let f = |n: &str| certs.pki.file(n);
    // (the [balancer] keys from line 3, the tables after the upstream,
    // the key blamed, its line, what is said)
    let cases = [
        (
            format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                f("shop.crt"),
                f("api.key")
            ),
            String::new(),
            "balancer.tls_key",
            4,
            "is not the private key of the certificate",
        ),
        (
            format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                f("absent.crt"),
                f("shop.key")
            ),
            String::new(),
            "balancer.tls_cert",
            3,
            "absent.crt",
        ),
        (
            format!("tls_cert = \"{}\"\n", f("shop.crt")),
            String::new(),
            "balancer.tls_cert",
            3,
            "needs `tls_key`",
        ),
        (
            format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                f("shop.crt"),
                f("shop.key")
            ),
            format!(
                "[[balancer.tls_sni]]\nnames = [\"api.test\", \"wrong.test\"]\ncert = \"{}\"\nkey = \"{}\"\n",
                f("api.crt"),
                f("api.key")
            ),
            "balancer.tls_sni.names",
            10,
            "\"wrong.test\": not a DNS name the certificate",
        ),
        (
            format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                f("shop.crt"),
                f("shop.key")
            ),
            format!(
                "[[balancer.tls_sni]]\nnames = [\"api.test\"]\ncert = \"{}\"\nkey = \"{}\"\n\n\
                 [[balancer.tls_sni]]\nnames = [\"API.test\"]\ncert = \"{}\"\nkey = \"{}\"\n",
                f("api.crt"),
                f("api.key"),
                f("api.crt"),
                f("api.key")
            ),
            "balancer.tls_sni.names",
            15,
            "listed for two certificates",
        ),
        (
            String::new(),
            format!(
                "[[balancer.tls_sni]]\nnames = [\"api.test\"]\ncert = \"{}\"\nkey = \"{}\"\n",
                f("api.crt"),
                f("api.key")
            ),
            "balancer.tls_sni",
            7,
            "needs `tls_cert` and `tls_key`",
        ),
    ];
    for (keys, tables, key, line, says) in cases {
        let text = format!(
            "[balancer]\nlisten = \"127.0.0.1:1\"\n{keys}\n[[balancer.upstream]]\naddr = \"127.0.0.1:2\"\n\n{tables}"
        );
        let path = write_config(&text);
        let e = spike::config::Config::load(&path)
            .expect_err(key)
            .to_string();
        let at = format!("{}:{line}: `{key}`: ", path.display());
        assert!(
            e.starts_with(&at) && e.contains(says),
            "{at} ... {says}: {e}"
        );
        common::spike::remove_config(&path);
    }
}

/// A stop lets the streams in flight on an HTTP/2 connection finish (the
/// client gets a GOAWAY, not a reset), and an idle HTTP/2 connection is
/// closed after `keepalive_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_in_flight_finish_at_a_stop_and_idle_h2_connections_expire() {
    let via = Transport::tls();
    let Transport::Tls(certs) = &via else {
        unreachable!()
    };
    let slow = Backend::start("slow").await;
    slow.delay_ms
        .store(700, std::sync::atomic::Ordering::Relaxed);
    let lb = balancer(&via, "round_robin", &[up(slow.addr, 1)], "").await;
    let mut sender = certs.h2(lb.addr).await;
    let in_flight =
        tokio::spawn(async move { h2_send(&mut sender, "GET", "/slow", &[], b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    lb.shutdown().await;
    assert_eq!(in_flight.await.expect("stream"), (200, "slow".to_string()));

    let text = format!(
        "{}\n[server]\nkeepalive_timeout = \"1s\"\n",
        via.config(&config_text(
            "round_robin",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &[up(slow.addr, 1)]
        ))
    );
    slow.delay_ms.store(0, std::sync::atomic::Ordering::Relaxed);
    let lb = Running::start(&text).await;
    let mut sender = certs.h2(lb.addr).await;
    assert_eq!(h2_send(&mut sender, "GET", "/", &[], b"").await.0, 200);
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), sender.ready())
        .await
        .expect("still open in time")
        .expect("open before");
    common::wait_for(
        "the idle h2 connection to close",
        Duration::from_secs(5),
        async || sender.is_closed(),
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    lb.shutdown().await;
}

/// HTTPS/1.1 on the own path, pipelined: 300 requests in one write, more
/// than one read of the path takes (records of 16 KiB, a first read of 1
/// KiB), reads ending where a request ends. Every one is answered, in
/// order, on the one connection: an idle wait looks at rustls's unread
/// plaintext before the socket, which has nothing more to say (without
/// that look, the connection waited for ever with requests in rustls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_https_requests_beyond_one_read_are_all_answered() {
    let certs = Certs::new();
    let backend = Backend::start("b").await;
    let (_lb, addr, _, path) = tls_balancer(&certs, backend.addr);
    let mut s = certs.connect(addr, SHOP, &[b"http/1.1"]).await;
    let mut batch = Vec::new();
    for i in 0..300 {
        // 64 bytes each, so that a read of 8 KiB ends where a request
        // does, and the path waits with the rest still in rustls.
        let mut one = format!("GET /p{i:03} HTTP/1.1\r\nHost: {SHOP}\r\nX-Pad: ");
        let close = if i == 299 {
            "\r\nConnection: close"
        } else {
            ""
        };
        while one.len() + close.len() + 4 < 64 {
            one.push('x');
        }
        one.push_str(close);
        one.push_str("\r\n\r\n");
        if i < 299 {
            assert_eq!(one.len(), 64);
        }
        batch.extend_from_slice(one.as_bytes());
    }
    assert!(batch.len() > 8 * 1024, "{}", batch.len());
    let answers = balancer_support::tls::exchange(&mut s, &batch, false).await;
    assert_eq!(
        answers.matches("HTTP/1.1 200").count(),
        300,
        "{}",
        &answers[answers.len().saturating_sub(300)..]
    );
    common::spike::remove_config(&path);
}

/// How long an idle HTTPS/1.1 keep-alive connection stays open while its
/// client dribbles a TLS record a byte every 500 ms after one request
/// (`keepalive_timeout` and `header_read_timeout` 1 s); `None` if it is
/// still open after 6 s.
async fn dribbled_record_closed_after(fast_path: bool) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let certs = Certs::new();
    let backend = Backend::start("b").await;
    let (addr, admin) = (common::free_addr(), common::free_addr());
    let text = format!(
        "[balancer]\nlisten = \"{addr}\"\nadmin = \"{admin}\"\nfast_path = {fast_path}\n{}\n[server]\nkeepalive_timeout = \"1s\"\nheader_read_timeout = \"1s\"\n",
        certs.with_upstream(backend.addr)
    );
    let path = write_config(&text);
    let _p = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("path")]);
    wait_listening(&addr.to_string(), Duration::from_secs(15));
    let mut s = certs.connect(addr, SHOP, &[b"http/1.1"]).await;
    s.write_all(format!("GET /a HTTP/1.1\r\nHost: {SHOP}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    s.flush().await.expect("flush");
    let answer = read_response(&mut s).await;
    assert!(answer.contains(" 200 "), "{answer}");
    // Under the TLS session: a record's header, then its body a byte at a
    // time, so that no plaintext ever comes of it.
    let tcp = &mut s.get_mut().0;
    tcp.write_all(&[0x17, 0x03, 0x03, 0x00, 0x40])
        .await
        .expect("record header");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let closed = loop {
        if started.elapsed() > Duration::from_secs(6) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if tcp.write_all(&[0x41]).await.is_err() {
            break Some(started.elapsed());
        }
        if let Ok(read) = tokio::time::timeout(Duration::from_millis(10), tcp.read(&mut buf)).await
        {
            // Whatever came (close_notify, an alert, the end): it is over.
            let _ = read;
            break Some(started.elapsed());
        }
    };
    common::spike::remove_config(&path);
    closed
}

/// A reviewer's finding on the HTTPS fast path: ciphertext that never
/// becomes a whole record restarted the keep-alive wait at every byte, so
/// a client dribbling one kept its connection (and looked freshly idle to
/// the connection cap) as long as it liked; hyper's path closed it at the
/// header timeout. Both close it within a few seconds now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dribbled_tls_record_does_not_keep_an_idle_connection() {
    for fast_path in [true, false] {
        let closed = dribbled_record_closed_after(fast_path).await;
        assert!(
            closed.is_some_and(|t| t < Duration::from_secs(4)),
            "fast_path = {fast_path}: {closed:?}"
        );
    }
}
