//! TLS on a listener (the balancer's): the certificates a file names,
//! loaded and checked once into [`ListenerTls`] when the config is
//! validated; built into a rustls [`ServerConfig`] per config version (so a
//! reload that brings new certificates serves them to the next handshake,
//! while open connections keep the one they began with); and the serving of
//! one TLS connection, HTTP/2 or HTTP/1.1 as ALPN chose.
//!
//! After the handshake a connection whose ALPN chose `http/1.1` (or that
//! offered none) goes to the server's [`super::Front`] (the balancer's own
//! HTTP/1 path, generic over the stream) as a plain one does, and what it
//! hands on to hyper's HTTP/1 server on the same stream, with the bytes it
//! read ([`Prefixed`]); an `h2` one to hyper's HTTP/2 server. What the
//! accept loop
//! promises on plain connections holds here too: the first head within
//! `header_read_timeout` of the accept (the handshake included), an idle
//! keep-alive connection closed after `keepalive_timeout`, or at once when
//! the connection cap needs its place ([`super::reuse`]), `send_timeout`
//! for a client that takes nothing, answers that ask the client to close
//! (HTTP/1.1) or a GOAWAY (HTTP/2) once the server is stopping.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, ResolvesServerCertUsingSni};
use rustls::sign::CertifiedKey;
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use super::recycle::{Guarded, SendClock, now_ms};
use super::reuse::{self, Idle};
use super::upgrade::Then;
use hyper::upgrade::OnUpgrade;

/// One certificate of a listener, with the names it is chosen for.
#[derive(Clone)]
pub struct TlsCert {
    /// The SNI names that pick it (lowercase); empty for the default
    /// certificate, which answers every other name and clients that send
    /// none.
    pub names: Vec<String>,
    /// The PEM chain (leaf first), as the file names it.
    pub cert_file: PathBuf,
    /// The PEM private key.
    pub key_file: PathBuf,
    key: Arc<CertifiedKey>,
    /// Of the chain's and the key's bytes: a reload compares what the
    /// files hold, not only their names, so a renewed certificate under
    /// the same name is a change.
    digest: [u8; 32],
}

impl std::fmt::Debug for TlsCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCert")
            .field("names", &self.names)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl PartialEq for TlsCert {
    fn eq(&self, other: &Self) -> bool {
        self.names == other.names
            && self.cert_file == other.cert_file
            && self.key_file == other.key_file
            && self.digest == other.digest
    }
}

impl Eq for TlsCert {}

/// Which part of a certificate's settings an error is about, so the config
/// can name the key and its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertPart {
    /// The certificate file.
    Cert,
    /// The key file.
    Key,
    /// The `i`th name.
    Name(usize),
}

/// Why a certificate was refused, with the part to blame.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CertRefusal {
    /// The part of the settings at fault.
    pub part: CertPart,
    /// What is wrong, naming the file.
    pub message: String,
}

/// The ring provider every TLS server config of spike uses (fred's Redis
/// TLS already builds it: no second crypto library). rustls 0.23.48 calls
/// ring's provider deprecated for its lack of post-quantum key exchange;
/// the provider that has it (aws-lc-rs) is a C build of its own, and
/// Nginx and HAProxy on this machine offer none either.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

impl TlsCert {
    /// Reads `cert_file` and `key_file` (relative to `dir`, the config
    /// file's folder), checks that the key is the certificate's and that
    /// the certificate covers every name in `names`.
    pub fn load(
        dir: Option<&Path>,
        names: &[String],
        cert_file: &str,
        key_file: &str,
    ) -> Result<TlsCert, CertRefusal> {
        let path = |value: &str| {
            let p = Path::new(value.trim());
            match dir {
                Some(dir) if p.is_relative() => dir.join(p),
                _ => p.to_path_buf(),
            }
        };
        let refuse = |part, message: String| CertRefusal { part, message };
        let (cert_file, key_file) = (path(cert_file), path(key_file));
        let chain = crate::redis_client::read_certs(&cert_file)
            .map_err(|e| refuse(CertPart::Cert, e.to_string()))?;
        let key = crate::redis_client::read_key(&key_file)
            .map_err(|e| refuse(CertPart::Key, e.to_string()))?;
        let mut digest = sha2::Sha256::new();
        for c in &chain {
            digest.update(c.as_ref());
        }
        digest.update(key.secret_der());
        let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
            refuse(
                CertPart::Key,
                match e {
                    rustls::Error::InconsistentKeys(_) => format!(
                        "{} is not the private key of the certificate in {}",
                        key_file.display(),
                        cert_file.display()
                    ),
                    e => format!("{}: not a key rustls can use: {e}", key_file.display()),
                },
            )
        })?;
        let mut lowered = Vec::with_capacity(names.len());
        // Only to check the names: the resolver used is `BySni`.
        let mut check = ResolvesServerCertUsingSni::new();
        for (i, name) in names.iter().enumerate() {
            let name = name.trim().to_ascii_lowercase();
            check.add(&name, certified.clone()).map_err(|e| {
                refuse(
                    CertPart::Name(i),
                    format!(
                        "{name:?}: not a DNS name the certificate in {} covers ({e})",
                        cert_file.display()
                    ),
                )
            })?;
            lowered.push(name);
        }
        // Absolute, for the configs `nginx-conf` and `haproxy-conf` print
        // (whose relative paths would be from another directory).
        let absolute = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
        Ok(TlsCert {
            names: lowered,
            cert_file: absolute(cert_file),
            key_file: absolute(key_file),
            key: Arc::new(certified),
            digest: digest.finalize().into(),
        })
    }
}

