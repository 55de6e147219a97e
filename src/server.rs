//! The accept loop that the node and the balancer share: bind, `TCP_NODELAY`,
//! a connection cap, hyper's HTTP/1 with a header-read timeout, an idle
//! keep-alive timeout, no buffers held by idle connections ([`recycle`]), and
//! graceful shutdown. One loop, so both modes keep the same promises to
//! clients.

pub mod proxy_protocol;
mod recycle;
pub mod reuse;
pub mod tls;
pub mod upgrade;

pub use reuse::{Idle, Reusable};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, watch};

use crate::config::{DEFAULT_MAX_CONNECTIONS, ServerConfig};

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
    socket.listen(BACKLOG as u32)
}

/// The backlog of every listening socket: a flash sale opens thousands of
/// connections in the same second.
const BACKLOG: i32 = 4096;

/// Listening sockets for `more` further accept loops on `listener`'s
/// address, each its own socket in one `SO_REUSEPORT` group with
/// `listener`: the kernel hands each new connection to one socket, so it
/// wakes one loop. With one socket shared by every loop (its descriptor
/// duplicated), each connection woke every loop and all but one found
/// nothing to accept: under `ab` a third more `accept` calls than
/// connections and twice Nginx's context switches, which spreads its
/// listeners with `EPOLLEXCLUSIVE` (that flag cannot be given to tokio's
/// epoll).
///
/// `listener` was bound without `SO_REUSEPORT` and is only now made part
/// of a group, so another process that binds the port as usual still gets
/// "address in use"; only one that sets `SO_REUSEPORT` itself, as the same
/// user, could join. An error (a kernel without it) leaves `listener` as
/// it was.
pub fn listeners_for_loops(
    listener: &TcpListener,
    more: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let first = socket2::SockRef::from(listener);
    let addr = listener.local_addr()?;
    first.set_reuse_port(true)?;
    let made = (0..more)
        .map(|_| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            if addr.is_ipv6() {
                socket.set_only_v6(first.only_v6()?)?;
            }
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(BACKLOG)?;
            Ok(std::net::TcpListener::from(socket))
        })
        .collect::<std::io::Result<Vec<_>>>();
    if made.is_err() {
        let _ = first.set_reuse_port(false);
    }
    made
}

/// Sets `TCP_NODELAY` on the listening socket where the sockets it accepts
/// inherit it (Linux), so that an accepted connection needs no `setsockopt`
/// of its own: one system call fewer for every connection, which is a
/// request for HTTP/1.0 clients. `false` elsewhere, or if it failed: then
/// each accepted socket is set as it comes.
fn set_nodelay_for_accepted(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux")
        && socket2::SockRef::from(listener)
            .set_tcp_nodelay(true)
            .is_ok()
}

/// Serves HTTP/1 on `listener` until `shutdown` resolves, then stops accepting,
/// closes idle connections, and gives in-flight requests
/// `limits.grace_period` to finish (their responses say `Connection: close`).
///
/// `make_service` is called once per connection with the client's address,
/// so services can see the TCP peer (ip_hash, `X-Forwarded-For`).
pub async fn serve<F, S, B>(
    listener: TcpListener,
    limits: &ServerConfig,
    make_service: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_with(
        listener,
        limits,
        ServeOptions::new(limits),
        make_service,
        shutdown,
    )
    .await;
}

/// What an accept loop of [`serve_with`] has beyond [`serve`]'s: named
/// fields, because four optional arguments in a row were easy to swap.
pub struct ServeOptions {
    /// The connection cap in force (the permits there are in all).
    pub most: usize,
    /// The connection cap, shared by every loop on the port.
    pub permits: Arc<Semaphore>,
    /// The idle keep-alive connections of every loop on the port, closed
    /// (oldest first) when the cap is reached and a new client comes.
    pub reusable: Arc<Reusable>,
    /// `Some((share, me))`: new connections are shared evenly among the
    /// loops, as [`AcceptShare`] says, this one being loop `me`.
    pub share: Option<(Arc<AcceptShare>, usize)>,
    /// A connection whose client takes no byte of a response for this
    /// long is closed (Nginx's `send_timeout`).
    pub send_timeout: Option<Duration>,
    /// Where every connection goes first, before hyper's server.
    pub front: Option<Arc<dyn Front>>,
    /// Set by the caller to make every answer ask its client to close
    /// before the stop itself (a balancer draining); set by the loop at
    /// the stop either way.
    pub closing: Option<Arc<AtomicBool>>,
    /// Which peers must open with a PROXY protocol header (read before
    /// anything else reads the socket), and which are refused.
    pub proxy_protocol: Option<Arc<dyn proxy_protocol::Gate>>,
    /// TLS on every connection, with the certificates in force at its
    /// handshake; such connections go to hyper (see [`tls`]).
    pub tls: Option<Arc<dyn tls::CurrentTls>>,
}

impl ServeOptions {
    /// One loop alone on its port, with its own connection cap (one
    /// descriptor per client: [`connection_cap`]): what [`serve`] runs.
    pub fn new(limits: &ServerConfig) -> ServeOptions {
        ServeOptions::with_cap(connection_cap(limits, 1))
    }

    /// A loop with a cap of `most` connections of its own, and nothing else.
    pub fn with_cap(most: usize) -> ServeOptions {
        ServeOptions {
            most,
            permits: Arc::new(Semaphore::new(most)),
            reusable: Reusable::new(most),
            share: None,
            send_timeout: None,
            front: None,
            closing: None,
            proxy_protocol: None,
            tls: None,
        }
    }
}

