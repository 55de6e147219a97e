//! Host names of upstreams (`addr = "node-1.internal:3001"`), resolved at
//! load and, with `resolve = "30s"`, again while the balancer runs (see
//! `crate::balancer::resolver`): a node that comes back on a new address
//! (a container restart) is found without a reload, as Nginx's `server …
//! resolve` finds it.
//!
//! A name is looked up in `[balancer] hosts_file` first, when one is set
//! (a file in `/etc/hosts`'s format that the operator, or a test, owns:
//! `/etc/hosts` is the whole machine's), then by the system's resolver
//! (`getaddrinfo`: `/etc/hosts`, then DNS). The first address is taken, as
//! at load.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;

/// Why a name gave no address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// `hosts_file` cannot be read.
    #[error("cannot read the hosts file {path}: {source}")]
    HostsFile {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The system's resolver failed.
    #[error("{0}")]
    Lookup(std::io::Error),
    /// The name resolved to no address.
    #[error("the name resolved to no address")]
    NoAddress,
}

/// `host:port` split at its last colon (a name, never an IPv6 literal:
/// those parse as a `SocketAddr` first); `None` without a port.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((host, port))
}

/// The address of `host` (a name), port `port`: from `hosts_file` if it
/// lists the name, else from the system's resolver. Blocking.
pub fn resolve(
    host: &str,
    port: u16,
    hosts_file: Option<&Path>,
) -> Result<SocketAddr, ResolveError> {
    if let Some(path) = hosts_file {
        let text = std::fs::read_to_string(path).map_err(|source| ResolveError::HostsFile {
            path: path.display().to_string(),
            source,
        })?;
        if let Some(ip) = in_hosts(&text, host) {
            return Ok(SocketAddr::new(ip, port));
        }
    }
    (host, port)
        .to_socket_addrs()
        .map_err(ResolveError::Lookup)?
        .next()
        .ok_or(ResolveError::NoAddress)
}

/// The first address `/etc/hosts`-format `text` gives `host` (names are
/// case-insensitive; `#` starts a comment).
pub fn in_hosts(text: &str, host: &str) -> Option<IpAddr> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let ip: IpAddr = words.next()?.parse().ok()?;
        words.any(|n| n.eq_ignore_ascii_case(host)).then_some(ip)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_file_is_read_as_etc_hosts() {
        let text = "# test names\n127.0.0.1 localhost\n10.0.0.7  node-1.internal n1 # the first\n\
                    not-an-ip node-2\n::1 node-6\n10.0.0.8 NODE-1.internal\n";
        assert_eq!(
            in_hosts(text, "node-1.internal"),
            Some("10.0.0.7".parse().expect("ip"))
        );
        assert_eq!(in_hosts(text, "N1"), Some("10.0.0.7".parse().expect("ip")));
        assert_eq!(in_hosts(text, "node-6"), Some("::1".parse().expect("ip")));
        assert_eq!(in_hosts(text, "node-2"), None);
        assert_eq!(in_hosts(text, "the"), None, "a comment is no name");
        assert_eq!(
            split_host_port("node-1.internal:3001"),
            Some(("node-1.internal", 3001))
        );
        assert_eq!(split_host_port("node-1.internal"), None);
        assert_eq!(split_host_port(":3001"), None);
    }

    #[test]
    fn the_hosts_file_comes_first_then_the_system() {
        let path = std::env::temp_dir().join(format!("spike-hosts-{}", std::process::id()));
        std::fs::write(&path, "192.0.2.44 only-here.test\n").expect("write");
        assert_eq!(
            resolve("only-here.test", 80, Some(&path)).expect("resolves"),
            "192.0.2.44:80".parse::<SocketAddr>().expect("addr")
        );
        // Not in the file: the system's resolver (its /etc/hosts).
        assert!(
            resolve("localhost", 80, Some(&path))
                .expect("localhost")
                .ip()
                .is_loopback()
        );
        let _ = std::fs::remove_file(&path);
        assert!(matches!(
            resolve("only-here.test", 80, Some(&path)),
            Err(ResolveError::HostsFile { .. })
        ));
    }
}
