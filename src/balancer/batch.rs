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

/// Workers with a batcher of their own (one worker per CPU: machines
/// with more CPUs share them, a lock each).
const SLOTS: usize = 64;

/// Purchases waiting for a batch at most, per batcher: past it a purchase
/// goes alone rather than wait behind several batches.
const MOST_WAITING: usize = 4 * batch::MAX_ITEMS;

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
    if request.len() > batch::BATCHED_REQUEST_BYTES {
        return Err(BatchError::Declined);
    }
    let slot = worker % SLOTS;
    let (tx, rx) = oneshot::channel();
    let start = {
        let mut q = live.batches.slots[slot]
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if q.items.len() >= MOST_WAITING {
            return Err(BatchError::Declined);
        }
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

/// Clears a batcher's `sending` if its task ends without doing so (a
/// panic, or its runtime shutting down), so that the next purchase starts
/// another instead of waiting for none.
struct Sending<'a> {
    batcher: &'a Batcher,
    done: bool,
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut q = self.batcher.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.sending = false;
            // Their buyers hear it at once (`rx` closed), not at the timeout.
            q.items.clear();
        }
    }
}

/// Sends the queue of `slot` as batches until it is empty.
async fn send_all(live: &LiveState, slot: usize, target: Target) {
    let batcher = &live.batches.slots[slot];
    let mut sending = Sending {
        batcher,
        done: false,
    };
    loop {
        let (items, conn) = {
            let mut q = batcher.queue.lock().unwrap_or_else(|p| p.into_inner());
            // A purchase whose buyer has had an answer (its wait ran out)
            // is not sent: no sale may follow a 504.
            q.items.retain(|i| !i.answer.is_closed());
            if q.items.is_empty() {
                q.sending = false;
                sending.done = true;
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
    // Whether the batch went out once already: its purchases may have run
    // (a node that died after them looks like an idle connection closed),
    // so a failure from here on is not "not sent".
    let mut went = false;
    if let Some(conn) = conn {
        match once(conn, &head, body).await {
            Err(Once::Stale) => went = true,
            Err(Once::Failed(e)) => return Err(e),
            Ok(done) => return Ok(done),
        }
    }
    let conn = live
        .connect_or_shed(Duration::ZERO, || {
            pool::connect_raw(target.addr, target.connect_timeout)
        })
        .await
        .map_err(|e| {
            if went {
                BatchError::Broken(io::Error::other(format!(
                    "the batch's connection closed, and then: {e}"
                )))
            } else {
                BatchError::NotSent(e)
            }
        })?;
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
    let Some(items) = batch::items(body, batch::MAX_ITEMS) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A node that takes batches and never answers: how many came.
    async fn silent_node() -> (SocketAddr, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(AtomicU64::new(0));
        let counted = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut all = Vec::new();
                    let mut here = 0;
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        all.extend_from_slice(&buf[..n]);
                        let heads = all.windows(5).filter(|w| w == b"POST ").count() as u64;
                        counted.fetch_add(heads - here, Ordering::Relaxed);
                        here = heads;
                    }
                });
            }
        });
        (addr, seen)
    }

    /// A purchase queued behind a batch whose buyer leaves (or whose wait
    /// ran out) is not sent when that batch ends: no sale may follow the
    /// buyer's answer. One that still waits is.
    #[tokio::test(flavor = "current_thread")]
    async fn a_purchase_whose_buyer_left_is_not_sent() {
        let (addr, seen) = silent_node().await;
        let live = Arc::new(LiveState::new(addr));
        let target = Target {
            addr,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(300),
        };
        let first = {
            let live = live.clone();
            tokio::spawn(async move {
                submit(&live, 0, target, b"GET /buy/ticket?user=a HTTP/1.1\r\n\r\n").await
            })
        };
        // The first batch is out (and will get no answer).
        while seen.load(Ordering::Relaxed) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let left = {
            let live = live.clone();
            tokio::spawn(async move {
                submit(&live, 0, target, b"GET /buy/ticket?user=b HTTP/1.1\r\n\r\n").await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        left.abort();
        let outcome = first.await.expect("first");
        assert!(
            matches!(&outcome, Err(BatchError::Broken(e)) if e.kind() == io::ErrorKind::TimedOut),
            "{outcome:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            seen.load(Ordering::Relaxed),
            1,
            "the left buyer's purchase was sent"
        );
        assert_eq!(live.batches.sent.load(Ordering::Relaxed), 1);

        // A buyer still waiting behind a batch is sent next.
        let again = {
            let live = live.clone();
            tokio::spawn(async move {
                submit(&live, 0, target, b"GET /buy/ticket?user=c HTTP/1.1\r\n\r\n").await
            })
        };
        while seen.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = again.await;
    }
}