/// Descriptors kept free of clients by a cap sized from the open-files
/// limit: listeners, the admin port, Redis, logs, health checks and the
/// few files a process opens.
const RESERVED_FILES: u64 = 64;

/// The connection cap in force for a server whose clients each take
/// `files_per_client` descriptors (the balancer's 2: the client's and an
/// upstream connection; a node's 1): `[server] max_connections` as the
/// file sets it, or, left out, what the open-files limit leaves room for
/// after [`RESERVED_FILES`], at most [`DEFAULT_MAX_CONNECTIONS`], as
/// HAProxy sizes its `maxconn`. Without it, under `ulimit -n 256` a flood
/// took every descriptor: upstream connects failed (502s) and every
/// accept failed with EMFILE. The first sizing is said once in the log; a
/// set value the limit cannot hold is warned about.
pub fn connection_cap(limits: &ServerConfig, files_per_client: u64) -> usize {
    static SAID: AtomicBool = AtomicBool::new(false);
    let files = open_files_limit();
    let room = files.map(|n| {
        usize::try_from(n.saturating_sub(RESERVED_FILES) / files_per_client.max(1))
            .unwrap_or(usize::MAX)
            .max(1)
    });
    let said = SAID.swap(true, Ordering::Relaxed);
    match (limits.max_connections, room) {
        (Some(set), Some(room)) if set > room => {
            if !said {
                tracing::warn!(
                    max_connections = set,
                    open_files_limit = files,
                    "max_connections is more than the open-files limit leaves room for ({room}): past that, accepts and upstream connects fail with EMFILE; raise the limit (ulimit -n, LimitNOFILE) or lower max_connections"
                );
            }
            set
        }
        (Some(set), _) => set,
        (None, Some(room)) => {
            let cap = room.min(DEFAULT_MAX_CONNECTIONS);
            if !said {
                tracing::info!(
                    max_connections = cap,
                    open_files_limit = files,
                    "max_connections not set: sized from the open-files limit ({RESERVED_FILES} kept for listeners, Redis and upstreams' spare, {files_per_client} per client), at most {DEFAULT_MAX_CONNECTIONS}"
                );
            }
            cap
        }
        (None, None) => DEFAULT_MAX_CONNECTIONS,
    }
}

/// The soft open-files limit (`RLIMIT_NOFILE`), read from
/// `/proc/self/limits` (no unsafe call for one number); `None` where there
/// is no such file or it says "unlimited".
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// How several accept loops on one port (the balancer's worker threads)
/// share new connections: a loop takes the next one only while it holds at
/// most one more open connection than the least loaded loop.
///
/// All loops wait on the same listening socket and the kernel wakes them
/// all, so without this the first one awake takes a whole burst (60
/// connections opened at once split 57/2/1 over three workers), and its
/// clients queue behind each other while another worker idles: the reason
/// Nginx has `accept_mutex` and `EPOLLEXCLUSIVE`. A loop that must leave
/// its turn is woken as soon as any count changes, since with short
/// connections (`ab`, one request per connection) the counts change faster
/// than any polling interval, and a loop that sleeps while it is its turn
/// stalls every accept.
#[derive(Debug)]
pub struct AcceptShare {
    open: Box<[AtomicU64]>,
    /// Loops that never started (no thread, runtime or listener): their
    /// count of 0 must not hold the others to one connection each.
    gone: Box<[AtomicBool]>,
    /// Loops waiting for their turn; counts changes only notify when some.
    waiting: AtomicUsize,
    turn_changed: Notify,
    /// Each loop has a socket of its own ([`listeners_for_loops`]) and
    /// the kernel spreads new connections over them: a loop accepts what
    /// its socket has (one that waited for its turn would leave its
    /// socket's clients waiting while the others cannot take them).
    by_kernel: AtomicBool,
}

impl AcceptShare {
    /// A share among `loops` accept loops, numbered from 0.
    pub fn new(loops: usize) -> AcceptShare {
        AcceptShare {
            open: (0..loops.max(1)).map(|_| AtomicU64::new(0)).collect(),
            gone: (0..loops.max(1)).map(|_| AtomicBool::new(false)).collect(),
            waiting: AtomicUsize::new(0),
            turn_changed: Notify::new(),
            by_kernel: AtomicBool::new(false),
        }
    }

    /// From now on every loop has its own socket, spread over by the
    /// kernel ([`listeners_for_loops`]): no loop waits for a turn; the
    /// counts stay, for `/metrics`.
    pub fn spread_by_kernel(&self) {
        self.by_kernel.store(true, Ordering::SeqCst);
        self.turn_changed.notify_waiters();
    }

    /// Loop `me` will not accept (its thread or runtime could not start):
    /// the others stop comparing themselves with it, and any waiting for
    /// their turn look again.
    pub fn leave(&self, me: usize) {
        if let Some(g) = self.gone.get(me) {
            g.store(true, Ordering::SeqCst);
        }
        self.turn_changed.notify_waiters();
    }

