//! An upstream: its static config (from the file) and its live state
//! (failures, active requests, counters).
//!
//! The live state is shared through an `Arc` and looked up by address when a
//! new config is built, so a reload keeps the failure marks, counters and
//! idle keep-alive connections of every upstream that stays (and closes those
//! of an upstream that goes, with its last reference).

use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use hyper::header::HeaderValue;
use tokio::sync::Notify;

use crate::config::UpstreamConfig;

use super::pool::{ConnectError, IdleConns, RawConn, out_of_files};

pub use super::clock::now_ms;

/// The per-address state that survives reloads.
///
/// `fails`, `checked` and `accessed` are Nginx's fields of the same names;
/// they are only written while the picking lock of a selector is held, and are
/// atomics so that the old and the new selector can share them across a reload.
#[derive(Debug)]
pub struct LiveState {
    /// The upstream's address (the key).
    pub addr: SocketAddr,
    /// Failures counted in the current window (Nginx `fails`).
    pub fails: AtomicU32,
    /// When the window was last (re)started, in [`now_ms`] (Nginx `checked`).
    pub checked: AtomicU64,
    /// When the last failure happened, in [`now_ms`] (Nginx `accessed`).
    pub accessed: AtomicU64,
    /// Requests picked for this upstream and not finished yet.
    pub active: AtomicU64,
    /// Attempts sent to this upstream, ever.
    pub requests: AtomicU64,
    /// Failed attempts (connect errors, resets, timeouts), ever.
    pub failures: AtomicU64,
    /// Responses by status code, index `code - 100` (100 to 599): an
    /// operator tells a sold-out 409 from a 400 or a 404, which a count by
    /// class would lump together. Boxed: 4 KB per upstream, allocated once.
    pub responses: Box<[AtomicU64; STATUS_CODES]>,
    /// Idle keep-alive connections to this upstream, per worker.
    pub idle: IdleConns,
    /// Idle keep-alive connections of the balancer's own HTTP/1 path
    /// ([`super::h1`]), per worker.
    pub raw_idle: IdleConns<RawConn>,
    /// What the active health check says (true until it says otherwise).
    pub healthy: AtomicBool,
    /// Health checks failed in a row.
    pub check_fails: AtomicU32,
    /// Health checks passed in a row.
    pub check_passes: AtomicU32,
    /// When it last came back (its check passed again, or its failure
    /// window ended), in [`now_ms`]; 0: never. `slow_start` ramps from here.
    pub back_since: AtomicU64,
    /// Purchases to it in batches (a node; see [`super::batch`]).
    pub batches: super::batch::Batches,
}

/// Rung whenever a request to an upstream with `max_conns` ends: the
/// requests waiting in the balancer's queue look again. One for the whole
/// process (every balancer in it): a wake-up meant for another only costs
/// a look.
pub static FREED: Notify = Notify::const_new();

impl LiveState {
    /// Closes this upstream's idle keep-alive connections, every worker's
    /// and both paths', for a connect that found no descriptor left. Each
    /// worker keeps its own idle connections, and with a listening socket
    /// per worker the kernel does not spread clients evenly: the
    /// connections one worker keeps idle from its busiest moment held the
    /// descriptors another needed (under `prlimit --nofile=256`, 1 to 12
    /// of 400 flooding clients got 502s). The cap on clients
    /// ([`crate::server::connection_cap`]) counts one upstream connection
    /// per client, not idle ones besides.
    pub fn shed_idle(&self) {
        self.raw_idle.close_all();
        self.idle.close_all();
    }

    /// `connect`, and once more after [`LiveState::shed_idle`] if it found
    /// no descriptor left (and `settle` for the shed sockets to close):
    /// idle connections must not cost a request its answer. Both paths'
    /// connects go through here.
    pub async fn connect_or_shed<C, F>(
        &self,
        settle: std::time::Duration,
        connect: impl Fn() -> F,
    ) -> Result<C, ConnectError>
    where
        F: std::future::Future<Output = Result<C, ConnectError>>,
    {
        match connect().await {
            Err(e) if out_of_files(&e) => {
                self.shed_idle();
                if !settle.is_zero() {
                    tokio::time::sleep(settle).await;
                }
                connect().await
            }
            connected => connected,
        }
    }

