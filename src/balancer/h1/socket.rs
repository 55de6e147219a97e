//! The fast path's socket I/O: reads that do not cost a `recv` which only
//! says `EAGAIN`, and writes with `send_timeout`; and [`Client`], what the
//! path needs of a client connection, a TCP socket or TLS over one.

use std::future::Future;
use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client connection the fast path serves: a TCP socket, or TLS over one
/// (HTTPS's HTTP/1.1 connections, see `crate::server::tls`).
pub trait Client: AsyncRead + AsyncWrite + Unpin + Send {
    /// Ready once a read may find something (or the close): what an idle
    /// connection waits for, holding no buffer and no waiter node.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Reads what is there into `buf`'s spare room without waiting
    /// (`WouldBlock` when nothing is).
    fn try_read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize>;

    /// Reads what comes next into `buf`'s spare room (reserved by the
    /// caller), waiting for it.
    fn read_more(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send;

    /// Writes all of `bytes` out to the client, failing once it took
    /// nothing for `limit` (Nginx's `send_timeout`).
    fn send(
        &mut self,
        bytes: &[u8],
        limit: Duration,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Ends the connection after an answer: TLS's `close_notify` (so the
    /// client sees the end, not a cut), then the socket's half-close;
    /// given up after `limit`.
    fn close(&mut self, limit: Duration) -> impl Future<Output = ()> + Send {
        async move {
            let _ = tokio::time::timeout(limit, self.shutdown()).await;
        }
    }
}

impl Client for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn try_read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        try_read_some(self, buf)
    }

    fn read_more(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send {
        read_some(self, buf)
    }

    fn send(
        &mut self,
        bytes: &[u8],
        limit: Duration,
    ) -> impl Future<Output = io::Result<()>> + Send {
        send(self, bytes, limit)
    }

    /// Nothing before the drop: closing the socket sends the FIN, so a
    /// half-close first only adds a system call to every connection that
    /// ends after its answer (`ab`'s, HTTP/1.0's). It would not keep a
    /// client's unread bytes from turning the close into a reset either:
    /// Linux resets a socket closed with unread input whether or not it was
    /// half-closed.
    fn close(&mut self, _limit: Duration) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// TLS: reads and writes go through rustls's buffers (a record may hold
/// several requests, or half of one), so a write is flushed to the socket
/// before it counts as sent.
impl Client for crate::server::tls::TlsClient {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (socket, tls) = self.get_ref();
        if !tls.wants_read() {
            // Plaintext rustls decrypted and nobody read yet (a pipelined
            // request), or the client's close_notify: a read finds it
            // without the socket saying anything.
            return Poll::Ready(Ok(()));
        }
        socket.poll_read_ready(cx)
    }

    fn try_read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if buf.capacity() == buf.len() {
            buf.reserve(READ_CHUNK);
        }
        // One poll with a waker that does nothing: `Pending` is "nothing
        // yet", and the next wait registers the real waker (a readiness
        // that came meanwhile is not lost: tokio keeps it until a read
        // sees `WouldBlock`).
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let read = std::pin::pin!(self.read_buf(buf));
        match read.poll(&mut cx) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    async fn read_more(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        self.read_buf(buf).await
    }

    async fn send(&mut self, bytes: &[u8], limit: Duration) -> io::Result<()> {
        let sent = async {
            self.write_all(bytes).await?;
            self.flush().await
        };
        tokio::time::timeout(limit, sent)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    }
}

/// Room kept for reading: a request head, or a response's head and the
/// first part of its body.
pub(super) const READ_CHUNK: usize = 8 * 1024;

/// A connection's first buffer: room for the one small request most
/// connections make (`ab`'s, a buyer's) and its answer, and a size that
/// malloc serves from its per-thread cache; an 8 KiB one cost a walk of
/// its bins and a consolidation at every close (a quarter of the user
/// instructions per `ab` request were malloc's, measured with callgrind).
pub(super) const FIRST_READ: usize = 1024;

/// Makes room for the next read into `buf`: [`FIRST_READ`] when it has
/// none yet, else [`READ_CHUNK`] once less than 1 KiB is free.
pub(super) fn make_room(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        buf.reserve(FIRST_READ);
    } else if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
}

/// Reads what the socket has into `buf`'s spare room, as one `recv`
/// that does not wait (`WouldBlock` when nothing is there).
///
/// A read that leaves room unfilled got all the kernel had, so the socket
/// is marked not readable at once, as Nginx does with a short read:
/// otherwise the next read (the next request on a keep-alive client, the
/// next response on a pooled upstream, the pool's check that an idle
/// upstream is quiet) costs a `recv` that only says `EAGAIN`, two per
/// proxied request, about a tenth of the proxy's CPU (measured with `perf
/// stat`: 3.95 `recv` per request before, against HAProxy's 1.0).
///
/// The read happens inside `try_io`, which notes the readiness it saw
/// before the read and clears only that one: an event for data that came
/// after the read bumps tokio's readiness tick and makes the clearing a
/// no-op, whichever thread runs the I/O driver, so no wakeup is lost.
pub(super) fn try_read_some(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() == buf.len() {
        buf.reserve(READ_CHUNK);
    }
    let room = buf.capacity() - buf.len();
    let mut got = 0;
    let read = stream.try_io(tokio::io::Interest::READABLE, || {
        got = stream.try_read_buf(buf)?;
        if got > 0 && got < room {
            // Drained: clear the readiness seen before the read.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(got)
        }
    });
    match read {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// [`try_read_some`], waiting for the socket to be readable.
pub(super) async fn read_some(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match try_read_some(stream, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Writes all of `bytes` to the client, failing once it took nothing for
/// `limit` (Nginx's `send_timeout`). Most writes go through at once and
/// never make a timer.
pub(super) async fn send(stream: &mut TcpStream, bytes: &[u8], limit: Duration) -> io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        match stream.try_write(&bytes[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    while done < bytes.len() {
        match tokio::time::timeout(limit, stream.write(&bytes[done..])).await {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => done += n,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        }
    }
    Ok(())
}