    /// Open connections of each loop (for `/metrics`).
    pub fn open(&self) -> impl Iterator<Item = u64> + '_ {
        self.open.iter().map(|c| c.load(Ordering::SeqCst))
    }

    /// Whether each loop has a socket of its own
    /// ([`AcceptShare::spread_by_kernel`]).
    pub fn by_kernel(&self) -> bool {
        self.by_kernel.load(Ordering::Relaxed)
    }

    fn is_turn_of(&self, me: usize) -> bool {
        if self.by_kernel.load(Ordering::Relaxed) {
            return true;
        }
        let Some(mine) = self.open.get(me) else {
            return true;
        };
        let mine = mine.load(Ordering::SeqCst);
        self.open
            .iter()
            .enumerate()
            .zip(self.gone.iter())
            .all(|((w, c), gone)| {
                w == me || gone.load(Ordering::SeqCst) || mine <= c.load(Ordering::SeqCst) + 1
            })
    }

    /// Resolves once loop `me` may take the next connection.
    async fn turn(&self, me: usize) {
        while !self.is_turn_of(me) {
            let changed = self.turn_changed.notified();
            tokio::pin!(changed);
            // Registered before the second look: a change after it wakes us
            // (every change is SeqCst and then reads `waiting`).
            changed.as_mut().enable();
            self.waiting.fetch_add(1, Ordering::SeqCst);
            if !self.is_turn_of(me) {
                changed.await;
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn change(&self, me: usize, opened: bool) {
        if let Some(c) = self.open.get(me) {
            if opened {
                c.fetch_add(1, Ordering::SeqCst);
            } else {
                c.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.turn_changed.notify_waiters();
        }
    }
}

/// Counts a connection as open on its loop until dropped.
struct OpenOnLoop(Arc<AcceptShare>, usize);

impl OpenOnLoop {
    fn new(share: &Arc<AcceptShare>, me: usize) -> OpenOnLoop {
        share.change(me, true);
        OpenOnLoop(share.clone(), me)
    }
}

impl Drop for OpenOnLoop {
    fn drop(&mut self) {
        self.0.change(self.1, false);
    }
}

/// What the first owner of a new connection (a [`Front`]) knows of the
/// server it belongs to: its limits and whether it is stopping.
pub struct ConnContext {
    /// Becomes true when the server stops: an idle connection closes.
    pub stop: watch::Receiver<bool>,
    /// Set when the server stops: answers ask the client to close.
    pub stopping: Arc<AtomicBool>,
    /// A client that has not sent its request head by then is closed.
    pub header_read_timeout: Duration,
    /// The first request's head must be in by then (`header_read_timeout`
    /// after the accept, as Nginx's `client_header_timeout`).
    pub first_head_deadline: tokio::time::Instant,
    /// A keep-alive client that sends no next request by then is closed.
    pub keepalive_timeout: Duration,
    /// Says when the connection waits for a next request, and hears when
    /// it is closed to make room for a new client ([`reuse`]).
    pub idle: Option<Idle>,
    permits: Arc<Semaphore>,
    most: usize,
}

impl ConnContext {
    /// Whether so many connections are open that an idle one should give
    /// its buffers back (see [`recycle`]).
    pub fn crowded(&self) -> bool {
        recycle::crowded(self.most, &self.permits)
    }
}

/// A connection a [`Front`] leaves to hyper's server: a TCP socket, or
/// TLS over one ([`tls::TlsClient`]).
pub struct Handed<S = TcpStream> {
    /// The client's connection.
    pub stream: S,
    /// The bytes read ahead: the start of the request left to hyper.
    pub ahead: Bytes,
    /// When that request's head must be in: a head the front began to
    /// read keeps its deadline instead of getting a fresh period.
    pub head_deadline: tokio::time::Instant,
}

/// What a [`Front`] ends with: nothing (the connection is done), or the
/// connection for hyper's server.
pub type Handover = std::pin::Pin<Box<dyn Future<Output = Option<Handed>> + Send>>;

/// [`Handover`] for a TLS connection.
pub type TlsHandover =
    std::pin::Pin<Box<dyn Future<Output = Option<Handed<tls::TlsClient>>> + Send>>;

/// A connection's first owner, before hyper's server: it serves what it
/// can itself and hands the socket on, with the bytes it read ahead, for
/// the request it leaves to hyper (the balancer's own HTTP/1 path).
pub trait Front: Send + Sync + 'static {
    /// Serves `stream` until it closes (`None`), or until a request is for
    /// hyper (`Some`: the socket, the bytes read that belong to it, and
    /// that request's head deadline).
    fn serve(&self, stream: TcpStream, peer: SocketAddr, ctx: ConnContext) -> Handover;

    /// [`Front::serve`] for a TLS connection whose ALPN chose HTTP/1.1
    /// (or nothing), after its handshake; HTTP/2 ones go to hyper.
    fn serve_tls(&self, stream: tls::TlsClient, peer: SocketAddr, ctx: ConnContext) -> TlsHandover;
}

/// [`serve`] for one of several accept loops on one port (the balancer's
/// worker threads): they share the connection cap's permits and, with
/// `options.share`, new connections; see [`ServeOptions`] for the rest.
pub async fn serve_with<F, S, B>(
    listener: TcpListener,
    limits: &ServerConfig,
    options: ServeOptions,
    make_service: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let ServeOptions {
        most,
        permits,
        reusable,
        share,
        send_timeout,
        front,
        closing,
        proxy_protocol,
        tls,
    } = options;
    let stopping = closing.unwrap_or_else(|| Arc::new(AtomicBool::new(false)));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a sender; when all are gone, so are they.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
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
    let hyper_side = Arc::new(HyperSide {
        builder,
        make_service,
        stopping: stopping.clone(),
        stop: stop_rx.clone(),
        permits: permits.clone(),
        header_read_timeout: limits.header_read_timeout,
        keepalive_timeout: limits.keepalive_timeout,
        most,
        send_timeout,
    });
    let mut accept_errors = AcceptErrors::default();
    let inherits_nodelay = set_nodelay_for_accepted(&listener);
    tokio::pin!(shutdown);
    'accept: loop {
        // Take a permit before accepting: over the cap, clients wait in the
        // kernel's backlog instead of costing us memory; unless some
        // connection is idle between requests, which gives its place up to
        // the next client (below). Not with a socket of its own
        // (`SO_REUSEPORT`): the clients in its queue are this loop's alone,
        // and a permit held in hand while none comes would make another
        // loop close an idle connection for its client below the cap. It
        // takes the permit after the accept (one client per loop waits
        // accepted when the cap is reached and nothing is idle).
        let own_socket = share.as_ref().is_some_and(|(s, _)| s.by_kernel());
        let permit = if own_socket {
            None
        } else {
            loop {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => break Some(p),
                    Err(TryAcquireError::Closed) => break 'accept,
                    Err(TryAcquireError::NoPermits) => {}
                }
                if reusable.room_to_make() {
                    break None;
                }
                tokio::select! {
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => break Some(p),
                        Err(_) => break 'accept,
                    },
                    () = reusable.idle_appeared() => {}
                    () = &mut shutdown => break 'accept,
                }
            }
        };
        // While this loop waits for a client with a permit in hand, no other
        // loop closes an idle connection for one.
        let spare = permit.as_ref().map(|_| reusable.spare());
        if let Some((share, me)) = &share {
            tokio::select! {
                () = share.turn(*me) => {}
                () = &mut shutdown => break,
            }
        }
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    accept_errors.failed(&e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        drop(spare);
        let permit = match permit {
            Some(p) => p,
            None => {
                // A free permit; or, over the cap with a client in hand,
                // the connection idle the longest closes to make room
                // (Nginx's reusable connections).
                let made = tokio::select! {
                    p = make_room(&permits, &reusable) => p,
                    () = &mut shutdown => None,
                };
                match made {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        reusable.crowd(recycle::crowded(most, &permits));
        let place = reusable.place();
        let idle = place.as_ref().map(reuse::Place::idle);
        let on_loop = share
            .as_ref()
            .map(|(share, me)| OpenOnLoop::new(share, *me));
        if !inherits_nodelay {
            let _ = stream.set_nodelay(true);
        }
        // The first head counts from the accept, not from its first byte.
        let first_head_deadline = tokio::time::Instant::now() + limits.header_read_timeout;
        let hyper_side = hyper_side.clone();
        let open = open_tx.clone();
        // After the accept, before serving: a TLS connection goes its own
        // way (its handshake, then the front for HTTP/1.1, hyper for h2).
        // Boxed, as hyper's side below: a plain connection's task must not
        // carry room for what only a TLS one needs.
        let tls = tls.as_ref().map(|t| {
            Box::new((
                t.current(),
                hyper_side.tls_conn(first_head_deadline, idle.clone()),
            ))
        });
        let ctx = front.as_ref().map(|_| ConnContext {
            stop: stop_rx.clone(),
            stopping: stopping.clone(),
            header_read_timeout: limits.header_read_timeout,
            first_head_deadline,
            keepalive_timeout: limits.keepalive_timeout,
            idle: idle.clone(),
            permits: permits.clone(),
            most,
        });
        // Boxed into the task: what only starting the connection needs is
        // on the heap until the connection is served, not room in a task
        // that lives as long as the connection.
        let task = serve_accepted(Box::new(Accepted {
            held: (on_loop, place, permit, open),
            stream,
            peer,
            first_head_deadline,
            gate: proxy_protocol.clone(),
            tls,
            hyper_side,
            front: front.clone(),
            ctx,
            idle,
        }));
        tokio::spawn(task);
    }
    drop(listener);
    stopping.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    reusable.stop_all();
    drop(open_tx);
    tokio::select! {
        _ = open_rx.recv() => {}
        () = tokio::time::sleep(limits.grace_period) => {
            tracing::warn!("grace period over with requests still in flight");
        }
    }
}

/// What a task needs to serve one accepted connection.
struct Accepted<F> {
    /// Dropped in this order when the connection is done: its place among
    /// the open ones of its loop, its slot, its permit of the cap, and the
    /// sender the server's end waits on.
    held: (
        Option<OpenOnLoop>,
        Option<reuse::Place>,
        OwnedSemaphorePermit,
        mpsc::Sender<()>,
    ),
    stream: TcpStream,
    peer: SocketAddr,
    first_head_deadline: tokio::time::Instant,
    gate: Option<Arc<dyn proxy_protocol::Gate>>,
    tls: Option<Box<(Option<Arc<rustls::ServerConfig>>, tls::TlsConn)>>,
    hyper_side: Arc<HyperSide<F>>,
    front: Option<Arc<dyn Front>>,
    ctx: Option<ConnContext>,
    idle: Option<Idle>,
}

/// Serves one accepted connection to its end. A plain connection's task
/// (what every open connection holds: an idle keep-alive client waits in
/// it for as long as it likes, ten thousand of them at a time) holds only
/// `held`, the shared side and the front's boxed future: reading a PROXY
/// header and a TLS connection are boxed, as only some connections need
/// them.
async fn serve_accepted<F, S, B>(mut accepted: Box<Accepted<F>>)
where
    F: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // The client's address from a PROXY header, before any other read of
    // the socket (the TLS handshake's included); a refused peer or a bad
    // header closes. (Every listener has a gate, which says `Plain` when
    // the protocol is off: a reload may turn it on.)
    if let Some(gate) = accepted.gate.take() {
        match proxy_protocol::admit(&*gate, accepted.peer) {
            proxy_protocol::Admit::Plain => {}
            proxy_protocol::Admit::Refuse => return,
            proxy_protocol::Admit::Header => {
                let a = &mut *accepted;
                let read = proxy_protocol::source(&mut a.stream, a.peer, a.first_head_deadline);
                match Box::pin(read).await {
                    Some(source) => a.peer = source,
                    None => return,
                }
            }
        }
    }
    if accepted.tls.is_some() {
        return Box::pin(serve_tls(accepted)).await;
    }
    serve_plain(accepted).await
}

/// [`serve_accepted`] for a TLS connection: its handshake, then the front
/// for HTTP/1.1 and hyper for h2 (see [`tls::serve`]).
async fn serve_tls<F, S, B>(mut accepted: Box<Accepted<F>>)
where
    F: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(tls) = accepted.tls.take() else {
        return;
    };
    let Accepted {
        held: _held,
        stream,
        peer,
        hyper_side,
        front,
        ctx,
        ..
    } = unbox(accepted);
    let (Some(config), conn) = *tls else { return };
    let service = (hyper_side.make_service)(peer);
    let front = front.zip(ctx);
    tls::serve(stream, peer, config, service, conn, front).await;
}

/// The value out of its box, the box freed now: a value moved out of a box
/// in place (`let .. = *boxed`) leaves the box allocated until the end of
/// the scope, which for a connection's task is the connection's end.
#[allow(clippy::boxed_local)] // the box is the point: it is freed here
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// [`serve_accepted`] for a plain connection: its front, then hyper's
/// side for what the front hands on.
async fn serve_plain<F, S, B>(accepted: Box<Accepted<F>>)
where
    F: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Accepted {
        held: _held,
        stream,
        peer,
        first_head_deadline,
        hyper_side,
        front,
        ctx,
        idle,
        ..
    } = unbox(accepted);
    // The front's future made before it is awaited: a match on the pair
    // around the await kept the pair's room in every connection's task.
    let fronted = match (front, ctx) {
        (Some(front), Some(ctx)) => Ok(front.serve(stream, peer, ctx)),
        _ => Err(stream),
    };
    let handed = match fronted {
        Ok(serving) => match serving.await {
            Some(handed) => handed,
            None => return,
        },
        Err(stream) => Handed {
            stream,
            ahead: Bytes::new(),
            head_deadline: first_head_deadline,
        },
    };
    // hyper's side of the connection (its service, the turn it takes
    // requests by) is made only now: behind a front, most connections
    // never get here.
    let (connection, service) = hyper_side.connection(peer, idle);
    // Boxed: behind a front it is the rare case, and a connection the
    // front keeps should not carry room for it.
    Box::pin(connection.run(handed, service)).await;
}

