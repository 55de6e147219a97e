//! A tier's peers as every strategy reads them: the upstreams, the weights
//! they count with, and [`Tried`], the peers one request already tried.
//! At the bottom of the strategies: it knows none of them.

use std::ops::Index;

use crate::balancer::upstream::Upstream;
use crate::config::Strategy;

/// One set of peers (the primaries, or the backups) and their weights.
#[derive(Debug)]
pub(super) struct Peers {
    upstreams: Vec<Upstream>,
    /// The weight each peer counts with (1 for plain round-robin).
    pub(super) weights: Vec<i64>,
    /// Sum of `weights`, down peers included, as Nginx's `total_weight`.
    pub(super) total_weight: u64,
    /// Running sums of `weights`: `ends[i]` is the sum up to and with `i`.
    pub(super) ends: Vec<u64>,
    /// Sum of the weights of the peers that are not `down`.
    pub(super) up_weight: i64,
}

impl Peers {
    /// The peers in file order, with the weights `strategy` counts.
    pub(super) fn new(upstreams: Vec<Upstream>, strategy: Strategy) -> Peers {
        let unweighted = strategy == Strategy::RoundRobin;
        let weights: Vec<i64> = upstreams
            .iter()
            .map(|p| {
                if unweighted {
                    1
                } else {
                    p.config.weight as i64
                }
            })
            .collect();
        let total_weight = weights.iter().map(|&w| w as u64).sum();
        let ends = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += w as u64;
                Some(*sum)
            })
            .collect();
        let up_weight = weights
            .iter()
            .zip(&upstreams)
            .filter(|(_, p)| !p.config.down)
            .map(|(w, _)| w)
            .sum();
        Peers {
            upstreams,
            weights,
            total_weight,
            ends,
            up_weight,
        }
    }

    /// How many peers.
    pub(super) fn len(&self) -> usize {
        self.upstreams.len()
    }

    /// The peers, in file order.
    pub(super) fn iter(&self) -> std::slice::Iter<'_, Upstream> {
        self.upstreams.iter()
    }

    /// Whether peer `i` may be picked now (not tried, not down, not failed).
    pub(super) fn usable(&self, i: usize, tried: &Tried, now: u64) -> bool {
        let p = &self.upstreams[i];
        !tried.has(i) && !p.config.down && !p.is_failed(now)
    }
}

impl Index<usize> for Peers {
    type Output = Upstream;

    fn index(&self, i: usize) -> &Upstream {
        &self.upstreams[i]
    }
}

/// Which peers one request already tried, like Nginx's `tried` bitmap. The
/// first 128 peers need no allocation.
#[derive(Debug, Default)]
pub(super) struct Tried {
    pub(super) low: u128,
    pub(super) high: Vec<u64>,
}

impl Tried {
    pub(super) fn has(&self, i: usize) -> bool {
        if i < 128 {
            return self.low & (1u128 << i) != 0;
        }
        let j = i - 128;
        self.high
            .get(j / 64)
            .is_some_and(|w| w & (1u64 << (j % 64)) != 0)
    }

    pub(super) fn set(&mut self, i: usize) {
        if i < 128 {
            self.low |= 1u128 << i;
            return;
        }
        let j = i - 128;
        if self.high.len() <= j / 64 {
            self.high.resize(j / 64 + 1, 0);
        }
        self.high[j / 64] |= 1u64 << (j % 64);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.low == 0 && self.high.iter().all(|&w| w == 0)
    }

    /// The peers tried, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        let low = std::iter::successors(Some(self.low), |&b| Some(b & b.wrapping_sub(1)))
            .take_while(|&b| b != 0)
            .map(|b| b.trailing_zeros() as usize);
        let high = self.high.iter().enumerate().flat_map(|(k, &word)| {
            std::iter::successors(Some(word), |&b| Some(b & b.wrapping_sub(1)))
                .take_while(|&b| b != 0)
                .map(move |b| 128 + k * 64 + b.trailing_zeros() as usize)
        });
        low.chain(high)
    }

    pub(super) fn clear(&mut self) {
        self.low = 0;
        self.high.clear();
    }
}
