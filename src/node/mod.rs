//! The ticket-selling node: local pre-deduction, then one atomic Lua script
//! in Redis (or the embedded store), then the answer.

pub mod buy;
pub mod lease;
pub mod routes;
pub mod sale;
pub mod sale_map;
pub mod sales;
pub mod snapshot;
pub mod state;
pub mod stats;
pub mod store;
pub mod sweep;

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use tokio::net::TcpListener;

pub use sales::Sales;
pub use state::{Node, NodeSettings};
pub use store::{Store, StoreError};

use crate::config::{Config, ConfigError, ServerConfig};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The config does not describe a node that can run.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Several nodes were configured without Redis, which would sell the
    /// stock once per process.
    #[error(
        "{path}: the file has {nodes} [[node]] entries and no [redis]: the embedded store lives in one process, so separate `spike node` processes would each sell the whole stock. Add a [redis] section, or run them all with `spike up`"
    )]
    EmbeddedNeedsOneProcess {
        /// The config file.
        path: std::path::PathBuf,
        /// How many nodes it lists.
        nodes: usize,
    },
}

/// Builds node `name` of `config` over `store`, for the file's one sale.
pub fn build(config: &Config, name: &str, store: Store) -> Result<Arc<Node>, ConfigError> {
    let sale = config.require_sale()?;
    build_for(config, sale, name, store)
}

/// Builds node `name`'s state for `sale` of `config` over `store`.
pub fn build_for(
    config: &Config,
    sale: &crate::config::SaleConfig,
    name: &str,
    store: Store,
) -> Result<Arc<Node>, ConfigError> {
    let node = config.node(name)?;
    Ok(Node::new(
        NodeSettings {
            name: node.name.clone(),
            event: sale.event.clone(),
            names_sale: config.sales.len() > 1,
            per_user_limit: sale.per_user_limit,
            max_per_purchase: sale.max_per_purchase,
            lease: sale.lease,
            timeout: config
                .redis
                .as_ref()
                .map_or(std::time::Duration::from_secs(1), |r| r.timeout),
            max_body: config.server.max_body,
            max_clock_offset: config.redis.as_ref().map(|r| r.max_clock_offset),
            auth: authority_for(config, &sale.event)?,
            opens_at_ms: sale.opens_at_ms.unwrap_or(0),
            closes_at_ms: sale.closes_at_ms.unwrap_or(0),
        },
        store,
    ))
}

/// The file's `[auth]` for its sale, ready to check requests; `None`
/// without `[auth]`. (Validation tried the keys already: an error here
/// means they changed under it.)
pub fn authority(config: &Config) -> Result<Option<Arc<crate::auth::Authority>>, ConfigError> {
    match config.sale() {
        Some(sale) => authority_for(config, &sale.event),
        None => Ok(None),
    }
}

/// The file's `[auth]` for the sale of `event` (tokens whose `aud` is
/// that event); `None` without `[auth]`.
pub fn authority_for(
    config: &Config,
    event: &str,
) -> Result<Option<Arc<crate::auth::Authority>>, ConfigError> {
    let Some(auth) = &config.auth else {
        return Ok(None);
    };
    crate::auth::Authority::new(auth, event)
        .map(|a| Some(Arc::new(a)))
        .map_err(|e| ConfigError::Lacks {
            path: config.path.clone(),
            message: format!("[auth]: {e}"),
        })
}

/// Reads the file again on every SIGHUP and puts its `[auth]` keys in
/// force on `node`: a rotated key works, a removed `kid` is refused from
/// then on, without a restart and without dropping a request; with
/// several sales, its list of sales too (see [`Sales::reload`]: an added
/// sale sells once `spike stock init --event` started it, a removed one
/// stops). (The rest of a node's settings need a restart; a bad file
/// changes nothing.)
async fn reload_on_hangup(path: std::path::PathBuf, node: std::sync::Weak<Sales>) {
    let Some(mut hup) = crate::signals::take_hangup() else {
        return;
    };
    while hup.recv().await.is_some() {
        let Some(node) = node.upgrade() else {
            return;
        };
        match Config::load(&path).and_then(|c| node.reload(&c).map(|added| (c, added))) {
            Ok((c, added)) => {
                tracing::info!(node = %node.name(), auth = c.auth.is_some(), sales = c.sales.len(), added = added.len(), "SIGHUP: file reloaded");
            }
            Err(e) => {
                tracing::warn!(node = %node.name(), error = %e, "SIGHUP: the file was not reloaded; the keys in force stay");
            }
        }
    }
}

