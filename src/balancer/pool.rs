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
//!
//! Each upstream has two such stacks per worker, one per path:
//! `LiveState::idle` holds hyper's connections ([`UpstreamConn`]: a
//! `SendRequest` whose connection task owns the socket) and
//! `LiveState::raw_idle` the fast path's bare sockets ([`RawConn`]). They
//! stay apart because a connection cannot cross paths for free: a bare
//! socket on hyper's path needs a handshake (a spawned connection task and
//! hyper's buffers, per checkout: the cost this module exists to avoid),
//! and a hyper connection goes back to being a bare socket only once its
//! task has ended and handed the socket back with nothing read ahead. So
//! under mixed traffic an upstream may hold up to `keepalive` idle
//! connections per worker on each path.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::body::ClientBody;
use bytes::Bytes;
use http_body_util::{Either, Full};

/// What goes to upstreams: a small replayable body, or the client's stream.
/// Defined here, with the connections that carry it, so that the pool needs
/// nothing from the proxy above it.
pub type ReqBody = Either<Full<Bytes>, ClientBody>;

/// Whether a connect failed because the process (`EMFILE`) or the system
/// (`ENFILE`) has no descriptor left: then idle keep-alive connections are
/// worth closing to make one (see
/// [`LiveState::shed_idle`](super::upstream::LiveState::shed_idle)).
pub fn out_of_files(e: &ConnectError) -> bool {
    matches!(e, ConnectError::Io(io) if io_out_of_files(io))
}

/// Whether an I/O error is the process (EMFILE) or the system (ENFILE)
/// out of file descriptors: a shortage here, never the peer's doing.
pub fn io_out_of_files(e: &std::io::Error) -> bool {
    // Linux's numbers (no libc in the library for two constants).
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE))
}

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

/// One connection to an upstream: hyper's handle to send on it, and a count
/// of the bytes that came in on it. The count tells a reused keep-alive
/// connection that went stale (closed before any byte of the response)
/// from an upstream that began to answer and then failed: only the first
/// is worth the same request again on that upstream.
pub struct UpstreamConn {
    /// hyper's handle.
    pub sender: SendRequest<ReqBody>,
    /// Bytes read from the upstream so far.
    pub received: Arc<AtomicU64>,
}

impl UpstreamConn {
    /// Bytes read from the upstream so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// The upstream socket, counting what it reads (one relaxed add per read,
/// on the worker that owns the connection).
struct Counting {
    stream: TcpStream,
    received: Arc<AtomicU64>,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        if got > 0 {
            self.received.fetch_add(got as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Counting {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Opens a connection to `addr` (with `TCP_NODELAY`) and starts its task on
/// the current runtime, so it is served by the worker that will use it.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<UpstreamConn, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))??;
    stream.set_nodelay(true)?;
    let received = Arc::new(AtomicU64::new(0));
    let io = Counting {
        stream,
        received: received.clone(),
    };
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        // An error here is also the error of the request in flight, which
        // reports it; an idle connection closed by the upstream is normal.
        if let Err(e) = conn.await {
            tracing::debug!(upstream = %addr, error = %e, "upstream connection ended");
        }
    });
    Ok(UpstreamConn { sender, received })
}

/// A new connection to `addr` for one request that may switch protocols
/// (a WebSocket's handshake on hyper's path): its task gives the socket up
/// after a `101` (`hyper::upgrade::on` the response). Never pooled.
pub async fn connect_upgradable(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<SendRequest<ReqBody>, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))??;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(upstream = %addr, error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// A connection that can sit on an idle stack: it must be able to tell,
/// without waiting, that its upstream closed it meanwhile.
pub trait Reusable {
    /// Whether the upstream is known to have closed it.
    fn is_closed(&self) -> bool;
}

impl Reusable for UpstreamConn {
    fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// A bare upstream socket, for the balancer's own HTTP/1 path
/// ([`super::h1`]): the request task writes and reads it itself, with no
/// connection task and no channel between them.
pub struct RawConn {
    /// The socket, `TCP_NODELAY` set.
    pub stream: TcpStream,
    /// The upstream it goes to, for the logs: asked of the socket after a
    /// reset, the address is gone.
    pub addr: SocketAddr,
}

impl Reusable for RawConn {
    fn is_closed(&self) -> bool {
        // An idle connection has nothing to say: readable means the
        // upstream closed it (or broke the protocol). While tokio has not
        // seen it readable this makes no system call.
        let mut byte = [0u8; 1];
        !matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Opens a bare connection to `addr` with `TCP_NODELAY`.
pub async fn connect_raw(addr: SocketAddr, timeout: Duration) -> Result<RawConn, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))??;
    stream.set_nodelay(true)?;
    Ok(RawConn { stream, addr })
}

struct Idle<C> {
    conn: C,
    /// When it went idle, in [`now_ms`](super::upstream::now_ms).
    since: u64,
}

/// One worker's idle connections, oldest first.
type Stack<C> = Mutex<VecDeque<Idle<C>>>;

/// The idle connections of one upstream, one stack per worker thread.
pub struct IdleConns<C = UpstreamConn> {
    /// Sized on first use, to the number of workers.
    stacks: OnceLock<Box<[Stack<C>]>>,
}

impl<C> Default for IdleConns<C> {
    fn default() -> Self {
        IdleConns {
            stacks: OnceLock::new(),
        }
    }
}

impl<C: Reusable> std::fmt::Debug for IdleConns<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleConns")
            .field("idle", &self.len())
            .finish()
    }
}

fn lock<C>(m: &Mutex<VecDeque<Idle<C>>>) -> MutexGuard<'_, VecDeque<Idle<C>>> {
    // A panic while holding it leaves at worst a connection too many or too
    // few on the stack.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C: Reusable> IdleConns<C> {
    fn stack(&self, worker: usize, workers: usize) -> &Mutex<VecDeque<Idle<C>>> {
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
    pub fn take(&self, worker: usize, workers: usize, now: u64, timeout: Duration) -> Option<C> {
        let mut stack = lock(self.stack(worker, workers));
        while let Some(idle) = stack.pop_back() {
            if now.saturating_sub(idle.since) > timeout.as_millis() as u64 {
                stack.clear();
                return None;
            }
            if !idle.conn.is_closed() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Puts a connection whose response was read to the end back on
    /// `worker`'s stack; beyond `max_idle` the oldest is closed.
    pub fn put(&self, worker: usize, workers: usize, conn: C, now: u64, max_idle: usize) {
        if max_idle == 0 || conn.is_closed() {
            return;
        }
        let mut stack = lock(self.stack(worker, workers));
        while stack.len() >= max_idle {
            stack.pop_front();
        }
        stack.push_back(Idle { conn, since: now });
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

    /// Closes every worker's idle connections (a worker out of descriptors
    /// takes back those another worker keeps idle: see
    /// [`LiveState::shed_idle`](super::upstream::LiveState::shed_idle)).
    pub fn close_all(&self) {
        if let Some(stacks) = self.stacks.get() {
            for stack in stacks.iter() {
                // Dropped outside the lock: closing takes system calls.
                let gone = std::mem::take(&mut *lock(stack));
                drop(gone);
            }
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