/// The certificates of a listener: the first is the default, the others
/// are picked by the name a client asks for (SNI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// Default first.
    pub certs: Vec<TlsCert>,
}

impl ListenerTls {
    /// Every file the certificates were read from: a change of any of them
    /// is a reason to reload.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.certs
            .iter()
            .flat_map(|c| [c.cert_file.as_path(), c.key_file.as_path()])
    }

    /// The rustls config for these certificates: TLS 1.3 and 1.2, ALPN
    /// `h2` then `http/1.1`, and `sessions` for resumption (shared by every
    /// config version, so a reload does not end the sessions clients hold).
    pub fn server_config(&self, sessions: &Sessions) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut by_name = HashMap::new();
        for c in self.certs.iter().skip(1) {
            for n in &c.names {
                by_name.entry(n.clone()).or_insert_with(|| c.key.clone());
            }
        }
        let default = self.certs.first().map(|c| c.key.clone());
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(BySni { by_name, default }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ticketer = sessions.ticketer.clone();
        config.session_storage = sessions.cache.clone();
        Ok(Arc::new(config))
    }
}

/// Picks a certificate by the client's SNI name, else the default.
#[derive(Debug)]
struct BySni {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls hands the name over lowercased.
        hello
            .server_name()
            .and_then(|n| self.by_name.get(n))
            .or(self.default.as_ref())
            .cloned()
    }
}

/// What makes sessions resumable: the ticket keys (TLS 1.3 and 1.2
/// tickets, rotated by rustls every 6 hours) and a cache for clients that
/// resume by session id. Made once per process and kept by every config
/// version.
#[derive(Debug, Clone)]
pub struct Sessions {
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    cache: Arc<dyn rustls::server::StoresServerSessions>,
}

/// Sessions kept by id for TLS 1.2 clients without tickets (about what
/// `spike nginx-conf` prints for Nginx: `ssl_session_cache shared:SSL:5m`).
const SESSION_CACHE: usize = 20_000;

impl Sessions {
    /// New ticket keys and an empty cache.
    pub fn new() -> Result<Sessions, rustls::Error> {
        Ok(Sessions {
            ticketer: rustls::crypto::ring::Ticketer::new()?,
            cache: rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE),
        })
    }
}

/// Where an accept loop gets the TLS config for its next handshake: the
/// config version in force, so a reload's certificates take effect for new
/// connections.
pub trait CurrentTls: Send + Sync + 'static {
    /// The config for the next handshake; `None` closes the connection
    /// (the listener was started with TLS: never served in plaintext).
    fn current(&self) -> Option<Arc<ServerConfig>>;
}

/// What serving one TLS connection needs of its server.
pub(super) struct TlsConn {
    pub(super) h1: http1::Builder,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) stopping: Arc<AtomicBool>,
    pub(super) header_read_timeout: Duration,
    pub(super) keepalive_timeout: Duration,
    pub(super) first_head_deadline: tokio::time::Instant,
    pub(super) send_timeout: Option<Duration>,
    pub(super) idle: Option<Idle>,
}

/// A TLS connection as the balancer's own HTTP/1 path serves it.
pub type TlsClient = tokio_rustls::server::TlsStream<Watched>;

