//! The fast path's socket I/O: reads that do not cost a `recv` which only
//! says `EAGAIN`, and writes with `send_timeout`.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

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
