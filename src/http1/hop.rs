//! What describes one hop of an HTTP/1.1 connection (RFC 9110 7.6.1) and
//! is never forwarded: the names, and the tokens of a `Connection` value
//! (which may name more). One table for the request and the response
//! side, and for hyper's path (`crate::balancer::forward::headers`).

/// The hop-by-hop header names, lower case, plus the non-standard ones
/// old clients and servers still send; `connection` is first.
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Where `name` (any case) is in [`HOP_BY_HOP`]; `None` for an end-to-end
/// header. By length first: most names are decided without a comparison.
pub fn hop_by_hop_index(name: &[u8]) -> Option<usize> {
    let is = |i: usize| name.eq_ignore_ascii_case(HOP_BY_HOP[i].as_bytes());
    match name.len() {
        10 if is(0) => Some(0),
        10 if is(1) => Some(1),
        16 if is(2) => Some(2),
        2 if is(3) => Some(3),
        7 if is(4) => Some(4),
        17 if is(5) => Some(5),
        7 if is(6) => Some(6),
        _ => None,
    }
}

/// End-to-end headers a `Connection` token never removes: the ones the
/// balancer or a node reads (the purchase's key, the buyer, the client's
/// address, the buyer's token, `Host` and the body's length). RFC 9110
/// 7.6.1 lets a sender make any header hop-by-hop by listing it; honoured
/// for these, it split one request into two readings: the balancer read
/// the key, the buyer or `X-Forwarded-For` before removing them and the
/// node then saw none (a listed `Idempotency-Key` bought twice, a listed
/// `X-User-Id` was `already_bought` at the edge and a 400 at the node),
/// and any client could switch off its own key. Removing them before the
/// balancer reads them would make the same double purchase on purpose.
/// Nginx and HAProxy forward listed headers; spike forwards these and
/// still drops any other listed one.
pub const NEVER_HOP_BY_HOP: [&str; 7] = [
    "host",
    "content-length",
    "idempotency-key",
    "x-user-id",
    "x-forwarded-for",
    "authorization",
    "cookie",
];

/// Whether a `Connection` token names a header in [`NEVER_HOP_BY_HOP`]
/// (any case).
pub fn is_never_hop_by_hop(token: &[u8]) -> bool {
    NEVER_HOP_BY_HOP
        .iter()
        .any(|name| token.eq_ignore_ascii_case(name.as_bytes()))
}

/// The tokens of a `Connection` value: split at commas, spaces around
/// them trimmed, empty ones skipped.
pub fn connection_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_and_no_other_is_hop_by_hop() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_bytes()), Some(i));
            assert_eq!(
                hop_by_hop_index(name.to_ascii_uppercase().as_bytes()),
                Some(i)
            );
        }
        for other in ["host", "connectio", "x-upgrade", "", "t", "trailers"] {
            assert_eq!(hop_by_hop_index(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn what_spike_reads_is_never_made_hop_by_hop() {
        for name in [
            "Idempotency-Key",
            "X-USER-ID",
            "x-forwarded-for",
            "Host",
            "Cookie",
        ] {
            assert!(is_never_hop_by_hop(name.as_bytes()), "{name}");
        }
        for name in ["x-secret", "keep-alive", "x-user", ""] {
            assert!(!is_never_hop_by_hop(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn connection_tokens_are_trimmed_and_never_empty() {
        let tokens: Vec<&[u8]> = connection_tokens(b" close ,, X-A,\tkeep-alive ,").collect();
        assert_eq!(tokens, [&b"close"[..], b"X-A", b"keep-alive"]);
        assert_eq!(connection_tokens(b"").count(), 0);
    }
}
