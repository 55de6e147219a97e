//! Keep-alive clients of a real `spike node` process. Between requests the
//! socket is taken back from hyper so that an idle connection holds no
//! buffer; these tests hold that to what a client must see: every request on
//! a kept-alive connection answered in order (one after another, pipelined,
//! or dribbled in pieces), idle ones closed after `keepalive_timeout` or at
//! shutdown, and 10,000 that have each made a request costing little memory.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::spike::{SpikeProcess, remove_config};

fn start_node(event: &str, server: &str) -> (SpikeProcess, SocketAddr, std::path::PathBuf) {
    common::spike::start_node(event, 100_000, &format!("[server]\n{server}"))
}

/// `server` with `max_connections = 16` added when `crowd` is set.
fn crowd_or_not(crowd: bool, server: &str) -> String {
    if crowd {
        format!("{server}\n{CROWDED}")
    } else {
        server.to_string()
    }
}

/// One response read off a kept-alive connection: status, whether it asked
/// to close, and the body (framed by `Content-Length`).
struct Answer {
    status: u16,
    closes: bool,
    body: String,
}

fn read_answer(reader: &mut BufReader<TcpStream>) -> Answer {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status line");
    let status = status_line
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {status_line:?}"));
    let mut length = 0usize;
    let mut closes = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().expect("content-length");
        }
        if lower.starts_with("connection:") && lower.contains("close") {
            closes = true;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).expect("body");
    Answer {
        status,
        closes,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn connect(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let reader = BufReader::new(s.try_clone().expect("clone"));
    (s, reader)
}

fn buy(user: &str) -> String {
    format!("GET /buy/ticket?user={user} HTTP/1.1\r\nHost: x\r\n\r\n")
}

/// Whether the server has closed the connection (a read sees end-of-file
/// within `limit`).
fn closed_within(reader: &mut BufReader<TcpStream>, limit: Duration) -> bool {
    reader
        .get_ref()
        .set_read_timeout(Some(limit))
        .expect("timeout");
    let mut byte = [0u8; 1];
    matches!(reader.read(&mut byte), Ok(0))
}

/// `max_connections = 16` makes two open connections a crowd (more than a
/// sixteenth), so every idle connection is handed back between requests:
/// the path under test. `crowd` is that second connection.
fn crowded(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let (mut s, mut r) = connect(addr);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    assert_eq!(read_answer(&mut r).status, 200);
    (s, r)
}

const CROWDED: &str = "max_connections = 16";

#[test]
fn one_connection_serves_requests_one_by_one_pipelined_and_in_pieces() {
    let (_node, addr, path) = start_node("ka-order", CROWDED);
    let _crowd = crowded(addr);
    let (mut s, mut r) = connect(addr);

    // One after another, with pauses that let the socket go idle.
    for i in 0..3 {
        s.write_all(buy(&format!("seq{i}")).as_bytes())
            .expect("write");
        let a = read_answer(&mut r);
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(
            a.body.contains(&format!("\"buyer\":\"seq{i}\"")),
            "{}",
            a.body
        );
        assert!(!a.closes);
        std::thread::sleep(Duration::from_millis(50));
    }

    // Pipelined: three requests in one write, three answers in order.
    let three = format!("{}{}{}", buy("p0"), buy("p1"), buy("p2"));
    s.write_all(three.as_bytes()).expect("write");
    for i in 0..3 {
        let a = read_answer(&mut r);
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(
            a.body.contains(&format!("\"buyer\":\"p{i}\"")),
            "{}",
            a.body
        );
    }

    // A head dribbled in pieces.
    let head = buy("pieces");
    let (first, rest) = head.split_at(7);
    s.write_all(first.as_bytes()).expect("write");
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(rest.as_bytes()).expect("write");
    let a = read_answer(&mut r);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("\"buyer\":\"pieces\""), "{}", a.body);

    // A POST with its body, then another request on the same connection.
    s.write_all(
        b"POST /buy/ticket?user=posted HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde",
    )
    .expect("write");
    let a = read_answer(&mut r);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("\"buyer\":\"posted\""), "{}", a.body);
    s.write_all(buy("after-post").as_bytes()).expect("write");
    assert_eq!(read_answer(&mut r).status, 200);
    remove_config(&path);
}

