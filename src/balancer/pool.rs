//! Keep-alive connections to upstreams (Nginx's `keepalive N` cache): for
//! every upstream and every worker thread, a stack of idle HTTP/1
//! connections, most recently used on top.
//!
//! Why not hyper-util's pooled client: callgrind put its checkout, put-back
//! and connect race at about 6,700 of the 45,000 user-space instructions of
//! a proxied request. Its pool is one map for every host, keyed by scheme
//! and authority and hashed with SipHash byte by byte on every checkout and
//! every put-back, and each checkout races a lazily built connect future.
//! Here the stack hangs off the upstream's [`LiveState`](super::upstream::LiveState)
//! (no lookup; it survives reloads with the rest of that state), each worker
//! thread has its own (no contention; a connection's task lives on the
//! runtime that opened it), and a connection goes back on the stack when
//! its response body has been read to the end. The HTTP itself is hyper's.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// What goes to upstreams: a small replayable body, or the client's stream.
/// Defined here, with the connections that carry it, so that the pool needs
/// nothing from the proxy above it.
pub type ReqBody = Either<Full<Bytes>, Incoming>;

/// Why no connection to an upstream could be made: the request was not
/// sent, so any method may go on to the next upstream.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No TCP connection within `connect_timeout`.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// The TCP connect failed (refused, unreachable, ...).
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    /// hyper refused the connection before any byte was sent.
    #[error("HTTP/1 handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

/// Opens a connection to `addr` (with `TCP_NODELAY`) and starts its task on
/// the current runtime, so it is served by the worker that will use it.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<SendRequest<ReqBody>, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))??;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // An error here is also the error of the request in flight, which
        // reports it; an idle connection closed by the upstream is normal.
        if let Err(e) = conn.await {
            tracing::debug!(upstream = %addr, error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

struct Idle {
    sender: SendRequest<ReqBody>,
    /// When it went idle, in [`now_ms`](super::upstream::now_ms).
    since: u64,
}

/// The idle connections of one upstream, one stack per worker thread.
#[derive(Default)]
pub struct IdleConns {
    /// Sized on first use, to the number of workers.
    stacks: OnceLock<Box<[Mutex<VecDeque<Idle>>]>>,
}

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleConns")
            .field("idle", &self.len())
            .finish()
    }
}

fn lock(m: &Mutex<VecDeque<Idle>>) -> MutexGuard<'_, VecDeque<Idle>> {
    // A panic while holding it leaves at worst a connection too many or too
    // few on the stack.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl IdleConns {
    fn stack(&self, worker: usize, workers: usize) -> &Mutex<VecDeque<Idle>> {
        let stacks = self.stacks.get_or_init(|| {
            (0..workers.max(1))
                .map(|_| Mutex::new(VecDeque::new()))
                .collect()
        });
        &stacks[worker % stacks.len()]
    }

    /// The most recently used idle connection of `worker` that is still
    /// open and idle for at most `timeout`. Older ones than an expired one
    /// are expired too, and are closed.
    pub fn take(
        &self,
        worker: usize,
        workers: usize,
        now: u64,
        timeout: Duration,
    ) -> Option<SendRequest<ReqBody>> {
        let mut stack = lock(self.stack(worker, workers));
        while let Some(idle) = stack.pop_back() {
            if now.saturating_sub(idle.since) > timeout.as_millis() as u64 {
                stack.clear();
                return None;
            }
            if !idle.sender.is_closed() {
                return Some(idle.sender);
            }
        }
        None
    }

    /// Puts a connection whose response was read to the end back on
    /// `worker`'s stack; beyond `max_idle` the oldest is closed.
    pub fn put(
        &self,
        worker: usize,
        workers: usize,
        sender: SendRequest<ReqBody>,
        now: u64,
        max_idle: usize,
    ) {
        if max_idle == 0 || sender.is_closed() {
            return;
        }
        let mut stack = lock(self.stack(worker, workers));
        while stack.len() >= max_idle {
            stack.pop_front();
        }
        stack.push_back(Idle { sender, since: now });
    }

    /// Closes `worker`'s connections idle for longer than `timeout` (the
    /// stack is oldest first, so they are at the bottom).
    pub fn expire(&self, worker: usize, now: u64, timeout: Duration) {
        let Some(stacks) = self.stacks.get() else {
            return;
        };
        let mut stack = lock(&stacks[worker % stacks.len()]);
        let limit = timeout.as_millis() as u64;
        while stack
            .front()
            .is_some_and(|i| now.saturating_sub(i.since) > limit)
        {
            stack.pop_front();
        }
    }

    /// Idle connections, all workers together (for `/status`).
    pub fn len(&self) -> usize {
        self.stacks
            .get()
            .map_or(0, |s| s.iter().map(|m| lock(m).len()).sum())
    }

    /// Whether no connection is idle.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
