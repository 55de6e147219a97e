//! The PROXY protocol (HAProxy's, versions 1 and 2): the header an L4
//! balancer (HAProxy in TCP mode, an AWS NLB, ...) sends first on every
//! connection it opens to us, carrying the client's own address. Behind
//! such a balancer every TCP peer is the balancer, so without it `ip_hash`
//! put the whole sale on one node and the per-client limits limited
//! everyone together.
//!
//! The header is read right after the accept, before anything else reads
//! the socket (a TLS handshake, the request head), and only from a peer
//! the [`Gate`] trusts: anyone else could claim any address. It is read
//! with `peek` until whole and then taken off the socket exactly, so the
//! stream handed on holds no bytes read ahead. A header that is malformed,
//! larger than [`MAX_HEADER`], or not in by the first head's deadline
//! closes the connection, as Nginx and HAProxy do.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Version 2's first twelve bytes.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest version 1 line, CRLF included (the specification's bound).
const MAX_V1: usize = 107;

/// The largest version 2 header taken, TLVs included: 1 KiB, Nginx's
/// `client_header_buffer_size` where it reads one. HAProxy's own headers
/// (addresses, a few TLVs) take under 100 bytes.
pub const MAX_HEADER: usize = 1024;

/// Between two looks at a header that came in pieces (rare: a balancer
/// writes it in one go).
const PIECES_PAUSE: Duration = Duration::from_millis(2);

/// What a listener expects first from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// No PROXY header: the request comes at once (the listener does not
    /// speak the protocol).
    Plain,
    /// A PROXY header, then the request: the peer is a trusted L4 proxy.
    Header,
    /// Closed at once: the listener speaks the protocol, and this peer is
    /// not one it trusts to say who the client is.
    Refuse,
}

/// Decides, for each accepted connection, what it must begin with (the
/// balancer's is read from the config in force, so a reload changes it).
pub trait Gate: Send + Sync + 'static {
    /// What a connection from `peer` must begin with.
    fn admit(&self, peer: IpAddr) -> Admit;
}

/// Why a connection was closed before its first request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    /// The bytes are not a PROXY header of either version.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// The peer closed before its header was whole.
    #[error("closed before a whole PROXY protocol header")]
    Closed,
    /// The header was not whole by the first request head's deadline.
    #[error("no whole PROXY protocol header in time")]
    TimedOut,
    /// Reading the socket failed.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A header's beginning: more bytes are needed.
    Incomplete,
    /// A whole header of `len` bytes. `source`: the client's address it
    /// carries, `None` where the socket's own peer stands (version 2's
    /// `LOCAL`, a health check of the proxy itself; version 1's `UNKNOWN`;
    /// an address family other than IPv4 and IPv6).
    Header {
        /// The header's length in bytes.
        len: usize,
        /// The client's address, if it carries one.
        source: Option<SocketAddr>,
    },
}