/// Where a node serves: its public listener (`[[node]] listen`) and, with
/// `[[node]] internal`, the one its internal routes move to, so that an
/// operator can firewall them.
#[derive(Debug)]
pub struct Listeners {
    /// Buyers' requests (and every route, without `internal`).
    pub public: TcpListener,
    /// The internal routes ([`crate::protocol::INTERNAL_PATHS`]) only.
    pub internal: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    /// One listener for every route, as without `[[node]] internal`.
    fn from(public: TcpListener) -> Listeners {
        Listeners {
            public,
            internal: None,
        }
    }
}

/// Which of a node's routes one of its listeners serves; the others are
/// its 404.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    /// Every route: the node has no internal listener.
    All,
    /// All but the internal routes, which are on the internal listener.
    Public,
    /// The internal routes only.
    Internal,
}

impl Served {
    /// Whether a request for `path` is served on this listener.
    fn serves(self, path: &str) -> bool {
        match self {
            Served::All => true,
            Served::Public => !crate::protocol::is_internal_path(path),
            Served::Internal => crate::protocol::is_internal_path(path),
        }
    }

    /// The answer for a path this listener does not serve.
    fn not_found(self) -> routes::reply::Answer {
        match self {
            Served::All | Served::Public => routes::not_found(),
            Served::Internal => routes::reply::fixed(
                StatusCode::NOT_FOUND,
                b"{\"status\":\"not_found\",\"reason\":\"this is the node's internal listener: only /healthz, /stats, /metrics, /sale, /sold_out, /holders and /purchases are here\"}\n",
            ),
        }
    }
}

/// What a node serves: one sale's state made by the caller
/// ([`build`], as the tests and a single-sale `spike up` do), or every
/// sale of the file ([`Sales`]).
pub trait Sells {
    /// The sales to serve.
    fn into_sales(self) -> Arc<Sales>;
}

impl Sells for Arc<Node> {
    fn into_sales(self) -> Arc<Sales> {
        Sales::single(self)
    }
}

impl Sells for Arc<Sales> {
    fn into_sales(self) -> Arc<Sales> {
        self
    }
}

/// Serves `node` on `listeners` until `shutdown`; in-flight purchases
/// finish within the grace period. Beside it, each sale's state keeps up
/// with its sale (see [`Node::watch`]) from its first request on.
pub async fn run(
    listeners: impl Into<Listeners>,
    node: impl Sells,
    limits: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let listeners = listeners.into();
    let node = node.into_sales();
    let (stop_internal, stopped) = tokio::sync::watch::channel(());
    let internal = listeners.internal.map(|listener| {
        let (node, limits, mut stopped) = (node.clone(), limits.clone(), stopped.clone());
        tokio::spawn(async move {
            serve(listener, node, &limits, Served::Internal, async move {
                let _ = stopped.changed().await;
            })
            .await;
        })
    });
    let public = if internal.is_some() {
        Served::Public
    } else {
        Served::All
    };
    serve(listeners.public, node.clone(), limits, public, shutdown).await;
    let _ = stop_internal.send(());
    if let Some(task) = internal {
        let _ = task.await;
    }
    node.stop();
}

/// Serves what `served` says of `node`'s routes on `listener` until
/// `shutdown`.
async fn serve(
    listener: TcpListener,
    node: Arc<Sales>,
    limits: &ServerConfig,
    served: Served,
    shutdown: impl Future<Output = ()>,
) {
    if served == Served::All {
        // As before there were internal listeners: no check per request.
        return crate::server::serve(
            listener,
            limits,
            move |_peer| {
                let node = node.clone();
                service_fn(move |req| routes::handle(node.clone(), req))
            },
            shutdown,
        )
        .await;
    }
    crate::server::serve(
        listener,
        limits,
        move |_peer| {
            let node = node.clone();
            service_fn(move |req: Request<Incoming>| {
                let node = node.clone();
                async move {
                    if !served.serves(req.uri().path()) {
                        return Ok(served.not_found());
                    }
                    routes::handle(node, req).await
                }
            })
        },
        shutdown,
    )
    .await
}

