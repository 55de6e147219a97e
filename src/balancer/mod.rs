//! The HTTP load balancer: Nginx's upstream strategies, keep-alive pools,
//! failover and hot reload.
//!
//! [`run`] (or [`Balancer::run`]) serves already-bound listeners, so tests and
//! `spike up` can bind `127.0.0.1:0` and drive the real thing;
//! [`Balancer::reloader`] hands out a [`Reloader`] for reloads in-process.
//!
//! The modules are layered, and each imports only from the layers below it,
//! so that any of them can be read (and changed) knowing only what it stands
//! on:
//! 1. [`error`], [`answer`] (the balancer's own answers), [`pool`] (idle
//!    upstream connections), [`metrics`], [`window`] (the last seconds'
//!    samples, which [`recent`] takes), [`limit`] (the per-client limits'
//!    tables);
//! 2. [`upstream`]: an upstream's config and the live state that survives
//!    reloads (with its idle connections);
//! 3. [`select`]: picking among the upstreams;
//! 4. [`state`]: the config version in force, built into a selector, and
//!    how a reload replaces it;
//! 5. [`forward`]: the forwarding policy, once for both paths;
//! 6. the two paths that carry it, [`h1`] (the fast path over raw TCP, with
//!    the framing of `crate::http1`) and [`proxy`] (hyper's); [`admin`] and
//!    [`reload`] (the triggers); and this module, which wires them to the
//!    listeners.
pub mod access_log;
pub mod admin;
pub mod answer;
pub mod batch;
pub mod body;
pub mod clock;
pub mod edge;
pub mod error;
pub mod forward;
pub mod h1;
pub mod health;
pub mod idempotency;
pub mod limit;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod recent;
pub mod reload;
pub mod resolver;
pub mod sale;
pub mod sale_edges;
pub mod select;
pub mod state;

pub mod upgrade;
pub mod upstream;
pub mod waiting_room;
pub mod window;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::{Config, ConfigError};

pub use error::BalancerError;
pub use reload::Reloader;

/// The admin address's connection cap: health checkers, Prometheus and
/// operators, never a crowd. Its own table of idle connections (64 bytes
/// a place) sized to the clients' cap was 1.3 MB held for nothing.
const ADMIN_MAX_CONNECTIONS: usize = 1024;
/// A balancer built from a config, not yet serving.
#[derive(Debug)]
pub struct Balancer {
    shared: Arc<state::Shared>,
}

impl Balancer {
    /// Builds config version 1 (needs a balancer section or `[[node]]`s).
    /// It serves clients on the runtime that calls [`Balancer::run`].
    pub fn new(config: Config) -> Result<Balancer, BalancerError> {
        Balancer::with_workers(config, 1)
    }

    /// Like [`Balancer::new`], but [`Balancer::run`] serves clients on
    /// `workers` threads: the caller's, plus `workers - 1` threads that each
    /// run a single-threaded runtime of their own, accept on a duplicate of
    /// the same listening socket and keep their own upstream keep-alive
    /// pools, so a request never leaves the thread that accepted its
    /// connection (Nginx's worker processes, as threads). `spike balancer`
    /// uses one worker per CPU.
    pub fn with_workers(config: Config, workers: usize) -> Result<Balancer, BalancerError> {
        Ok(Balancer {
            shared: Arc::new(state::Shared::new(config, workers)?),
        })
    }

    /// Lets `hook` start and stop what runs beside the balancer around
    /// each reload (see [`state::ReloadHook`]).
    pub fn set_reload_hook(&self, hook: Box<dyn state::ReloadHook>) {
        self.shared.set_reload_hook(hook);
    }

