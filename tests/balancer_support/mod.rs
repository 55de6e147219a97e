//! Helpers for the balancer tests: an in-process balancer on ephemeral
//! ports, config text, a keep-alive HTTP client, raw HTTP over TCP (with a
//! chosen source address), and a load generator that counts failures.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use spike::balancer::{Balancer, Reloader};
use spike::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::common::spike::write_config;

pub mod recorder;
pub mod tls;

/// One upstream line of a test config.
pub struct Up {
    /// Its address.
    pub addr: SocketAddr,
    /// Its weight.
    pub weight: u32,
    /// Extra lines (`backup = true`, `max_fails = 2` ...).
    pub extra: &'static str,
}

/// Shorthand for an upstream with a weight and no extras.
pub fn up(addr: SocketAddr, weight: u32) -> Up {
    Up {
        addr,
        weight,
        extra: "",
    }
}

/// [`config_text`] with `extra` lines at the top of `[balancer]` (the
/// settings a test is about).
pub fn config_text_with(
    strategy: &str,
    listen: &str,
    admin: &str,
    ups: &[Up],
    extra: &str,
) -> String {
    config_text(strategy, listen, admin, ups)
        .replace("[balancer]\n", &format!("[balancer]\n{extra}\n"))
}

/// The text of a balancer-only config.
pub fn config_text(strategy: &str, listen: &str, admin: &str, ups: &[Up]) -> String {
    let mut s = format!(
        "[balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\nstrategy = \"{strategy}\"\nconnect_timeout = \"1s\"\nresponse_timeout = \"5s\"\n"
    );
    for u in ups {
        s.push_str(&format!(
            "\n[[balancer.upstream]]\naddr = \"{}\"\nweight = {}\nfail_timeout = \"1s\"\n{}\n",
            u.addr, u.weight, u.extra
        ));
    }
    s
}

/// A balancer running inside the test's runtime.
pub struct Running {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Where the admin endpoints are.
    pub admin: SocketAddr,
    /// The config file (rewrite it to reload).
    pub path: PathBuf,
    /// Reloads in-process.
    pub reloader: Reloader,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    /// Writes `text` to a fresh file and runs a balancer from it on
    /// `127.0.0.1:0` listeners.
    pub async fn start(text: &str) -> Running {
        Running::start_workers(text, 1).await
    }

    /// Like [`Running::start`], with `workers` client worker threads (the
    /// test's runtime plus `workers - 1` threads of their own).
    pub async fn start_workers(text: &str, workers: usize) -> Running {
        let path = write_config(text);
        let config = Config::load(&path).expect("valid test config");
        let balancer = Balancer::with_workers(config, workers).expect("balancer");
        let reloader = balancer.reloader();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = listener.local_addr().expect("addr");
        let admin_addr = admin.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            balancer
                .run(listener, admin, async move {
                    let _ = rx.await;
                })
                .await
                .expect("balancer run");
        });
        Running {
            addr,
            admin: admin_addr,
            path,
            reloader,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// The URL of `path` on the balancer.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the balancer and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        crate::common::spike::remove_config(&self.path);
    }
}

/// A keep-alive HTTP/1.1 client, as a load tester would use.
pub type Http = Client<HttpConnector, Empty<Bytes>>;

/// A fresh keep-alive client.
pub fn http() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `url`: status and body, or the error in words.
pub async fn get(client: &Http, url: &str) -> Result<(u16, String), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let res = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// GET that must succeed with 200; returns the body (the backend's name).
pub async fn get_ok(client: &Http, url: &str) -> String {
    match get(client, url).await {
        Ok((200, body)) => body,
        other => panic!("GET {url}: {other:?}"),
    }
}

/// Sends raw bytes on a new TCP connection (from `source` if given) and
/// reads until the server closes; returns everything read.
pub async fn raw(source: Option<IpAddr>, to: SocketAddr, request: &[u8]) -> String {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .unwrap_or_else(|e| panic!("bind source {ip}: {e}"));
    }
    let mut stream = socket.connect(to).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("server closes the connection")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// The body of a raw response (everything after the head).
pub fn body_of(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
}

/// Load from `clients` keep-alive clients until `stop` is set.
pub struct Load {
    /// Requests answered 200.
    pub ok: Arc<AtomicU64>,
    /// Requests that failed, with the first few errors.
    pub failed: Arc<AtomicU64>,
    /// Some of the errors seen.
    pub errors: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `clients` loops of GET `url`.
    pub fn start(url: String, clients: usize) -> Load {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let (ok, failed, errors, stop, url) = (
                    ok.clone(),
                    failed.clone(),
                    errors.clone(),
                    stop.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let client = http();
                    while !stop.load(Ordering::Relaxed) {
                        match get(&client, &url).await {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let mut e = errors.lock().expect("lock");
                                if e.len() < 10 {
                                    e.push(format!("{other:?}"));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            ok,
            failed,
            errors,
            stop,
            tasks,
        }
    }

    /// Stops the clients; returns (ok, failed, some errors).
    pub async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let errors = self.errors.lock().expect("lock").clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// Nginx's smooth weighted round-robin, written out again independently of
/// spike's code, for the expected order of picks.
pub fn nginx_smooth_order(weights: &[i64], picks: usize) -> Vec<usize> {
    let mut current = vec![0i64; weights.len()];
    let total: i64 = weights.iter().sum();
    (0..picks)
        .map(|_| {
            let mut best = 0;
            for i in 0..weights.len() {
                current[i] += weights[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            best
        })
        .collect()
}

/// Nginx's ip_hash for an IPv4 client over primaries with these weights
/// (no peer down), written out again independently of spike's code.
pub fn nginx_ip_hash(ip: [u8; 4], weights: &[u64]) -> usize {
    let mut hash: u64 = 89;
    for b in &ip[..3] {
        hash = (hash * 113 + *b as u64) % 6271;
    }
    let mut w = hash % weights.iter().sum::<u64>();
    let mut i = 0;
    while w >= weights[i] {
        w -= weights[i];
        i += 1;
    }
    i
}

/// Reads one response with a Content-Length body (at most 10 s), leaving
/// the connection open; everything read.
pub async fn read_response(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if out.len() >= end + 4 + length {
                    return;
                }
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server closed `s` within `limit` (end of file, a reset, or
/// a TLS close).
pub async fn closed_within(s: &mut (impl tokio::io::AsyncRead + Unpin), limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}
