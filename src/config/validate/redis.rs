//! `[redis]`: where the store is, and how long to wait for it.

use std::time::Duration;

use toml::Spanned;

use super::cx::{Cx, optional};
use crate::config::error::ConfigError;
use crate::config::file::RedisFile;
use crate::config::sections::RedisConfig;

/// The URL schemes fred opens: one Redis, a Cluster, or Sentinels, each
/// in plaintext or over TLS.
const SCHEMES: [&str; 6] = [
    "redis://",
    "rediss://",
    "redis-cluster://",
    "rediss-cluster://",
    "redis-sentinel://",
    "rediss-sentinel://",
];

/// The shortest `timeout`: deadlines are whole milliseconds in Redis's
/// clock, less a 1 ms margin for the clocks' drift, so a shorter timeout
/// makes every purchase "too late" before it is sent.
const MIN_TIMEOUT: Duration = Duration::from_millis(10);

/// `[redis]`, or `None` (the embedded store) when the file has none.
pub(super) fn validate(
    cx: &Cx,
    file: Option<&Spanned<RedisFile>>,
) -> Result<Option<RedisConfig>, ConfigError> {
    let Some(r) = file else {
        return Ok(None);
    };
    let r = r.get_ref();
    let url = r.url.get_ref().trim();
    let shown = crate::redis_client::redacted(url);
    if !SCHEMES.iter().any(|s| url.starts_with(s)) {
        return Err(cx.err(
            "redis.url",
            r.url.span(),
            format!(
                "{shown:?} is not a redis://, rediss://, redis-cluster://, rediss-cluster://, redis-sentinel:// or rediss-sentinel:// URL"
            ),
        ));
    }
    // fred reads the URL when a store opens; checking it here names the
    // line instead of failing later with no place.
    if let Err(e) = fred::types::config::Config::from_url(url) {
        return Err(cx.err("redis.url", r.url.span(), format!("{shown:?}: {e}")));
    }
    let tls = crate::redis_client::tls_files(
        cx.path.parent(),
        (url.starts_with("rediss"), r.url.span()),
        [&r.tls_ca_file, &r.tls_cert_file, &r.tls_key_file]
            .map(|v| v.as_ref().map(|v| (v.get_ref().as_str(), v.span()))),
    )
    .map_err(|e| cx.err(e.key, e.span, e.message))?;
    let origin = format!("{}:{}", cx.path.display(), cx.line(r.url.span().start));
    let d = RedisConfig::new(url.to_string(), origin);
    Ok(Some(RedisConfig {
        tls,
        timeout: optional(&r.timeout, d.timeout, |v| {
            cx.duration_at_least(
                "redis.timeout",
                v,
                MIN_TIMEOUT,
                "deadlines are whole milliseconds of Redis's clock, less a 1 ms margin",
            )
        })?,
        max_clock_offset: optional(&r.max_clock_offset, d.max_clock_offset, |v| {
            cx.duration("redis.max_clock_offset", v)
        })?,
        pool_size: optional(&r.pool_size, d.pool_size, |v| {
            Ok(cx.count("redis.pool_size", v, 1)?.min(64) as usize)
        })?,
        replicas: optional(&r.replicas, d.replicas, |v| {
            cx.count("redis.replicas", v, 0)
        })?,
        ..d
    }))
}