    /// Fresh state for an upstream never seen before.
    pub fn new(addr: SocketAddr) -> LiveState {
        LiveState {
            addr,
            fails: AtomicU32::new(0),
            checked: AtomicU64::new(0),
            accessed: AtomicU64::new(0),
            active: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            responses: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            idle: IdleConns::default(),
            raw_idle: IdleConns::default(),
            healthy: AtomicBool::new(true),
            check_fails: AtomicU32::new(0),
            check_passes: AtomicU32::new(0),
            back_since: AtomicU64::new(0),
            batches: super::batch::Batches::default(),
        }
    }

    /// Counts one response by its status code (codes outside 100..600,
    /// which hyper does not produce, count as 599).
    pub fn count_response(&self, status: u16) {
        let i = (status.clamp(100, 599) - 100) as usize;
        self.responses[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The status codes answered so far with their counts, lowest first.
    pub fn responses_by_code(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.responses.iter().enumerate().filter_map(|(i, c)| {
            let n = c.load(Ordering::Relaxed);
            (n > 0).then_some((i as u16 + 100, n))
        })
    }
}

/// How many status codes are counted apart: 100 to 599.
pub const STATUS_CODES: usize = 500;

/// One upstream as the selector and the proxy see it.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// What the file says.
    pub config: UpstreamConfig,
    /// The address as a `Host` value, for the rare client that sends none
    /// (HTTP/1.1 upstreams require one); built once so no request formats it.
    pub host: HeaderValue,
    /// The state that outlives reloads.
    pub live: Arc<LiveState>,
}

impl Upstream {
    /// Builds an upstream around existing (or fresh) live state.
    pub fn new(config: UpstreamConfig, live: Arc<LiveState>) -> Upstream {
        // A SocketAddr always prints as a valid header value ("1.2.3.4:5").
        let host = HeaderValue::try_from(config.addr.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Upstream { config, host, live }
    }

    /// Whether passive health checking currently keeps this upstream out
    /// (Nginx: `max_fails && fails >= max_fails && now - checked <= fail_timeout`).
    pub fn is_failed(&self, now: u64) -> bool {
        let c = &self.config;
        c.max_fails != 0
            && self.live.fails.load(Ordering::Relaxed) >= c.max_fails
            && now.saturating_sub(self.live.checked.load(Ordering::Relaxed))
                <= c.fail_timeout.as_millis() as u64
    }

    /// Whether it is at its `max_conns`.
    pub fn is_busy(&self) -> bool {
        self.config.max_conns != 0
            && self.live.active.load(Ordering::Relaxed) >= u64::from(self.config.max_conns)
    }

    /// Its share of the traffic while it ramps up after coming back
    /// (`slow_start`): from a tenth to all of it, in per mille; 1000 when
    /// not ramping.
    pub fn ramp_permille(&self, now: u64, slow_start_ms: u64) -> u64 {
        let since = self.live.back_since.load(Ordering::Relaxed);
        if slow_start_ms == 0 || since == 0 {
            return 1000;
        }
        let elapsed = now.saturating_sub(since);
        if elapsed >= slow_start_ms {
            return 1000;
        }
        100 + 900 * elapsed / slow_start_ms
    }

    /// The state shown by `/status`: `down`, `unhealthy`, `failed`,
    /// `backup` or `up`.
    pub fn state_name(&self, now: u64) -> &'static str {
        if self.config.down {
            "down"
        } else if !self.live.healthy.load(Ordering::Relaxed) {
            "unhealthy"
        } else if self.is_failed(now) {
            "failed"
        } else if self.config.backup {
            "backup"
        } else {
            "up"
        }
    }
}
