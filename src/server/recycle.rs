//! Idle keep-alive connections without hyper's buffers.
//!
//! A hyper HTTP/1 connection allocates an 8 KiB read buffer and an 8 KiB
//! buffer for response heads, and keeps both until the connection closes.
//! Keep-alive clients of a flash sale spend most of their life idle, so
//! 10,000 of them would pin about 200 MB of buffers that hold nothing.
//!
//! So when many connections are open, hyper gets a connection for one
//! request at a time. Between requests the socket is handed back: [`Turn`]
//! knows when the last response was taken off the service's hands (its body
//! dropped by hyper), every byte of it flushed to the socket, and no byte of
//! a next request has arrived yet. Then [`HandBack`] answers hyper's next
//! read, which would only wait, with end-of-file. On an idle connection hyper
//! takes that as the client being done, ends without touching the socket
//! (`without_shutdown`), and returns it with any bytes it read ahead. The
//! accept loop then waits for the socket to become readable with no buffer
//! at all, and starts a new hyper connection for the next request.
//!
//! Setting up a hyper connection per request costs about a fifth more
//! user-space work per request (callgrind: 44k to 52k instructions per
//! proxied request), so it is only done at once when it saves real memory:
//! while at most 1,024 connections are open (fewer when `max_connections` is
//! small), a connection keeps its hyper connection for a next request that
//! comes soon (at most 16 MiB of buffers). The accept loop takes the socket
//! back (with [`Turn::want_back`]) from a connection idle for a quarter of
//! `header_read_timeout` (at most 250 ms), since hyper's header timer runs
//! over the idle time and would close a client that waits longer than
//! `header_read_timeout` between requests; and from one silent for
//! `keepalive_timeout`, to close it (hyper has no idle timeout of its own).
//! A connection whose last request had a body is never handed back (below),
//! so a client that then waits longer than `header_read_timeout` is still
//! closed by hyper's timer, as before.
//!
//! What the client sees does not change: the response already went out with
//! keep-alive, and a pipelined request already in the socket is read by the
//! same hyper connection (a read that finds bytes is never cut short). Nor
//! is a connection handed back while the bytes hyper got do not end with a
//! request head's blank line: hyper may hold the first part of a pipelined
//! request that came in the same read as the last one, and would drop it. A
//! connection whose last request carried a body is not handed back until its
//! next request: hyper drains a body the service left unread after the
//! response, and only hyper knows where that body ends (handing back early
//! would read its tail as the next request).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::service::Service;
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Sleep;

/// A request is being served: its response body is still alive.
const BUSY: u8 = 1;
/// Bytes reached hyper since the last request began: part of a next one.
const FRESH: u8 = 2;
/// hyper wrote and has not flushed since: its buffer may hold response bytes.
const UNFLUSHED: u8 = 4;
/// The current request has a body: hyper may still be reading (or, after the
/// response, draining) it, and only hyper knows where it ends.
const BODY: u8 = 8;
/// The end-of-file hyper saw came from us, not from the client.
const HANDED_BACK: u8 = 16;
/// The client closed its side, or the socket failed.
const CLOSED: u8 = 32;
/// The accept loop wants the socket back at hyper's next idle read.
const WANTED: u8 = 64;
/// The bytes hyper got so far do not end where a request head ends, so its
/// buffer may hold the start of a next request that came in the same read
/// as the end of the last one (pipelining). [`FRESH`] cannot say so, since
/// the request that begins after that read clears it; handing the socket
/// back then would make hyper drop those bytes with an error.
const PARTIAL: u8 = 128;

/// The last four bytes of a request head.
const HEAD_END: u32 = u32::from_be_bytes(*b"\r\n\r\n");

/// Open connections (across the server's workers) above which every idle
/// connection gives its hyper connection and buffers back at once: 1,024,
/// or a sixteenth of `max_connections` when that is less.
fn crowd(most: usize) -> usize {
    (most / 16).min(1024)
}

/// Whether more connections are open than [`crowd`] allows, for a cap of
/// `most` held as `permits` (the permits an accept loop holds while it
/// waits count as open).
pub(super) fn crowded(most: usize, permits: &Semaphore) -> bool {
    most.saturating_sub(permits.available_permits()) > crowd(most)
}

/// Milliseconds on a monotonic clock that starts with the process.
pub(super) fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Where one connection is between requests, shared by its [`HandBack`] and
/// its [`Turnstile`].
#[derive(Debug)]
pub(super) struct Turn {
    state: AtomicU8,
    /// When the last request began, in [`now_ms`].
    begun_at: AtomicU64,
    /// The server is stopping: answers ask the client to close.
    stopping: Arc<AtomicBool>,
    /// What a `101` asked to run on the socket once hyper is done (see
    /// [`super::upgrade`]).
    then: std::sync::Mutex<Option<super::upgrade::Then>>,
}

