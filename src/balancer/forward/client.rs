//! Who the client is: the connection's peer, with its address formatted
//! once for the headers, and the client's address behind trusted proxies
//! (Nginx's realip), for both forwarding paths.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use ipnet::IpNet;

/// Where the client's address goes, after those it came through (see
/// [`super::headers`]); behind a trusted proxy, where it is read from.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The client end of one connection, with its address already formatted for
/// `X-Forwarded-For` / `X-Real-IP`: made once per connection, so a request
/// from a direct client copies a shared value instead of formatting an IP.
#[derive(Debug, Clone)]
pub struct Peer {
    pub(crate) ip: IpAddr,
    pub(crate) value: HeaderValue,
}

impl Peer {
    /// The peer of a connection accepted from `addr`.
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = addr.ip().to_canonical();
        Peer {
            ip,
            value: ip_value(ip),
        }
    }
}

/// An IP address as a header value.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    // An IP address is always a valid header value.
    HeaderValue::from_maybe_shared(Bytes::from(ip.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy,
/// then the last address in `X-Forwarded-For` that is not a trusted proxy
/// (Nginx's realip with `real_ip_recursive on`).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    client_ip_from(
        peer,
        headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .map(HeaderValue::as_bytes),
        trusted,
    )
}

/// [`client_ip`] over the `X-Forwarded-For` values as they came, in order.
pub fn client_ip_from<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for value in forwarded_for.rev() {
        let Ok(s) = std::str::from_utf8(value) else {
            return client;
        };
        for item in s.rsplit(',') {
            let Ok(ip) = item.trim().parse::<IpAddr>() else {
                return client;
            };
            client = ip.to_canonical();
            if !is_trusted(&client) {
                return client;
            }
        }
    }
    client
}

/// The balancer listener's PROXY protocol gate: off unless
/// `proxy_protocol`, then a header from `trusted_proxies` peers and a
/// close for every other peer. Read from the config in force at each
/// accept (one atomic load), so a reload changes it for new connections.
pub struct ProxyGate(pub std::sync::Arc<crate::balancer::state::Shared>);

impl crate::server::proxy_protocol::Gate for ProxyGate {
    fn admit(&self, peer: IpAddr) -> crate::server::proxy_protocol::Admit {
        use crate::server::proxy_protocol::Admit;
        let active = self.0.current.load();
        if !active.config.proxy_protocol {
            Admit::Plain
        } else if active
            .config
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer))
        {
            Admit::Header
        } else {
            Admit::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_skips_trusted_proxies_from_the_right() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let mut h = HeaderMap::new();
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("6.6.6.6, 5.5.5.5, 10.1.1.1"),
        );
        let proxy: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "5.5.5.5".parse::<IpAddr>().expect("ip")
        );
        let stranger: IpAddr = "7.7.7.7".parse().expect("ip");
        assert_eq!(client_ip(stranger, &h, &trusted), stranger);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
    }
}
