//! Why Redis is out of reach, in words: the pool's last connection error,
//! kept so that a timeout while disconnected reports its cause and the URL.

use std::sync::Arc;

use fred::prelude::*;

use crate::config::RedisConfig;
use crate::node::store::model::StoreError;

/// Where the pool connects and why its last try failed, so that an error
/// while disconnected says "connection refused" (or the TLS handshake's
/// complaint) with the URL, instead of the timeout the waiting command
/// ends in.
pub(super) struct Reach {
    /// The URL, its password hidden.
    pub(super) url: String,
    /// Where the config file sets it.
    pub(super) origin: String,
    /// The last connection error any client of the pool reported.
    pub(super) cause: std::sync::Mutex<Option<String>>,
}

/// fred's connection error in words, with what to check: an OS error
/// arrives as its `Debug` form (`Os { code: 111, kind: ConnectionRefused,
/// message: "Connection refused" }`, shown as `Connection refused (os error
/// 111)`), a TLS failure as rustls's (`Custom { kind: InvalidData, error:
/// InvalidCertificate(UnknownIssuer) }`).
fn plain_cause(e: &Error, tls_url: bool) -> String {
    let details = e.details();
    let between = |start: &str, end: char| {
        details
            .split_once(start)
            .and_then(|(_, rest)| rest.split_once(end))
            .map(|(inside, _)| inside)
    };
    if let (Some(message), Some(code)) = (between("message: \"", '"'), between("code: ", ',')) {
        return format!("{message} (os error {code})");
    }
    let custom = details
        .split_once("error: ")
        .map(|(_, rest)| rest.trim_end().trim_end_matches('}').trim_end());
    // A resolver's error is a quoted message; rustls's is an enum variant.
    if let Some(message) = custom.and_then(|c| c.strip_prefix('"')?.strip_suffix('"')) {
        return message.to_string();
    }
    if let Some(tls) = custom.filter(|_| tls_url) {
        let hint = if tls.starts_with("InvalidCertificate") {
            "Redis's certificate was refused (is `tls_ca_file` the CA that signed it?)"
        } else if tls.contains("CertificateRequired") {
            "Redis asks for a client certificate (`tls-auth-clients`): set `tls_cert_file` and `tls_key_file`"
        } else {
            "the TLS handshake failed"
        };
        return format!("TLS: {hint}: {tls}");
    }
    if tls_url && *e.kind() == ErrorKind::Timeout {
        return format!(
            "{e} (no TLS handshake in time: is the port Redis's `tls-port`, not its plaintext one?)"
        );
    }
    e.to_string()
}

impl Reach {
    /// Listens to the connection errors of every client of `pool`; call
    /// before connecting, so the first is not missed.
    pub(super) fn watch(pool: &Pool, cfg: &RedisConfig) -> Arc<Reach> {
        let reach = Arc::new(Reach {
            url: crate::redis_client::redacted(&cfg.url),
            origin: cfg.origin.clone(),
            cause: std::sync::Mutex::new(None),
        });
        let tls_url = cfg.url.starts_with("rediss");
        for client in pool.clients() {
            // The listener holds a weak link: it must not keep the store's
            // state alive, and it ends with the client's channel.
            let weak = Arc::downgrade(&reach);
            let _listener = client.on_error(move |(e, _server)| {
                if let Some(reach) = weak.upgrade()
                    && let Ok(mut cause) = reach.cause.lock()
                {
                    *cause = Some(plain_cause(&e, tls_url));
                }
                async { Ok(()) }
            });
        }
        reach
    }

    pub(super) fn cause(&self) -> Option<String> {
        self.cause.lock().ok().and_then(|c| c.clone())
    }

    pub(super) fn unreachable(&self, cause: String) -> StoreError {
        StoreError::Unreachable {
            url: self.url.clone(),
            origin: self.origin.clone(),
            cause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_errors_read_as_words() {
        let refused = Error::new(
            ErrorKind::IO,
            r#"Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }"#,
        );
        assert_eq!(
            plain_cause(&refused, false),
            "Connection refused (os error 111)"
        );
        let dns = Error::new(
            ErrorKind::IO,
            r#"Custom { kind: Uncategorized, error: "failed to lookup address information: Name or service not known" }"#,
        );
        assert_eq!(
            plain_cause(&dns, true),
            "failed to lookup address information: Name or service not known"
        );
        let untrusted = Error::new(
            ErrorKind::IO,
            "Custom { kind: InvalidData, error: InvalidCertificate(UnknownIssuer) }",
        );
        let said = plain_cause(&untrusted, true);
        assert!(said.starts_with("TLS: "), "{said}");
        assert!(said.contains("tls_ca_file"), "{said}");
        assert!(
            said.ends_with("InvalidCertificate(UnknownIssuer)"),
            "{said}"
        );
        let silent = Error::new(ErrorKind::Timeout, "Request timed out.");
        assert!(plain_cause(&silent, true).contains("tls-port"));
        assert!(!plain_cause(&silent, false).contains("tls-port"));
    }
}
