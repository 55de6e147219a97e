//! Tiny HTTP backends for balancer tests: each answers every request with its
//! own name, counts what it served, and can be stopped and revived.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running backend.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its name, the body of every answer.
    pub name: String,
    /// Requests it answered.
    pub hits: Arc<AtomicU64>,
    /// Connections it accepted.
    pub accepts: Arc<AtomicU64>,
    /// Connections open now.
    pub open: Arc<AtomicI64>,
    /// What `GET /healthz` says: 200 while true, 503 after.
    pub healthy: Arc<AtomicBool>,
    /// The status of every other answer (200 to start with).
    pub status: Arc<AtomicU16>,
    /// How long every other answer takes, in ms (0 to start with).
    pub delay_ms: Arc<AtomicU64>,
    /// Requests other than `/healthz` it answered.
    pub served: Arc<AtomicU64>,
    /// The most requests (other than `/healthz`) it had in hand at once.
    pub most_at_once: Arc<AtomicU64>,
    task: JoinHandle<()>,
    /// Set to true to make every open connection drop, like a killed process.
    kill: watch::Sender<bool>,
    /// Bumped to make every open connection drop while the backend goes on
    /// accepting, like a server closing its idle keep-alive connections.
    hang_up: watch::Sender<u64>,
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
        // The stopped listener closes when its aborted task is dropped, which
        // the runtime does shortly after stop(): retry for a moment.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind backend on {addr}: {e}"),
            }
        };
        Self::serve(listener, name)
    }

    fn serve(listener: TcpListener, name: &str) -> Backend {
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU64::new(0));
        let body = Bytes::from(name.to_string());
        let accepts = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicI64::new(0));
        let (h, a, o) = (hits.clone(), accepts.clone(), open.clone());
        let healthy = Arc::new(AtomicBool::new(true));
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let served = Arc::new(AtomicU64::new(0));
        let most_at_once = Arc::new(AtomicU64::new(0));
        let in_hand = Arc::new(AtomicU64::new(0));
        let knobs = (
            healthy.clone(),
            status.clone(),
            delay_ms.clone(),
            served.clone(),
            (in_hand, most_at_once.clone()),
        );
        let (kill, killed) = watch::channel(false);
        let (hang_up, hung_up) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::Relaxed);
                o.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let body = body.clone();
                let h = h.clone();
                let o = o.clone();
                let knobs = knobs.clone();
                let mut killed = killed.clone();
                let mut hung_up = hung_up.clone();
                hung_up.mark_unchanged();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        h.fetch_add(1, Ordering::Relaxed);
                        let body = body.clone();
                        let (healthy, status, delay, served, (in_hand, most)) = knobs.clone();
                        async move {
                            if req.uri().path() == "/healthz" {
                                let code = if healthy.load(Ordering::Relaxed) {
                                    200
                                } else {
                                    503
                                };
                                let mut res = Response::new(Full::new(body));
                                *res.status_mut() =
                                    hyper::StatusCode::from_u16(code).expect("code");
                                return Ok::<_, Infallible>(res);
                            }
                            served.fetch_add(1, Ordering::Relaxed);
                            let now = in_hand.fetch_add(1, Ordering::AcqRel) + 1;
                            most.fetch_max(now, Ordering::AcqRel);
                            let ms = delay.load(Ordering::Relaxed);
                            if ms > 0 {
                                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                            }
                            in_hand.fetch_sub(1, Ordering::AcqRel);
                            let mut res = Response::new(Full::new(body));
                            *res.status_mut() =
                                hyper::StatusCode::from_u16(status.load(Ordering::Relaxed))
                                    .expect("code");
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                    // A kill drops the connection (and its socket) at once.
                    tokio::select! {
                        _ = conn => {}
                        _ = killed.wait_for(|k| *k) => {}
                        _ = hung_up.changed() => {}
                    }
                    o.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            hits,
            accepts,
            open,
            healthy,
            status,
            delay_ms,
            served,
            most_at_once,
            task,
            kill,
            hang_up,
        }
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> u64 {
        self.accepts.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> i64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Closes every open connection, and goes on serving new ones.
    pub fn hang_up_all(&self) {
        self.hang_up.send_modify(|g| *g += 1);
    }

    /// Requests served so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stops like a killed process: no more accepts, and every open
    /// connection is dropped (clients see resets or EOF).
    pub fn stop(self) -> SocketAddr {
        self.task.abort();
        let _ = self.kill.send(true);
        self.addr
    }
}
