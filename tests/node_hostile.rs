//! Hostile and broken clients against a real `spike node` process: each gets a
//! clear, cheap answer and the node stays healthy and keeps selling.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::spike::{SpikeProcess, remove_config};

fn start_node(extra: &str) -> (SpikeProcess, SocketAddr, std::path::PathBuf) {
    common::spike::start_node("hostile", 1000, extra)
}

/// Sends raw bytes and returns what came back before the server closed or
/// `limit` passed.
fn exchange(addr: SocketAddr, raw: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(limit)).expect("timeout");
    let _ = s.write_all(raw);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn status_of(answer: &str) -> &str {
    answer.get(9..12).unwrap_or("")
}

fn buy(addr: SocketAddr, user: &str) -> String {
    exchange(
        addr,
        format!("GET /buy/ticket?user={user} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(5),
    )
}

#[test]
fn oversized_and_malformed_requests_get_4xx() {
    let (_node, addr, path) = start_node("");
    let long_uri = format!(
        "GET /buy/ticket?user=a&pad={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "p".repeat(10_000)
    );
    assert_eq!(
        status_of(&exchange(addr, long_uri.as_bytes(), Duration::from_secs(5))),
        "414"
    );

    let huge_header = format!(
        "GET /buy/ticket?user=a HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "h".repeat(120_000)
    );
    assert_eq!(
        status_of(&exchange(
            addr,
            huge_header.as_bytes(),
            Duration::from_secs(5)
        )),
        "431"
    );

    let mut many = String::from("GET /buy/ticket?user=a HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(
        status_of(&exchange(addr, many.as_bytes(), Duration::from_secs(5))),
        "431"
    );

    let garbage = exchange(
        addr,
        b"\x16\x03\x01 this is not http\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(status_of(&garbage), "400", "{garbage}");

    let body = format!(
        "POST /buy/ticket?user=a HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{}",
        "b".repeat(5000)
    );
    assert_eq!(
        status_of(&exchange(addr, body.as_bytes(), Duration::from_secs(5))),
        "413"
    );
    let chunked = "POST /buy/ticket?user=a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    assert_eq!(
        status_of(&exchange(addr, chunked.as_bytes(), Duration::from_secs(5))),
        "413"
    );

    let bad_ids = ["", "a%00b", "a\u{7f}b", "has space", &"z".repeat(65)];
    for id in bad_ids {
        let raw = format!(
            "GET /buy/ticket HTTP/1.1\r\nHost: x\r\nX-User-Id: {id}\r\nConnection: close\r\n\r\n"
        );
        let answer = exchange(addr, raw.as_bytes(), Duration::from_secs(5));
        assert_eq!(status_of(&answer), "400", "{id:?}: {answer}");
    }
    let answer = exchange(
        addr,
        b"PUT /buy/ticket?user=a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(status_of(&answer), "405");
    assert!(
        answer.to_ascii_lowercase().contains("allow: get, post"),
        "{answer}"
    );
    assert_eq!(
        status_of(&buy(addr, "after-the-garbage")),
        "200",
        "the node still sells"
    );
    remove_config(&path);
}

/// A client that dribbles its headers is closed by the header-read timeout,
/// and others are served meanwhile.
#[test]
fn slow_header_dribblers_are_cut_off() {
    let (_node, addr, path) = start_node("[server]\nheader_read_timeout = \"1s\"\n");
    let mut slow = TcpStream::connect(addr).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let start = Instant::now();
    let mut closed_after = None;
    for b in b"GET /buy/ticket?user=slow HTTP/1.1\r\nHost: x\r\nX-Slow: 1234567890\r\n".iter() {
        if slow.write_all(&[*b]).is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if closed_after.is_none() {
        let mut buf = [0u8; 512];
        let n = slow.read(&mut buf).unwrap_or(0);
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
        closed_after = Some(start.elapsed());
    }
    let after = closed_after.expect("closed");
    assert!(
        after < Duration::from_secs(8),
        "dribbler kept for {after:?}"
    );
    assert_eq!(status_of(&buy(addr, "patient")), "200");
    remove_config(&path);
}

/// 10,000 connections that never send a byte: memory stays bounded, a new
/// client is still served, and the idle ones are closed after the
/// header-read timeout.
#[test]
fn ten_thousand_idle_connections_cost_little() {
    let (node, addr, path) = start_node("[server]\nheader_read_timeout = \"4s\"\n");
    let pid = node.child.id();
    let before = common::rss_kib(pid);
    let idle: Vec<TcpStream> = (0..10_000)
        .map(|_| TcpStream::connect(addr).expect("idle connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        status_of(&buy(addr, "newcomer")),
        "200",
        "a new client is served"
    );
    let with_idle = common::rss_kib(pid);
    let grown_mib = with_idle.saturating_sub(before) / 1024;
    eprintln!("rss {before} KiB -> {with_idle} KiB with 10,000 idle connections");
    assert!(
        grown_mib < 48,
        "10,000 idle connections cost {grown_mib} MiB"
    );
    // After the header-read timeout the node has closed them.
    std::thread::sleep(Duration::from_secs(5));
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    assert_eq!(
        first.read(&mut buf).unwrap_or(0),
        0,
        "idle connection was closed"
    );
    drop(idle);
    assert_eq!(status_of(&buy(addr, "later")), "200");
    remove_config(&path);
}
