//! `spike up`: a whole sale on one machine from one command: the balancer and
//! every `[[node]]` of the file, in this one process.
//!
//! One process, not several: the embedded store can only be shared inside a
//! process, Ctrl-C can leave no orphan behind, and a new user needs nothing
//! but the binary. Separate `spike node` processes (with Redis) are the way
//! to spread nodes over machines.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::node::store::{Snapshot, Stores};
use crate::node::{NodeError, Sales};

/// Why `spike up` could not start.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// The file is not a runnable sale.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A node could not start.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The store could not be reached or set up.
    #[error(transparent)]
    Store(#[from] crate::node::StoreError),
    /// An address is taken.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What wanted it.
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The balancer failed.
    #[error(transparent)]
    Balancer(#[from] crate::balancer::BalancerError),
    /// The store may forget answered orders (the gate `stock init` has).
    #[error(transparent)]
    Refused(#[from] crate::stock::StartRefused),
}

/// Everything `spike up` listens on, bound before anything starts serving so
/// a taken port fails the whole command at once.
pub struct Listeners {
    /// The balancer's client listener.
    pub balancer: TcpListener,
    /// The balancer's admin listener.
    pub admin: TcpListener,
    /// One per node, in file order (with its internal one, when the node
    /// has `internal`).
    pub nodes: Vec<crate::node::Listeners>,
}

impl Listeners {
    /// Binds every address the config names.
    pub fn bind(config: &Config) -> Result<Listeners, UpError> {
        let b = config.require_balancer()?;
        let bind = |addr: SocketAddr, what: &str| {
            crate::server::bind(addr).map_err(|source| UpError::Bind {
                addr,
                what: what.to_string(),
                source,
            })
        };
        Ok(Listeners {
            balancer: bind(b.listen, "balancer")?,
            admin: bind(b.admin, "balancer admin")?,
            nodes: config
                .nodes
                .iter()
                .map(|n| {
                    Ok(crate::node::Listeners {
                        public: bind(n.listen, &format!("node {}", n.name))?,
                        internal: n
                            .internal
                            .map(|a| bind(a, &format!("node {} internal", n.name)))
                            .transpose()?,
                    })
                })
                .collect::<Result<_, UpError>>()?,
        })
    }
}

/// Runs the sale until `shutdown`, then stops the balancer first (so no new
/// purchase reaches a node that is stopping) and the nodes after it, each
/// letting in-flight requests finish. `ready` is called once everything
/// listens, with the sale as the store holds it (the one in force, whatever
/// the file says) and the nodes, so callers can print or test.
///
/// A sale not yet in the store is started as `spike stock init` starts
/// it, through the same durability gate (`allow_volatile` as its
/// `--allow-volatile`); a sale already there is joined, never wiped.
pub async fn run(
    config: Config,
    listeners: Listeners,
    allow_volatile: bool,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&Config, &[Snapshot], &[Arc<Sales>]),
) -> Result<(), UpError> {
    if config.sales.is_empty() {
        config.require_sale()?;
    }
    // Every sale of the file, started (or joined) before any node serves.
    // The embedded stores are the sales themselves, shared by the nodes;
    // with Redis these are for the start only (each node opens its own).
    let stores = Stores::open(&config.sales, config.redis.as_ref()).await?;
    let mut snaps = Vec::with_capacity(config.sales.len());
    let mut warned = false;
    for sale in &config.sales {
        let Some(store) = stores.get(&sale.event).await else {
            continue;
        };
        let snap = store.snapshot().await?;
        let snap = if snap.initialised {
            if !warned && let Ok(Some(durability)) = store.durability().await {
                // One Redis for every sale: said once.
                warned = true;
                for problem in durability.problems() {
                    tracing::warn!(event = %sale.event, "redis may lose answered orders: {problem}");
                }
            }
            snap
        } else {
            crate::stock::start_gate(&store, &sale.event, allow_volatile).await?;
            store.init(false).await?;
            store.snapshot().await?
        };
        snaps.push(snap);
    }
    let line_store = match config.sale() {
        Some(sale) => stores.get(&sale.event).await,
        None => None,
    };
    // Several sales' lines: in the embedded stores the nodes sell from,
    // or in a store of the line's own over Redis, made on the line's first
    // request (the start's stores keep a clock and a batch task per sale).
    let line_stores = match (&config.redis, config.sales.len() > 1) {
        (_, false) => None,
        (None, true) => Some(stores.clone()),
        (Some(redis), true) => Some(Stores::open(&config.sales, Some(redis)).await?),
    };
    let mut nodes = Vec::with_capacity(config.nodes.len());
    let fleet = Arc::new(Fleet {
        stores: match config.redis {
            Some(_) => None,
            None => Some(stores.clone()),
        },
        running: Mutex::new(HashMap::new()),
        events: Mutex::new(config.sales.iter().map(|s| s.event.clone()).collect()),
        allow_volatile,
    });
    // With Redis the start's stores are done (each node opens its own, and
    // the line keeps its sale's): each kept its clock's reading a second and
    // a batch task, for every sale of the file, for the whole run.
    drop(stores);
    for (cfg, listener) in config.nodes.iter().zip(listeners.nodes) {
        nodes.push(fleet.start(&config, &cfg.name, listener).await?);
    }
    let balancer = crate::balancer::Balancer::new(config.clone())?;
    // The waiting room's line lives with the sale: in its Redis, or in
    // the embedded store the nodes sell from. Always handed over, so that
    // a reload that adds a `[waiting_room]` opens the line (with several
    // sales, each sale's line).
    if let Some(store) = line_store {
        balancer.attach_line_store(store);
    }
    if let Some(stores) = line_stores {
        balancer.attach_line_stores(stores);
    }
    balancer.set_reload_hook(Box::new(FleetHook {
        fleet: fleet.clone(),
        runtime: tokio::runtime::Handle::current(),
    }));
    let (stop_balancer, balancer_rx) = watch::channel(());
    let balancer = tokio::spawn(
        balancer.run(listeners.balancer, listeners.admin, async move {
            let mut rx = balancer_rx;
            let _ = rx.changed().await;
        }),
    );
    ready(&config, &snaps, &nodes);
    shutdown.await;
    let _ = stop_balancer.send(());
    let balancer_result = balancer.await;
    let all: Vec<Running> = fleet.lock().drain().map(|(_, r)| r).collect();
    for r in &all {
        let _ = r.stop.send(());
    }
    for r in all {
        let _ = r.task.await;
    }
    match balancer_result {
        Ok(r) => r.map_err(UpError::from),
        Err(e) => {
            tracing::error!(error = %e, "balancer task failed");
            Ok(())
        }
    }
}

/// One node serving in this process.
struct Running {
    /// Where it serves its internal routes (`None`: on its listen
    /// address), which a reload cannot move.
    internal: Option<SocketAddr>,
    stop: watch::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    /// The node, for what a reload changes in place (its `[auth]` keys).
    node: Arc<Sales>,
}

/// The nodes `spike up` runs, by listen address: what a reload of the file
/// starts and stops.
struct Fleet {
    /// The embedded stores the nodes sell from (`None` with Redis: each
    /// node opens its own connection to the same Redis).
    stores: Option<Arc<Stores>>,
    running: Mutex<HashMap<SocketAddr, Running>>,
    /// The events of the sales in force: a reload starts those it adds.
    events: Mutex<std::collections::HashSet<String>>,
    /// `--allow-volatile`, for the sales a reload adds.
    allow_volatile: bool,
}

impl Fleet {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the sales of `config` that are not in force yet, as `spike
    /// up` starts the file's sales at its start (through the same
    /// durability gate; a sale already in the store is joined); the
    /// embedded stores learn of them. Returns how many were added.
    async fn start_added_sales(&self, config: &Config) -> Result<usize, UpError> {
        let added: Vec<crate::config::SaleConfig> = {
            let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
            config
                .sales
                .iter()
                .filter(|s| !events.contains(&s.event))
                .cloned()
                .collect()
        };
        if added.is_empty() {
            return Ok(0);
        }
        // The embedded stores are the process's: the added sales' slots
        // go there (each starts when first asked, below). With Redis, one
        // connection for the start, as at `spike up`'s start.
        let stores = match &self.stores {
            Some(embedded) => {
                embedded.add_sales(&added);
                embedded.clone()
            }
            None => Stores::open(&added, config.redis.as_ref()).await?,
        };
        for sale in &added {
            let Some(store) = stores.get(&sale.event).await else {
                continue;
            };
            if !store.snapshot().await?.initialised {
                crate::stock::start_gate(&store, &sale.event, self.allow_volatile).await?;
                store.init(false).await?;
            }
        }
        Ok(added.len())
    }

    /// Starts node `name` of `config` on `listeners`.
    async fn start(
        &self,
        config: &Config,
        name: &str,
        listeners: crate::node::Listeners,
    ) -> Result<Arc<Sales>, UpError> {
        // With Redis, each node its own connection and batch queues, as
        // separate `spike node` processes would have: its `redis_calls`
        // are its own. The embedded stores live once per process.
        let stores = match (&self.stores, config.redis.as_ref()) {
            (Some(embedded), _) => embedded.clone(),
            (None, r) => Stores::open(&config.sales, r).await?,
        };
        let node = Sales::new(config, name, stores).await?;
        // Keyed by the file's address, which the reload compares against.
        let cfg = config.node(name)?;
        let (addr, internal) = (cfg.listen, cfg.internal);
        let (stop, rx) = watch::channel(());
        let task = crate::node::spawn(listeners, node.clone(), config.server.clone(), rx);
        self.lock().insert(
            addr,
            Running {
                internal,
                stop,
                task,
                node: node.clone(),
            },
        );
        Ok(node)
    }
}

/// Follows the file's `[[node]]` entries on reload: an added node is bound
/// and serving before the balancer routes to it; a removed one is stopped
/// once the balancer routes nothing to it and its requests in flight have
/// ended. A node that cannot start refuses the whole file.
struct FleetHook {
    fleet: Arc<Fleet>,
    runtime: tokio::runtime::Handle,
}

impl crate::balancer::state::ReloadHook for FleetHook {
    fn before(&self, config: &Config) -> Result<(), String> {
        for sale in &config.sales {
            crate::node::authority_for(config, &sale.event).map_err(|e| e.to_string())?;
        }
        let one_now = self
            .fleet
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            == 1;
        crate::node::sales::refuse_one_to_several(one_now, config).map_err(|e| e.to_string())?;
        // The refusals told at once first: a file refused must not have
        // written its added sales' stock.
        if config.nodes.is_empty() {
            return Err(format!(
                "{}: `spike up` runs the file's [[node]] entries and there are none",
                config.path.display()
            ));
        }
        let added: Vec<_> = {
            let running = self.fleet.lock();
            if let Some(n) = config.nodes.iter().find(|n| {
                running
                    .get(&n.listen)
                    .is_some_and(|r| r.internal != n.internal)
            }) {
                return Err(format!(
                    "node {}: `internal` changes only with a restart of `spike up` (the node keeps serving where it does); the file is refused",
                    n.name
                ));
            }
            config
                .nodes
                .iter()
                .filter(|n| !running.contains_key(&n.listen))
                .collect()
        };
        // Bind them all before starting any: a taken port refuses the file
        // with nothing started.
        let _in_runtime = self.runtime.enter();
        let mut bound = Vec::with_capacity(added.len());
        for n in added {
            let bind = |addr: SocketAddr| {
                crate::server::bind(addr).map_err(|e| {
                    format!(
                        "node {} cannot listen on {addr}: {e}; the file is refused",
                        n.name
                    )
                })
            };
            let listeners = crate::node::Listeners {
                public: bind(n.listen)?,
                internal: n.internal.map(bind).transpose()?,
            };
            bound.push((n.name.clone(), listeners));
        }
        // Sales the file adds are started before any node sells them (and
        // once nothing else can refuse the file but a node's start).
        let started = self
            .runtime
            .block_on(self.fleet.start_added_sales(config))
            .map_err(|e| format!("the sales added cannot start: {e}; the file is refused"))?;
        if started > 0 {
            tracing::info!(
                added = started,
                "sales added by the reload are started in the store"
            );
        }
        for (name, listener) in bound {
            self.runtime
                .block_on(self.fleet.start(config, &name, listener))
                .map_err(|e| format!("node {name} cannot start: {e}; the file is refused"))?;
            tracing::info!(node = %name, "node added by the reload is serving");
        }
        Ok(())
    }

    fn after(&self, config: &Config, gone: Vec<Arc<crate::balancer::upstream::LiveState>>) {
        // The keys and the sales in force on every node that stays (the
        // added ones were built with them). `before` accepted the file,
        // so they load.
        let _in_runtime = self.runtime.enter();
        for r in self.fleet.lock().values() {
            if let Err(e) = r.node.reload(config) {
                tracing::warn!(node = %r.node.name(), error = %e, "the node keeps its [auth] keys and sales");
            }
        }
        *self.fleet.events.lock().unwrap_or_else(|p| p.into_inner()) =
            config.sales.iter().map(|s| s.event.clone()).collect();
        let removed: Vec<(SocketAddr, Running)> = {
            let mut running = self.fleet.lock();
            let stale: Vec<SocketAddr> = running
                .keys()
                .filter(|a| !config.nodes.iter().any(|n| n.listen == **a))
                .copied()
                .collect();
            stale
                .into_iter()
                .filter_map(|a| running.remove(&a).map(|r| (a, r)))
                .collect()
        };
        let grace = config.server.grace_period;
        for (addr, r) in removed {
            let live = gone.iter().find(|l| l.addr == addr).cloned();
            self.runtime.spawn(async move {
                // Requests the balancer sent before the reload finish
                // first (bounded by the grace period), then the node stops
                // the way a SIGTERM stops it.
                let until = tokio::time::Instant::now() + grace;
                while let Some(l) = &live {
                    if l.active.load(std::sync::atomic::Ordering::Acquire) == 0
                        || tokio::time::Instant::now() >= until
                    {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                let _ = r.stop.send(());
                let _ = r.task.await;
                tracing::info!(%addr, "node removed by the reload has stopped");
            });
        }
    }
}

/// What `spike up` prints once the sale is open: the sale as the store
/// holds it, where things listen and lines to paste. When the file's
/// `[sale]` differs from the stored sale it says so: the stored one is in
/// force.
pub fn banner(config: &Config, stored: &[Snapshot]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if config.sales.len() > 1 {
        return several_banner(config, stored);
    }
    let (Some(b), Some(sale), Some(stored)) =
        (config.balancer.as_ref(), config.sale(), stored.first())
    else {
        return s;
    };
    let store = match &config.redis {
        Some(r) => format!("redis at {}", r.url),
        None => "the embedded in-process store".to_string(),
    };
    let _ = writeln!(
        s,
        "spike up: selling {} tickets of {} (at most {} per buyer) from {store}",
        stored.total,
        stored.event,
        if stored.per_user_limit == 0 {
            "any number".to_string()
        } else {
            stored.per_user_limit.to_string()
        }
    );
    if stored.sold > 0 {
        let _ = writeln!(
            s,
            "  a sale under way: {} sold, {} left",
            stored.sold, stored.remaining
        );
    }
    if let Some(differs) = crate::stock::sale_differs(sale, stored) {
        let _ = writeln!(s, "  note: {differs}");
    }
    // The balancer's own address as clients reach it (HTTPS with TLS on).
    let front = match b.tls {
        Some(_) => format!("https://{}", b.listen),
        None => format!("http://{}", b.listen),
    };
    let _ = writeln!(
        s,
        "  balancer  {front}  ({}, admin on http://{})",
        b.strategy.as_str(),
        b.admin
    );
    for cfg in &config.nodes {
        let _ = write!(
            s,
            "  node {:<4}  http://{}  weight {}, leases {} tickets at a time",
            cfg.name, cfg.listen, cfg.weight, sale.lease
        );
        match cfg.internal {
            Some(a) => {
                let _ = writeln!(s, "; internal routes on http://{a}");
            }
            None => s.push('\n'),
        }
    }
    // With [auth] a buyer is a token: mint one for the line to paste (an
    // hour is long enough for a first look; `spike token` makes more).
    let token = config.auth.as_ref().and_then(|auth| {
        crate::auth::mint(
            auth,
            "alice",
            &sale.event,
            std::time::Duration::from_secs(3600),
        )
        .ok()
    });
    match &token {
        Some(t) => {
            let _ = writeln!(
                s,
                "\nbuy one:   curl -s -X POST -H 'Authorization: Bearer {t}' {front}/buy/ticket"
            );
            let _ = writeln!(
                s,
                "           (a token for buyer alice, valid 1h; more: spike token --config {} --buyer NAME)",
                config.path.display()
            );
        }
        None => {
            let _ = writeln!(s, "\nbuy one:   curl -s '{front}/buy/ticket?user=alice'");
        }
    }
    if stored.pay_within_ms > 0 {
        let window = std::time::Duration::from_millis(stored.pay_within_ms);
        if config.auth.is_some() {
            let _ = writeln!(
                s,
                "pay it:    spike pay-sign --config {} --order ORDER --ref R   (prints the payment service's signed curl; ORDER from the answer; unpaid, it goes back on sale after {})",
                config.path.display(),
                humantime::format_duration(window)
            );
        } else {
            let _ = writeln!(
                s,
                "pay it:    curl -s -X POST '{front}/orders/ORDER/pay?user=alice'   (ORDER from the answer; unpaid, it goes back on sale after {})",
                humantime::format_duration(window)
            );
        }
    }
    if config.auth.is_some() {
        // oha sends one set of headers: one token, one buyer.
        let _ = writeln!(
            s,
            "load test: oha -n 20000 -c 100 -m POST -H \"Authorization: Bearer $(spike token --config {} --buyer load)\" {front}/buy/ticket   (one buyer: 1 sale, then already_bought)",
            config.path.display(),
        );
    } else {
        let _ = writeln!(
            s,
            "load test: oha -n 20000 -c 100 --rand-regex-url '{front}/buy/ticket\\?user=u[0-9]{{6}}'"
        );
    }
    let _ = writeln!(
        s,
        "state:     curl -s http://{}/sale    status: curl -s http://{}/status",
        config.nodes[0].internal.unwrap_or(config.nodes[0].listen),
        b.admin
    );
    s.push_str("Ctrl-C stops everything.\n");
    s
}

/// [`banner`] for a file of several sales: what is on sale, where
/// things listen, how a purchase names its sale.
fn several_banner(config: &Config, stored: &[Snapshot]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let Some(b) = config.balancer.as_ref() else {
        return s;
    };
    let store = match &config.redis {
        Some(r) => format!("redis at {}", r.url),
        None => "the embedded in-process store".to_string(),
    };
    let tickets: u64 = stored.iter().map(|s| s.total).sum();
    let sold: u64 = stored.iter().map(|s| s.sold).sum();
    let _ = writeln!(
        s,
        "spike up: selling {} sales, {tickets} tickets in all ({sold} sold), from {store}: {}",
        config.sales.len(),
        config.events_listed()
    );
    let front = match b.tls {
        Some(_) => format!("https://{}", b.listen),
        None => format!("http://{}", b.listen),
    };
    let _ = writeln!(
        s,
        "  balancer  {front}  ({}, admin on http://{}; the sold-out edge is off with several sales)",
        b.strategy.as_str(),
        b.admin
    );
    for cfg in &config.nodes {
        let _ = writeln!(
            s,
            "  node {:<4}  http://{}  weight {}",
            cfg.name, cfg.listen, cfg.weight
        );
    }
    let first = &config.sales[0].event;
    let _ = writeln!(
        s,
        "\nbuy one:   curl -s '{front}/buy/ticket?event={first}&user=alice'   (a purchase names its sale; its order id is EVENT:ID)"
    );
    let _ = writeln!(
        s,
        "state:     curl -s 'http://{}/sale?event={first}'",
        config.nodes[0].internal.unwrap_or(config.nodes[0].listen),
    );
    s.push_str("Ctrl-C stops everything.\n");
    s
}

/// Entry point of `spike up`.
pub fn main(config_path: &Path, allow_volatile: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    if config.sales.is_empty() {
        config.require_sale()?;
    }
    config.require_balancer()?;
    if config.nodes.is_empty() {
        anyhow::bail!(
            "{}: `spike up` runs the file's [[node]] entries and there are none",
            config.path.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = crate::signals::shutdown_signal();
        crate::signals::catch_hangup();
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        // Not refused as `stock init` refuses it: `spike up` is the first
        // look, and the store is often the embedded one.
        if let Some(why) = crate::stock::unverified_buyers(&config) {
            tracing::warn!("{why}");
        }
        if let Some(why) = crate::stock::development_keys(&config) {
            tracing::warn!("{why}");
        }
        let listeners = Listeners::bind(&config)?;
        run(
            config,
            listeners,
            allow_volatile,
            shutdown,
            |c, stored, _nodes| {
                println!("{}", banner(c, stored));
            },
        )
        .await?;
        eprintln!("spike up: stopped");
        Ok(ExitCode::SUCCESS)
    })
}
