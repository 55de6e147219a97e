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
///
/// Made once per connection, so a connection per request (`ab`, HTTP/1.0)
/// pays it per request: written into a stack buffer and copied once, where
/// `to_string` went through the formatter and grew a `String` twice (about
/// 1,600 instructions and three allocations a connection, measured with
/// callgrind).
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    let mut buf = [0u8; 45];
    let len = match ip {
        IpAddr::V4(v4) => write_ipv4(&mut buf, v4.octets()),
        IpAddr::V6(v6) => {
            use std::io::Write;
            let mut at = &mut buf[..];
            // 45 bytes hold the longest IPv6 text (an IPv4-mapped one).
            let _ = write!(at, "{v6}");
            45 - at.len()
        }
    };
    // An IP address is always a valid header value.
    HeaderValue::from_maybe_shared(Bytes::copy_from_slice(&buf[..len]))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// `a.b.c.d` into `buf`; its length.
fn write_ipv4(buf: &mut [u8; 45], octets: [u8; 4]) -> usize {
    let mut at = 0;
    for (i, o) in octets.into_iter().enumerate() {
        if i > 0 {
            buf[at] = b'.';
            at += 1;
        }
        if o >= 100 {
            buf[at] = b'0' + o / 100;
            at += 1;
        }
        if o >= 10 {
            buf[at] = b'0' + o / 10 % 10;
            at += 1;
        }
        buf[at] = b'0' + o % 10;
        at += 1;
    }
    at
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

    /// The hand-written text is `to_string`'s, for every octet value in
    /// every place and for IPv6 (mapped, compressed, the longest form).
    #[test]
    fn ip_value_is_the_address_text() {
        for o in 0..=255u8 {
            for ip in [
                std::net::Ipv4Addr::new(o, 0, 255, o),
                std::net::Ipv4Addr::new(1, o, o, 100),
            ] {
                assert_eq!(
                    ip_value(IpAddr::V4(ip)).as_bytes(),
                    ip.to_string().as_bytes()
                );
            }
        }
        for text in [
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: IpAddr = text.parse().expect("ip");
            assert_eq!(ip_value(ip).as_bytes(), ip.to_string().as_bytes());
        }
    }
}
