//! Upstream host names looked up again while the balancer runs (`resolve
//! = "30s"` on an upstream whose `addr` is a name, as Nginx's `server …
//! resolve`): a node that comes back on a new address (a container
//! restart) takes traffic again without a reload, and a name that stops
//! resolving keeps its last address, said in `/status` and the log.
//!
//! Every second this looks for names that are due, resolves them off the
//! runtime (`spawn_blocking`: `getaddrinfo` blocks), and puts a changed
//! address in force as a new config version, the way a reload does
//! ([`Shared::readdress`]): the upstream at the new address starts with
//! no idle connections and no failure marks, and requests in flight
//! finish on the old one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::Shared;

/// Looks up the names of the config in force as they fall due, until the
/// task is aborted.
pub async fn run(shared: Arc<Shared>) {
    let mut due: HashMap<(String, u16), Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let active = shared.current.load_full();
        let now = Instant::now();
        let mut wanted: Vec<(String, u16, Duration, SocketAddr)> = Vec::new();
        for u in &active.config.upstreams {
            let Some(name) = &u.name else { continue };
            let key = (name.host.clone(), name.port);
            if due.get(&key).is_some_and(|at| *at > now)
                || wanted.iter().any(|w| (&w.0, w.1) == (&key.0, key.1))
            {
                continue;
            }
            wanted.push((name.host.clone(), name.port, name.every, u.addr));
        }
        if wanted.is_empty() {
            continue;
        }
        let hosts_file = active.config.hosts_file.clone();
        let looked = tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .map(|(host, port, every, addr)| {
                    let found = crate::resolve::resolve(&host, port, hosts_file.as_deref());
                    (host, port, every, addr, found)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(looked) = looked else { continue };
        let mut moved = Vec::new();
        for (host, port, every, addr, found) in looked {
            due.insert((host.clone(), port), Instant::now() + every);
            match found {
                Ok(new) => {
                    shared.name_resolved(&host, port);
                    if new != addr {
                        moved.push((host, port, new));
                    }
                }
                Err(e) => shared.name_failed(&host, port, addr, &e.to_string()),
            }
        }
        if !moved.is_empty() {
            shared.readdress(&moved);
        }
    }
}
