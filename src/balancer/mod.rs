//! The HTTP load balancer: Nginx's upstream strategies, keep-alive pools,
//! failover and hot reload.
//!
//! [`run`] (or [`Balancer::run`]) serves already-bound listeners, so tests and
//! `spike up` can bind `127.0.0.1:0` and drive the real thing;
//! [`Balancer::reloader`] hands out a [`Reloader`] for reloads in-process.

pub mod admin;
pub mod proxy;
pub mod reload;
pub mod strategy;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};

pub use reload::Reloader;

/// Why the balancer could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    /// The config file is unreadable or invalid, or has no balancer.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// "clients" or "admin".
        what: &'static str,
        /// The address from the file.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Any other I/O failure (runtime start, listener address).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A balancer built from a config, not yet serving.
#[derive(Debug)]
pub struct Balancer {
    shared: Arc<reload::Shared>,
}

impl Balancer {
    /// Builds config version 1 (needs a balancer section or `[[node]]`s).
    pub fn new(config: Config) -> Result<Balancer, BalancerError> {
        Ok(Balancer {
            shared: Arc::new(reload::Shared::new(config)?),
        })
    }

    /// A handle to reload from the config file while running.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            shared: self.shared.clone(),
        }
    }

    /// Serves clients on `listener` and the admin endpoints on `admin` until
    /// `shutdown` resolves, reloading on SIGHUP and on file changes.
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

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let proxy_shared = shared.clone();
        let make_proxy = move |peer: SocketAddr| {
            let shared = proxy_shared.clone();
            let conn = admin::ConnectionGuard::new(shared.clone());
            service_fn(move |req| {
                let _counted_while_open = &conn;
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(proxy::handle(&shared, peer, req).await) }
            })
        };
        let admin_shared = shared.clone();
        let make_admin = move |_peer: SocketAddr| {
            let shared = admin_shared.clone();
            service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(admin::handle(&shared, req).await) }
            })
        };
        let limits = shared.server.clone();
        let trigger = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        tokio::join!(
            crate::server::serve(listener, &limits, make_proxy, stopped(stop_rx.clone())),
            crate::server::serve(admin, &limits, make_admin, stopped(stop_rx)),
            trigger,
        );
        hup.abort();
        poll.abort();
        Ok(())
    }
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

/// Entry point of `spike balancer`: load, bind, serve until SIGTERM/Ctrl-C.
pub fn main(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let b = config.require_balancer()?.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BalancerError::Io)?;
    runtime.block_on(async {
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
            "balancer listening"
        );
        run(listener, admin, config, crate::server::shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}