impl Turn {
    /// A connection's turn, seeing the server's `stopping` flag.
    pub(super) fn new(stopping: Arc<AtomicBool>) -> Turn {
        Turn {
            state: AtomicU8::new(0),
            begun_at: AtomicU64::new(0),
            stopping,
            then: std::sync::Mutex::new(None),
        }
    }

    /// What a `101` asked to run on the socket, taken.
    pub(super) fn take_then(&self) -> Option<super::upgrade::Then> {
        self.then.lock().map(|mut t| t.take()).unwrap_or(None)
    }

    fn set(&self, bits: u8) {
        self.state.fetch_or(bits, Ordering::AcqRel);
    }

    fn clear(&self, bits: u8) {
        self.state.fetch_and(!bits, Ordering::AcqRel);
    }

    fn has(&self, bits: u8) -> bool {
        self.state.load(Ordering::Acquire) & bits != 0
    }

    /// A new hyper connection starts with nothing seen.
    pub(super) fn reset(&self) {
        self.state.store(0, Ordering::Release);
    }

    /// Whether hyper holds nothing of a request: no response alive or
    /// unflushed, no byte of a next request, no body it may still drain.
    pub(super) fn idle(&self) -> bool {
        !self.has(BUSY | FRESH | UNFLUSHED | BODY | PARTIAL)
    }

    /// When the last request began, in [`now_ms`].
    pub(super) fn begun_at(&self) -> u64 {
        self.begun_at.load(Ordering::Acquire)
    }

    /// Asks for the socket back at hyper's next read that finds nothing;
    /// the caller polls the hyper connection again right after.
    pub(super) fn want_back(&self) {
        self.set(WANTED);
    }

    /// Whether the socket is wanted back (no request began since).
    pub(super) fn wanted(&self) -> bool {
        self.has(WANTED)
    }

    /// Whether the last hyper connection ended because we handed the socket
    /// back (so the client expects it to stay open).
    pub(super) fn handed_back(&self) -> bool {
        self.has(HANDED_BACK) && !self.has(CLOSED)
    }
}

/// Nginx's `send_timeout` on a client socket's writes: a connection whose
/// client takes no byte for that long fails.
pub(super) struct SendClock {
    /// How long a write may wait for the client to take bytes.
    limit: Option<std::time::Duration>,
    /// The send deadline, made on the first write that had to wait (most
    /// connections never wait) and moved for every later one.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Whether `stalled` runs for the write waiting now.
    waiting: bool,
}

impl SendClock {
    /// A clock for `limit` (none: writes may wait for ever).
    pub(super) fn new(limit: Option<std::time::Duration>) -> SendClock {
        SendClock {
            limit,
            stalled: None,
            waiting: false,
        }
    }

    /// After a write: one that went through ends the wait; one that must
    /// wait starts (or goes on with) the send deadline, and fails with
    /// `TimedOut` once the client took nothing for the limit.
    pub(super) fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        let Some(limit) = self.limit else {
            return polled;
        };
        if !self.waiting {
            self.waiting = true;
            let deadline = tokio::time::Instant::now() + limit;
            match &mut self.stalled {
                Some(s) => s.as_mut().reset(deadline),
                None => self.stalled = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        if let Some(s) = &mut self.stalled
            && s.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no response byte within send_timeout",
            )));
        }
        polled
    }
}

/// The socket as hyper sees it: reads that find nothing while the connection
/// is idle end the hyper connection instead of waiting.
pub(super) struct HandBack {
    stream: TcpStream,
    /// Bytes a previous hyper connection had read but not used.
    ahead: Bytes,
    turn: Arc<Turn>,
    /// The server's connection permits: how many are taken says how many
    /// connections are open.
    permits: Arc<Semaphore>,
    /// The most connections the server allows.
    most: usize,
    /// `send_timeout` on its writes.
    send: SendClock,
    /// The last four bytes handed to hyper (a new hyper connection starts
    /// where a request head ended), for [`PARTIAL`].
    last4: u32,
}

impl HandBack {
    pub(super) fn new(
        stream: TcpStream,
        ahead: Bytes,
        turn: Arc<Turn>,
        permits: Arc<Semaphore>,
        most: usize,
        send_timeout: Option<std::time::Duration>,
    ) -> HandBack {
        HandBack {
            stream,
            ahead,
            turn,
            permits,
            most,
            send: SendClock::new(send_timeout),
            last4: HEAD_END,
        }
    }

    /// Notes bytes handed to hyper: whether they end where a head ends.
    /// Over-cautious on purpose (a body that ends otherwise also counts as
    /// partial until the next head): that only keeps hyper's buffers for
    /// one more request, where the opposite mistake loses a request.
    fn delivered(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().rev().take(4).rev() {
            self.last4 = (self.last4 << 8) | u32::from(b);
        }
        if self.last4 == HEAD_END {
            self.turn.clear(PARTIAL);
        } else {
            self.turn.set(PARTIAL);
        }
    }

