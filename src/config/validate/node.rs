//! `[[node]]`: the ticket-selling processes.

use std::collections::HashSet;

use toml::Spanned;

use super::cx::{Cx, optional};
use crate::config::error::ConfigError;
use crate::config::file::NodeFile;
use crate::config::sections::NodeConfig;

/// Every `[[node]]`, in file order; `warnings` gets one line per obsolete key.
pub(super) fn validate(
    cx: &Cx,
    file: &[Spanned<NodeFile>],
    warnings: &mut Vec<String>,
) -> Result<Vec<NodeConfig>, ConfigError> {
    let mut names = HashSet::new();
    let mut nodes = Vec::with_capacity(file.len());
    for (i, n) in file.iter().enumerate() {
        let n = n.get_ref();
        let key = |k: &str| format!("node[{i}].{k}");
        let name = cx.name(key("name"), &n.name, 32, "")?;
        if !names.insert(name.clone()) {
            return Err(cx.err(
                key("name"),
                n.name.span(),
                format!("duplicate node name {name:?}"),
            ));
        }
        let d = NodeConfig::new(name, cx.socket_addr(&key("listen"), &n.listen)?);
        let weight = optional(&n.weight, d.weight, |w| cx.weight(&key("weight"), w))?;
        let internal = optional(&n.internal, None, |v| {
            Ok(Some(cx.socket_addr(&key("internal"), v)?))
        })?;
        if let Some(s) = &n.stock {
            warnings.push(cx.warning(
                &key("stock"),
                s.span(),
                "no longer does anything: a node leases its stock from the store as it sells (see [sale] lease); remove it",
            ));
        }
        let threads = optional(&n.threads, d.threads, |t| {
            Ok(Some(cx.count(&key("threads"), t, 1)?.min(1024) as usize))
        })?;
        nodes.push(NodeConfig {
            weight,
            internal,
            threads,
            ..d
        });
    }
    Ok(nodes)
}