/// Parses the start of a connection as a PROXY header of version 1 or 2.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    let sig = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig] == V2_SIGNATURE[..sig] {
        return parse_v2(buf);
    }
    let prefix = buf.len().min(6);
    if buf[..prefix] == b"PROXY "[..prefix] {
        return parse_v1(buf);
    }
    Err(ProxyProtocolError::Malformed(
        "neither \"PROXY \" nor version 2's signature",
    ))
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    use ProxyProtocolError::Malformed;
    let window = &buf[..buf.len().min(MAX_V1)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if window.len() == MAX_V1 {
            return Err(Malformed("a version 1 line longer than 107 bytes"));
        }
        return Ok(Parsed::Incomplete);
    };
    let line =
        std::str::from_utf8(&buf[..end]).map_err(|_| Malformed("a version 1 line not ASCII"))?;
    let mut words = line.split(' ');
    let _proxy = words.next();
    let family = words.next().ok_or(Malformed("no protocol in version 1"))?;
    let len = end + 2;
    let source = match family {
        // Whatever follows UNKNOWN is ignored, as the specification says.
        "UNKNOWN" => None,
        "TCP4" | "TCP6" => {
            let fields: Vec<&str> = words.collect();
            let [src, dst, sport, dport] = fields[..] else {
                return Err(Malformed("version 1 needs two addresses and two ports"));
            };
            // Of the family named; the destination is checked, not used.
            let ip = |s: &str| -> Result<IpAddr, ProxyProtocolError> {
                if family == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::from)
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::from)
                }
                .map_err(|_| Malformed("an address not of the family named"))
            };
            let (src, _dst) = (ip(src)?, ip(dst)?);
            let port = |p: &str| {
                if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Malformed("a bad port in version 1"));
                }
                p.parse::<u16>()
                    .map_err(|_| Malformed("a bad port in version 1"))
            };
            let sport = port(sport)?;
            port(dport)?;
            Some(SocketAddr::new(src, sport))
        }
        _ => {
            return Err(Malformed(
                "a version 1 protocol other than TCP4, TCP6, UNKNOWN",
            ));
        }
    };
    Ok(Parsed::Header { len, source })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    use ProxyProtocolError::Malformed;
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(Malformed("a version 2 signature with another version"));
    }
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    if family > 3 || transport > 2 {
        // The specification: other values must be rejected.
        return Err(Malformed(
            "an unknown version 2 address family or transport",
        ));
    }
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > MAX_HEADER {
        return Err(Malformed("a version 2 header over 1 KiB"));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let addresses = &buf[16..len];
    let source = match command {
        // LOCAL: the proxy speaking for itself (its health checks).
        0 => None,
        1 => match (family, transport) {
            (1, 1) => {
                let a: &[u8; 12] = addresses
                    .get(..12)
                    .and_then(|a| a.try_into().ok())
                    .ok_or(Malformed("a version 2 IPv4 block too short"))?;
                let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
            }
            (2, 1) => {
                let a: &[u8; 36] = addresses
                    .get(..36)
                    .and_then(|a| a.try_into().ok())
                    .ok_or(Malformed("a version 2 IPv6 block too short"))?;
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&a[..16]);
                Some(SocketAddr::new(
                    Ipv6Addr::from(ip).into(),
                    u16::from_be_bytes([a[32], a[33]]),
                ))
            }
            // UNSPEC, a Unix socket or a datagram: no address of ours to
            // take, the socket's stands (as the specification says).
            _ => None,
        },
        _ => return Err(Malformed("a version 2 command other than LOCAL and PROXY")),
    };
    // TLVs after the addresses are skipped: nothing here needs them.
    Ok(Parsed::Header { len, source })
}

/// What a connection from `peer` must begin with, the refusal said in the
/// log: the first step of a connection's start, without waiting for
/// anything (the server then reads the header with [`source`]).
pub fn admit(gate: &dyn Gate, peer: SocketAddr) -> Admit {
    let admit = gate.admit(peer.ip().to_canonical());
    if let Admit::Refuse = admit {
        tracing::debug!(%peer, "refused: PROXY protocol is on and the peer is not in trusted_proxies");
    }
    admit
}

/// The second step, where [`admit`] said [`Admit::Header`]: the
/// client's address the header gives (the peer's where it gives none), or
/// `None` when the connection is to close.
pub async fn source(
    stream: &mut TcpStream,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<SocketAddr> {
    match read(stream, deadline).await {
        Ok(source) => Some(source.unwrap_or(peer)),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "closed before the first request");
            None
        }
    }
}

