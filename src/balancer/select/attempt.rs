//! The per-request picking state: what one request has tried so far, as
//! the selector and the strategies read and write it.

use std::net::IpAddr;

use super::peers::Tried;

/// The per-request picking state (Nginx's per-request peer data): which
/// tier is in use, which peers were tried, and ip_hash's running hash.
#[derive(Debug)]
pub struct Attempt {
    /// A peer was left out because it is at its `max_conns`: nothing to
    /// pick may only mean "wait" (see
    /// [`Selector::pick`](super::Selector::pick)).
    pub busy: bool,
    /// Picks made so far: which draw of `slow_start` this is.
    pub(super) draws: u64,
    /// Peers (of the first 128) left out by a `slow_start` draw in this
    /// tier, by this pick or an earlier one of the same request: given back
    /// when nothing else can be picked (a failover included), because a
    /// small share is still a share.
    pub(super) ramped_out: u128,
    /// The draws are off for the rest of this attempt (see `ramped_out`).
    pub(super) no_ramp: bool,
    pub(super) tier: usize,
    pub(super) tried: Tried,
    pub(super) key: [u8; 16],
    pub(super) key_len: u8,
    pub(super) hash: u32,
    pub(super) hash_tries: u32,
}

impl Attempt {
    /// A fresh attempt for a request from `client` (used by ip_hash only).
    pub fn new(client: IpAddr) -> Attempt {
        let mut key = [0u8; 16];
        let key_len = match client.to_canonical() {
            IpAddr::V4(v4) => {
                key[..3].copy_from_slice(&v4.octets()[..3]);
                3
            }
            IpAddr::V6(v6) => {
                key = v6.octets();
                16
            }
        };
        Attempt {
            busy: false,
            draws: 0,
            ramped_out: 0,
            no_ramp: false,
            tier: 0,
            tried: Tried::default(),
            key,
            key_len,
            hash: 89,
            hash_tries: 0,
        }
    }

    pub(super) fn key(&self) -> &[u8] {
        &self.key[..self.key_len as usize]
    }
}
