//! From the file as written to a [`Config`]: each section checked by its
//! own module, in one pass, so every later reader gets typed values.
//!
//! The order of the checks is part of the behaviour: with several mistakes
//! in a file, the first one found is the one reported.

mod auth;
mod balancer;
mod cx;
mod listeners;
mod node;
mod redis;
mod sale;
mod server;
mod toml_key;
mod waiting_room;

use std::path::Path;

use cx::Cx;

use crate::config::Config;
use crate::config::error::ConfigError;
use crate::config::file::FileConfig;

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (tests and fuzzing use this).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let cx = Cx { path, text };
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| cx.line(s.start)).unwrap_or(1);
            let key = toml_key::key_from_toml_error(text, &e);
            let mut message = e.message().trim().to_string();
            if let Some(hint) = toml_key::hint(&key, &message) {
                message.push_str("; ");
                message.push_str(&hint);
            }
            ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                line,
                message,
            }
        })?;
        validate(&cx, file)
    }
}

/// Every section, then what spans sections (the listeners' addresses).
fn validate(cx: &Cx, file: FileConfig) -> Result<Config, ConfigError> {
    let mut warnings = Vec::new();
    let server = server::validate(cx, file.server.as_ref())?;
    let redis = redis::validate(cx, file.redis.as_ref())?;
    let nodes = node::validate(cx, &file.node, &mut warnings)?;
    let sales = sale::validate(
        cx,
        file.sale.as_ref(),
        nodes.len(),
        file.redis.is_some(),
        &mut warnings,
    )?;
    // The sale the balancer's edge, waiting room and token checks know
    // when there is one; with several, each request names its own (see
    // docs/design/many-sales.md).
    let sale = match sales.as_slice() {
        [one] => Some(one),
        _ => None,
    };
    let mut balancer = balancer::validate(cx, file.balancer.as_ref(), &nodes, !sales.is_empty())?;
    let auth = auth::validate(cx, file.auth.as_ref(), &sales)?;
    if let (Some(b), Some(s)) = (balancer.as_mut(), sale) {
        b.sale_opens_at_ms = s.opens_at_ms.unwrap_or(0);
        b.sale_closes_at_ms = s.closes_at_ms.unwrap_or(0);
        b.sale_max_per_purchase = s.max_per_purchase;
    }
    if sales.len() > 1
        && let Some(b) = balancer.as_mut()
    {
        // A purchase names its sale (`/events/{event}/buy`, `?event=`);
        // the edge and the waiting room keep each sale apart.
        b.several_sales = true;
    }
    let room = waiting_room::validate(cx, file.waiting_room.as_ref(), &sales)?;
    if let Some(b) = balancer.as_mut() {
        b.waiting_room = room;
    }
    if let (Some(b), Some(a)) = (balancer.as_mut(), auth.as_ref())
        && !sales.is_empty()
    {
        b.auth = Some(crate::config::EdgeAuth {
            auth: a.clone(),
            event: sale.map(|s| s.event.clone()),
        });
    }
    listeners::check(cx, &file, &nodes, balancer.as_ref())?;
    Ok(Config {
        path: cx.path.to_path_buf(),
        sales,
        redis,
        nodes,
        balancer,
        server,
        auth,
        warnings,
    })
}