/// How often a failing accept is said in the log.
const ACCEPT_ERROR_PERIOD: Duration = Duration::from_secs(5);

/// Failed accepts, said once per [`ACCEPT_ERROR_PERIOD`] with how many
/// there were, not once per accept: out of descriptors, a loop fails fifty
/// accepts a second, and a warning for each buried everything else.
#[derive(Default)]
struct AcceptErrors {
    said_at: Option<tokio::time::Instant>,
    unsaid: u64,
}

impl AcceptErrors {
    fn failed(&mut self, e: &std::io::Error) {
        let now = tokio::time::Instant::now();
        if self
            .said_at
            .is_some_and(|at| now.duration_since(at) < ACCEPT_ERROR_PERIOD)
        {
            self.unsaid += 1;
            return;
        }
        tracing::warn!(
            error = %e,
            failed_since_last_said = self.unsaid,
            "accept failed (said at most once every {ACCEPT_ERROR_PERIOD:?}, with the failures since)"
        );
        self.said_at = Some(now);
        self.unsaid = 0;
    }
}

/// How long a loop waits for the permit of the connection it claimed
/// before it claims another (see [`make_room`]).
const RECLAIM_WAIT: Duration = Duration::from_millis(100);

/// A permit of the cap for a client accepted over it: the connection idle
/// the longest is claimed and closes, and its permit is the new client's.
/// With none idle (they all began requests), the client waits for the
/// first permit back, or for a connection to turn idle. `None` once the
/// cap is closed.
async fn make_room(permits: &Arc<Semaphore>, reusable: &Reusable) -> Option<OwnedSemaphorePermit> {
    let mut claimed = false;
    loop {
        match permits.clone().try_acquire_owned() {
            Ok(p) => return Some(p),
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {}
        }
        if !claimed {
            claimed = reusable.reclaim_oldest();
        }
        if claimed {
            // The claimed connection closes as soon as it is woken, and its
            // permit comes here, unless a loop waiting for one since before
            // (the semaphore serves them in turn) takes it: then, after a
            // while, the next idle connection is claimed.
            match tokio::time::timeout(RECLAIM_WAIT, permits.clone().acquire_owned()).await {
                Ok(p) => return p.ok(),
                Err(_) => {
                    claimed = false;
                    continue;
                }
            }
        }
        tokio::select! {
            p = permits.clone().acquire_owned() => return p.ok(),
            () = reusable.idle_appeared() => {}
        }
    }
}

