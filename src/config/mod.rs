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
    /// Every sale of the file, in file order: none (a balancer alone
    /// needs none), the one `[sale]`, or each `[[sale]]`. Events differ.
    pub sales: Vec<SaleConfig>,
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
    /// The fleet's one sale, when the file has exactly one: what a request
    /// or a command that names no sale means, and what the balancer's
    /// edge and waiting room serve (they know one sale).
    pub fn sale(&self) -> Option<&SaleConfig> {
        match self.sales.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// The one sale, or an error that says this mode needs one (or, with
    /// several, that it must be named).
    pub fn require_sale(&self) -> Result<&SaleConfig, ConfigError> {
        self.pick_sale(None)
    }

    /// The sale named `event`, or with `None` the only one; an error names
    /// the choice (the events of the file) when there is none to take.
    pub fn pick_sale(&self, event: Option<&str>) -> Result<&SaleConfig, ConfigError> {
        let lacks = |message: String| ConfigError::Lacks {
            path: self.path.clone(),
            message,
        };
        match (event, self.sales.as_slice()) {
            (_, []) => Err(lacks(
                "this command sells tickets and needs a [sale] section".into(),
            )),
            (None, [one]) => Ok(one),
            (None, several) => Err(lacks(format!(
                "the file has {} sales: name one with --event ({})",
                several.len(),
                self.events_listed()
            ))),
            (Some(e), sales) => sales.iter().find(|s| s.event == e).ok_or_else(|| {
                lacks(format!(
                    "--event {e}: the file has no sale of that event; it has: {}",
                    self.events_listed()
                ))
            }),
        }
    }

    /// The events of the file, comma-separated, the first 20 and a count
    /// of the rest: for messages that name the choice.
    pub fn events_listed(&self) -> String {
        const SHOWN: usize = 20;
        let mut s = self
            .sales
            .iter()
            .take(SHOWN)
            .map(|s| s.event.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if self.sales.len() > SHOWN {
            s.push_str(&format!(" and {} more", self.sales.len() - SHOWN));
        }
        s
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
