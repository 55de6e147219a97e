//! A raw test backend that records what it reads (request line,
//! `Idempotency-Key`s, body) and then answers, drops the connection
//! unanswered, or answers garbage: the upstream failures that the retry
//! rules are about.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request as a test backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `GET /path HTTP/1.1`.
    pub request_line: String,
    /// Every `Idempotency-Key` value, as sent.
    pub keys: Vec<String>,
    /// The body (Content-Length framed).
    pub body: Vec<u8>,
    /// The whole head as it came, request line and header lines.
    pub head: String,
}

/// What a [`Recorder`] does with a request once it has read it.
#[derive(Debug, Clone, Copy)]
pub enum Then {
    /// Answers 200 with its name.
    Answer,
    /// Closes the connection without a byte, as a node SIGKILLed after its
    /// script ran.
    Drop,
    /// Answers the first `n` requests of each connection, then drops (an
    /// idle keep-alive connection gone stale).
    AnswerThenDrop(usize),
    /// Answers bytes that are not HTTP.
    Garbage,
    /// Answers these bytes, then closes.
    Raw(&'static [u8]),
    /// Answers the first `n` requests of each connection, then answers
    /// these bytes and closes.
    AnswerThenRaw(usize, &'static [u8]),
    /// Answers these bytes, then holds the connection open for a minute
    /// without another byte (a backend stalled mid-response).
    Stall(&'static [u8]),
}

/// A raw backend that records every request it reads, then does `Then`.
pub struct Recorder {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Recorder {
    /// Starts one on a free port.
    pub async fn start(name: &'static str, then: Then) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut served = 0;
                    while let Some(req) = read_request(&mut stream).await {
                        log.lock().expect("lock").push(req);
                        match then {
                            Then::Drop => return,
                            Then::AnswerThenDrop(n) if served >= n => return,
                            Then::AnswerThenRaw(n, bytes) if served >= n => {
                                let _ = stream.write_all(bytes).await;
                                return;
                            }
                            Then::Garbage => {
                                let _ = stream.write_all(b"HTTP/1.1 2xx nonsense\r\n\r\n").await;
                                return;
                            }
                            Then::Raw(bytes) => {
                                let _ = stream.write_all(bytes).await;
                                return;
                            }
                            Then::Stall(bytes) => {
                                let _ = stream.write_all(bytes).await;
                                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                                return;
                            }
                            _ => {}
                        }
                        served += 1;
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                            name.len()
                        );
                        if stream.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Recorder { addr, seen, task }
    }

    /// Every request read so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head and a Content-Length body), or `None` at EOF.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let head = head.clone();
    let request_line = lines.next().unwrap_or("").to_string();
    let mut keys = Vec::new();
    let mut length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("idempotency-key") {
            keys.push(value.trim().to_string());
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Seen {
        request_line,
        keys,
        body,
        head,
    })
}
