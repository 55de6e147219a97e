//! Upgraded connections on hyper's server (`Upgrade: websocket` and the
//! like): a service that answers `101 Switching Protocols` puts a [`Then`]
//! in the response's extensions, and once hyper has written the `101` the
//! connection's task hands it the client's connection as a [`ClientIo`]
//! (the bytes hyper read past the handshake first) and runs it to its end.
//!
//! Run by the connection's own task, not a spawned one, so that a tunnel
//! keeps what any open connection keeps: its place under the connection
//! cap (never closed as idle to make room), and the server's wait for open
//! connections at a stop (within `grace_period`). On a plain connection
//! hyper's server ends with `without_shutdown` and gives the socket back
//! (see [`super::recycle`]); over TLS it serves `with_upgrades`, and the
//! socket comes through hyper's own upgrade.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What runs on the client's connection after a `101`.
type Run = Box<dyn FnOnce(ClientIo) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// What a `101` response asks of the server: run this on the client's
/// connection once the `101` is out. Put in the response's extensions
/// (hence `Clone`, one run at most); a `101` without one closes the
/// connection.
#[derive(Clone)]
pub struct Then(Arc<Mutex<Option<Run>>>);

impl Then {
    /// `run`, given the client's connection after the `101`.
    pub fn new<F>(run: impl FnOnce(ClientIo) -> F + Send + 'static) -> Then
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let run: Run = Box::new(move |io| Box::pin(run(io)));
        Then(Arc::new(Mutex::new(Some(run))))
    }

    /// Runs it on `io` (once: a second run does nothing).
    pub(super) async fn run(self, io: ClientIo) {
        let run = self.0.lock().map(|mut r| r.take()).unwrap_or(None);
        if let Some(run) = run {
            run(io).await;
        }
    }
}

impl std::fmt::Debug for Then {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Then")
    }
}

/// The client's connection after a `101`, as hyper's server gave it up.
pub struct ClientIo(Inner);

enum Inner {
    /// A plain socket, and the bytes hyper had read past the handshake.
    Plain { stream: TcpStream, ahead: Bytes },
    /// hyper's upgraded connection (over TLS); it gives the bytes read
    /// ahead back itself.
    Upgraded(TokioIo<hyper::upgrade::Upgraded>),
}

impl ClientIo {
    /// A plain socket, whose first reads give `ahead`.
    pub(super) fn plain(stream: TcpStream, ahead: Bytes) -> ClientIo {
        ClientIo(Inner::Plain { stream, ahead })
    }

    /// hyper's upgraded connection.
    pub(super) fn upgraded(io: hyper::upgrade::Upgraded) -> ClientIo {
        ClientIo(Inner::Upgraded(TokioIo::new(io)))
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.0 {
            Inner::Plain { ahead, .. } if !ahead.is_empty() => {
                let n = ahead.len().min(buf.remaining());
                buf.put_slice(&ahead.split_to(n));
                Poll::Ready(Ok(()))
            }
            Inner::Plain { stream, .. } => Pin::new(stream).poll_read(cx, buf),
            Inner::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.0 {
            Inner::Plain { stream, .. } => Pin::new(stream).poll_write(cx, buf),
            Inner::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            Inner::Plain { stream, .. } => Pin::new(stream).poll_flush(cx),
            Inner::Upgraded(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            Inner::Plain { stream, .. } => Pin::new(stream).poll_shutdown(cx),
            Inner::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// Takes the [`Then`] out of a response, if it is a `101` that has one.
pub(super) fn take_then<B>(res: &mut hyper::Response<B>) -> Option<Then> {
    if res.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        return None;
    }
    res.extensions_mut().remove::<Then>()
}