    /// Resolves `drain_delay` after `signal`: from the signal on, `/ready`
    /// answers 503 `draining` and every answer asks its client to close,
    /// while the balancer goes on serving and accepting, so that an L4
    /// balancer's health check takes it out before it stops accepting.
    /// Give it to [`Balancer::run`] as its shutdown (`spike balancer` does;
    /// `spike up`, one machine with nothing in front, stops at once). A
    /// second SIGTERM or Ctrl-C during the delay ends it at once: an
    /// operator who means "now" says it twice.
    pub fn drained(
        &self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            signal.await;
            // Caught from here on: the second signal.
            let again = crate::signals::shutdown_signal();
            shared
                .draining
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let delay = shared.current.load().config.drain_delay;
            tracing::info!(
                drain_delay = ?delay,
                "stopping: /ready fails; serving on for drain_delay, then no new connections and grace_period for those in flight"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = again => tracing::info!("stopping now: a second signal ended the drain"),
            }
        }
    }

    /// Keeps the waiting room's line in `store` (the sale's): `spike
    /// balancer` opens the sale's Redis, `spike up` hands over the store
    /// its nodes sell from.
    pub fn attach_line_store(&self, store: crate::node::store::Store) {
        self.shared.waiting_room.attach(store);
    }

    /// In front of several sales, keeps each sale's line in its store of
    /// `stores` (made on the line's first request): `spike balancer` opens
    /// the sales' Redis, `spike up` hands over the stores its nodes sell
    /// from (embedded) or opens its own (Redis).
    pub fn attach_line_stores(&self, stores: Arc<crate::node::store::Stores>) {
        self.shared.waiting_room.attach_sales(stores);
    }

    /// A handle to reload from the config file while running.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            shared: self.shared.clone(),
        }
    }

    /// Serves clients on `listener` and the admin endpoints on `admin` until
    /// `shutdown` resolves, reloading on SIGHUP and on file changes. With
    /// more than one worker it also starts the worker threads, and returns
    /// once all of them have finished.
    pub async fn run(
        self,
        listener: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), BalancerError> {
        let shared = self.shared;
        let admin_addr = admin.local_addr()?;
        if !admin_addr.ip().is_loopback() {
            tracing::warn!(
                %admin_addr,
                "the admin endpoints are reachable from other machines; bind them to loopback unless that is intended"
            );
        }
        let hup = tokio::spawn(reload::watch_sighup(shared.clone()));
        let poll = tokio::spawn(reload::watch_file(shared.clone()));
        let expiry = tokio::spawn(expire_idle(shared.clone(), 0));
        let edge = tokio::spawn(sale::watch_edge(shared.clone()));
        let sale_edges = tokio::spawn(sale_edges::run(shared.clone()));
        let recent = tokio::spawn(recent::run(shared.clone()));
        let health = tokio::spawn(health::run(shared.clone()));
        waiting_room::first_read(&shared, std::time::Duration::from_secs(3)).await;
        let line = tokio::spawn(waiting_room::run(shared.clone()));
        let reopen = tokio::spawn(reopen_access_log(shared.clone()));
        let names = tokio::spawn(resolver::run(shared.clone()));

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let limits = shared.server.clone();
        let send_timeout = shared.current.load().config.send_timeout;
        // Two descriptors per client: its own and an upstream connection.
        let most = crate::server::connection_cap(&limits, 2);
        let permits = Arc::new(Semaphore::new(most));
        let reusable = crate::server::Reusable::new(most);
        let (listener, others) = if shared.workers > 1 {
            // Every worker accepts on a socket of its own, the kernel
            // handing each new connection to one of them (SO_REUSEPORT, as
            // Nginx's `reuseport`); see `listeners_for_loops`. Where that
            // cannot be made, every worker accepts on its own descriptor of
            // the one listening socket, taking turns (`AcceptShare`).
            match crate::server::listeners_for_loops(&listener, shared.workers - 1) {
                Ok(others) => {
                    shared.accept_share.spread_by_kernel();
                    (listener, others)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no SO_REUSEPORT: the workers share one listening socket, taking turns");
                    let std = listener.into_std()?;
                    let mut others = Vec::with_capacity(shared.workers - 1);
                    for _ in 1..shared.workers {
                        others.push(std.try_clone()?);
                    }
                    (TcpListener::from_std(std)?, others)
                }
            }
        } else {
            (listener, Vec::new())
        };
        let mut finished = Vec::with_capacity(others.len());
        for (i, other) in others.into_iter().enumerate() {
            let worker = i + 1;
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            let shared = shared.clone();
            let permits = permits.clone();
            let reusable = reusable.clone();
            let stop = stop_rx.clone();
            let accept_share = shared.accept_share.clone();
            let started = std::thread::Builder::new()
                .name(format!("spike-worker-{worker}"))
                .spawn(move || {
                    run_worker(shared, worker, other, (most, permits, reusable), stop);
                    let _ = done_tx.send(());
                });
            match started {
                Ok(_) => finished.push(done_rx),
                Err(e) => {
                    accept_share.leave(worker);
                    tracing::error!(worker, error = %e, "cannot start a worker thread; serving with fewer")
                }
            }
        }
        let proxy_shared = shared.clone();
        let admin_shared = shared.clone();
        let make_admin = move |_peer: SocketAddr| {
            let shared = admin_shared.clone();
            service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(admin::handle(&shared, req).await) }
            })
        };
        let trigger = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        tokio::join!(
            crate::server::serve_with(
                listener,
                &limits,
                crate::server::ServeOptions {
                    most,
                    permits,
                    reusable,
                    share: Some((shared.accept_share.clone(), 0)),
                    send_timeout: Some(send_timeout),
                    front: Some(Arc::new(h1::FastPath {
                        shared: shared.clone(),
                        worker: 0,
                    }) as Arc<dyn crate::server::Front>),
                    closing: Some(shared.draining.clone()),
                    proxy_protocol: Some(Arc::new(forward::client::ProxyGate(shared.clone()))),
                    tls: TlsInForce::of(&shared),
                },
                move |peer| proxy_connection(&proxy_shared, 0, peer),
                stopped(stop_rx.clone())
            ),
            crate::server::serve_with(
                admin,
                &limits,
                crate::server::ServeOptions::with_cap(
                    crate::server::connection_cap(&limits, 1).min(ADMIN_MAX_CONNECTIONS)
                ),
                make_admin,
                stopped(stop_rx)
            ),
            trigger,
        );
        for done in finished {
            let _ = done.await;
        }
        hup.abort();
        poll.abort();
        expiry.abort();
        edge.abort();
        sale_edges.abort();
        recent.abort();
        health.abort();
        line.abort();
        reopen.abort();
        names.abort();
        if let Some(log) = &shared.access_log {
            // What is queued is written before the process ends.
            let log_shared = shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(log) = &log_shared.access_log {
                    log.finish();
                }
            })
            .await;
            tracing::debug!(path = %log.path().display(), "access log closed");
        }
        Ok(())
    }
}

