//! The header policy, for both forwarding paths: what a request must carry
//! to be forwarded (one plain `Host`), what never crosses a hop (RFC 9110
//! 7.6.1), what is dropped (names with `_`, unless allowed), and what the
//! balancer adds (`X-Forwarded-For`, `X-Real-IP`). Here over hyper's
//! `HeaderMap`; the fast path applies the same rules to the bytes as they
//! came (`crate::http1::request` marks the lines to drop, and
//! `balancer::h1` writes the rest with the same additions:
//! [`write_forwarded_for`], [`write_real_ip`]).

use std::net::IpAddr;

use bytes::BytesMut;
use hyper::header::{CONNECTION, HOST, HeaderName, HeaderValue};
use hyper::{HeaderMap, Version};

use crate::http1::hop;
use crate::protocol::MADE_KEY;

use super::client::{Peer, X_FORWARDED_FOR, ip_value};

/// The client's address as the balancer believes it.
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers that describe one hop, never forwarded: [`hop::HOP_BY_HOP`]'s
/// names, as hyper's.
const HOP_BY_HOP: [HeaderName; 7] = [
    HeaderName::from_static(hop::HOP_BY_HOP[0]),
    HeaderName::from_static(hop::HOP_BY_HOP[1]),
    HeaderName::from_static(hop::HOP_BY_HOP[2]),
    HeaderName::from_static(hop::HOP_BY_HOP[3]),
    HeaderName::from_static(hop::HOP_BY_HOP[4]),
    HeaderName::from_static(hop::HOP_BY_HOP[5]),
    HeaderName::from_static(hop::HOP_BY_HOP[6]),
];

/// Whether the request's `Host` is acceptable (RFC 9112 3.2): exactly one,
/// required from HTTP/1.1 clients (an HTTP/1.0 one may send none), and a
/// plain authority: a name or address and an optional port, no spaces, no
/// `/` and no `..`. Two Hosts would reach the backend as one joined value,
/// a missing one would be replaced by the upstream's address, and a path in
/// it reaches whatever builds URLs from it; all three are 400s in Nginx.
pub fn host_is_valid(h: &HeaderMap, version: Version) -> bool {
    let mut hosts = h.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => version < Version::HTTP_11,
        (Some(_), Some(_)) => false,
        (Some(v), None) => crate::http1::request::is_authority(v.as_bytes()),
    }
}

/// An HTTP/2 request's head as an HTTP/1.1 upstream must get it (RFC 9113
/// 8.3.1 and 8.2.3): the `:authority` pseudo-header becomes `Host` when the
/// client sent no `Host` (it is the same field in HTTP/2; one without
/// either is then refused by [`host_is_valid`], as a Host-less HTTP/1.1
/// request is), and `Cookie` fields split for HTTP/2's header compression
/// are joined again with `; `, since an HTTP/1.1 server expects one line.
pub fn from_h2(h: &mut HeaderMap, uri: &hyper::Uri) {
    if !h.contains_key(HOST)
        && let Some(authority) = uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        h.insert(HOST, v);
    }
    let mut cookies = h.get_all(hyper::header::COOKIE).iter();
    if let (Some(first), Some(_)) = (cookies.next(), cookies.next()) {
        let mut joined = first.as_bytes().to_vec();
        for c in h.get_all(hyper::header::COOKIE).iter().skip(1) {
            joined.extend_from_slice(b"; ");
            joined.extend_from_slice(c.as_bytes());
        }
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            h.insert(hyper::header::COOKIE, v);
        }
    }
}