/// Serves one accepted connection over TLS, until the client closes, a
/// timeout closes it, or the server stops: HTTP/2 with hyper's server and
/// `service`; HTTP/1.1 with `front` first when there is one (as a plain
/// connection is), and hyper's server with `service` for what it hands on.
pub(super) async fn serve<S, B>(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    service: S,
    mut conn: TlsConn,
    front: Option<(Arc<dyn super::Front>, super::ConnContext)>,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::new(conn.stopping.clone(), conn.idle.clone()));
    let io = Watched {
        stream,
        activity: activity.clone(),
        send: SendClock::new(conn.send_timeout),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshake = tokio::time::timeout_at(conn.first_head_deadline, acceptor.accept(io));
    let tls = tokio::select! {
        done = handshake => match done {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        },
        _ = conn.stop.wait_for(|stop| *stop) => return,
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let service = Counted {
        inner: service,
        activity: activity.clone(),
    };
    if h2 {
        let io = TokioIo::new(tls);
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        let c = builder.serve_connection(io, service);
        drive(c, &activity, &mut conn, false, |c| c.graceful_shutdown()).await;
    } else {
        let (tls, ahead) = match front {
            Some((front, ctx)) => match front.serve_tls(tls, peer, ctx).await {
                Some(handed) => {
                    conn.first_head_deadline = handed.head_deadline;
                    (handed.stream, handed.ahead)
                }
                None => return,
            },
            None => (tls, Bytes::new()),
        };
        let io = TokioIo::new(Prefixed { ahead, inner: tls });
        // The head timeout is the driver's, from the head's first byte:
        // hyper's would run over the keep-alive wait.
        let mut builder = conn.h1.clone();
        builder.header_read_timeout(None);
        let c = builder.serve_connection(io, service).with_upgrades();
        drive(c, &activity, &mut conn, true, |c| c.graceful_shutdown()).await;
        // After a request that asked to upgrade, hyper gives the
        // connection up whatever the answer: after a `101` with a `Then`,
        // it is the upgraded protocol's (see [`super::upgrade`]; the place
        // stays busy while it is used); else it is closed here, with TLS's
        // close_notify after the last answer.
        let (on, then) = activity.take_upgrade();
        if let Some(on) = on
            && let Ok(upgraded) = on.await
        {
            let io = super::upgrade::ClientIo::upgraded(upgraded);
            match then {
                Some(then) => then.run(io).await,
                None => {
                    let mut io = io;
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
                }
            }
        }
    }
}

/// Runs a hyper connection, and ends it when it has been idle for
/// `keepalive_timeout`, when a head takes longer than
/// `header_read_timeout` (HTTP/1.1: from its first byte, or the accept for
/// the first), when its place is claimed for a new client, and gracefully
/// when the server stops or drains.
async fn drive<C>(
    conn: C,
    activity: &Activity,
    tls: &mut TlsConn,
    heads_timed: bool,
    graceful: impl Fn(Pin<&mut C>),
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    let mut closing = false;
    let timer = tokio::time::sleep_until(tls.first_head_deadline);
    tokio::pin!(timer);
    loop {
        if !closing
            && (tls.stopping.load(Ordering::Relaxed)
                || *tls.stop.borrow()
                || activity.claimed.load(Ordering::Relaxed))
        {
            closing = true;
            graceful(conn.as_mut());
        }
        let deadline = if closing || activity.open.load(Ordering::Acquire) > 0 {
            None
        } else if !activity.begun.load(Ordering::Acquire) {
            Some(tls.first_head_deadline)
        } else {
            let at = |ms: u64| {
                let ago = now_ms().saturating_sub(ms);
                tokio::time::Instant::now()
                    .checked_sub(Duration::from_millis(ago))
                    .unwrap_or_else(tokio::time::Instant::now)
            };
            let fresh = activity.fresh_at.load(Ordering::Acquire);
            Some(if heads_timed && fresh != 0 {
                at(fresh) + tls.header_read_timeout
            } else {
                at(activity.ended_at.load(Ordering::Acquire)) + tls.keepalive_timeout
            })
        };
        if let Some(d) = deadline {
            if tokio::time::Instant::now() >= d {
                // Idle too long, or a head too slow: nothing is in flight.
                return;
            }
            timer.as_mut().reset(d);
        }
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "TLS connection ended with an error");
                }
                return;
            }
            () = &mut timer, if deadline.is_some() => {}
            () = activity.changed.notified() => {}
            // Closed gracefully, not dropped: the last response's bytes may
            // still be in hyper's buffer, or unflushed under TLS.
            () = reuse::claimed(tls.idle.as_ref()), if !closing => {
                activity.claimed.store(true, Ordering::Relaxed);
            }
            _ = tls.stop.wait_for(|stop| *stop), if !closing => {}
        }
    }
}