/// Reopens the access log on every SIGUSR1 (logrotate: rename the file,
/// send SIGUSR1, the next lines go to a new file at the path), as Nginx's
/// `USR1`.
async fn reopen_access_log(shared: Arc<state::Shared>) {
    #[cfg(unix)]
    {
        if shared.access_log.is_none() {
            return;
        }
        use tokio::signal::unix::{SignalKind, signal};
        let mut usr1 = match signal(SignalKind::user_defined1()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot listen for SIGUSR1, the access log cannot be reopened: {e}");
                return;
            }
        };
        while usr1.recv().await.is_some() {
            if let Some(log) = &shared.access_log {
                log.reopen();
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = shared;
    }
}

/// The listener's TLS as the config version in force has it, for each
/// new connection's handshake.
struct TlsInForce(Arc<state::Shared>);

impl TlsInForce {
    /// For the accept loops: `None` when the listener has no TLS.
    fn of(shared: &Arc<state::Shared>) -> Option<Arc<dyn crate::server::tls::CurrentTls>> {
        shared.current.load().tls.as_ref()?;
        Some(Arc::new(TlsInForce(shared.clone())))
    }
}

impl crate::server::tls::CurrentTls for TlsInForce {
    fn current(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.0.current.load().tls.clone()
    }
}

/// Resolves once the balancer is told to stop (or the stopping side is gone).
async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The service of one client connection on worker `worker` (the accept
/// loop counts it as open, see [`crate::server::AcceptShare`]).
fn proxy_connection(
    shared: &Arc<state::Shared>,
    worker: usize,
    peer: SocketAddr,
) -> impl Service<
    Request<Incoming>,
    Response = Response<proxy::RespBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Send
+ use<> {
    /// What every request of the connection needs, behind one `Arc`.
    struct Connection {
        shared: Arc<state::Shared>,
        peer: forward::client::Peer,
    }
    let conn = Arc::new(Connection {
        shared: shared.clone(),
        peer: forward::client::Peer::new(peer),
    });
    service_fn(move |req| {
        let conn = conn.clone();
        // Boxed: the request's future (the policy, hyper's client, the
        // attempts) is large, and an HTTP/2 stream's was moved twice on
        // its way into the task hyper spawns for it (`H2Stream::new`,
        // `spawn`: a few % of an h2 request's user time in memmove, by
        // perf); a box moves as a pointer.
        Box::pin(async move {
            Ok::<_, Infallible>(proxy::handle(&conn.shared, worker, &conn.peer, req).await)
        })
    })
}

/// Closes worker `worker`'s upstream connections that stayed idle for longer
/// than `keepalive_timeout`, as Nginx's keepalive cache does, also when no
/// request comes along to find them expired; worker 0 also sweeps
/// `limit_rate`'s table of the clients that left (see [`limit`]).
async fn expire_idle(shared: Arc<state::Shared>, worker: usize) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let active = shared.current.load();
        let now = upstream::now_ms();
        for u in active.selector.upstreams() {
            u.live
                .idle
                .expire(worker, now, active.config.keepalive_timeout);
            u.live
                .raw_idle
                .expire(worker, now, active.config.keepalive_timeout);
        }
        if worker == 0 {
            let bucket = active.config.limits.rate.as_ref().map(limit::Bucket::of);
            shared.limits.rate.sweep(bucket, now);
        }
    }
}

