//! `spike up` configs and processes: a balancer and its nodes on free ports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::spike::{SpikeProcess, wait_listening, write_config};

/// Where a `spike up` config listens.
pub struct Ports {
    /// The balancer's client listener.
    pub balancer: SocketAddr,
    /// The balancer's admin listener.
    pub admin: SocketAddr,
    /// Each node, in file order.
    pub nodes: Vec<SocketAddr>,
}

/// A sale of `total` tickets (one per buyer) behind a weighted round-robin
/// balancer, with `nodes` nodes weighted 1, 2, ...; `redis` None means the
/// embedded store.
pub fn up_config(total: u64, nodes: usize, redis: Option<&str>) -> (String, Ports) {
    let p = super::free_addr;
    let ports = Ports {
        balancer: p(),
        admin: p(),
        nodes: (0..nodes).map(|_| p()).collect(),
    };
    let mut text = format!(
        "[sale]\nevent = \"up\"\ntotal = {total}\nper_user_limit = 1\n\n[balancer]\nlisten = \"{}\"\nadmin = \"{}\"\nstrategy = \"weighted_round_robin\"\n",
        ports.balancer, ports.admin
    );
    if let Some(url) = redis {
        text.push_str(&format!("\n[redis]\nurl = \"{url}\"\n"));
    }
    for (i, a) in ports.nodes.iter().enumerate() {
        text.push_str(&node_entry(i + 1, *a));
    }
    (text, ports)
}

/// The `[[node]]` entry of node `n<i>` listening on `addr`, weight `i`.
pub fn node_entry(i: usize, addr: SocketAddr) -> String {
    format!("\n[[node]]\nname = \"n{i}\"\nlisten = \"{addr}\"\nweight = {i}\n")
}

/// Writes `text` and runs `spike up` on it until the balancer, its admin
/// listener and every node accept connections.
pub fn start_up(text: &str, ports: &Ports) -> (SpikeProcess, PathBuf) {
    let path = write_config(text);
    let up = SpikeProcess::start(&["up", "--config", path.to_str().expect("utf-8 path")]);
    wait_listening(&ports.balancer.to_string(), Duration::from_secs(15));
    wait_listening(&ports.admin.to_string(), Duration::from_secs(5));
    for n in &ports.nodes {
        wait_listening(&n.to_string(), Duration::from_secs(5));
    }
    (up, path)
}

/// The value of the Prometheus sample `sample` (name and labels exactly as
/// printed) in `text`, 0 when absent (a counter never bumped).
pub fn sample(text: &str, sample: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0, |v| {
            v.trim()
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{sample}: {v}: {e}")) as u64
        })
}
