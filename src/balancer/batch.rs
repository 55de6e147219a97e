//! Purchases to one node, batched: while a batch is out, the purchases
//! that come for the same node (from the same worker) wait, and go
//! together as the next `POST /purchases` (see
//! [`crate::node::routes::purchases`]), at most
//! [`batch::MAX_ITEMS`](crate::protocol::batch::MAX_ITEMS) at a time.
//!
//! Why: on the success path each purchase cost two messages between the
//! balancer and a node, and the kernel's work for those messages was most
//! of both processes' CPU; Nginx pays the same, so spike could only tie it
//! (benchmarks.md, "The success path"). A batch shares the two messages
//! among its purchases. Nothing waits for a batch to fill: the first
//! purchase to find none out sends at once, so a lone buyer's purchase
//! goes alone, and under a crowd the batches are as large as the crowd
//! that arrived during the last one's round trip.
//!
//! Each item is the request exactly as it would have gone alone (its
//! `Idempotency-Key`, made here if the buyer sent none, included), and its
//! answer the node's HTTP/1.1 response to it, so what the policy decides
//! (retries, marks, the edge's sold-out learning, the access log) does not
//! change. A batch that fails fails each of its items as a connection
//! would: not sent (the connect failed), or sent with no answer (only a
//! purchase with a key goes again, to another node, which then finds the
//! key's order if there was one).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::pool::{self, ConnectError};
use super::upstream::LiveState;
use crate::protocol::batch;

/// Workers with a batcher of their own; more share them (a lock each).
const SLOTS: usize = 16;

/// How a purchase in a batch got no answer.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// No connection to the node: nothing was sent.
    #[error("{0}")]
    NotSent(ConnectError),
    /// Sent, and no answer came (the connection broke, or the answer did
    /// not come within `response_timeout`).
    #[error("the batch got no answer: {0}")]
    Broken(io::Error),
    /// The node's answer to the batch cannot be read as one.
    #[error("the node's answer to a batch is malformed")]
    Malformed,
    /// The node does not take batches (an older node: 404 or 405): the
    /// purchase goes alone, and so does every later one to that node.
    #[error("the node takes no batches")]
    Refused,
    /// The node refused this batch as a whole (another status than 200:
    /// busy, too large), before any purchase in it ran: each goes alone,
    /// and its buyer hears what the node says to it.
    #[error("the node refused the batch")]
    Declined,
}

/// The batches of one upstream: a batcher per worker, and what `/status`
/// shows of them.
#[derive(Debug)]
pub struct Batches {
    slots: Box<[Batcher]>,
    /// The node answered a batch 404 or 405: purchases go alone to it.
    pub refused: AtomicBool,
    /// Batches sent.
    pub sent: AtomicU64,
    /// Purchases in them.
    pub purchases: AtomicU64,
}

impl Default for Batches {
    fn default() -> Self {
        Batches {
            slots: (0..SLOTS).map(|_| Batcher::default()).collect(),
            refused: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            purchases: AtomicU64::new(0),
        }
    }
}

/// One worker's batches to one node.
#[derive(Debug, Default)]
struct Batcher {
    queue: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    items: Vec<Item>,
    /// A task is sending batches (until the queue is empty).
    sending: bool,
    /// The connection the batches go on, while idle.
    conn: Option<TcpStream>,
}

#[derive(Debug)]
struct Item {
    request: Vec<u8>,
    answer: oneshot::Sender<Result<Vec<u8>, BatchError>>,
}

/// Where and within what a batch goes.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The node's address for its internal routes.
    pub addr: SocketAddr,
    pub connect_timeout: Duration,
    /// For the whole batch: written, answered and read.
    pub response_timeout: Duration,
}

/// The node's HTTP/1.1 response to `request` (the bytes that would have
/// gone alone), sent in a batch with the other purchases to it from this
/// `worker`.
pub async fn submit(
    live: &Arc<LiveState>,
    worker: usize,
    target: Target,
    request: &[u8],
) -> Result<Vec<u8>, BatchError> {
    let slot = worker % SLOTS;
    let (tx, rx) = oneshot::channel();
    let start = {
        let mut q = live.batches.slots[slot]
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        q.items.push(Item {
            request: request.to_vec(),
            answer: tx,
        });
        !std::mem::replace(&mut q.sending, true)
    };
    if start {
        // A task of its own: a buyer who leaves (or whose wait runs out)
        // must not take the others' batch with them.
        let live = live.clone();
        tokio::spawn(async move { send_all(&live, slot, target).await });
    }
    rx.await.unwrap_or_else(|_| {
        Err(BatchError::Broken(io::Error::other(
            "the batch was dropped",
        )))
    })
}

/// Sends the queue of `slot` as batches until it is empty.
async fn send_all(live: &LiveState, slot: usize, target: Target) {
    let batcher = &live.batches.slots[slot];
    loop {
        let (items, conn) = {
            let mut q = batcher.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.items.is_empty() {
                q.sending = false;
                return;
            }
            let take = q.items.len().min(batch::MAX_ITEMS);
            let rest = q.items.split_off(take);
            (std::mem::replace(&mut q.items, rest), q.conn.take())
        };
        live.batches.sent.fetch_add(1, Ordering::Relaxed);
        live.batches
            .purchases
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        let mut body = Vec::with_capacity(items.iter().map(|i| 4 + i.request.len()).sum());
        for item in &items {
            batch::push(&mut body, &item.request);
        }
        let outcome =
            tokio::time::timeout(target.response_timeout, exchange(live, conn, target, &body))
                .await
                .unwrap_or_else(|_| {
                    Err(BatchError::Broken(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer within response_timeout",
                    )))
                });
        match outcome {
            Ok((answers, conn)) => {
                if let Some(conn) = conn {
                    batcher.queue.lock().unwrap_or_else(|p| p.into_inner()).conn = Some(conn);
                }
                if answers.len() != items.len() {
                    for item in items {
                        let _ = item.answer.send(Err(BatchError::Malformed));
                    }
                    continue;
                }
                for (item, answer) in items.into_iter().zip(answers) {
                    let _ = item.answer.send(Ok(answer));
                }
            }
            Err(e) => {
                if matches!(e, BatchError::Refused) {
                    live.batches.refused.store(true, Ordering::Relaxed);
                }
                for item in items {
                    let _ = item.answer.send(Err(same(&e)));
                }
            }
        }
    }
}

