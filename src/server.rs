//! The accept loop that the node and the balancer share: bind, `TCP_NODELAY`,
//! a connection cap, hyper's HTTP/1 with a header-read timeout, and graceful
//! shutdown. One loop, so both modes keep the same promises to clients.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;

use crate::config::ServerConfig;

/// Binds a listener with `SO_REUSEADDR` and a deep backlog, because a flash
/// sale opens thousands of connections in the same second.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves HTTP/1 on `listener` until `shutdown` resolves, then stops accepting
/// and gives in-flight requests `limits.grace_period` to finish.
///
/// `make_service` is called once per connection with the client's address,
/// so services can see the TCP peer (ip_hash, `X-Forwarded-For`).
pub async fn serve<F, S, B>(
    listener: TcpListener,
    limits: &ServerConfig,
    make_service: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    serve_with(listener, limits, permits, make_service, shutdown).await;
}

/// [`serve`] with the connection cap's permits passed in, so that several
/// accept loops on one port (the balancer's worker threads) share one
/// `max_connections`.
pub async fn serve_with<F, S, B>(
    listener: TcpListener,
    limits: &ServerConfig,
    permits: Arc<Semaphore>,
    make_service: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        // Request heads over this are answered 431 by hyper, and targets
        // over its 64k URI limit 414, before any service code runs.
        // More than 100 headers is a 431 too: hyper's default limit. It is
        // deliberately not set with `max_headers(100)`, which gives the same
        // limit but makes hyper fill a 100-slot array on every request
        // (~3% of a node's CPU on the sold-out path) instead of leaving it
        // uninitialised.
        .max_buf_size(96 * 1024);
    tokio::pin!(shutdown);
    loop {
        // Take a permit before accepting: over the cap, clients wait in the
        // kernel's backlog instead of costing us memory.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = make_service(peer);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let first_byte_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            // A spawned task reserves room for its largest state, and the
            // hyper connection (with the service's future inside) is ~16 KiB.
            // Until a client sends its first byte it costs only this small
            // task; the connection is boxed, once, when there is work. One
            // that sends nothing in time is closed.
            // `peek`, not `readable`: readiness can be reported before any
            // byte has arrived.
            let mut first = [0u8; 1];
            match tokio::time::timeout(first_byte_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let conn =
                Box::pin(watcher.watch(builder.serve_connection(TokioIo::new(stream), service)));
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.grace_period) => {
            tracing::warn!("grace period over with requests still in flight");
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM, so every mode shuts down the same way.
///
/// The handlers are installed when this is called, not when the future is
/// first polled: call it before binding, so that a SIGTERM that arrives as
/// soon as the port answers still means a graceful stop. Needs a runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
                match s {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(int) => {}
                () = wait(term) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A complete JSON answer with the right content type; static bodies cost no
/// allocation.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    res
}
