//! No two listeners on one address: checked across sections, once each
//! section has its addresses.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use super::cx::Cx;
use crate::config::error::ConfigError;
use crate::config::file::FileConfig;
use crate::config::sections::{BalancerConfig, NodeConfig};

/// Refuses two listeners on one address (the balancer's `listen` and
/// `admin`, every node's `listen` and `internal`): under `spike up` the second could not
/// bind, and a node on the balancer's address would have the balancer
/// proxy to itself. Addresses clash when their ports are equal (and not
/// 0, which the OS picks) and their IPs are equal, or one is the
/// wildcard and the other the wildcard or loopback: both then bind on
/// the same machine. The error stands on the later key and names the
/// earlier one.
pub(super) fn check(
    cx: &Cx,
    file: &FileConfig,
    nodes: &[NodeConfig],
    balancer: Option<&BalancerConfig>,
) -> Result<(), ConfigError> {
    /// One address something listens on: its key, and its span when
    /// the file sets it (a default has none).
    struct Bound {
        key: String,
        addr: SocketAddr,
        span: Option<Range<usize>>,
    }
    let mut bound = Vec::with_capacity(nodes.len() + 2);
    if let Some(b) = balancer {
        let section = file.balancer.as_ref().map(|s| s.get_ref());
        let listen = section.and_then(|s| s.listen.as_ref()).map(|v| v.span());
        let admin = section.and_then(|s| s.admin.as_ref()).map(|v| v.span());
        bound.push(Bound {
            key: "balancer.listen".into(),
            addr: b.listen,
            span: listen,
        });
        bound.push(Bound {
            key: "balancer.admin".into(),
            addr: b.admin,
            span: admin,
        });
    }
    for (i, (node, nf)) in nodes.iter().zip(&file.node).enumerate() {
        bound.push(Bound {
            key: format!("node[{i}].listen"),
            addr: node.listen,
            span: Some(nf.get_ref().listen.span()),
        });
        if let (Some(addr), Some(v)) = (node.internal, &nf.get_ref().internal) {
            bound.push(Bound {
                key: format!("node[{i}].internal"),
                addr,
                span: Some(v.span()),
            });
        }
    }
    let clash = |a: SocketAddr, b: SocketAddr| {
        let near =
            |x: IpAddr, y: IpAddr| x.is_unspecified() && (y.is_unspecified() || y.is_loopback());
        a.port() != 0
            && a.port() == b.port()
            && (a.ip() == b.ip() || near(a.ip(), b.ip()) || near(b.ip(), a.ip()))
    };
    for (j, later) in bound.iter().enumerate() {
        for earlier in &bound[..j] {
            if !clash(earlier.addr, later.addr) {
                continue;
            }
            // The error stands on a key the file sets; a default names itself.
            let (here, other) = match (&later.span, &earlier.span) {
                (Some(_), _) => (later, earlier),
                (None, Some(_)) => (earlier, later),
                (None, None) => continue,
            };
            let Some(span) = here.span.clone() else {
                continue;
            };
            let other_is = match &other.span {
                Some(s) => format!(
                    "`{}` (line {}) is {}",
                    other.key,
                    cx.line(s.start),
                    other.addr
                ),
                None => format!(
                    "`{}` is {} by default (set it in [balancer])",
                    other.key, other.addr
                ),
            };
            return Err(cx.err(
                here.key.clone(),
                span,
                format!(
                    "{} clashes with another listener: {other_is}; two listeners cannot share an address",
                    here.addr
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    /// Parses `text`, expects it refused on `key` at `line`; returns the message.
    fn refused(text: &str, key: &str, line: usize) -> String {
        let e = Config::parse(Path::new("test.toml"), text).expect_err("must be refused");
        let msg = e.to_string();
        assert_eq!((e.key(), e.line()), (Some(key), Some(line)), "{msg}");
        msg
    }

    #[test]
    fn balancer_listen_and_admin_on_one_address() {
        let msg = refused(
            "[balancer]\nlisten = \"127.0.0.1:9000\"\nadmin = \"127.0.0.1:9000\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\n",
            "balancer.admin",
            3,
        );
        assert!(
            msg.contains("`balancer.listen` (line 2) is 127.0.0.1:9000"),
            "{msg}"
        );
    }

    #[test]
    fn two_nodes_on_one_address_name_each_other() {
        let msg = refused(
            "[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:3001\"\n[[node]]\nname = \"b\"\nlisten = \"127.0.0.1:3001\"\n",
            "node[1].listen",
            6,
        );
        assert!(msg.contains("`node[0].listen` (line 3)"), "{msg}");
    }

    #[test]
    fn a_node_on_the_balancer_address() {
        let msg = refused(
            "[balancer]\nlisten = \"127.0.0.1:3001\"\n[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:3001\"\n",
            "node[0].listen",
            5,
        );
        assert!(msg.contains("`balancer.listen` (line 2)"), "{msg}");
    }

    #[test]
    fn a_node_on_a_default_balancer_address() {
        let msg = refused(
            "[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:8001\"\n",
            "node[0].listen",
            3,
        );
        assert!(
            msg.contains("`balancer.admin` is 127.0.0.1:8001 by default"),
            "{msg}"
        );
    }

    #[test]
    fn the_wildcard_clashes_with_loopback_not_with_other_machines() {
        let msg = refused(
            "[balancer]\nlisten = \"0.0.0.0:9000\"\n[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:9000\"\n",
            "node[0].listen",
            5,
        );
        assert!(
            msg.contains("`balancer.listen` (line 2) is 0.0.0.0:9000"),
            "{msg}"
        );
        let other = "[balancer]\nlisten = \"0.0.0.0:9000\"\n[[node]]\nname = \"a\"\nlisten = \"10.0.0.5:9000\"\n";
        Config::parse(Path::new("test.toml"), other).expect("another machine's port is its own");
    }

    #[test]
    fn a_node_internal_address_on_its_own_listen() {
        let msg = refused(
            "[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:3001\"\ninternal = \"127.0.0.1:3001\"\n",
            "node[0].internal",
            4,
        );
        assert!(msg.contains("`node[0].listen` (line 3)"), "{msg}");
    }

    #[test]
    fn port_zero_never_clashes() {
        let text = "[balancer]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\n";
        Config::parse(Path::new("test.toml"), text).expect("the OS picks each port");
    }
}
