//! Nginx's ip_hash (`ngx_http_upstream_ip_hash_module`): the client's
//! first three IPv4 octets (all 16 of IPv6) hashed, then a walk over the
//! weights, done as a binary search over their running sums; after too
//! many rehashes, smooth weighted round-robin, as Nginx falls back.

use super::algorithm::Algorithm;
use super::attempt::Attempt;
use super::peers::Peers;
use super::smooth::SmoothState;

/// How many times ip_hash rehashes before it falls back to round-robin.
pub(super) const IP_HASH_TRIES: u32 = 20;

/// ip_hash's state of a tier: only its fallback's (the hash is the
/// request's, in its [`Attempt`]).
#[derive(Debug)]
pub(super) struct IpHashState {
    pub(super) fallback: SmoothState,
}

impl IpHashState {
    pub(super) fn new(peers: &Peers) -> IpHashState {
        IpHashState {
            fallback: SmoothState::new(peers),
        }
    }
}

impl Algorithm for IpHashState {
    fn pick(&mut self, peers: &Peers, attempt: &mut Attempt, now: u64) -> Option<usize> {
        match ip_hash(peers, attempt, now) {
            Some(i) => Some(i),
            None => self.fallback.next(peers, &attempt.tried, now),
        }
    }

    fn detach(&mut self, peers: &Peers, i: usize) {
        self.fallback.detach(peers, i);
    }

    fn fail(&mut self, peers: &Peers, i: usize, penalty: i64) {
        self.fallback.fail(peers, i, penalty);
    }
}

/// Nginx's ip_hash walk; `None` means "fall back to round-robin".
fn ip_hash(peers: &Peers, attempt: &mut Attempt, now: u64) -> Option<usize> {
    if attempt.hash_tries > IP_HASH_TRIES || peers.len() < 2 || peers.total_weight == 0 {
        return None;
    }
    let mut hash = attempt.hash;
    loop {
        hash = ip_hash_step(hash, attempt.key());
        // Nginx subtracts weights until the rest is smaller than the
        // peer's: that is the first peer whose running sum exceeds it.
        let w = hash as u64 % peers.total_weight;
        let p = peers.ends.partition_point(|&end| end <= w);
        if peers.usable(p, &attempt.tried, now) {
            attempt.hash = hash;
            return Some(p);
        }
        attempt.hash_tries += 1;
        if attempt.hash_tries > IP_HASH_TRIES {
            return None;
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