/// One extra worker thread: a single-threaded runtime serving `listener`
/// until `stop`, then its in-flight requests for the grace period.
fn run_worker(
    shared: Arc<state::Shared>,
    worker: usize,
    listener: std::net::TcpListener,
    (most, permits, reusable): (usize, Arc<Semaphore>, Arc<crate::server::Reusable>),
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            shared.accept_share.leave(worker);
            tracing::error!(worker, error = %e, "cannot start a worker's runtime; serving with fewer");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                shared.accept_share.leave(worker);
                tracing::error!(worker, error = %e, "a worker cannot use the listener; serving with fewer");
                return;
            }
        };
        let limits = shared.server.clone();
        // Dropped with the runtime when the worker ends.
        tokio::spawn(expire_idle(shared.clone(), worker));
        let share = Some((shared.accept_share.clone(), worker));
        let send_timeout = shared.current.load().config.send_timeout;
        crate::server::serve_with(
            listener,
            &limits,
            crate::server::ServeOptions {
                most,
                permits,
                reusable,
                share,
                send_timeout: Some(send_timeout),
                front: Some(Arc::new(h1::FastPath {
                    shared: shared.clone(),
                    worker,
                }) as Arc<dyn crate::server::Front>),
                closing: Some(shared.draining.clone()),
                proxy_protocol: Some(Arc::new(forward::client::ProxyGate(shared.clone()))),
                tls: TlsInForce::of(&shared),
            },
            move |peer| proxy_connection(&shared, worker, peer),
            stopped(stop),
        )
        .await;
    });
}

