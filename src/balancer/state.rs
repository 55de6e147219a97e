//! The state every part of the balancer shares: the config version in force
//! (swapped whole by a reload), the balancer-wide counters and the fixed
//! server limits. The proxy and the admin endpoints read it; the reload
//! triggers above it (SIGHUP, the file watcher, `Reloader`, in `reload.rs`) call
//! [`Shared::reload`]. A file that validates replaces the config in force
//! through an `ArcSwap` (the next request sees it, in-flight ones finish on
//! the old one); a file that does not is refused and the old one stays.
//!
//! The per-upstream live state is carried over by address, so the failure
//! marks, counters and idle keep-alive connections of the upstreams that stay
//! survive.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::{BalancerConfig, Config, ServerConfig};
use crate::server::AcceptShare;

use super::error::BalancerError;
use super::metrics::Metrics;
use super::select::{Gate, Selector};
use super::upstream::{LiveState, Upstream};

/// One config version in force: what the file said, built into a selector.
#[derive(Debug)]
pub struct Active {
    /// Starts at 1, one more per successful reload.
    pub version: u64,
    /// The validated balancer section.
    pub config: BalancerConfig,
    /// The upstreams and their picking state.
    pub selector: Selector,
    /// `[auth]` for the edge: a sold-out buyer is told they hold an order
    /// only once their token verifies. Built with the version, so a reload
    /// puts new keys in force for every request after it.
    pub auth: Option<Arc<crate::auth::Authority>>,
    /// The listener's TLS for handshakes from this version on (open
    /// connections keep the one they began with).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Active {
    fn build(
        version: u64,
        config: BalancerConfig,
        old: Option<&Active>,
        sessions: Option<&crate::server::tls::Sessions>,
    ) -> Result<Active, BalancerError> {
        let tls = match (&config.tls, sessions) {
            (Some(t), Some(s)) => Some(t.server_config(s)?),
            _ => None,
        };
        let previous: HashMap<SocketAddr, Arc<LiveState>> = old
            .map(|o| {
                o.selector
                    .upstreams()
                    .map(|u| (u.config.addr, u.live.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let upstreams = config
            .upstreams
            .iter()
            .map(|c| {
                let live = previous
                    .get(&c.addr)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(LiveState::new(c.addr)));
                Upstream::new(c.clone(), live)
            })
            .collect();
        let gate = Gate {
            on: config.health.is_some()
                || !config.slow_start.is_zero()
                || config.upstreams.iter().any(|u| u.max_conns != 0),
            slow_start_ms: config.slow_start.as_millis() as u64,
        };
        if config.health.is_none() {
            // Nothing checks them any more: what the last check said no
            // longer holds.
            for live in previous.values() {
                live.healthy
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        // Validation tried these keys on this sale: an error here is a
        // key the JWT library refused after all, and the edge then sends
        // every sold-out buyer to a node, which answers for them.
        let auth = config.auth.as_ref().and_then(|e| {
            match &e.event {
                Some(event) => crate::auth::Authority::new(&e.auth, event),
                None => crate::auth::Authority::any_sale(&e.auth),
            }
                .map_err(|error| tracing::error!(%error, "[auth] keys refused; the edge answers no already_bought"))
                .ok()
                .map(Arc::new)
        });
        Ok(Active {
            version,
            selector: Selector::new(config.strategy, upstreams).gated(gate),
            config,
            auth,
            tls,
        })
    }
}

/// Work around a reload outside the balancer: `spike up` starts the nodes
/// a file adds before they are routed to, and stops the ones it removes
/// once nothing is routed to them, so the balancer never routes to a node
/// that does not exist.
pub trait ReloadHook: Send + Sync {
    /// The validated file, before it goes in force; an error refuses it
    /// (the old config stays in force).
    fn before(&self, config: &Config) -> Result<(), String>;
    /// The file is in force; `gone` are the upstreams it took out, with
    /// their requests in flight.
    fn after(&self, config: &Config, gone: Vec<Arc<LiveState>>);
}

/// The hook, printable for `Shared`'s `Debug`.
struct Hook(Box<dyn ReloadHook>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadHook")
    }
}

/// What a file looked like last time: modification time and length.
type Stamp = Option<(SystemTime, u64)>;

/// The stamps of the config file and of the certificate files it names
/// (a renewed certificate is a reason to reload, as Nginx needs a HUP for).
fn stamps(path: &std::path::Path, config: &BalancerConfig) -> Vec<Stamp> {
    std::iter::once(path)
        .chain(config.tls.iter().flat_map(|t| t.files()))
        .map(stamp)
        .collect()
}

fn stamp(path: &std::path::Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The file's `[[node]]` names by listen address.
fn node_names(config: &Config) -> HashMap<SocketAddr, String> {
    config
        .nodes
        .iter()
        .map(|n| (n.listen, n.name.clone()))
        .collect()
}

/// Everything the proxy, the admin endpoints and the reloaders share.
#[derive(Debug)]
pub struct Shared {
    /// The config version in force.
    pub current: ArcSwap<Active>,
    /// Counters that are not per upstream.
    pub metrics: Metrics,
    /// Sold out at the edge (see [`super::edge`]).
    pub edge: super::edge::Edge,
    /// The waiting room's line as last heard, and its counters (see
    /// [`super::waiting_room`]).
    pub waiting_room: super::waiting_room::WaitingRoom,
    /// The per-client limits' tables and counters (see [`super::limit`]),
    /// kept across reloads.
    pub limits: super::limit::Limits,
    /// Rates, p99 and the sale's figures of the last seconds, for the
    /// status page (see [`super::recent`]).
    pub recent: super::window::Recent,
    /// How the workers share new client connections.
    pub accept_share: Arc<AcceptShare>,
    /// Server limits, fixed at start (a reload cannot rebind sockets).
    pub server: ServerConfig,
    /// Worker threads serving clients, fixed at start; each has its own
    /// idle upstream connections (see [`super::pool`]).
    pub workers: usize,
    /// Set when the balancer begins to stop (SIGTERM): `/ready` fails and
    /// every answer asks its client to close, while it goes on serving for
    /// `drain_delay` (see [`super::Balancer::drained`]).
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// What the last lookups of each upstream host name (`resolve`) said,
    /// by name and port (see [`super::resolver`]).
    names: Mutex<HashMap<(String, u16), NameState>>,
    /// The access log, when `access_log` is set (opened at start).
    pub access_log: Option<super::access_log::AccessLog>,
    /// TLS session resumption (ticket keys, session cache), kept across
    /// reloads; `Some` exactly when the listener has TLS, which only a
    /// restart changes.
    sessions: Option<crate::server::tls::Sessions>,
    /// Called around every reload that makes a new version.
    hook: std::sync::OnceLock<Hook>,
    /// The file in force has a `[sale]` (the status page shows it).
    has_sale: std::sync::atomic::AtomicBool,
    /// The file's `[sale]` as last read, to say when a reload changes it
    /// (which changes no sale: the stored one is in force).
    sale: Mutex<Option<crate::config::SaleConfig>>,
    /// The events of a file of several sales (empty with one or none): a
    /// reload that changes them is a reload even when the balancer's
    /// section is the same (the reload hook of `spike up` starts the
    /// sales added); one that makes one sale several, or several one, is
    /// refused (docs/design/many-sales.md).
    several: Mutex<Vec<String>>,
    /// The file's `[[node]]` names by listen address: an operator knows
    /// the nodes by name, and `/status` names the upstreams that are nodes.
    node_names: ArcSwap<HashMap<SocketAddr, String>>,
    path: PathBuf,
    reloading: Mutex<()>,
    seen: Mutex<Vec<Stamp>>,
    last_reload: Mutex<Option<LastReload>>,
}

/// What the last lookups of an upstream host name said, for `/status`.
#[derive(Debug, Clone, Default)]
pub struct NameState {
    /// When it last resolved.
    pub resolved_at: Option<SystemTime>,
    /// The last lookup's error, and since when lookups have failed;
    /// `None` while it resolves.
    pub failing: Option<(String, SystemTime)>,
}

/// How the last reload attempt ended, for `/status`: whoever saved the file
/// or sent SIGHUP needs to see whether it went in force, and if not, why
/// (the log may be out of reach).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastReload {
    /// When the attempt was made.
    pub at: SystemTime,
    /// Why the file was refused; `None` when it went in force (or was
    /// the config in force already).
    pub error: Option<String>,
    /// The file validated to the config in force: no new version was made.
    pub unchanged: bool,
    /// What the reload did not do though the file asked for it (a changed
    /// `[sale]`: the stored sale is the one in force).
    pub note: Option<String>,
}

impl Shared {
    /// Builds version 1 from a loaded config, for `workers` worker threads
    /// (at least one).
    pub fn new(config: Config, workers: usize) -> Result<Shared, BalancerError> {
        let balancer = config.require_balancer()?.clone();
        let workers = workers.max(1);
        let access_log = match &balancer.access_log {
            Some(path) => Some(
                super::access_log::AccessLog::open(path, balancer.access_log_format).map_err(
                    |source| BalancerError::AccessLog {
                        path: path.clone(),
                        source,
                    },
                )?,
            ),
            None => None,
        };
        let sessions = match balancer.tls {
            Some(_) => Some(crate::server::tls::Sessions::new()?),
            None => None,
        };
        let seen = stamps(&config.path, &balancer);
        Ok(Shared {
            access_log,
            current: ArcSwap::from_pointee(Active::build(1, balancer, None, sessions.as_ref())?),
            sessions,
            metrics: Metrics::default(),
            edge: super::edge::Edge::default(),
            limits: super::limit::Limits::default(),
            waiting_room: Default::default(),
            recent: super::window::Recent::default(),
            accept_share: Arc::new(AcceptShare::new(workers)),
            server: config.server.clone(),
            workers,
            draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            seen: Mutex::new(seen),
            has_sale: std::sync::atomic::AtomicBool::new(config.sale().is_some()),
            sale: Mutex::new(config.sale().cloned()),
            several: Mutex::new(several_sales(&config)),
            node_names: ArcSwap::from_pointee(node_names(&config)),
            hook: std::sync::OnceLock::new(),
            path: config.path,
            reloading: Mutex::new(()),
            last_reload: Mutex::new(None),
            names: Mutex::new(HashMap::new()),
        })
    }

    /// Reads and validates the file again and, if it is good and says
    /// something new, puts it in force as the next version; returns the
    /// version in force. A file that validates to the config in force
    /// (saved without changes, or changed only in comments or in the
    /// server limits, which need a restart) makes no new version. Blocking
    /// (file and DNS): async callers use `spawn_blocking`.
    pub fn reload(&self) -> Result<u64, BalancerError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let at = SystemTime::now();
        let before = self.current.load().version;
        let mut note = None;
        let result = self.reload_locked(&mut note);
        if note.is_none() && matches!(result, Ok(v) if v == before) {
            // Nothing new since the last reload (the file watcher and a
            // SIGHUP may both reload one save): what that one said of the
            // file's [sale] still holds, and must not be lost.
            note = self.last_reload().and_then(|r| r.note);
        }
        let outcome = LastReload {
            at,
            error: result.as_ref().err().map(|e| e.to_string()),
            unchanged: matches!(result, Ok(v) if v == before) && note.is_none(),
            note,
        };
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        result
    }

    /// How the last reload attempt ended (`None` before the first).
    pub fn last_reload(&self) -> Option<LastReload> {
        self.last_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// [`Shared::reload`] under its lock.
    fn reload_locked(&self, note: &mut Option<String>) -> Result<u64, BalancerError> {
        let old = self.current.load_full();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamps(&self.path, &old.config);
        let config = Config::load(&self.path)?;
        let balancer = config.require_balancer()?.clone();
        if balancer.tls.is_some() != self.sessions.is_some() {
            return Err(BalancerError::Refused(
                "TLS on balancer.listen (tls_cert, tls_key) is turned on or off only by a restart; a reload changes the certificates"
                    .into(),
            ));
        }
        let several = several_sales(&config);
        let sales_changed = {
            let now = self.several.lock().unwrap_or_else(|e| e.into_inner());
            if several.is_empty() != now.is_empty() {
                return Err(BalancerError::Refused(if now.is_empty() {
                    "the file now has several sales ([[sale]]) where the fleet sells one or none: what /buy/ticket without `event` and an order id mean changes with it, so it takes a restart of the fleet (a file of several sales adds sales by reload)".into()
                } else {
                    "the file now has one sale or none where the fleet sells several: what /buy/ticket without `event` and an order id mean changes with it, so it takes a restart of the fleet".into()
                }));
            }
            several != *now
        };
        *note = self.sale_changed(&config);
        if let Some(n) = note {
            tracing::warn!("{n}");
        }
        if balancer == old.config && !sales_changed {
            // Whether the page shows a sale is no part of the version.
            self.set_has_sale(&config);
            if note.is_none() {
                tracing::info!(version = old.version, "config unchanged, no new version");
            }
            return Ok(old.version);
        }
        if balancer.listen != old.config.listen || balancer.admin != old.config.admin {
            tracing::warn!(
                "a change of balancer.listen or balancer.admin takes effect only after a restart"
            );
        }
        let hook = self.hook.get();
        if let Some(h) = hook {
            h.0.before(&config).map_err(BalancerError::Refused)?;
        }
        let next = Active::build(
            old.version + 1,
            balancer,
            Some(&old),
            self.sessions.as_ref(),
        )?;
        let version = next.version;
        tracing::info!(
            version,
            strategy = next.config.strategy.as_str(),
            upstreams = next.config.upstreams.len(),
            "config reloaded"
        );
        let gone: Vec<Arc<LiveState>> = old
            .selector
            .upstreams()
            .filter(|u| {
                !next
                    .selector
                    .upstreams()
                    .any(|n| n.config.addr == u.config.addr)
            })
            .map(|u| u.live.clone())
            .collect();
        if next.config.tls != old.config.tls {
            // The new certificates' files, as they were read.
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let config_file = seen.first().copied().flatten();
            *seen = stamps(&self.path, &next.config);
            if let Some(first) = seen.first_mut() {
                *first = config_file;
            }
            tracing::info!(
                version = next.version,
                "new TLS certificates in force for new connections"
            );
        }
        self.current.store(Arc::new(next));
        self.set_has_sale(&config);
        *self.several.lock().unwrap_or_else(|e| e.into_inner()) = several;
        if sales_changed {
            // Each sale added gets its line (no purchase of it passes
            // none); a sale removed has none made any more.
            self.waiting_room.sales_in_force(&config.sales);
        }
        if let Some(h) = hook {
            h.0.after(&config, gone);
        }
        Ok(version)
    }

    /// `host:port` resolved (again): any failure it had is over.
    pub fn name_resolved(&self, host: &str, port: u16) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let state = names.entry((host.to_string(), port)).or_default();
        if let Some((error, since)) = state.failing.take() {
            tracing::info!(host, port, %error, failing_since = %humantime::format_rfc3339_seconds(since), "upstream name resolves again");
        }
        state.resolved_at = Some(SystemTime::now());
    }

    /// `host:port` did not resolve: its upstream keeps `kept`, and
    /// `/status` says so (the log says it once, when it begins).
    pub fn name_failed(&self, host: &str, port: u16, kept: SocketAddr, error: &str) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let state = names.entry((host.to_string(), port)).or_default();
        match &mut state.failing {
            Some((last, _)) => error.clone_into(last),
            None => {
                tracing::warn!(host, port, %kept, error, "upstream name does not resolve; keeping its last address");
                state.failing = Some((error.to_string(), SystemTime::now()));
            }
        }
    }

    /// What the last lookups of `host:port` said (`None` before any).
    pub fn name_state(&self, host: &str, port: u16) -> Option<NameState> {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(host.to_string(), port))
            .cloned()
    }

    /// Puts the config in force again with each `(host, port, new)`'s
    /// upstreams at their new address, as a new version (the way a
    /// reload does, without reading the file). A new address that another
    /// upstream already has is left out, with a warning.
    pub fn readdress(&self, moved: &[(String, u16, SocketAddr)]) {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        let mut config = old.config.clone();
        let mut changed = false;
        for (host, port, new) in moved {
            if config.upstreams.iter().any(|u| u.addr == *new) {
                tracing::warn!(host, port, %new, "upstream name now resolves to another upstream's address; keeping its last one");
                continue;
            }
            for u in &mut config.upstreams {
                if u.name
                    .as_ref()
                    .is_some_and(|n| n.host == *host && n.port == *port)
                {
                    tracing::info!(host, port, from = %u.addr, to = %new, "upstream name resolves to a new address");
                    u.addr = *new;
                    changed = true;
                }
            }
        }
        if !changed {
            return;
        }
        let next = match Active::build(old.version + 1, config, Some(&old), self.sessions.as_ref())
        {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "no new version for the new upstream address: the TLS config could not be built");
                return;
            }
        };
        tracing::info!(
            version = next.version,
            "new version for the new upstream address"
        );
        self.current.store(Arc::new(next));
    }

    /// Sets the reload hook (once; a second is ignored).
    pub fn set_reload_hook(&self, hook: Box<dyn ReloadHook>) {
        let _ = self.hook.set(Hook(hook));
    }

    /// What a reload says when the file's `[sale]` changed: a sale is
    /// started by `stock init` (or `spike up`, once) and then lives in the
    /// store, so an edited total or limit in the file changes nothing.
    fn sale_changed(&self, config: &Config) -> Option<String> {
        let mut kept = self.sale.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(old), Some(new)) = (kept.as_ref(), config.sale()) else {
            *kept = config.sale().cloned();
            return None;
        };
        if old == new {
            return None;
        }
        let mut changed = Vec::new();
        if old.total != new.total {
            changed.push(format!("total {} -> {}", old.total, new.total));
        }
        if old.per_user_limit != new.per_user_limit {
            changed.push(format!(
                "per_user_limit {} -> {}",
                old.per_user_limit, new.per_user_limit
            ));
        }
        if old.pay_within != new.pay_within {
            changed.push("pay_within".to_string());
        }
        if old.event != new.event {
            changed.push(format!("event {} -> {}", old.event, new.event));
        }
        if changed.is_empty() {
            changed.push("a setting".to_string());
        }
        let text = format!(
            "the file's [sale] changed ({}), but a reload does not change the sale: [sale] is the store's, and the stored sale stays in force; use `spike stock init --force` to start a new sale with these figures",
            changed.join(", ")
        );
        *kept = config.sale().cloned();
        Some(text)
    }

    /// The file's per-user limit, when it has a sale (the stored one is
    /// the sale's: `/status` prefers what a node reports).
    pub fn sale_limit(&self) -> Option<u64> {
        self.sale
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.per_user_limit)
    }

    fn set_has_sale(&self, config: &Config) {
        self.has_sale.store(
            config.sale().is_some(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.node_names.store(Arc::new(node_names(config)));
    }

    /// The `[[node]]` names of the file in force, by listen address.
    pub fn node_names(&self) -> Arc<HashMap<SocketAddr, String>> {
        self.node_names.load_full()
    }

    /// The events of the file in force when it has several sales (empty
    /// with one or none): what the admin's `/sale?event=` and `/status`
    /// go by.
    pub fn several_sales(&self) -> Vec<String> {
        self.several
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the file in force has a `[sale]`.
    pub fn has_sale(&self) -> bool {
        self.has_sale.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the file changed since the last load or reload attempt.
    pub fn changed_on_disk(&self) -> bool {
        let now = stamps(&self.path, &self.current.load().config);
        now.first().is_some_and(Option::is_some)
            && now != *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The events of a file of several sales; empty with one or none.
fn several_sales(config: &Config) -> Vec<String> {
    if config.sales.len() < 2 {
        return Vec::new();
    }
    config.sales.iter().map(|s| s.event.clone()).collect()
}