/// What hyper's side of every connection of one server is made from,
/// shared by them all: a connection takes its copies only when it reaches
/// hyper ([`HyperSide::connection`]).
struct HyperSide<F> {
    builder: http1::Builder,
    make_service: F,
    stopping: Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
    permits: Arc<Semaphore>,
    header_read_timeout: Duration,
    keepalive_timeout: Duration,
    most: usize,
    send_timeout: Option<Duration>,
}

impl<F, S> HyperSide<F>
where
    F: Fn(SocketAddr) -> S,
{
    /// What a TLS connection needs of the server (see [`tls::serve`]).
    fn tls_conn(
        &self,
        first_head_deadline: tokio::time::Instant,
        idle: Option<Idle>,
    ) -> tls::TlsConn {
        tls::TlsConn {
            h1: self.builder.clone(),
            stop: self.stop.clone(),
            stopping: self.stopping.clone(),
            header_read_timeout: self.header_read_timeout,
            keepalive_timeout: self.keepalive_timeout,
            first_head_deadline,
            send_timeout: self.send_timeout,
            idle,
        }
    }

    /// hyper's side of the connection from `peer`: its service, behind the
    /// turn it takes requests by.
    fn connection(
        &self,
        peer: SocketAddr,
        idle: Option<Idle>,
    ) -> (Connection, recycle::Turnstile<S>) {
        let turn = Arc::new(recycle::Turn::new(self.stopping.clone()));
        let service = recycle::Turnstile::new((self.make_service)(peer), turn.clone());
        let connection = Connection {
            builder: self.builder.clone(),
            turn,
            stop: self.stop.clone(),
            header_read_timeout: self.header_read_timeout,
            keepalive_timeout: self.keepalive_timeout,
            peer,
            permits: self.permits.clone(),
            most: self.most,
            send_timeout: self.send_timeout,
            idle,
        };
        (connection, service)
    }
}