/// Runs the balancer on bound listeners until `shutdown` resolves. For
/// in-process reloads build a [`Balancer`] and keep its [`Reloader`].
pub async fn run(
    listener: TcpListener,
    admin: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BalancerError> {
    Balancer::new(config)?.run(listener, admin, shutdown).await
}

/// The sale's store for the waiting room's line, when the file has a
/// `[waiting_room]`: its Redis (a line every balancer shares), which
/// `spike balancer` cannot do without.
/// Where the waiting room keeps its lines: the only sale's store, or the
/// stores of several sales (each made on its line's first request).
enum LineStores {
    One(crate::node::store::Store),
    Several(Arc<crate::node::store::Stores>),
}

async fn line_store(config: &Config) -> Result<Option<LineStores>, BalancerError> {
    let wants_line = config
        .balancer
        .as_ref()
        .is_some_and(|b| b.waiting_room.is_some());
    if !wants_line {
        return Ok(None);
    }
    let Some(redis) = config.redis.as_ref() else {
        return Err(BalancerError::Config(ConfigError::Lacks {
            path: config.path.clone(),
            message: "[waiting_room] keeps its line in the sale's Redis, shared by every balancer: `spike balancer` needs a [redis] section (only `spike up` can keep it in memory)".into(),
        }));
    };
    if config.sales.len() > 1 {
        return crate::node::store::Stores::open(&config.sales, Some(redis))
            .await
            .map(|s| Some(LineStores::Several(s)))
            .map_err(|e| BalancerError::Refused(format!("the waiting room's store: {e}")));
    }
    let sale = config.require_sale()?;
    crate::node::store::Store::open(sale, Some(redis))
        .await
        .map(|s| Some(LineStores::One(s)))
        .map_err(|e| BalancerError::Refused(format!("the waiting room's store: {e}")))
}

/// Entry point of `spike balancer`: load, bind, serve until SIGTERM/Ctrl-C.
pub fn main(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let b = config.require_balancer()?.clone();
    // One single-threaded runtime per CPU (see `Balancer::with_workers`);
    // `available_parallelism` follows CPU affinity (taskset) and cgroup
    // quotas, which is how to give the balancer fewer cores.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BalancerError::Io)?;
    runtime.block_on(async {
        let shutdown = crate::signals::shutdown_signal();
        crate::signals::catch_hangup();
        crate::signals::catch_user1();
        let listener = crate::server::bind(b.listen).map_err(|source| BalancerError::Bind {
            what: "clients",
            addr: b.listen,
            source,
        })?;
        let admin = crate::server::bind(b.admin).map_err(|source| BalancerError::Bind {
            what: "admin",
            addr: b.admin,
            source,
        })?;
        tracing::info!(
            listen = %b.listen,
            admin = %b.admin,
            strategy = b.strategy.as_str(),
            upstreams = b.upstreams.len(),
            workers,
            "balancer listening"
        );
        let line = line_store(&config).await?;
        let balancer = Balancer::with_workers(config, workers)?;
        match line {
            Some(LineStores::One(store)) => balancer.attach_line_store(store),
            Some(LineStores::Several(stores)) => balancer.attach_line_stores(stores),
            None => {}
        }
        let shutdown = balancer.drained(shutdown);
        balancer.run(listener, admin, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A balancer run in the test's process, for tests that look at what it
/// leaves running once it stops.
#[cfg(test)]
pub(crate) mod in_process {
    use std::sync::{Arc, Weak};
    use std::time::Duration;

    use super::{Balancer, state::Shared};

    /// A running balancer on `127.0.0.1:0`: its state, and the way to stop it.
    pub(crate) struct Running {
        pub(crate) shared: Arc<Shared>,
        gone: Weak<Shared>,
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), super::BalancerError>>,
    }

    impl Running {
        /// Runs `balancer` until [`Running::stop_and_forget`].
        pub(crate) async fn start(balancer: Balancer) -> Running {
            let shared = balancer.shared.clone();
            let gone = Arc::downgrade(&shared);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(balancer.run(listener, admin, async move {
                let _ = stopped.await;
            }));
            Running {
                shared,
                gone,
                stop,
                task,
            }
        }

        /// Stops the balancer and asserts that nothing of it runs on: its
        /// state is dropped within `bound` (the aborted tasks go as the
        /// runtime gets to them; the bound only makes a failure end).
        pub(crate) async fn stop_and_forget(self, bound: Duration) {
            let Running {
                shared,
                gone,
                stop,
                task,
            } = self;
            drop(shared);
            let _ = stop.send(());
            task.await.expect("join").expect("run");
            let until = tokio::time::Instant::now() + bound;
            while gone.strong_count() > 0 && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(
                gone.strong_count(),
                0,
                "the balancer's state is still held once it stopped: a task runs on"
            );
        }
    }
}
