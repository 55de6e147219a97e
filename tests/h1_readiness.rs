//! The fast path marks a socket not readable after a short read, so that
//! the next read waits for the next readiness event instead of making a
//! `recv` that only says `EAGAIN`. Done wrong, that loses a wakeup: the
//! event for bytes that came just after the read is cleared with the old
//! one, and the connection sleeps until a timeout. These tests run the
//! balancer on a multi-threaded runtime (its I/O driver then runs on
//! whichever thread is free, as in `spike up`) and dribble bytes both ways
//! with tiny, varying gaps, so that events land between reads and clears
//! over and over; every answer must come long before any timeout could
//! have fired.

mod balancer_support;
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use balancer_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A small deterministic generator, so a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Waits a few microseconds, or not at all, or only yields: the gaps in
/// which a readiness event may land between a read and its clearing.
async fn gap(rng: &mut Lcg) {
    match rng.next() % 4 {
        0 => {}
        1 => tokio::task::yield_now().await,
        _ => tokio::time::sleep(Duration::from_micros(rng.next() % 300)).await,
    }
}

/// A backend that answers every GET on a keep-alive connection with its
/// path as the body, the response written in three pieces with gaps.
async fn dribbling_backend(seed: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut conn_no = 0u64;
        while let Ok((mut s, _)) = listener.accept().await {
            conn_no += 1;
            let mut rng = Lcg(seed ^ conn_no);
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("?").as_bytes().to_vec();
                        let top = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", path.len());
                        for piece in [top.as_bytes(), b"\r\n", &path] {
                            if s.write_all(piece).await.is_err() {
                                return;
                            }
                            gap(&mut rng).await;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response with a `Content-Length` body off `s`, keeping what
/// came after it in `rest`; `None` when nothing whole came within `limit`.
async fn read_one(s: &mut TcpStream, rest: &mut Vec<u8>, limit: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(rest, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if rest.len() >= end + 4 + length {
                let body = rest[end + 4..end + 4 + length].to_vec();
                rest.drain(..end + 4 + length);
                return Some(body);
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => rest.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Many keep-alive clients, each sending requests in two pieces with gaps
/// (and now and then two at once, pipelined), through a balancer with two
/// worker threads to a backend that dribbles its answers: every answer
/// comes, in order, and none waits for a timeout (they are all 30 s here,
/// and a lost wakeup would hold its connection until one fired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dribbled_bytes_both_ways_never_wait_for_a_timeout() {
    let backend = dribbling_backend(0x5eed).await;
    let text = config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(backend, 1)],
    )
    .replace("response_timeout = \"5s\"", "response_timeout = \"30s\"")
    .replace(
        "connect_timeout = \"1s\"",
        "connect_timeout = \"1s\"\nread_timeout = \"30s\"\nsend_timeout = \"30s\"",
    ) + "\n[server]\nkeepalive_timeout = \"30s\"\nheader_read_timeout = \"30s\"\n";
    let lb = Running::start_workers(&text, 2).await;

    const CLIENTS: u64 = 16;
    const REQUESTS: u64 = 120;
    // Far below every timeout of the balancer: a lost wakeup shows here.
    let patience = Duration::from_secs(5);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let addr = lb.addr;
        tasks.push(tokio::spawn(async move {
            let mut rng = Lcg(c + 1);
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            let mut rest = Vec::new();
            let mut r = 0;
            while r < REQUESTS {
                // One request, or two pipelined.
                let batch = if rng.next().is_multiple_of(5) { 2 } else { 1 }.min(REQUESTS - r);
                let mut bytes = Vec::new();
                for k in 0..batch {
                    bytes.extend_from_slice(
                        format!("GET /c{c}/r{} HTTP/1.1\r\nHost: a\r\n\r\n", r + k).as_bytes(),
                    );
                }
                let cut = 1 + (rng.next() as usize) % (bytes.len() - 1);
                s.write_all(&bytes[..cut]).await.expect("write");
                gap(&mut rng).await;
                s.write_all(&bytes[cut..]).await.expect("write");
                for k in 0..batch {
                    let want = format!("/c{c}/r{}", r + k);
                    let started = tokio::time::Instant::now();
                    match read_one(&mut s, &mut rest, patience).await {
                        Some(body) => assert_eq!(
                            String::from_utf8_lossy(&body),
                            want,
                            "client {c}: answers out of order"
                        ),
                        None => panic!(
                            "client {c}: no answer to {want} after {:?}: a wakeup was lost",
                            started.elapsed()
                        ),
                    }
                }
                r += batch;
                gap(&mut rng).await;
            }
            r
        }));
    }
    let mut answered = 0;
    for t in tasks {
        answered += t.await.expect("client task");
    }
    assert_eq!(answered, CLIENTS * REQUESTS);
    lb.shutdown().await;
}
