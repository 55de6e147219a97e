//! `spike up`: a whole sale on one machine from one command: the balancer and
//! every `[[node]]` of the file, in this one process.
//!
//! One process, not several: the embedded store can only be shared inside a
//! process, Ctrl-C can leave no orphan behind, and a new user needs nothing
//! but the binary. Separate `spike node` processes (with Redis) are the way
//! to spread nodes over machines.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::node::{Node, NodeError, Store};

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
}

/// Everything `spike up` listens on, bound before anything starts serving so
/// a taken port fails the whole command at once.
pub struct Listeners {
    /// The balancer's client listener.
    pub balancer: TcpListener,
    /// The balancer's admin listener.
    pub admin: TcpListener,
    /// One per node, in file order.
    pub nodes: Vec<TcpListener>,
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
                .map(|n| bind(n.listen, &format!("node {}", n.name)))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Runs the sale until `shutdown`, then stops the balancer first (so no new
/// purchase reaches a node that is stopping) and the nodes after it, each
/// letting in-flight requests finish. `ready` is called once everything
/// listens, with the nodes, so callers can print or test.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&Config, &[Arc<Node>]),
) -> Result<(), UpError> {
    let sale = config.require_sale()?.clone();
    let store = Store::open(&sale, config.redis.as_ref()).await?;
    // Initialise only a sale that is not there yet: `up` must never wipe a
    // sale in progress in a shared Redis.
    let snap = store.snapshot().await?;
    if !snap.initialised {
        store.init(false).await?;
    }
    let mut nodes = Vec::with_capacity(config.nodes.len());
    let (stop_nodes, nodes_rx) = watch::channel(());
    let mut node_tasks = Vec::new();
    for (cfg, listener) in config.nodes.iter().zip(listeners.nodes) {
        // With Redis, each node its own connection and batch queue, as
        // separate `spike node` processes would have: its `redis_calls`
        // are its own. The embedded store lives once per process.
        let node_store = match config.redis.as_ref() {
            Some(r) => Store::open(&sale, Some(r)).await?,
            None => store.clone(),
        };
        let node = crate::node::build(&config, &cfg.name, node_store)?;
        node_tasks.push(crate::node::spawn(
            listener,
            node.clone(),
            config.server.clone(),
            nodes_rx.clone(),
        ));
        nodes.push(node);
    }
    let (stop_balancer, balancer_rx) = watch::channel(());
    let balancer = tokio::spawn(crate::balancer::run(
        listeners.balancer,
        listeners.admin,
        config.clone(),
        async move {
            let mut rx = balancer_rx;
            let _ = rx.changed().await;
        },
    ));
    ready(&config, &nodes);
    shutdown.await;
    let _ = stop_balancer.send(());
    let balancer_result = balancer.await;
    let _ = stop_nodes.send(());
    for t in node_tasks {
        let _ = t.await;
    }
    match balancer_result {
        Ok(r) => r.map_err(UpError::from),
        Err(e) => {
            tracing::error!(error = %e, "balancer task failed");
            Ok(())
        }
    }
}

/// What `spike up` prints once the sale is open: where things listen and two
/// lines to paste.
pub fn banner(config: &Config) -> String {
    let mut s = String::new();
    let (Some(b), Some(sale)) = (config.balancer.as_ref(), config.sale.as_ref()) else {
        return s;
    };
    let store = match &config.redis {
        Some(r) => format!("redis at {}", r.url),
        None => "the embedded in-process store".to_string(),
    };
    s.push_str(&format!(
        "spike up: selling {} tickets of {} (at most {} per buyer) from {store}\n",
        sale.total,
        sale.event,
        if sale.per_user_limit == 0 {
            "any number".to_string()
        } else {
            sale.per_user_limit.to_string()
        }
    ));
    s.push_str(&format!(
        "  balancer  http://{}  ({}, admin on http://{})\n",
        b.listen,
        b.strategy.as_str(),
        b.admin
    ));
    for cfg in &config.nodes {
        s.push_str(&format!(
            "  node {:<4}  http://{}  weight {}, leases {} tickets at a time\n",
            cfg.name, cfg.listen, cfg.weight, sale.lease
        ));
    }
    s.push_str(&format!(
        "\nbuy one:   curl -s 'http://{}/buy/ticket?user=alice'\n",
        b.listen
    ));
    s.push_str(&format!(
        "load test: oha -n 20000 -c 100 --rand-regex-url 'http://{}/buy/ticket\\?user=u[0-9]{{6}}'\n",
        b.listen
    ));
    s.push_str(&format!(
        "state:     curl -s http://{}/sale    status: curl -s http://{}/status\n",
        config.nodes[0].listen, b.admin
    ));
    s.push_str("Ctrl-C stops everything.\n");
    s
}

/// Entry point of `spike up`.
pub fn main(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    config.require_sale()?;
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
        let shutdown = crate::server::shutdown_signal();
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let listeners = Listeners::bind(&config)?;
        run(config, listeners, shutdown, |c, _nodes| {
            println!("{}", banner(c));
        })
        .await?;
        eprintln!("spike up: stopped");
        Ok(ExitCode::SUCCESS)
    })
}