/// Removes request headers whose name has an underscore (Nginx's
/// `underscores_in_headers off`): CGI and WSGI backends turn `-` and `_`
/// alike into `_`, so `X_Real_IP` would override the `X-Real-IP` the
/// balancer sets.
pub fn drop_underscored(h: &mut HeaderMap) {
    if !h.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    // Rare: collected first, since the map cannot change while read.
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        h.remove(name);
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`,
/// except the end-to-end ones spike reads ([`hop::NEVER_HOP_BY_HOP`]): the
/// balancer reads them before this runs, and the node after, so both must
/// see the same.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the (few) names present first: most messages carry at
    // most `Connection`, and a removal of an absent name still hashes it.
    let mut present = 0u8;
    for name in h.keys() {
        if let Some(i) = hop::hop_by_hop_index(name.as_str().as_bytes()) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Collected first (rarely anything: allocation only when a client
        // names an unusual header), since the map cannot change while read.
        let mut listed: Vec<HeaderName> = Vec::new();
        for v in h.get_all(CONNECTION) {
            if v.to_str().is_err() {
                continue;
            }
            for token in hop::connection_tokens(v.as_bytes()) {
                if token.eq_ignore_ascii_case(b"close")
                    || token.eq_ignore_ascii_case(b"keep-alive")
                    || token.eq_ignore_ascii_case(b"upgrade")
                    || hop::is_never_hop_by_hop(token)
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token) {
                    listed.push(name);
                }
            }
        }
        for name in listed {
            h.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(name);
        }
    }
}

/// Hop-by-hop headers out, `X-Forwarded-For` appended, `X-Real-IP` set,
/// a client's [`MADE_KEY`] dropped (only a balancer says it made a key);
/// `Host` is left as the client sent it.
pub fn prepare_request_headers(h: &mut HeaderMap, peer: &Peer, client: IpAddr) {
    strip_hop_by_hop(h);
    h.remove(MADE_KEY);
    let xff = if h.contains_key(X_FORWARDED_FOR) {
        let mut xff = BytesMut::with_capacity(64);
        for v in h.get_all(X_FORWARDED_FOR) {
            xff.extend_from_slice(v.as_bytes());
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(peer.value.as_bytes());
        HeaderValue::from_maybe_shared(xff.freeze()).ok()
    } else {
        Some(peer.value.clone())
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR, v);
    }
    let real = if client == peer.ip {
        peer.value.clone()
    } else {
        ip_value(client)
    };
    h.insert(X_REAL_IP, real);
}

/// The `X-Forwarded-For` line the fast path writes (the value
/// [`prepare_request_headers`] sets): `forwarded_for` are the values the
/// client sent, in order, then the peer.
pub fn write_forwarded_for<'a>(
    out: &mut Vec<u8>,
    forwarded_for: impl Iterator<Item = &'a [u8]>,
    peer: &Peer,
) {
    out.extend_from_slice(b"x-forwarded-for: ");
    for v in forwarded_for {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer.value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The `X-Real-IP` line the fast path writes (the value
/// [`prepare_request_headers`] sets).
pub fn write_real_ip(out: &mut Vec<u8>, peer: &Peer, client: IpAddr) {
    out.extend_from_slice(b"x-real-ip: ");
    if client == peer.ip {
        out.extend_from_slice(peer.value.as_bytes());
    } else {
        out.extend_from_slice(ip_value(client).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::TRANSFER_ENCODING;

    #[test]
    fn hop_by_hop_and_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(HOST, HeaderValue::from_static("example.com"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["host", "x-keep"]);

        // Every hop-by-hop name goes, with or without `Connection`.
        let mut h = HeaderMap::new();
        for name in &HOP_BY_HOP[1..] {
            h.insert(name, HeaderValue::from_static("x"));
        }
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep"]);

        // What spike reads stays, listed or not.
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("Idempotency-Key, x-user-id, X-Forwarded-For, x-secret"),
        );
        h.insert("idempotency-key", HeaderValue::from_static("k"));
        h.insert("x-user-id", HeaderValue::from_static("alice"));
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            vec!["idempotency-key", "x-forwarded-for", "x-user-id"]
        );
    }

    #[test]
    fn host_must_be_one_plain_authority() {
        let with = |hosts: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in hosts {
                h.append(HOST, HeaderValue::from_static(v));
            }
            h
        };
        for ok in ["a", "example.com:8080", "10.0.0.1", "[::1]:80", "my_host"] {
            assert!(host_is_valid(&with(&[ok]), Version::HTTP_11), "{ok}");
        }
        for bad in ["", "a b", "a/../b", "a/b", "..", "a..b"] {
            assert!(!host_is_valid(&with(&[bad]), Version::HTTP_11), "{bad:?}");
        }
        let two = with(&["good.example", "evil.example"]);
        assert!(!host_is_valid(&two, Version::HTTP_11));
        assert!(!host_is_valid(&HeaderMap::new(), Version::HTTP_11));
        assert!(host_is_valid(&HeaderMap::new(), Version::HTTP_10));
        assert!(!host_is_valid(&HeaderMap::new(), Version::HTTP_2));
    }

    #[test]
    fn an_h2_head_gets_host_from_authority_and_one_cookie_line() {
        let uri: hyper::Uri = "https://shop.example/buy/ticket".parse().expect("uri");
        let mut h = HeaderMap::new();
        h.append(hyper::header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(
            hyper::header::COOKIE,
            HeaderValue::from_static("spike_token=t"),
        );
        from_h2(&mut h, &uri);
        assert_eq!(
            h.get(HOST).map(HeaderValue::as_bytes),
            Some(&b"shop.example"[..])
        );
        let cookies: Vec<_> = h.get_all(hyper::header::COOKIE).iter().collect();
        assert_eq!(cookies, [HeaderValue::from_static("a=1; spike_token=t")]);
        assert!(host_is_valid(&h, Version::HTTP_2));
        // A Host the client sent stays.
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("other.example"));
        from_h2(&mut h, &uri);
        assert_eq!(
            h.get(HOST).map(HeaderValue::as_bytes),
            Some(&b"other.example"[..])
        );
    }

    #[test]
    fn underscored_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("x_real_ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        drop_underscored(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep"]);
    }

    #[test]
    fn forwarded_for_is_appended_and_real_ip_set() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        let peer = Peer::new("10.0.0.1:5000".parse().expect("addr"));
        prepare_request_headers(&mut h, &peer, peer.ip);
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 10.0.0.1");
        assert_eq!(h[X_REAL_IP], "10.0.0.1");

        // A direct client: both headers are its address; a client behind a
        // trusted proxy: X-Real-IP is the client, X-Forwarded-For ends with
        // the proxy.
        let mut h = HeaderMap::new();
        prepare_request_headers(&mut h, &peer, peer.ip);
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1");
        assert_eq!(h[X_REAL_IP], "10.0.0.1");
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("5.5.5.5"));
        let v4mapped = Peer::new("[::ffff:10.0.0.2]:1".parse().expect("addr"));
        prepare_request_headers(&mut h, &v4mapped, "5.5.5.5".parse().expect("ip"));
        assert_eq!(h[X_FORWARDED_FOR], "5.5.5.5, 10.0.0.2");
        assert_eq!(h[X_REAL_IP], "5.5.5.5");
    }
}
