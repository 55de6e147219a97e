//! Whether the Redis holding a sale keeps what it acknowledged. Every 200
//! promises an order that lives only in Redis: a Redis without an
//! append-only file comes back from a crash with its last snapshot (answered
//! orders gone, `sold` lower, order ids handed out again), and one that may
//! evict any key under memory pressure can drop the buyers hash in the
//! middle of a sale. `spike stock init` refuses such a Redis; a node says so
//! at start and in `/healthz`; `stock audit` reports it.

use serde::Serialize;

/// What a Redis server says about its own durability, read from `INFO`
/// (which works where `CONFIG` is renamed, as on managed Redis) and, for
/// `appendfsync` only, `CONFIG GET`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Durability {
    /// `aof_enabled` from `INFO persistence`; absent when unreadable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appendonly: Option<bool>,
    /// `appendfsync` from `CONFIG GET`; absent where `CONFIG` is renamed or refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appendfsync: Option<String>,
    /// `maxmemory_policy` from `INFO memory` (else `CONFIG GET maxmemory-policy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maxmemory_policy: Option<String>,
    /// `connected_slaves` from `INFO replication`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas_connected: Option<u64>,
    /// `min_slaves_good_slaves` from `INFO replication`: the replicas
    /// within `min-replicas-max-lag`, present only where
    /// `min-replicas-to-write` is set. What Redis itself counts before it
    /// takes a write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas_good: Option<u64>,
    /// `min-replicas-to-write` from `CONFIG GET`; absent where `CONFIG` is
    /// renamed or refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_replicas_to_write: Option<u64>,
    /// `[redis] replicas`: how many must acknowledge an answer (0: none).
    /// Not Redis's: the node's, so that the problems below can be judged
    /// against it.
    #[serde(skip_serializing_if = "is_zero")]
    pub replicas_wanted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Durability {
    /// Reads the fields spike needs out of `INFO` text (any sections).
    pub fn from_info(info: &str) -> Durability {
        let mut d = Durability::default();
        for line in info.lines() {
            let Some((name, value)) = line.trim_end().split_once(':') else {
                continue;
            };
            match name {
                "aof_enabled" => d.appendonly = Some(value == "1"),
                "maxmemory_policy" => d.maxmemory_policy = Some(value.to_string()),
                "connected_slaves" => d.replicas_connected = value.parse().ok(),
                "min_slaves_good_slaves" => d.replicas_good = value.parse().ok(),
                _ => {}
            }
        }
        d
    }

    /// Each setting that lets Redis forget an answered order, with its fix;
    /// empty when the store keeps what it acknowledged.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match self.appendonly {
            Some(true) => {}
            Some(false) => problems.push(
                "appendonly is off: after a crash Redis comes back from its last snapshot, without orders it already answered, and hands their ids out again; start it with --appendonly yes (or CONFIG SET appendonly yes and the same in redis.conf)"
                    .to_string(),
            ),
            None => problems.push(
                "INFO persistence did not say whether the append-only file is on (aof_enabled); check that Redis runs with appendonly yes".to_string(),
            ),
        }
        match self.maxmemory_policy.as_deref() {
            // `volatile-*` policies evict only keys with a TTL, and no key of
            // a sale has one, so they keep the sale like `noeviction`.
            Some(p) if p == "noeviction" || p.starts_with("volatile-") => {}
            Some(p) => problems.push(format!(
                "maxmemory-policy is {p}: under memory pressure Redis may evict the sale's keys (the buyers, the orders); set maxmemory-policy noeviction"
            )),
            None => problems.push(
                "neither INFO memory nor CONFIG GET said the eviction policy (maxmemory_policy); check that Redis runs with maxmemory-policy noeviction".to_string(),
            ),
        }
        if self.replicas_wanted > 0 {
            let wanted = self.replicas_wanted;
            match self.min_replicas_to_write {
                Some(n) if n >= wanted => {}
                Some(n) => problems.push(format!(
                    "[redis] replicas = {wanted} but Redis's min-replicas-to-write is {n}: a primary with fewer replicas (after a failover, say) still sells, and every such sale is answered 503 while its buyer holds the ticket; set min-replicas-to-write {wanted} (and min-replicas-max-lag) in the redis.conf of every server of the group, then Redis refuses the sale instead"
                )),
                None => problems.push(format!(
                    "[redis] replicas = {wanted}, and CONFIG GET did not say Redis's min-replicas-to-write; check that every server of the group runs with min-replicas-to-write {wanted}, or a primary without replicas sells what it cannot acknowledge"
                )),
            }
        }
        problems
    }

    /// `(replicas able to acknowledge, replicas wanted)` when fewer than
    /// `[redis] replicas` are connected (Redis's own count of good
    /// replicas where it keeps one): no answer that names an order can be
    /// given until more are.
    pub fn replicas_short(&self) -> Option<(u64, u64)> {
        if self.replicas_wanted == 0 {
            return None;
        }
        let able = self.replicas_good.or(self.replicas_connected).unwrap_or(0);
        (able < self.replicas_wanted).then_some((able, self.replicas_wanted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_info_sections() {
        let info = "# Persistence\r\nloading:0\r\naof_enabled:1\r\n# Memory\r\nmaxmemory_policy:noeviction\r\n# Replication\r\nrole:master\r\nconnected_slaves:2\r\n";
        let d = Durability::from_info(info);
        assert_eq!(d.appendonly, Some(true));
        assert_eq!(d.maxmemory_policy.as_deref(), Some("noeviction"));
        assert_eq!(d.replicas_connected, Some(2));
        assert_eq!(d.problems(), Vec::<String>::new());
    }

    #[test]
    fn names_each_setting_that_forgets() {
        let d = Durability::from_info("aof_enabled:0\r\nmaxmemory_policy:allkeys-lru\r\n");
        let problems = d.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("appendonly yes"), "{problems:?}");
        assert!(problems[1].contains("allkeys-lru"), "{problems:?}");
        let ttl_only = Durability::from_info("aof_enabled:1\r\nmaxmemory_policy:volatile-lru\r\n");
        assert_eq!(ttl_only.problems(), Vec::<String>::new());
        let unknown = Durability::default().problems();
        assert_eq!(unknown.len(), 2, "{unknown:?}");
    }

    #[test]
    fn replicas_wanted_need_redis_to_refuse_writes_without_them() {
        let mut d = Durability::from_info(
            "aof_enabled:1\r\nmaxmemory_policy:noeviction\r\nconnected_slaves:1\r\n",
        );
        assert_eq!(d.problems(), Vec::<String>::new(), "none wanted");
        d.replicas_wanted = 1;
        let problems = d.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("min-replicas-to-write"),
            "{problems:?}"
        );
        d.min_replicas_to_write = Some(0);
        assert!(d.problems()[0].contains("min-replicas-to-write is 0"));
        d.min_replicas_to_write = Some(1);
        assert_eq!(d.problems(), Vec::<String>::new());
        assert_eq!(d.replicas_short(), None);
        d.replicas_wanted = 2;
        assert_eq!(d.replicas_short(), Some((1, 2)));
        // Redis's own count (replicas within min-replicas-max-lag) wins
        // over the connected ones.
        d.replicas_good = Some(0);
        d.replicas_wanted = 1;
        assert_eq!(d.replicas_short(), Some((0, 1)));
    }
}
