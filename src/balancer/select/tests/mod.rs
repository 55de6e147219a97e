//! The strategies' tests, above every strategy (they drive whole
//! selectors), and what they build selectors from: the helpers here and the
//! transcription of Nginx's round-robin the differential tests compare with.

mod ip_hash;
mod least_conn;
mod selector;
mod smooth;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::balancer::upstream::{LiveState, Upstream};
use crate::config::{Strategy, UpstreamConfig};

use super::least_conn::LeastConnState;
use super::selector::State;
use super::smooth::SmoothState;
use super::{Attempt, Pick, Selector};

/// `f` of the smooth WRR state of `s`'s first tier (ip_hash's fallback's).
pub(super) fn with_smooth<R>(s: &Selector, f: impl FnOnce(&SmoothState) -> R) -> R {
    match &*s.tiers[0].lock() {
        State::Smooth(st) => f(st),
        State::IpHash(st) => f(&st.fallback),
        State::LeastConn(_) => panic!("least_conn keeps no smooth WRR state of its own"),
    }
}

/// `f` of the least_conn state of `s`'s first tier.
pub(super) fn with_least_conn<R>(s: &Selector, f: impl FnOnce(&LeastConnState) -> R) -> R {
    match &*s.tiers[0].lock() {
        State::LeastConn(st) => f(st),
        _ => panic!("not least_conn"),
    }
}

pub(super) fn up(port: u16, weight: u32) -> UpstreamConfig {
    UpstreamConfig {
        weight,
        ..UpstreamConfig::new(SocketAddr::from(([127, 0, 0, 1], port)))
    }
}

pub(super) fn upstreams(ups: Vec<UpstreamConfig>) -> Vec<Upstream> {
    ups.into_iter()
        .map(|c| {
            let live = Arc::new(LiveState::new(c.addr));
            Upstream::new(c, live)
        })
        .collect()
}

pub(super) fn selector(strategy: Strategy, ups: Vec<UpstreamConfig>) -> Selector {
    Selector::new(strategy, upstreams(ups))
}

pub(super) fn port(s: &Selector, p: &Pick) -> u16 {
    s.upstream(p).config.addr.port()
}

pub(super) fn one(s: &Selector, now: u64) -> u16 {
    let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let p = s.pick(&mut a, now).expect("a peer");
    port(s, &p)
}

/// An independent transcription of Nginx's `ngx_http_upstream_get_peer`
/// and `ngx_http_upstream_free_round_robin_peer` for one tier, with the
/// all-failed reset of `ngx_http_upstream_get_round_robin_peer`.
pub(super) struct NginxRoundRobin {
    pub(super) weight: Vec<i64>,
    pub(super) down: Vec<bool>,
    pub(super) max_fails: Vec<u32>,
    pub(super) fail_timeout: u64,
    pub(super) current: Vec<i64>,
    pub(super) effective: Vec<i64>,
    pub(super) fails: Vec<u32>,
    pub(super) checked: Vec<u64>,
    pub(super) accessed: Vec<u64>,
}

impl NginxRoundRobin {
    /// `n` peers, weights and limits to be filled in by the test.
    pub(super) fn new(n: usize, fail_timeout: u64) -> NginxRoundRobin {
        NginxRoundRobin {
            weight: vec![0; n],
            down: vec![false; n],
            max_fails: vec![0; n],
            fail_timeout,
            current: vec![0; n],
            effective: vec![0; n],
            fails: vec![0; n],
            checked: vec![0; n],
            accessed: vec![0; n],
        }
    }

    pub(super) fn get_peer(&mut self, tried: &[bool], now: u64) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut total = 0;
        for (i, &tried) in tried.iter().enumerate() {
            if tried || self.down[i] {
                continue;
            }
            if self.max_fails[i] != 0
                && self.fails[i] >= self.max_fails[i]
                && now - self.checked[i] <= self.fail_timeout
            {
                continue;
            }
            self.current[i] += self.effective[i];
            total += self.effective[i];
            if self.effective[i] < self.weight[i] {
                self.effective[i] += 1;
            }
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let Some(b) = best else {
            self.fails.iter_mut().for_each(|f| *f = 0);
            return None;
        };
        self.current[b] -= total;
        if now - self.checked[b] > self.fail_timeout {
            self.checked[b] = now;
        }
        Some(b)
    }

    pub(super) fn free(&mut self, i: usize, failed: bool, now: u64) {
        if failed {
            self.fails[i] += 1;
            self.accessed[i] = now;
            self.checked[i] = now;
            if self.max_fails[i] != 0 {
                self.effective[i] -= self.weight[i] / self.max_fails[i] as i64;
            }
            self.effective[i] = self.effective[i].max(0);
        } else if self.accessed[i] < self.checked[i] {
            self.fails[i] = 0;
        }
    }
}

/// A small deterministic generator, so a failing case can be replayed.
pub(super) struct Lcg(pub(super) u64);

impl Lcg {
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}