/// One client connection, served one request at a time by a fresh hyper
/// connection, and holding no buffer while it waits for the next request.
struct Connection {
    builder: http1::Builder,
    turn: Arc<recycle::Turn>,
    stop: watch::Receiver<bool>,
    header_read_timeout: Duration,
    keepalive_timeout: Duration,
    peer: SocketAddr,
    permits: Arc<Semaphore>,
    most: usize,
    send_timeout: Option<Duration>,
    /// Its slot among the connections that may be closed to make room.
    idle: Option<Idle>,
}

impl Connection {
    async fn run<S, B>(mut self, handed: Handed, mut service: recycle::Turnstile<S>)
    where
        S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // The first request: `peek`, not `readable`, since a fresh socket
        // counts as readable before any byte has arrived. A client that
        // sends nothing in time (or closes) is closed.
        // (Bytes read ahead by a front are that request's first.)
        let Handed {
            mut stream,
            ahead,
            head_deadline,
        } = handed;
        let mut first = [0u8; 1];
        if ahead.is_empty() {
            tokio::select! {
                peeked = tokio::time::timeout_at(head_deadline, stream.peek(&mut first)) => match peeked {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                },
                _ = self.stop.wait_for(|stop| *stop) => return,
            }
        }
        // The keep-alive deadline is one timer per connection, moved only
        // when it fires early, not set again for every request.
        let idle_limit = tokio::time::sleep(self.keepalive_timeout);
        tokio::pin!(idle_limit);
        let mut ahead = ahead;
        let mut waiting = false;
        // When the client last began a request, for the keep-alive wait.
        let mut quiet_since = tokio::time::Instant::now();
        // hyper's header timer starts with its connection: for the first
        // request that is after the wait above, so it gets what is left.
        let mut first_head = Some(head_deadline);
        // hyper runs its header timer from the moment a connection goes
        // idle, so a client that waits longer than `header_read_timeout`
        // between requests would be closed by it, and a late next head
        // would get less than its period. So an idle connection is handed
        // back after this long (or at once, after a first request whose
        // timer was cut by more than this): the next request gets a new
        // hyper connection, whose timer starts at its first byte. A request
        // sooner than that keeps the hyper connection, and its head at
        // least `header_read_timeout` less twice this (half of it). Not
        // for a connection whose last request had a body: hyper may still
        // drain it, so it is not handed back (see `recycle`), and hyper's
        // timer closes it after `header_read_timeout` of silence.
        let recycle_ms = u64::try_from((self.header_read_timeout / 4).as_millis())
            .unwrap_or(u64::MAX)
            .min(250);
        loop {
            if waiting {
                // hyper's last read found nothing, so `readable` now waits
                // for the next byte (or the client's close, which the next
                // read reports).
                let since = quiet_since;
                if let Some(idle) = &self.idle {
                    idle.idle();
                }
                loop {
                    tokio::select! {
                        ready = stream.readable() => match ready {
                            Ok(()) => break,
                            Err(_) => return,
                        },
                        () = reuse::claimed(self.idle.as_ref()) => return,
                        () = &mut idle_limit => {
                            let deadline = since + self.keepalive_timeout;
                            if tokio::time::Instant::now() >= deadline {
                                return;
                            }
                            idle_limit.as_mut().reset(deadline);
                        }
                        _ = self.stop.wait_for(|stop| *stop) => return,
                    }
                }
                if self.idle.as_ref().is_some_and(|idle| !idle.busy()) {
                    // Claimed for a new client just as this one spoke.
                    return;
                }
            }
            self.turn.reset();
            let io = recycle::HandBack::new(
                stream,
                ahead,
                self.turn.clone(),
                self.permits.clone(),
                self.most,
                self.send_timeout,
            );
            // Boxed: the connection and its buffers exist only while there is
            // a request, and the task stays small between requests.
            let shortened;
            let mut window_ms = recycle_ms;
            let builder = match first_head.take() {
                Some(deadline) => {
                    let left = deadline
                        .saturating_duration_since(tokio::time::Instant::now())
                        .min(self.header_read_timeout)
                        .max(Duration::from_millis(1));
                    let mut b = self.builder.clone();
                    b.header_read_timeout(left);
                    shortened = b;
                    if left + Duration::from_millis(recycle_ms) < self.header_read_timeout {
                        // This timer is for the first head only: cut by
                        // more than the window, it would cut the next too.
                        window_ms = 0;
                    }
                    &shortened
                }
                None => &self.builder,
            };
            let mut conn = Box::pin(
                builder
                    .serve_connection(TokioIo::new(io), service)
                    .without_shutdown(),
            );
            // hyper has no idle timeout: one lazy timer per hyper connection
            // checks for silence (and for the hand-back above), moved on when
            // it fires early.
            let started = recycle::now_ms();
            let limit_ms = u64::try_from(self.keepalive_timeout.as_millis()).unwrap_or(u64::MAX);
            idle_limit
                .as_mut()
                .reset(tokio::time::Instant::now() + self.keepalive_timeout);
            let stopped = self.stop.clone();
            let stopped = async move {
                let mut stopped = stopped;
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            tokio::pin!(stopped);
            let turn = &self.turn;
            let mut stopping = false;
            // The silence ran out: wanted back, to be closed.
            let mut expired = false;
            // Wanted back, to wait for the next request outside hyper.
            let mut handing_back = false;
            let ended = std::future::poll_fn(|cx| {
                loop {
                    if let Poll::Ready(ended) = conn.as_mut().poll(cx) {
                        return Poll::Ready(ended);
                    }
                    if !turn.wanted() {
                        // Not asked for, or a request began since it was
                        // (`call` clears the mark).
                        expired = false;
                        handing_back = false;
                    }
                    if expired || handing_back {
                        // Idle and wanted back: hyper's next read ends it.
                        return Poll::Pending;
                    }
                    if !stopping {
                        stopping = stopped.as_mut().poll(cx).is_ready();
                    }
                    if !turn.idle() {
                        // Busy: it turns idle inside `conn.poll`, which
                        // then brings us here. An answer begun after a stop
                        // says `Connection: close`, and hyper ends.
                        return Poll::Pending;
                    }
                    if stopping {
                        // Idle at the stop: closed (the caller sees the stop).
                        handing_back = true;
                        turn.want_back();
                        continue;
                    }
                    let last = turn.begun_at().max(started);
                    let deadline = last.saturating_add(limit_ms);
                    let now = recycle::now_ms();
                    if now >= deadline {
                        expired = true;
                        turn.want_back();
                        continue;
                    }
                    let hand_back_at = last.saturating_add(window_ms);
                    if now >= hand_back_at {
                        handing_back = true;
                        turn.want_back();
                        continue;
                    }
                    let next = hand_back_at.min(deadline);
                    let at = tokio::time::Instant::now()
                        + Duration::from_millis(next.saturating_sub(now).max(1));
                    // Moved only when it fired or is due later than needed:
                    // a timer that fires early looks again and moves on.
                    if idle_limit.is_elapsed() || idle_limit.deadline() > at {
                        idle_limit.as_mut().reset(at);
                    }
                    if idle_limit.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            })
            .await;
            let parts = match ended {
                Ok(parts) => parts,
                Err(e) => {
                    tracing::debug!(error = %e, peer = %self.peer, "connection ended with an error");
                    return;
                }
            };
            if let Some(then) = self.turn.take_then() {
                // A `101`: hyper is done with the socket, and it is the
                // upgraded protocol's from here (bytes hyper read past the
                // handshake first).
                let (stream, rest) = parts.io.into_inner().into_parts();
                let ahead = read_ahead(&parts.read_buf, rest);
                then.run(upgrade::ClientIo::plain(stream, ahead)).await;
                return;
            }
            if expired || !self.turn.handed_back() || *self.stop.borrow() {
                // The client closed, or hyper did (`Connection: close`, an
                // HTTP/1.0 client): dropping the socket closes it.
                return;
            }
            // The keep-alive wait counts from the last request, not from
            // the hand-back.
            let quiet_ms = recycle::now_ms().saturating_sub(self.turn.begun_at().max(started));
            quiet_since = tokio::time::Instant::now()
                .checked_sub(Duration::from_millis(quiet_ms))
                .unwrap_or_else(tokio::time::Instant::now);
            service = parts.service;
            let (s, rest) = parts.io.into_inner().into_parts();
            stream = s;
            ahead = read_ahead(&parts.read_buf, rest);
            waiting = ahead.is_empty();
        }
    }
}

/// What hyper had read past its last request (`read_buf`), then what it
/// left unread of the bytes handed to it (`rest`): the next bytes of the
/// connection. Copied, never kept as is: an empty `Bytes` cut from hyper's
/// read buffer still holds all 8 KiB of it.
fn read_ahead(read_buf: &Bytes, rest: Bytes) -> Bytes {
    if read_buf.is_empty() {
        return rest;
    }
    let mut both = BytesMut::with_capacity(read_buf.len() + rest.len());
    both.extend_from_slice(read_buf);
    both.extend_from_slice(&rest);
    both.freeze()
}

/// A complete JSON answer with the right content type; static bodies cost no
/// allocation.
pub fn json(status: StatusCode, body: impl JsonBody) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into_line()));
    *res.status_mut() = status;
    // hyper parses a connection's next request into the map of its last
    // answer: with room for a dozen, a purchase from the balancer
    // (`Idempotency-Key`, `X-Forwarded-For`, `X-Real-IP` beside the
    // client's) fits, where the map made by a first insert (room for six)
    // was grown, two allocations and a rehash, at every keyed purchase.
    *res.headers_mut() = hyper::HeaderMap::with_capacity(12);
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    res
}