/// Serves `node` on `listeners` in a task of its own until `stop` fires
/// (or its sender is dropped): how `spike up` and in-process tests run
/// several nodes side by side.
pub fn spawn(
    listeners: impl Into<Listeners>,
    node: impl Sells,
    limits: ServerConfig,
    mut stop: tokio::sync::watch::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    let listeners = listeners.into();
    let node = node.into_sales();
    tokio::spawn(async move {
        run(listeners, node, &limits, async move {
            let _ = stop.changed().await;
        })
        .await;
    })
}

/// Entry point of `spike node`.
pub fn main(config_path: &Path, name: &str) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    if config.sales.is_empty() {
        config.require_sale()?;
    }
    let node_cfg = config.node(name)?.clone();
    if config.redis.is_none() && config.nodes.len() > 1 {
        return Err(NodeError::EmbeddedNeedsOneProcess {
            path: config.path.clone(),
            nodes: config.nodes.len(),
        }
        .into());
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = node_cfg.threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async move {
        let shutdown = crate::signals::shutdown_signal();
        crate::signals::catch_hangup();
        let stores = store::Stores::open(&config.sales, config.redis.as_ref()).await?;
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        // With one sale, its store now (an embedded one starts its sale),
        // and what the store says of it; with several, each sale's store
        // is made on its first request (`stock show --event` tells one).
        if let Some(sale) = config.sale()
            && let Some(store) = stores.get(&sale.event).await
        {
            check_stored(sale, &store).await;
        }
        let bind = |addr| crate::server::bind(addr).map_err(|source| NodeError::Bind { addr, source });
        let listeners = Listeners {
            public: bind(node_cfg.listen)?,
            internal: node_cfg.internal.map(bind).transpose()?,
        };
        let node = Sales::new(&config, name, stores).await?;
        if let Some(why) = crate::stock::unverified_buyers(&config) {
            tracing::warn!(node = %node_cfg.name, "{why}");
        }
        if let Some(why) = crate::stock::development_keys(&config) {
            tracing::warn!(node = %node_cfg.name, "{why}");
        }
        let hangup = tokio::spawn(reload_on_hangup(
            config.path.clone(),
            Arc::downgrade(&node),
        ));
        tracing::info!(
            node = %node_cfg.name,
            listen = %node_cfg.listen,
            internal = %node_cfg.internal.map_or_else(|| "on listen".to_string(), |a| a.to_string()),
            sales = config.sales.len(),
            threads = %node_cfg.threads.map_or_else(|| "one per CPU".to_string(), |t| t.to_string()),
            store = if config.redis.is_some() { "redis" } else { "embedded" },
            "node selling"
        );
        run(listeners, node, &config.server, shutdown).await;
        hangup.abort();
        tracing::info!(node = %node_cfg.name, "node stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Warns of what the store says of a single sale at start: not
/// initialised, a stored limit other than the file's, a Redis that may
/// forget. Not a refusal: `stock init` is the gate, and a node refusing a
/// sale already under way would only take itself out of it.
async fn check_stored(sale: &crate::config::SaleConfig, store: &Store) {
    if let Store::Redis(_) = store {
        match store.snapshot().await {
            Ok(s) if !s.initialised => tracing::warn!(
                event = %sale.event,
                "the sale is not initialised in redis; buyers get 503 until `spike stock init`"
            ),
            Ok(s) if s.per_user_limit != sale.per_user_limit => tracing::warn!(
                event = %sale.event,
                stored = s.per_user_limit,
                file = sale.per_user_limit,
                "the sale in redis has per_user_limit {}, this file says {}: the stored limit is the sale's, and this node enforces it",
                s.per_user_limit,
                sale.per_user_limit
            ),
            _ => {}
        }
    }
    if let Ok(Some(durability)) = store.durability().await {
        for problem in durability.problems() {
            tracing::warn!(event = %sale.event, "redis may lose answered orders: {problem}");
        }
    }
}
