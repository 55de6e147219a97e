//! The fast path against hyper's server (issue 13): a corpus of ordinary
//! and hostile requests, each sent on its own connection to two balancers
//! over recording backends, one with the fast path on and one with
//! `fast_path = false` (hyper's server and client, the reference). What
//! reaches the backend must be the same (request line, header lines with
//! names in lower case and the generated `Idempotency-Key` blanked, the
//! body and its framing), and so must the status lines the client gets:
//! the fast path is equal, or it hands the request to hyper. Each case
//! also says which path must take it, read from the balancer's
//! `general_connections` count, so the comparison is known to have run
//! the fast path where it should.

mod balancer_support;
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as a backend read it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Received {
    line: String,
    /// (lower-cased name, value), stable-sorted by name.
    headers: Vec<(String, String)>,
    /// "length", "chunked" or "none".
    framing: &'static str,
    body: Vec<u8>,
}

/// A backend that records every request it reads and answers each with a
/// small 200.
struct RecordingBackend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingBackend {
    async fn start() -> RecordingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(r) = read_one(&mut stream, &mut buf).await {
                        record.lock().expect("lock").push(r);
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RecordingBackend { addr, seen, task }
    }

    /// What it read, its own address (a Host the balancer filled in for
    /// an HTTP/1.0 client) written as `<upstream>`.
    fn take(&self) -> Vec<Received> {
        let own = self.addr.to_string();
        let mut seen = std::mem::take(&mut *self.seen.lock().expect("lock"));
        for r in &mut seen {
            for (_, value) in &mut r.headers {
                if *value == own {
                    *value = "<upstream>".to_owned();
                }
            }
        }
        seen
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await.ok()?;
    if n == 0 {
        return None;
    }
    buf.extend_from_slice(&chunk[..n]);
    Some(())
}

/// Reads one request from `stream` (bytes left over stay in `buf`).
async fn read_one(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Received> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(stream, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end - 4]).into_owned();
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("").to_owned();
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut length = None;
    let mut chunked = false;
    let mut client_key = false;
    for l in lines {
        let (name, value) = l.split_once(':').unwrap_or((l, ""));
        let name = name.to_ascii_lowercase();
        let value = value.trim().to_owned();
        match name.as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            _ => {}
        }
        if name == "idempotency-key"
            && !(value.len() == 32 && value.bytes().all(|c| c.is_ascii_hexdigit()))
        {
            client_key = true;
        }
        headers.push((name, value));
    }
    for (name, value) in headers.iter_mut() {
        if name == "idempotency-key" && !client_key {
            // Made by the balancer: random, so only its presence counts.
            *value = "<generated>".to_owned();
        }
    }
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let (framing, body) = if chunked {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(stream, buf).await?;
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let size =
                usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).ok()?;
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers, to the blank line.
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                            break i;
                        }
                        fill(stream, buf).await?;
                    };
                    buf.drain(..end + 2);
                    if end == 0 {
                        break;
                    }
                }
                break;
            }
            while buf.len() < size + 2 {
                fill(stream, buf).await?;
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
        ("chunked", body)
    } else if let Some(n) = length {
        while buf.len() < n {
            fill(stream, buf).await?;
        }
        ("length", buf.drain(..n).collect())
    } else {
        ("none", Vec::new())
    };
    Some(Received {
        line,
        headers,
        framing,
        body,
    })
}

/// Sends `bytes` on a new connection and returns the status line of every
/// response read until the balancer closes or stays silent for 2.5 s (a
/// half-close would end hyper's connection before it answers).
async fn exchange(to: SocketAddr, bytes: &[u8]) -> Vec<String> {
    let mut stream = TcpStream::connect(to).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(2500), stream.read(&mut chunk)).await
    {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    text.match_indices("HTTP/1.")
        .filter(|(i, _)| *i == 0 || text[..*i].ends_with('\n') || text[..*i].ends_with("ok"))
        .map(|(i, _)| text[i..].split("\r\n").next().unwrap_or("").to_owned())
        .collect()
}

async fn general_connections(admin: SocketAddr) -> u64 {
    let client = http();
    let body = get_ok(&client, &format!("http://{admin}/status")).await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("status json");
    v["fast_path"]["general_connections"]
        .as_u64()
        .expect("general_connections")
}

/// Which path must take a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Fast,
    General,
}