/// The node answers `/buy` without reading the body. When the body's tail
/// arrives after the answer, hyper drains what it can and otherwise closes
/// the connection; the tail must never be read as the next request.
#[test]
fn a_body_tail_that_arrives_late_is_never_read_as_a_request() {
    let (_node, addr, path) = start_node("ka-tail", CROWDED);
    let _crowd = crowded(addr);
    let (mut s, mut r) = connect(addr);
    s.write_all(b"POST /buy/ticket?user=tail HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
        .expect("write");
    let a = read_answer(&mut r);
    assert_eq!(a.status, 200, "{}", a.body);
    std::thread::sleep(Duration::from_millis(100));
    let next = format!("cde{}", buy("after-tail"));
    if s.write_all(next.as_bytes()).is_ok() {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => {} // closed: the client retries on a new connection
            Ok(_) => assert!(line.starts_with("HTTP/1.1 200"), "{line}"),
        }
    }
    remove_config(&path);
}

/// Silent for `keepalive_timeout`: closed, whether the connection still
/// holds its hyper connection (few clients) or was handed back (a crowd).
#[test]
fn an_idle_keep_alive_connection_is_closed_after_keepalive_timeout() {
    for crowd in [false, true] {
        let server = crowd_or_not(crowd, "keepalive_timeout = \"400ms\"");
        let (_node, addr, path) = start_node("ka-timeout", &server);
        let _crowd = crowd.then(|| crowded(addr));
        let (mut s, mut r) = connect(addr);
        // Requests closer together than the timeout keep it open.
        for i in 0..4 {
            s.write_all(buy(&format!("k{i}")).as_bytes())
                .expect("write");
            assert_eq!(read_answer(&mut r).status, 200, "crowd {crowd}");
            std::thread::sleep(Duration::from_millis(200));
        }
        // Then silence: closed by the server.
        assert!(
            closed_within(&mut r, Duration::from_secs(3)),
            "crowd {crowd}"
        );
        remove_config(&path);
    }
}

#[test]
fn idle_keep_alive_connections_are_closed_at_shutdown_without_waiting_for_grace() {
    for crowd in [false, true] {
        let server = crowd_or_not(crowd, "grace_period = \"20s\"");
        let (mut node, addr, path) = start_node("ka-stop", &server);
        let _crowd = crowd.then(|| crowded(addr));
        let (mut s, mut r) = connect(addr);
        s.write_all(buy("before-stop").as_bytes()).expect("write");
        assert_eq!(read_answer(&mut r).status, 200);
        node.signal("TERM");
        assert!(
            closed_within(&mut r, Duration::from_secs(3)),
            "crowd {crowd}"
        );
        node.expect_clean_exit(Duration::from_secs(5));
        remove_config(&path);
    }
}

/// The figure: a server holding 10,000 keep-alive clients, each of
/// which has made a request (100 at a time) and is now idle, stays well under
/// 64 MiB. Before the socket was handed back between requests (past the
/// first 1,024 clients), hyper's two 8 KiB buffers per connection made this
/// about 200 MiB.
#[test]
fn ten_thousand_idle_keep_alive_clients_cost_little() {
    let (node, addr, path) = start_node("ka-memory", "");
    let pid = node.child.id();
    let before = common::rss_kib(pid);
    let mut held = Vec::with_capacity(10_000);
    for batch in 0..100 {
        let mut group = Vec::with_capacity(100);
        for i in 0..100 {
            let (mut s, r) = connect(addr);
            s.write_all(
                format!("GET /healthz?c={batch}-{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
            )
            .expect("write");
            group.push((s, r));
        }
        for (s, mut r) in group {
            assert_eq!(read_answer(&mut r).status, 200);
            held.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = common::rss_kib(pid);
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!("rss {before} KiB -> {after} KiB with 10,000 idle keep-alive clients");
    assert!(
        grown_mib < 64,
        "10,000 idle keep-alive clients cost {grown_mib} MiB"
    );
    // They are still open: one more request on the first one is answered.
    let first = held.swap_remove(0);
    let mut r = BufReader::new(first.try_clone().expect("clone"));
    (&first)
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    assert_eq!(read_answer(&mut r).status, 200);
    drop(held);
    remove_config(&path);
}