    /// A write under `send_timeout`; one that times out marks the
    /// connection closed.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let polled = self.send.check(cx, polled);
        if matches!(&polled, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::TimedOut) {
            self.turn.set(CLOSED);
        }
        polled
    }

    fn crowded(&self) -> bool {
        crowded(self.most, &self.permits)
    }

    /// The socket and what was read ahead of hyper, for the next request.
    pub(super) fn into_parts(self) -> (TcpStream, Bytes) {
        (self.stream, self.ahead)
    }
}

impl AsyncRead for HandBack {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            let ahead = self.ahead.split_to(n);
            buf.put_slice(&ahead);
            self.delivered(&ahead);
            self.turn.set(FRESH);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                self.turn.set(if got == 0 { CLOSED } else { FRESH });
                if got > 0 {
                    let filled = buf.filled();
                    let from = filled.len().saturating_sub(4).max(before);
                    self.delivered(&filled[from..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                self.turn.set(CLOSED);
                Poll::Ready(Err(e))
            }
            Poll::Pending if self.turn.idle() && (self.turn.has(WANTED) || self.crowded()) => {
                // Wanted back or crowded, idle, every response byte handed
                // to the socket (hyper flushes its buffer out before it
                // flushes the socket), and nothing of a next request yet:
                // end-of-file ends this hyper connection and gives the
                // socket back.
                self.turn.set(HANDED_BACK);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for HandBack {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.turn.set(UNFLUSHED);
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.timed(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.turn.set(UNFLUSHED);
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.turn.clear(UNFLUSHED);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The service as hyper sees it: marks the connection busy from a request's
/// head to the end of its response, and asks clients to close once the
/// server is stopping.
pub(super) struct Turnstile<S> {
    inner: S,
    turn: Arc<Turn>,
}

impl<S> Turnstile<S> {
    pub(super) fn new(inner: S, turn: Arc<Turn>) -> Turnstile<S> {
        Turnstile { inner, turn }
    }
}

impl<S, B> Service<Request<Incoming>> for Turnstile<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<Finished<B>>;
    type Error = S::Error;
    type Future = Responding<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // Bytes read from here on belong to a next request (or this one's
        // body). A new head also means any earlier body was read to its end.
        self.turn.begun_at.store(now_ms(), Ordering::Release);
        self.turn.set(BUSY);
        self.turn.clear(FRESH | BODY | WANTED);
        if !req.body().is_end_stream() {
            self.turn.set(BODY);
        }
        Responding {
            inner: self.inner.call(req),
            turn: Some(self.turn.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response on its way: once ready, its body carries the turn.
    pub(super) struct Responding<F> {
        #[pin]
        inner: F,
        turn: Option<Arc<Turn>>,
    }
}

impl<F, B, E> Future for Responding<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Finished<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(res)) => res,
        };
        let mut res = res;
        if let Some(then) = super::upgrade::take_then(&mut res)
            && let Some(turn) = this.turn.as_ref()
            && let Ok(mut slot) = turn.then.lock()
        {
            // hyper ends the connection after the `101` and hands the
            // socket back; the accept loop runs this on it.
            *slot = Some(then);
        }
        let (mut parts, body) = res.into_parts();
        if parts.status != hyper::StatusCode::SWITCHING_PROTOCOLS
            && this
                .turn
                .as_ref()
                .is_some_and(|t| t.stopping.load(Ordering::Relaxed))
        {
            // hyper closes after a response that says so, and the client
            // knows not to send another request on it.
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let body = Guarded::new(body, this.turn.take().map(Unbusy));
        Poll::Ready(Ok(Response::from_parts(parts, body)))
    }
}

/// Marks its connection's request done (not busy) when dropped.
pub(super) struct Unbusy(Arc<Turn>);

impl Drop for Unbusy {
    fn drop(&mut self) {
        self.0.clear(BUSY);
    }
}

/// A response body that marks its connection idle when hyper drops it,
/// which hyper does once the body is written (or never needed, as for
/// HEAD), before it reads again.
pub type Finished<B> = Guarded<B, Option<Unbusy>>;

pin_project_lite::pin_project! {
    /// A response body that carries `guard` until hyper drops it (once the
    /// body is written, or was never needed), so that the guard's drop
    /// says when a response is done: how both the plain and the TLS
    /// connections know they are idle.
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: G,
    }
}

impl<B, G> Guarded<B, G> {
    /// `inner`, carrying `guard`.
    pub(super) fn new(inner: B, guard: G) -> Guarded<B, G> {
        Guarded { inner, guard }
    }
}

impl<B: Body, G> Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