/// Where one TLS connection is: requests in flight, and when it went quiet.
struct Activity {
    /// Requests (HTTP/2: streams) whose response body is still alive.
    open: AtomicUsize,
    /// A first request began.
    begun: AtomicBool,
    /// When the last request ended, in `now_ms`.
    ended_at: AtomicU64,
    /// When the first byte came since then (0: none), for the head timeout.
    fresh_at: AtomicU64,
    /// Its place was claimed for a new client: it closes when idle.
    claimed: AtomicBool,
    /// The server is stopping or draining.
    stopping: Arc<AtomicBool>,
    idle: Option<Idle>,
    /// Wakes the driver: a request ended, or one began while stopping.
    changed: Notify,
    /// The connection on its way from hyper after a request that asked
    /// to upgrade, and what a `101` asked to run on it.
    upgrade: std::sync::Mutex<(Option<OnUpgrade>, Option<Then>)>,
}

impl Activity {
    fn new(stopping: Arc<AtomicBool>, idle: Option<Idle>) -> Activity {
        Activity {
            open: AtomicUsize::new(0),
            begun: AtomicBool::new(false),
            ended_at: AtomicU64::new(now_ms()),
            fresh_at: AtomicU64::new(0),
            claimed: AtomicBool::new(false),
            stopping,
            idle,
            changed: Notify::new(),
            upgrade: std::sync::Mutex::new((None, None)),
        }
    }

    fn began(&self) {
        self.begun.store(true, Ordering::Release);
        self.fresh_at.store(0, Ordering::Release);
        if self.open.fetch_add(1, Ordering::AcqRel) == 0
            && let Some(idle) = &self.idle
            && !idle.busy()
        {
            // Claimed just as the client spoke: served, then closed.
            self.claimed.store(true, Ordering::Relaxed);
            self.changed.notify_one();
        }
        if self.stopping.load(Ordering::Relaxed) {
            self.changed.notify_one();
        }
    }

    fn ended(&self) {
        self.ended_at.store(now_ms(), Ordering::Release);
        self.fresh_at.store(0, Ordering::Release);
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Not idle after a `101`: the connection goes on upgraded.
            let upgrading = self.upgrade.lock().is_ok_and(|u| u.1.is_some());
            if let Some(idle) = self.idle.as_ref().filter(|_| !upgrading) {
                idle.idle();
            }
            self.changed.notify_one();
        }
    }

    /// What hyper gives up after an upgrade request, and its `101`'s run.
    fn take_upgrade(&self) -> (Option<OnUpgrade>, Option<Then>) {
        self.upgrade
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or((None, None))
    }

    fn read_some(&self) {
        if self.open.load(Ordering::Acquire) == 0 && self.fresh_at.load(Ordering::Acquire) == 0 {
            self.fresh_at.store(now_ms().max(1), Ordering::Release);
            self.changed.notify_one();
        }
    }
}

/// The client's socket under TLS: notes when bytes come while the
/// connection is idle, and fails writes the client takes nothing of for
/// `send_timeout`.
pub struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
    send: SendClock,
}

impl Watched {
    /// Ready once the socket has something to read (or is closed).
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_read_ready(cx)
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.send.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.send.check(cx, polled)
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

/// A connection whose first reads give `ahead`: the bytes a front read of
/// the request it hands to hyper.
struct Prefixed<S> {
    ahead: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            let ahead = self.ahead.split_to(n);
            buf.put_slice(&ahead);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The service as hyper sees it on a TLS connection: counts requests in
/// flight until their response body is dropped.
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> Service<Request<Incoming>> for Counted<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = Responding<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.activity.began();
        // Kept by the connection, which gets the socket through it after
        // the answer; the service never sees hyper's upgrade.
        if req.extensions().get::<OnUpgrade>().is_some()
            && let Ok(mut u) = self.activity.upgrade.lock()
        {
            u.0 = Some(hyper::upgrade::on(&mut req));
        }
        Responding {
            inner: self.inner.call(req),
            done: Some(InFlight(self.activity.clone())),
        }
    }
}

/// One request counted as in flight until dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.ended();
    }
}

pin_project_lite::pin_project! {
    /// A response on its way; its body carries the count on.
    struct Responding<F> {
        #[pin]
        inner: F,
        done: Option<InFlight>,
    }
}

impl<F, B, E> Future for Responding<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(mut res)) => {
                if let Some(then) = super::upgrade::take_then(&mut res)
                    && let Some(InFlight(activity)) = this.done.as_ref()
                    && let Ok(mut slot) = activity.upgrade.lock()
                {
                    slot.1 = Some(then);
                }
                let done = this.done.take();
                Poll::Ready(Ok(res.map(|inner| Guarded::new(inner, done))))
            }
        }
    }
}

/// A response body that ends its request's count when hyper drops it.
type CountedBody<B> = Guarded<B, Option<InFlight>>;
