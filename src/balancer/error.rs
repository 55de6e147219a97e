//! Why the balancer could not start or reload: at the bottom, so that every
//! module may return it.

use std::net::SocketAddr;

use crate::config::ConfigError;

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
    /// What runs beside the balancer (`spike up`'s nodes) could not follow
    /// the new file, so it was refused.
    #[error("{0}")]
    Refused(String),
    /// The access log cannot be opened for appending.
    #[error("cannot open the access log {}: {source}", path.display())]
    AccessLog {
        /// `[balancer] access_log`.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// rustls refused to build the listener's TLS from certificates that
    /// passed validation.
    #[error("TLS on the listener: {0}")]
    Tls(#[from] rustls::Error),
    /// Any other I/O failure (runtime start, listener address).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
