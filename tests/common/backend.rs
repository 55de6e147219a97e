//! Tiny HTTP backends for balancer tests: each answers every request with its
//! own name, counts what it served, and can be stopped and revived.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running backend.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its name, the body of every answer.
    pub name: String,
    /// Requests it answered.
    pub hits: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Starts a backend on a free port.
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Self::serve(listener, name)
    }

    /// Starts a backend on a given address (to revive a stopped one).
    pub async fn start_on(addr: SocketAddr, name: &str) -> Backend {
        let listener = TcpListener::bind(addr).await.expect("rebind backend");
        Self::serve(listener, name)
    }

    fn serve(listener: TcpListener, name: &str) -> Backend {
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU64::new(0));
        let body = Bytes::from(name.to_string());
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let body = body.clone();
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                        h.fetch_add(1, Ordering::Relaxed);
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            hits,
            task,
        }
    }

    /// Requests served so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stops accepting (open connections end with the runtime's tasks).
    pub fn stop(self) -> SocketAddr {
        self.task.abort();
        self.addr
    }
}
