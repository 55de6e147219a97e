//! `[server]`: the limits both kinds of HTTP server share.

use toml::Spanned;

use super::cx::{Cx, optional};
use crate::config::error::ConfigError;
use crate::config::file::ServerFile;
use crate::config::sections::ServerConfig;

/// `[server]`, or its defaults when the file has none.
pub(super) fn validate(
    cx: &Cx,
    file: Option<&Spanned<ServerFile>>,
) -> Result<ServerConfig, ConfigError> {
    let d = ServerConfig::default();
    let Some(s) = file else {
        return Ok(d);
    };
    let s = s.get_ref();
    Ok(ServerConfig {
        max_connections: optional(&s.max_connections, d.max_connections, |v| {
            Ok(Some(cx.count("server.max_connections", v, 1)? as usize))
        })?,
        header_read_timeout: optional(&s.header_read_timeout, d.header_read_timeout, |v| {
            cx.duration("server.header_read_timeout", v)
        })?,
        keepalive_timeout: optional(&s.keepalive_timeout, d.keepalive_timeout, |v| {
            cx.duration("server.keepalive_timeout", v)
        })?,
        grace_period: optional(&s.grace_period, d.grace_period, |v| {
            cx.duration("server.grace_period", v)
        })?,
        max_body: optional(&s.max_body, d.max_body, |v| {
            cx.count("server.max_body", v, 0)
        })?,
    })
}