/// A JSON document as [`json`] sends it: ending with a newline, so that
/// `curl` output, logs and line-oriented tools (`jq -c`, `while read`) see
/// one document per line, the same from a node and from the balancer.
/// Owned bodies get the newline pushed in place; a static body should end
/// with one already (it is then sent without a copy).
pub trait JsonBody {
    /// The body's bytes, with exactly one trailing newline.
    fn into_line(self) -> Bytes;
}

impl JsonBody for String {
    fn into_line(self) -> Bytes {
        self.into_bytes().into_line()
    }
}

impl JsonBody for Vec<u8> {
    fn into_line(mut self) -> Bytes {
        if self.last() != Some(&b'\n') {
            self.push(b'\n');
        }
        Bytes::from(self)
    }
}

impl JsonBody for &'static str {
    fn into_line(self) -> Bytes {
        self.as_bytes().into_line()
    }
}

impl JsonBody for &'static [u8] {
    fn into_line(self) -> Bytes {
        Bytes::from_static(self).into_line()
    }
}

impl JsonBody for Bytes {
    fn into_line(self) -> Bytes {
        if self.last() == Some(&b'\n') {
            return self;
        }
        let mut line = Vec::with_capacity(self.len() + 1);
        line.extend_from_slice(&self);
        line.push(b'\n');
        Bytes::from(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workers' sockets are one `SO_REUSEPORT` group: each takes a
    /// share of new connections, and the port stays closed to a plain
    /// bind (a second balancer still hears "address in use").
    #[tokio::test]
    async fn the_loops_sockets_share_the_port_and_keep_it_from_others() {
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let others = listeners_for_loops(&listener, 1).expect("SO_REUSEPORT on Linux");
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].local_addr().expect("addr"), addr);
        let refused = std::net::TcpListener::bind(addr)
            .map(|_| ())
            .map_err(|e| e.kind());
        assert_eq!(refused, Err(std::io::ErrorKind::AddrInUse));
        let other = TcpListener::from_std(others.into_iter().next().expect("one")).expect("tokio");
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // Every connection is in exactly one of the two accept queues.
        let mut taken = [0usize; 2];
        for (i, l) in [&listener, &other].into_iter().enumerate() {
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), l.accept()).await
            {
                taken[i] += 1;
            }
        }
        assert_eq!(taken[0] + taken[1], 64, "{taken:?}");
        // A hash of the addresses: all 64 on one socket is a 2^-63 chance.
        assert!(taken[0] > 0 && taken[1] > 0, "{taken:?}");
    }

    /// What lets the accept loop skip `setsockopt` per connection: on Linux
    /// a socket accepted from a listener with `TCP_NODELAY` has it too.
    #[tokio::test]
    async fn accepted_sockets_have_nodelay_without_a_call_of_their_own() {
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let inherits = set_nodelay_for_accepted(&listener);
        assert_eq!(inherits, cfg!(target_os = "linux"));
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert_eq!(accepted.nodelay().expect("getsockopt"), inherits);
    }
    use std::pin::pin;
    use std::sync::atomic::AtomicBool;
    use std::task::{Context, Wake, Waker};

    #[derive(Default)]
    struct Woken(AtomicBool);

    impl Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A loop that is not its turn waits, and the change that makes it its
    /// turn wakes it (no timer: with one request per connection the counts
    /// change faster than any polling would notice).
    #[test]
    fn a_loop_waiting_for_its_turn_is_woken_by_the_change_that_gives_it() {
        let share = Arc::new(AcceptShare::new(2));
        let _a = OpenOnLoop::new(&share, 0);
        let b = OpenOnLoop::new(&share, 0);
        // Loop 0 holds 2, loop 1 none: only loop 1 may accept.
        let woken = Arc::new(Woken::default());
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(pin!(share.turn(1)).poll(&mut cx).is_ready());
        let mut turn = pin!(share.turn(0));
        assert!(turn.as_mut().poll(&mut cx).is_pending());
        assert!(!woken.0.load(Ordering::SeqCst));
        // A connection of loop 0 closes: 1 against 0, loop 0's turn again.
        drop(b);
        assert!(woken.0.load(Ordering::SeqCst), "not woken by the close");
        assert!(turn.as_mut().poll(&mut cx).is_ready());
        assert_eq!(share.open().collect::<Vec<_>>(), vec![1, 0]);

        // The same when the other loop accepts.
        let _c = OpenOnLoop::new(&share, 0);
        woken.0.store(false, Ordering::SeqCst);
        let mut turn = pin!(share.turn(0));
        assert!(turn.as_mut().poll(&mut cx).is_pending());
        let _d = OpenOnLoop::new(&share, 1);
        assert!(woken.0.load(Ordering::SeqCst), "not woken by the accept");
        assert!(turn.as_mut().poll(&mut cx).is_ready());
    }

    /// A loop whose thread never started keeps a count of 0; once it has
    /// left, the others take turns among themselves and are not held to
    /// one connection each (a loop waiting when it leaves is woken).
    #[test]
    fn a_loop_that_left_does_not_hold_the_others_back() {
        let share = Arc::new(AcceptShare::new(3));
        let _held: Vec<_> = (0..2).map(|_| OpenOnLoop::new(&share, 0)).collect();
        let woken = Arc::new(Woken::default());
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut turn = pin!(share.turn(0));
        assert!(
            turn.as_mut().poll(&mut cx).is_pending(),
            "2 against loop 2's 0"
        );
        share.leave(2);
        assert!(woken.0.load(Ordering::SeqCst), "not woken by the leave");
        // Loop 1 holds 0 as well, so loop 0 still waits for it...
        assert!(turn.as_mut().poll(&mut cx).is_pending());
        let _one = OpenOnLoop::new(&share, 1);
        // ...and with 2 against loop 1's 1 it is loop 0's turn, loop 2's 0 aside.
        assert!(turn.as_mut().poll(&mut cx).is_ready());
        let more: Vec<_> = (0..3).map(|_| OpenOnLoop::new(&share, 1)).collect();
        assert!(pin!(share.turn(0)).poll(&mut cx).is_ready(), "2 against 4");
        assert!(
            pin!(share.turn(1)).poll(&mut cx).is_pending(),
            "4 against 2"
        );
        drop(more);
    }
}
