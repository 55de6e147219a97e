//! Nginx's ip_hash (`ngx_http_upstream_ip_hash_module`): the client's
//! first three IPv4 octets (all 16 of IPv6) hashed, then a walk over the
//! weights, done as a binary search over their running sums.

use super::selector::{Attempt, Tier};

/// How many times ip_hash rehashes before it falls back to round-robin.
pub(super) const IP_HASH_TRIES: u32 = 20;

impl Tier {
    /// Nginx's ip_hash walk; `None` means "fall back to round-robin".
    pub(super) fn ip_hash(&self, attempt: &mut Attempt, now: u64) -> Option<usize> {
        if attempt.hash_tries > IP_HASH_TRIES || self.peers.len() < 2 || self.total_weight == 0 {
            return None;
        }
        let mut hash = attempt.hash;
        loop {
            hash = ip_hash_step(hash, attempt.key());
            // Nginx subtracts weights until the rest is smaller than the
            // peer's: that is the first peer whose running sum exceeds it.
            let w = hash as u64 % self.total_weight;
            let p = self.ends.partition_point(|&end| end <= w);
            if self.usable(p, &attempt.tried, now) {
                attempt.hash = hash;
                return Some(p);
            }
            attempt.hash_tries += 1;
            if attempt.hash_tries > IP_HASH_TRIES {
                return None;
            }
        }
    }
}

/// One round of Nginx's ip_hash over the client's key bytes.
pub fn ip_hash_step(mut hash: u32, key: &[u8]) -> u32 {
    for &b in key {
        hash = (hash * 113 + b as u32) % 6271;
    }
    hash
}

#[cfg(test)]
mod tests {

    use crate::balancer::strategy::Attempt;
    use crate::balancer::strategy::testing::*;

    use crate::config::Strategy;
    use std::net::IpAddr;

    /// An independent transcription of Nginx's ip_hash for the test.
    fn nginx_ip_hash(ip: [u8; 4], weights: &[u64]) -> usize {
        let mut hash: u64 = 89;
        for &b in &ip[..3] {
            hash = (hash * 113 + b as u64) % 6271;
        }
        let total: u64 = weights.iter().sum();
        let mut w = hash % total;
        let mut i = 0;
        while w >= weights[i] {
            w -= weights[i];
            i += 1;
        }
        i
    }

    #[test]
    fn ip_hash_matches_nginx_formula_and_groups_by_24() {
        let weights = [1u32, 2, 3, 1];
        let ups = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| up(i as u16 + 1, w))
            .collect();
        let s = selector(Strategy::IpHash, ups);
        let w64: Vec<u64> = weights.iter().map(|&w| w as u64).collect();
        for a in [10u8, 127, 192] {
            for b in 0..=255u8 {
                for c in [0u8, 7, 255] {
                    let ip = [a, b, c, 1];
                    let expect = nginx_ip_hash(ip, &w64) as u16 + 1;
                    for d in [1u8, 200] {
                        let mut at = Attempt::new(IpAddr::from([a, b, c, d]));
                        let p = s.pick(&mut at, 0).expect("peer");
                        assert_eq!(port(&s, &p), expect, "{a}.{b}.{c}.{d}");
                    }
                }
            }
        }
    }

    #[test]
    fn ip_hash_rehashes_past_a_down_peer() {
        let mut d = up(1, 1);
        d.down = true;
        let s = selector(Strategy::IpHash, vec![d, up(2, 1), up(3, 1)]);
        for i in 0..=255u8 {
            let mut at = Attempt::new(IpAddr::from([10, 0, i, 1]));
            let p = s.pick(&mut at, 0).expect("peer");
            assert_ne!(port(&s, &p), 1);
        }
    }
}
