//! What every section's checks share: the file being read (for lines and
//! messages), the readers of one value each, and the one shape of an
//! optional key. A message about a kind of value is worded here once, so it
//! reads the same whichever key it is about.

use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use crate::config::error::ConfigError;

/// The largest a toml integer may be for a count of tickets (keeps Lua's
/// doubles exact: 2^53).
const MAX_COUNT: i64 = crate::config::MAX_COUNT as i64;

/// The file being validated: errors need its path, and its text to turn a
/// span into a line.
pub(super) struct Cx<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
}

/// The value of an optional key: `read` (which checks it and names `key` in
/// any error) when the file sets it, else `default`, taken from
/// `crate::config::defaults`. Every optional key goes through here, so an
/// unset key can only ever mean its named default.
pub(super) fn optional<S, T>(
    v: &Option<Spanned<S>>,
    default: T,
    read: impl FnOnce(&Spanned<S>) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    match v {
        Some(v) => read(v),
        None => Ok(default),
    }
}

impl Cx<'_> {
    /// The 1-based line of a byte offset in the file.
    pub(super) fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// The error about `key`, standing on the line `span` starts on.
    pub(super) fn err(
        &self,
        key: impl Into<String>,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            line: self.line(span.start),
            message: message.into(),
        }
    }

    /// A warning about `key` (one that no longer does anything, or does
    /// nothing in this file), where it stands: logged at start, where an
    /// error would stop a file that still runs.
    pub(super) fn warning(&self, key: &str, span: Range<usize>, message: &str) -> String {
        format!(
            "{}:{}: `{key}` {message}",
            self.path.display(),
            self.line(span.start)
        )
    }

    /// A whole number from `min` to 2^53.
    pub(super) fn count(&self, key: &str, v: &Spanned<i64>, min: i64) -> Result<u64, ConfigError> {
        let n = *v.get_ref();
        if n < min || n > MAX_COUNT {
            return Err(self.err(
                key,
                v.span(),
                format!("must be a whole number from {min} to {MAX_COUNT}, not {n}"),
            ));
        }
        Ok(n as u64)
    }

    /// A weight, as Nginx takes them: 1 to 1,000,000.
    pub(super) fn weight(&self, key: &str, w: &Spanned<i64>) -> Result<u32, ConfigError> {
        let n = *w.get_ref();
        if !(1..=1_000_000).contains(&n) {
            return Err(self.err(key, w.span(), format!("must be from 1 to 1000000, not {n}")));
        }
        Ok(n as u32)
    }

    /// A duration like "500ms" or "10s", longer than zero.
    pub(super) fn duration(&self, key: &str, v: &Spanned<String>) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(v.get_ref().trim()).map_err(|e| {
            self.err(
                key,
                v.span(),
                format!(
                    "{:?} is not a duration like \"500ms\" or \"10s\": {e}",
                    v.get_ref()
                ),
            )
        })?;
        if d.is_zero() {
            return Err(self.err(key, v.span(), "must be longer than zero"));
        }
        Ok(d)
    }

    /// A moment in RFC 3339, in UTC (`"2026-02-10T10:00:00Z"`), as Unix
    /// ms. UTC only: a sale's opening is one moment for every node and
    /// balancer, whatever zone each host is set to.
    pub(super) fn instant(&self, key: &str, v: &Spanned<String>) -> Result<u64, ConfigError> {
        let at = humantime::parse_rfc3339(v.get_ref().trim()).map_err(|e| {
            self.err(
                key,
                v.span(),
                format!(
                    "{:?} is not a moment in RFC 3339, UTC, like \"2026-02-10T10:00:00Z\": {e}",
                    v.get_ref()
                ),
            )
        })?;
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| self.err(key, v.span(), "must be after 1970"))?
            .as_millis();
        Ok(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// A duration that may be zero (`"0s"`), for keys where zero means
    /// "not at all" (a drain delay).
    pub(super) fn duration_or_zero(
        &self,
        key: &str,
        v: &Spanned<String>,
    ) -> Result<Duration, ConfigError> {
        if humantime::parse_duration(v.get_ref().trim()).is_ok_and(|d| d.is_zero()) {
            return Ok(Duration::ZERO);
        }
        self.duration(key, v)
    }

    /// A duration of at least `min`, for keys where a shorter one would
    /// break what they time; `why` says what, in the message.
    pub(super) fn duration_at_least(
        &self,
        key: &str,
        v: &Spanned<String>,
        min: Duration,
        why: &str,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(key, v)?;
        if d < min {
            return Err(self.err(
                key,
                v.span(),
                format!(
                    "must be at least {} ({why}), not {:?}",
                    humantime::format_duration(min),
                    v.get_ref()
                ),
            ));
        }
        Ok(d)
    }

    /// A name that becomes part of keys and orders: 1 to `max` characters
    /// of letters, digits, '-', '_' or '.'; `why` ends the message.
    pub(super) fn name(
        &self,
        key: impl Into<String>,
        v: &Spanned<String>,
        max: usize,
        why: &str,
    ) -> Result<String, ConfigError> {
        let name = v.get_ref().trim();
        let fine = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
        if name.is_empty() || name.len() > max || !name.bytes().all(fine) {
            return Err(self.err(
                key,
                v.span(),
                format!("must be 1 to {max} characters of letters, digits, '-', '_' or '.'{why}"),
            ));
        }
        Ok(name.to_string())
    }

    /// An address to listen on or connect to. A hostname is resolved once,
    /// here, so the hot path only ever sees addresses.
    pub(super) fn socket_addr(
        &self,
        key: &str,
        v: &Spanned<String>,
    ) -> Result<SocketAddr, ConfigError> {
        let s = v.get_ref().trim();
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a);
        }
        let bad = |why: String| {
            self.err(
                key,
                v.span(),
                format!("{s:?} is not an address like \"127.0.0.1:3001\": {why}"),
            )
        };
        if !s.contains(':') {
            return Err(bad("a port is required".into()));
        }
        let mut addrs = s.to_socket_addrs().map_err(|e| bad(e.to_string()))?;
        addrs
            .next()
            .ok_or_else(|| bad("the name resolved to no address".into()))
    }
}