/// Reads one PROXY header off `stream` by `deadline`, taking exactly its
/// bytes: the client's address, or `None` where the socket's peer stands.
pub async fn read(
    stream: &mut TcpStream,
    deadline: tokio::time::Instant,
) -> Result<Option<SocketAddr>, ProxyProtocolError> {
    let reading = async {
        let mut buf = vec![0u8; MAX_HEADER];
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Err(ProxyProtocolError::Closed);
            }
            match parse(&buf[..n])? {
                Parsed::Header { len, source } => {
                    stream.read_exact(&mut buf[..len]).await?;
                    return Ok(source);
                }
                // `peek` would find the same bytes at once: wait for more.
                Parsed::Incomplete => tokio::time::sleep(PIECES_PAUSE).await,
            }
        }
    };
    tokio::time::timeout_at(deadline, reading)
        .await
        .map_err(|_| ProxyProtocolError::TimedOut)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("addr"))
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&u16::try_from(body.len()).expect("len").to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v2_ipv4(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[10, 0, 0, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&8080u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(1, 0x11, &body)
    }

    #[test]
    fn version_1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 8080\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(line).expect("v1"),
            Parsed::Header {
                len: 42,
                source: addr("192.0.2.7:51000")
            }
        );
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 443 8080\r\n";
        assert_eq!(
            parse(line).expect("v1"),
            Parsed::Header {
                len: line.len(),
                source: addr("[2001:db8::7]:443")
            }
        );
        let line = b"PROXY UNKNOWN ffff::1 whatever\r\n";
        assert_eq!(
            parse(line).expect("v1"),
            Parsed::Header {
                len: line.len(),
                source: None
            }
        );
    }

    #[test]
    fn version_1_truncated_asks_for_more_and_garbage_is_refused() {
        let whole = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 8080\r\n";
        for cut in 1..whole.len() {
            assert_eq!(
                parse(&whole[..cut]).expect("prefix"),
                Parsed::Incomplete,
                "{cut}"
            );
        }
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 192.0.2.7 10.0.0.1 51000\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 70000 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 +1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2 3\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY\r\n",
            b"proxy TCP4 192.0.2.7 10.0.0.1 1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(parse(&long).is_err());
    }

    #[test]
    fn version_2_ipv4_ipv6_with_tlvs_skipped() {
        let h = v2_ipv4([198, 51, 100, 9], 40000, &[]);
        assert_eq!(
            parse(&h).expect("v2"),
            Parsed::Header {
                len: 28,
                source: addr("198.51.100.9:40000")
            }
        );
        // A TLV (PP2_TYPE_AUTHORITY "a.example") and request bytes after.
        let mut h = v2_ipv4([198, 51, 100, 9], 40000, b"\x02\x00\x09a.example");
        let len = h.len();
        h.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse(&h).expect("v2"),
            Parsed::Header {
                len,
                source: addr("198.51.100.9:40000")
            }
        );
        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::9".parse::<Ipv6Addr>().expect("ip").octets());
        body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(&80u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &body)).expect("v2"),
            Parsed::Header {
                len: 52,
                source: addr("[2001:db8::9]:443")
            }
        );
    }

    #[test]
    fn version_2_local_and_unspec_keep_the_socket_address() {
        assert_eq!(
            parse(&v2(0, 0x00, &[])).expect("local"),
            Parsed::Header {
                len: 16,
                source: None
            }
        );
        // LOCAL with addresses in it: still the socket's.
        let mut local = v2_ipv4([198, 51, 100, 9], 1, &[]);
        local[12] = 0x20;
        assert_eq!(
            parse(&local).expect("local"),
            Parsed::Header {
                len: 28,
                source: None
            }
        );
        assert_eq!(
            parse(&v2(1, 0x00, &[])).expect("unspec"),
            Parsed::Header {
                len: 16,
                source: None
            }
        );
    }

    #[test]
    fn version_2_truncated_oversized_and_garbage() {
        let h = v2_ipv4([198, 51, 100, 9], 40000, &[]);
        for cut in 1..h.len() {
            assert_eq!(
                parse(&h[..cut]).expect("prefix"),
                Parsed::Incomplete,
                "{cut}"
            );
        }
        // An IPv4 block shorter than its family says.
        assert!(parse(&v2(1, 0x11, &[1, 2, 3, 4])).is_err());
        assert!(parse(&v2(1, 0x21, &[0; 12])).is_err());
        // Version 1 under version 2's signature, and an unknown command.
        let mut bad = h.clone();
        bad[12] = 0x11;
        assert!(parse(&bad).is_err());
        let mut bad = h.clone();
        bad[12] = 0x22;
        assert!(parse(&bad).is_err());
        // Over the bound, refused before it is all read.
        let mut big = h[..16].to_vec();
        big[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert!(parse(&big).is_err());
        let mut bad = h.clone();
        bad[13] = 0x41;
        assert!(parse(&bad).is_err(), "an unknown family");
        let mut bad = h.clone();
        bad[13] = 0x13;
        assert!(parse(&bad).is_err(), "an unknown transport");
        // A signature broken in the middle.
        let mut bad = h.clone();
        bad[5] = b'x';
        assert!(parse(&bad).is_err());
        assert!(parse(b"\x16\x03\x01\x02\x00").is_err(), "a TLS hello");
    }
}
