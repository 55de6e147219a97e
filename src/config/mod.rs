//! `config.toml`: read once into a serde file struct (`file`), then
//! validated (`validate`, a module per section) into a typed [`Config`] so
//! that nothing on the hot path ever parses a string.
//!
//! Every validation error names the file, the key and the line, because the
//! person reading it is about to start a sale and needs to fix the file fast.
//! Every default is named once, in `defaults`: validation and tests both
//! start from there.

mod defaults;
mod error;
mod file;
mod sections;
mod validate;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

/// The largest count a file (or `spike stock add`) may give: 2^53, the
/// largest whole number every JSON reader and Lua's numbers keep exactly.
pub const MAX_COUNT: u64 = 1 << 53;

pub use defaults::{DEFAULT_MAX_CONNECTIONS, default_lease};
pub use error::ConfigError;
pub use sections::{
    AccessLogFormat, Admit, BalancerConfig, ClientLimits, EdgeAuth, HealthCheck, NodeConfig,
    RateLimit, RedisConfig, SaleConfig, ServerConfig, Strategy, UpstreamConfig, UpstreamName,
    WaitingRoomConfig,
};

/// A config that has passed every check; what the rest of spike runs on.
/// Built by [`Config::load`] (or [`Config::parse`]), nowhere else.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from, for reloads and messages.
    pub path: PathBuf,
    /// The sale, when the file has one (the balancer alone needs none).
    pub sale: Option<SaleConfig>,
    /// Redis, when configured; absent means the embedded store.
    pub redis: Option<RedisConfig>,
    /// The ticket-selling nodes, in file order.
    pub nodes: Vec<NodeConfig>,
    /// The balancer; present whenever the file has `[balancer]` or `[[node]]`s.
    pub balancer: Option<BalancerConfig>,
    /// Limits of the HTTP servers (both modes).
    pub server: ServerConfig,
    /// Who a buyer is and who may pay, when the file has `[auth]`;
    /// without it buyers are who the client says they are.
    pub auth: Option<crate::auth::AuthConfig>,
    /// Keys the file sets that no longer do anything, each with what to
    /// do instead: logged at start, so an old file still runs.
    pub warnings: Vec<String>,
}

impl Config {
    /// The sale, or an error that says this mode needs one.
    pub fn require_sale(&self) -> Result<&SaleConfig, ConfigError> {
        self.sale.as_ref().ok_or_else(|| ConfigError::Lacks {
            path: self.path.clone(),
            message: "this command sells tickets and needs a [sale] section".into(),
        })
    }

    /// The node named `name`, or an error listing the names there are.
    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ConfigError::Lacks {
                path: self.path.clone(),
                message: format!(
                    "--name {name}: no [[node]] is named {name:?}; the file has: {}",
                    self.nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// The balancer section, or an error that says this mode needs one.
    pub fn require_balancer(&self) -> Result<&BalancerConfig, ConfigError> {
        self.balancer.as_ref().ok_or_else(|| ConfigError::Lacks {
            path: self.path.clone(),
            message: "the balancer needs a [balancer] section with upstreams, or [[node]] entries"
                .into(),
        })
    }
}