/// `e` again, for each item of a failed batch (an OS error keeps its
/// number: running out of descriptors is told apart by it).
fn same(e: &BatchError) -> BatchError {
    let io_again = |e: &io::Error| match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    };
    match e {
        BatchError::NotSent(ConnectError::Timeout(t)) => {
            BatchError::NotSent(ConnectError::Timeout(*t))
        }
        BatchError::NotSent(ConnectError::Io(e)) => {
            BatchError::NotSent(ConnectError::Io(io_again(e)))
        }
        BatchError::NotSent(other) => {
            BatchError::NotSent(ConnectError::Io(io::Error::other(other.to_string())))
        }
        BatchError::Broken(e) => BatchError::Broken(io_again(e)),
        BatchError::Malformed => BatchError::Malformed,
        BatchError::Refused => BatchError::Refused,
        BatchError::Declined => BatchError::Declined,
    }
}

/// One batch: on `conn` (the idle one, if any) and, if that had gone
/// stale (closed while idle, before any byte of an answer), once more on
/// a new connection. The answers, and the connection if it may be used
/// again.
async fn exchange(
    live: &LiveState,
    conn: Option<TcpStream>,
    target: Target,
    body: &[u8],
) -> Result<(Vec<Vec<u8>>, Option<TcpStream>), BatchError> {
    let mut head = Vec::with_capacity(96);
    head.extend_from_slice(b"POST ");
    head.extend_from_slice(crate::protocol::PURCHASES_PATH.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: spike-balancer\r\ncontent-length: ");
    head.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    if let Some(conn) = conn {
        match once(conn, &head, body).await {
            Err(Once::Stale) => {}
            Err(Once::Failed(e)) => return Err(e),
            Ok(done) => return Ok(done),
        }
    }
    let conn = live
        .connect_or_shed(Duration::ZERO, || {
            pool::connect_raw(target.addr, target.connect_timeout)
        })
        .await
        .map_err(BatchError::NotSent)?;
    match once(conn.stream, &head, body).await {
        Ok(done) => Ok(done),
        Err(Once::Stale) => Err(BatchError::Broken(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the node closed the connection before an answer",
        ))),
        Err(Once::Failed(e)) => Err(e),
    }
}

enum Once {
    /// Nothing came back before the connection closed or broke.
    Stale,
    Failed(BatchError),
}

/// Writes the batch and reads its answer.
async fn once(
    mut conn: TcpStream,
    head: &[u8],
    body: &[u8],
) -> Result<(Vec<Vec<u8>>, Option<TcpStream>), Once> {
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head);
    out.extend_from_slice(body);
    if conn.write_all(&out).await.is_err() {
        return Err(Once::Stale);
    }
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut got = false;
    let (head_len, status, length, keep, frames) = loop {
        match read(&conn, &mut buf).await {
            Ok(0) | Err(_) if !got => return Err(Once::Stale),
            Ok(0) => {
                return Err(Once::Failed(BatchError::Broken(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the node closed the connection in the middle of an answer",
                ))));
            }
            Err(e) => return Err(Once::Failed(BatchError::Broken(e))),
            Ok(_) => got = true,
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let header = |name: &str| {
                    resp.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| h.value)
                };
                let length = header("content-length")
                    .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok());
                let keep = !header("connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
                // A 200 that is not frames is no spike node's batch answer.
                let frames = header("content-type")
                    .is_some_and(|v| v.eq_ignore_ascii_case(b"application/octet-stream"));
                break (n, resp.code.unwrap_or(0), length, keep, frames);
            }
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => {}
            _ => return Err(Once::Failed(BatchError::Malformed)),
        }
    };
    match status {
        200 if frames => {}
        200 | 404 | 405 => return Err(Once::Failed(BatchError::Refused)),
        100..=599 => return Err(Once::Failed(BatchError::Declined)),
        _ => return Err(Once::Failed(BatchError::Malformed)),
    }
    let Some(length) = length.filter(|&n| n <= batch::MAX_BYTES) else {
        return Err(Once::Failed(BatchError::Malformed));
    };
    while buf.len() < head_len + length {
        match read(&conn, &mut buf).await {
            Ok(0) => {
                return Err(Once::Failed(BatchError::Broken(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the node closed the connection in the middle of an answer",
                ))));
            }
            Ok(_) => {}
            Err(e) => return Err(Once::Failed(BatchError::Broken(e))),
        }
    }
    let body = &buf[head_len..head_len + length];
    let Some(items) = batch::items(body) else {
        return Err(Once::Failed(BatchError::Malformed));
    };
    let answers = items.into_iter().map(<[u8]>::to_vec).collect();
    let reusable = keep && buf.len() == head_len + length;
    Ok((answers, reusable.then_some(conn)))
}

/// Reads what is there into `buf`.
async fn read(conn: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        conn.readable().await?;
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        match conn.try_read_buf(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