fn corpus() -> Vec<(&'static str, Vec<u8>, Path)> {
    use Path::*;
    let mut c: Vec<(&'static str, Vec<u8>, Path)> = vec![
        ("plain get", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), Fast),
        (
            "browser-like get",
            b"GET /events/42?from=home&x=%20y HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: t/1\r\nAccept: */*\r\nAccept-Encoding: gzip, br\r\nCookie: a=b; c=d\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "forwarded-for lines join",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nX-A: 1\r\nX-Forwarded-For: 2.2.2.2, 3.3.3.3\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "real ip spoof",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Real-IP: 6.6.6.6\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "underscored names dropped",
            b"GET / HTTP/1.1\r\nHost: a\r\nX_Real_IP: 6.6.6.6\r\nTransfer_Encoding: chunked\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "hop-by-hop dropped",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\nProxy-Connection: keep-alive\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "purchase gets a key",
            b"POST /buy/ticket?user=u1 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "purchase with its key",
            b"POST /buy/ticket HTTP/1.1\r\nHost: a\r\nX-User-Id: u2\r\nIdempotency-Key: \"k-1\"\r\n\r\n".to_vec(),
            Fast,
        ),
        // Only a balancer says it made a key: a client's mark is dropped,
        // with its own key or with the one the balancer makes (and marks).
        (
            "purchase with its key and a forged mark",
            b"POST /buy/ticket HTTP/1.1\r\nHost: a\r\nX-User-Id: u2\r\nIdempotency-Key: k-2\r\nSpike-Made-Key: 1\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "purchase with a forged mark",
            b"GET /buy/ticket?user=u6 HTTP/1.1\r\nHost: a\r\nspike-made-key: yes\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "purchase with two keys",
            b"POST /buy/ticket HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\nIdempotency-Key: k2\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "get purchase",
            b"GET /buy/ticket?user=u3 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Fast,
        ),
        // A sale's own purchase path (several sales in one fleet): a key
        // generated as for /buy/ticket, so that a retry sells once.
        (
            "event purchase gets a key",
            b"GET /events/e1/buy?user=u4 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "event purchase by post gets a key",
            b"POST /events/e-2/buy?user=u5 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "post with a body",
            b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            Fast,
        ),
        (
            "post without a length",
            b"POST /form HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "put delete options patch head",
            b"PUT /r HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcDELETE /r HTTP/1.1\r\nHost: a\r\n\r\nOPTIONS /r HTTP/1.1\r\nHost: a\r\n\r\nPATCH /r HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nxHEAD /r HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "pipelined gets",
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "name case, spaces, tabs, obs-text, empty value",
            b"GET / HTTP/1.1\r\nhOsT: a\r\nX-A:   v  \r\nX-B: a\tb\r\nX-C: caf\xe9\r\nX-Empty:\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "path characters",
            b"GET /a;b=c/@d:e/~f/%2e%2E/(g)*+,$!'/? HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "authorities",
            b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\nGET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "connection close",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "bare LF line ends",
            b"GET / HTTP/1.1\nHost: a\nX-A: 1\n\n".to_vec(),
            Fast,
        ),
        (
            "body cut off",
            b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello".to_vec(),
            Fast,
        ),
        // HTTP/1.0 as `ab` sends it: closed after the answer.
        (
            "http/1.0 with host",
            b"GET /ab HTTP/1.0\r\nHost: a\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "http/1.0 post",
            b"POST /form HTTP/1.0\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            Fast,
        ),
        // What the fast path leaves to hyper.
        ("http/1.0", b"GET / HTTP/1.0\r\n\r\n".to_vec(), General),
        (
            "http/1.0 upgrade",
            b"GET / HTTP/1.0\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n".to_vec(),
            General,
        ),
        (
            "http/1.0 keep-alive",
            b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n".to_vec(),
            General,
        ),
        ("http/0.9", b"GET /\r\n\r\n".to_vec(), General),
        ("http/2.0 line", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n".to_vec(), General),
        ("lower-case method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), General),
        ("unknown method", b"PROPFIND / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), General),
        ("connect", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n".to_vec(), General),
        ("trace", b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), General),
        (
            "length and chunked",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            General,
        ),
        (
            "two different lengths",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(),
            General,
        ),
        (
            "two equal lengths",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab".to_vec(),
            General,
        ),
        ("signed length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +2\r\n\r\nab".to_vec(), General),
        ("hex length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x2\r\n\r\nab".to_vec(), General),
        ("listed length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\nab".to_vec(), General),
        ("negative length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n".to_vec(), General),
        (
            "chunked",
            b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n".to_vec(),
            General,
        ),
        (
            "gzip then chunked",
            b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(),
            General,
        ),
        (
            "chunked then gzip",
            b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n".to_vec(),
            General,
        ),
        (
            "identity coding",
            b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n".to_vec(),
            General,
        ),
        (
            "space before colon",
            b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".to_vec(),
            General,
        ),
        (
            "chunk size overflow",
            b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nx\r\n0\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "chunk size 2^64-1",
            b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nxxxxxxxx".to_vec(),
            Fast,
        ),
        (
            "chunk over max_body",
            b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n200000\r\nxxxxxxxx".to_vec(),
            Fast,
        ),
        (
            "chunk size junk",
            b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5x\r\nhello\r\n0\r\n\r\n".to_vec(),
            Fast,
        ),
        (
            "chunk without its CRLF",
            b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n".to_vec(),
            Fast,
        ),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n".to_vec(), General),
        ("bare CR", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n".to_vec(), General),
        ("NUL in value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n".to_vec(), General),
        ("bad name", b"GET / HTTP/1.1\r\nHost: a\r\nX@Y: 1\r\n\r\n".to_vec(), General),
        ("space in name", b"GET / HTTP/1.1\r\nHost: a\r\nX Y: 1\r\n\r\n".to_vec(), General),
        ("no host", b"GET / HTTP/1.1\r\n\r\n".to_vec(), General),
        ("empty host", b"GET / HTTP/1.1\r\nHost: \r\n\r\n".to_vec(), General),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: good.example\r\nHost: evil.example\r\n\r\n".to_vec(), General),
        ("host with space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n".to_vec(), General),
        ("host with path", b"GET / HTTP/1.1\r\nHost: a/../b\r\n\r\n".to_vec(), General),
        ("absolute form", b"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), General),
        ("asterisk", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), General),
        ("fragment", b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), General),
        ("quote and braces", b"GET /a\"{b}| HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), General),
        ("non-ascii target", b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), General),
        (
            "expect continue",
            b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello".to_vec(),
            General,
        ),
        (
            // A whole WebSocket handshake (a GET) is the fast path's own
            // tunnel (tests/upgrade.rs); anything short of one is hyper's.
            "upgrade without connection: upgrade",
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n".to_vec(),
            General,
        ),
        (
            "upgrade on a POST",
            b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n".to_vec(),
            General,
        ),
        (
            "connection names a header",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\r\n".to_vec(),
            General,
        ),
        (
            "body over max_body",
            b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\nxx".to_vec(),
            General,
        ),
        (
            "body over the replay limit",
            {
                let mut r = b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 70000\r\n\r\n".to_vec();
                r.resize(r.len() + 70_000, b'z');
                r
            },
            General,
        ),
    ];
    let mut many = b"GET /many HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..98 {
        many.extend_from_slice(format!("X-H{i}: {i}\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    c.push(("99 header lines", many, Path::Fast));
    let mut too_many = b"GET /many HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..101 {
        too_many.extend_from_slice(format!("X-H{i}: {i}\r\n").as_bytes());
    }
    too_many.extend_from_slice(b"\r\n");
    c.push(("101 header lines", too_many, Path::General));
    let mut long_value = b"GET /long HTTP/1.1\r\nHost: a\r\nX-Long: ".to_vec();
    long_value.resize(long_value.len() + 8_000, b'v');
    long_value.extend_from_slice(b"\r\n\r\n");
    c.push(("8 KB value", long_value, Path::Fast));
    let mut huge_head = b"GET /huge HTTP/1.1\r\nHost: a\r\nX-Long: ".to_vec();
    huge_head.resize(huge_head.len() + 20_000, b'v');
    huge_head.extend_from_slice(b"\r\n\r\n");
    c.push(("20 KB head", huge_head, Path::General));
    c
}

/// What one case came to through both balancers.
struct Outcome {
    name: &'static str,
    path: Path,
    took: Path,
    fast_statuses: Vec<String>,
    general_statuses: Vec<String>,
    got_fast: Vec<Received>,
    got_general: Vec<Received>,
}

/// Runs one case on a pair of balancers and backends of its own, so that
/// the cases can run at once.
async fn run_case(name: &'static str, bytes: Vec<u8>, path: Path) -> Outcome {
    let fast_backend = RecordingBackend::start().await;
    let general_backend = RecordingBackend::start().await;
    let text = |addr| {
        config_text("round_robin", "127.0.0.1:0", "127.0.0.1:0", &[up(addr, 1)])
            .replace("[balancer]\n", "[balancer]\nbody_timeout = \"1s\"\n")
    };
    let fast = Running::start(&text(fast_backend.addr)).await;
    let general = Running::start(
        &text(general_backend.addr).replace("[balancer]\n", "[balancer]\nfast_path = false\n"),
    )
    .await;
    let (fast_statuses, general_statuses) =
        tokio::join!(exchange(fast.addr, &bytes), exchange(general.addr, &bytes));
    let took = if general_connections(fast.admin).await == 0 {
        Path::Fast
    } else {
        Path::General
    };
    let outcome = Outcome {
        name,
        path,
        took,
        fast_statuses,
        general_statuses,
        got_fast: fast_backend.take(),
        got_general: general_backend.take(),
    };
    fast.shutdown().await;
    general.shutdown().await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_forwards_what_hyper_forwards_or_hands_it_over() {
    let mut cases = tokio::task::JoinSet::new();
    for (name, bytes, path) in corpus() {
        cases.spawn(run_case(name, bytes, path));
    }
    let mut fast_cases = 0;
    let mut answered = 0;
    let mut first_status = std::collections::HashMap::new();
    while let Some(done) = cases.join_next().await {
        let o = done.expect("case task");
        let name = o.name;
        assert_eq!(o.took, o.path, "{name}: taken by the wrong path");
        if o.fast_statuses == o.general_statuses {
            assert_eq!(
                o.got_fast, o.got_general,
                "{name}: the backend got something else"
            );
        } else {
            // Only a refusal may differ: a 4xx where hyper's path did
            // something else, and nothing more reached the backend.
            let refused = o
                .fast_statuses
                .last()
                .is_some_and(|s| s.starts_with("HTTP/1.1 4"));
            assert!(
                refused && o.got_general.starts_with(&o.got_fast),
                "{name}: answered {:?} where hyper's path answered {:?}",
                o.fast_statuses,
                o.general_statuses
            );
        }
        first_status.insert(name, o.fast_statuses.first().cloned().unwrap_or_default());
        if o.path == Path::Fast {
            fast_cases += 1;
            assert!(!o.fast_statuses.is_empty(), "{name}: no answer");
        }
        answered += usize::from(!o.got_fast.is_empty());
    }
    assert!(
        fast_cases >= 20,
        "only {fast_cases} cases ran the fast path"
    );
    // Chunk sizes are checked before hyper reads the body (finding 8):
    // past 2^63 - 1 a 400, past max_body a 413, at once.
    for (name, status) in [
        ("chunk size 2^64-1", "HTTP/1.1 400 Bad Request"),
        ("chunk over max_body", "HTTP/1.1 413 Payload Too Large"),
        ("chunk size junk", "HTTP/1.1 400 Bad Request"),
    ] {
        assert_eq!(first_status[name], status, "{name}");
    }
    assert!(answered >= 25, "only {answered} cases reached a backend");
}

/// A backend that answers `GET /r/N` (or `HEAD /r/N`) with the `N`th of
/// `responses` as raw bytes, closing after it when the response says so.
async fn canned_backend(
    responses: Arc<Vec<(&'static str, Vec<u8>, bool)>>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let responses = responses.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(r) = read_one(&mut stream, &mut buf).await {
                    let n: usize = r
                        .line
                        .split(' ')
                        .nth(1)
                        .and_then(|t| t.strip_prefix("/r/"))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let Some((_, bytes, close)) = responses.get(n) else {
                        return;
                    };
                    if stream.write_all(bytes).await.is_err() || *close {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// A 100 KiB chunked response, in 1 KiB chunks.
fn big_chunked_response() -> Vec<u8> {
    let mut big_chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for i in 0..100u8 {
        big_chunked.extend_from_slice(b"400\r\n");
        big_chunked.extend(std::iter::repeat_n(b'a' + i % 26, 1024));
        big_chunked.extend_from_slice(b"\r\n");
    }
    big_chunked.extend_from_slice(b"0\r\n\r\n");
    big_chunked
}

/// Two balancers, each over its own backend answering `responses`: one
/// with the fast path, one with hyper's (`fast_path = false`).
async fn fast_and_general(
    responses: Vec<(&'static str, Vec<u8>, bool)>,
) -> (Running, Running, [tokio::task::JoinHandle<()>; 2]) {
    let responses = Arc::new(responses);
    let (fast_backend, a) = canned_backend(responses.clone()).await;
    let (general_backend, b) = canned_backend(responses).await;
    let text = |addr| config_text("round_robin", "127.0.0.1:0", "127.0.0.1:0", &[up(addr, 1)]);
    let fast = Running::start(&text(fast_backend)).await;
    let general = Running::start(
        &text(general_backend).replace("[balancer]\n", "[balancer]\nfast_path = false\n"),
    )
    .await;
    (fast, general, [a, b])
}

/// What a client made of a response: status, the headers that are not
/// about framing or the hop, and the decoded body; or how it failed.
async fn fetch(
    client: &Http,
    url: &str,
    method: hyper::Method,
) -> Result<(u16, Vec<(String, String)>, Vec<u8>), String> {
    use http_body_util::BodyExt;
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|_| "request failed".to_owned())?;
    let status = res.status().as_u16();
    let mut headers: Vec<(String, String)> = res
        .headers()
        .iter()
        .filter(|(n, _)| {
            !matches!(
                n.as_str(),
                "date" | "content-length" | "transfer-encoding" | "connection"
            )
        })
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    headers.sort();
    let body = tokio::time::timeout(Duration::from_secs(10), res.into_body().collect())
        .await
        .map_err(|_| "body timed out".to_owned())?
        .map_err(|_| "body failed".to_owned())?
        .to_bytes()
        .to_vec();
    Ok((status, headers, body))
}

/// The response side of the same comparison: a backend answers a corpus
/// of ordinary and odd responses, and a client through the fast path gets
/// the same status, headers (those not about framing or the hop) and
/// decoded body as through hyper's client and server, or fails the same
/// way; the fast path relays bodies as they came, hyper decodes and
/// re-encodes them, so the bodies' framing on the wire may differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_reach_the_client_alike_through_both_paths() {
    let big_chunked = big_chunked_response();
    let mut big = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
    big.extend((0..100_000u32).map(|i| b'a' + (i % 26) as u8));
    let responses: Vec<(&'static str, Vec<u8>, bool)> = vec![
        ("length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello".to_vec(), false),
        (
            "chunked with extensions and trailers",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n".to_vec(),
            false,
        ),
        ("until close", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nall of this".to_vec(), true),
        (
            "length beside chunked",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n".to_vec(),
            false,
        ),
        ("no content", b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n".to_vec(), false),
        ("not modified", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"x\"\r\n\r\n".to_vec(), false),
        (
            "early hints first",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            false,
        ),
        (
            "continue first",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            false,
        ),
        ("http/1.0 with length", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(), true),
        ("http/1.0 until close", b"HTTP/1.0 200 OK\r\n\r\nuntil close".to_vec(), true),
        (
            "listed and hop-by-hop headers",
            b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nUpgrade: h2c\r\nTrailer: X-T\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            false,
        ),
        ("two equal lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok".to_vec(), false),
        ("two different lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!".to_vec(), true),
        ("length not digits", b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nok".to_vec(), true),
        ("not http", b"HTTP/1.1 2xx nonsense\r\n\r\n".to_vec(), true),
        (
            "gzip then chunked",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(),
            false,
        ),
        ("odd reason", b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nok".to_vec(), false),
        ("status 500", b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops".to_vec(), false),
        (
            "cookies",
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-B: 2\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n".to_vec(),
            false,
        ),
        ("big length", big, false),
        ("big chunked", big_chunked, false),
        (
            "chunked broken midway",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX".to_vec(),
            true,
        ),
        ("length cut short", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello".to_vec(), true),
    ];
    let names: Vec<&'static str> = responses.iter().map(|r| r.0).collect();
    let (fast, general, _backends) = fast_and_general(responses).await;
    // One client each, keep-alive: every response also has to leave the
    // connection usable for the next (or closed where it must be).
    let (fast_client, general_client) = (http(), http());
    let mut failures = 0;
    for (i, name) in names.iter().enumerate() {
        for method in [hyper::Method::GET, hyper::Method::HEAD] {
            let path = format!("/r/{i}");
            let through_fast = fetch(&fast_client, &fast.url(&path), method.clone()).await;
            let through_general = fetch(&general_client, &general.url(&path), method.clone()).await;
            if method == hyper::Method::HEAD && through_general.is_err() {
                // A backend that sends a body to HEAD is out of step with
                // either path; only GETs of the odd ones count.
                continue;
            }
            if through_fast != through_general {
                // Stricter only: a response whose framing has no one
                // reading is a 502 even to HEAD, where hyper's client
                // does not look at its length.
                let malformed = ["two different lengths", "length not digits"];
                assert!(
                    malformed.contains(name)
                        && method == hyper::Method::HEAD
                        && through_fast.as_ref().is_ok_and(|r| r.0 == 502),
                    "{name} ({method}): {through_fast:?} where hyper's path gave {through_general:?}"
                );
                continue;
            }
            failures += usize::from(
                through_fast.is_err() || through_fast.as_ref().is_ok_and(|r| r.0 == 502),
            );
        }
    }
    // The malformed ones did fail (502 or a cut body) on both.
    assert!(failures >= 5, "only {failures} failures");
    assert_eq!(general_connections(fast.admin).await, 0);
    fast.shutdown().await;
    general.shutdown().await;
}

/// What an HTTP/1.0 client reads on a connection: everything until the
/// balancer closes it (it must), split into the status line and the body
/// (by `Content-Length` when there is one, else all the rest); `None` for
/// a connection left open after 5 s.
async fn read_as_http10(to: SocketAddr, path: &str, method: &str) -> Option<(String, Vec<u8>)> {
    let mut stream = TcpStream::connect(to).await.expect("connect");
    let request =
        format!("{method} {path} HTTP/1.0\r\nHost: a\r\nUser-Agent: ApacheBench/2.3\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
        .await
        .ok()?
        .ok()?;
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head.split("\r\n").next().unwrap_or("").to_owned();
    let length = head.split("\r\n").find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    let mut body = raw[end..].to_vec();
    if let Some(n) = length {
        body.truncate(n);
    }
    if head.to_ascii_lowercase().contains("transfer-encoding") {
        // An HTTP/1.0 client cannot read chunked framing: mark it so that
        // the comparison fails.
        body.splice(0..0, b"[chunked]".iter().copied());
    }
    Some((status, body))
}

/// The fast path takes `ab`'s requests (HTTP/1.0, no keep-alive): each
/// answer must reach the client as through hyper's path, with the same
/// status line, the connection closed after it, and a chunked body sent
/// as its data alone (a 1.0 client cannot read chunks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_what_hyper_gives_them() {
    let responses: Vec<(&'static str, Vec<u8>, bool)> = vec![
        ("length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(), false),
        (
            "chunked, in pieces",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n".to_vec(),
            false,
        ),
        ("until close", b"HTTP/1.1 200 OK\r\n\r\nall of this".to_vec(), true),
        ("no content", b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), false),
        ("status 500", b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops".to_vec(), false),
    ];
    let mut responses = responses;
    responses.push(("big chunked", big_chunked_response(), false));
    let names: Vec<&'static str> = responses.iter().map(|r| r.0).collect();
    let (fast, general, _backends) = fast_and_general(responses).await;
    for (i, name) in names.iter().enumerate() {
        for method in ["GET", "HEAD"] {
            let path = format!("/r/{i}");
            let through_fast = read_as_http10(fast.addr, &path, method).await;
            let through_general = read_as_http10(general.addr, &path, method).await;
            assert!(through_fast.is_some(), "{name} ({method}): not closed");
            assert_eq!(through_fast, through_general, "{name} ({method})");
        }
    }
    // The whole body of a chunked response came, as plain bytes.
    let (_, body) = read_as_http10(fast.addr, "/r/5", "GET")
        .await
        .expect("closed");
    assert_eq!(body.len(), 100 * 1024);
    assert_eq!(general_connections(fast.admin).await, 0, "hyper took one");
    fast.shutdown().await;
    general.shutdown().await;
}
