//! A TCP proxy between a node and redis-server that can lose a reply: in
//! "cut" mode it forwards the next request to Redis, lets Redis run it, then
//! closes the client's connection without passing the reply on. That is the
//! ambiguous outcome of a real network: the command ran, the answer is lost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy.
pub struct CutProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    cut_next: Arc<AtomicBool>,
}

impl CutProxy {
    /// Proxies to `upstream`.
    pub async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let cut_next = Arc::new(AtomicBool::new(false));
        let cut = cut_next.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cut = cut.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    pipe(client, server, cut).await;
                });
            }
        });
        CutProxy { addr, cut_next }
    }

    /// The next request that passes is delivered, and its reply is lost.
    pub fn cut_next_reply(&self) {
        self.cut_next.store(true, Ordering::SeqCst);
    }
}

async fn pipe(client: TcpStream, server: TcpStream, cut: Arc<AtomicBool>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let lose_reply = Arc::new(AtomicBool::new(false));
    let lose = lose_reply.clone();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Only a deduction (EVALSHA) is cut, not the handshake or PINGs.
            let is_evalsha = buf[..n]
                .windows(7)
                .any(|w| w.eq_ignore_ascii_case(b"EVALSHA"));
            if is_evalsha && cut.swap(false, Ordering::SeqCst) {
                lose.store(true, Ordering::SeqCst);
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if lose_reply.load(Ordering::SeqCst) {
            // Redis has run it; the client never hears.
            break;
        }
        if cw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    up.abort();
}
