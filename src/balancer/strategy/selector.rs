//! What every strategy shares: the tiers of peers and their picking state,
//! the per-request [`Attempt`] (which peers were tried, for retries), the
//! [`Pick`] it yields, and the [`Selector`] that dispatches to a strategy.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Strategy;

use super::least_conn::{LEAST_CONN_WALK_MAX, LeastConn, Levels};
use super::smooth::{Cycle, MAX_CYCLE};
use crate::balancer::upstream::{LiveState, Upstream};

/// The smooth weighted round-robin numbers of one peer (Nginx's
/// `current_weight` and `effective_weight`).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Smooth {
    pub(super) current: i64,
    pub(super) effective: i64,
}

impl Smooth {
    /// One peer's part of an Nginx smooth-WRR round: its current weight grows
    /// by its effective weight, and an effective weight lowered by failures
    /// climbs back one toward `weight`. Returns what it adds to the round's
    /// total.
    pub(super) fn step(&mut self, weight: i64) -> i64 {
        self.current += self.effective;
        let added = self.effective;
        if self.effective < weight {
            self.effective += 1;
        }
        added
    }
}

/// The picking state of a tier.
#[derive(Debug)]
pub(super) struct PickState {
    /// Nginx's per-peer numbers; stale while `at` is `Some`, and for the
    /// peers least_conn keeps sorted.
    pub(super) smooth: Vec<Smooth>,
    /// The last cycle recorded.
    pub(super) cycle: Option<Cycle>,
    /// `Some(p)`: the state is that of `cycle` after `p` picks, and the next
    /// pick is `cycle.order[p]`.
    pub(super) at: Option<usize>,
    /// The calm walk since `start`, until it comes back there.
    pub(super) recording: Option<Cycle>,
    /// least_conn's counts and its sorted peers (empty for the others).
    pub(super) lc: LeastConn,
}

/// One set of peers: the primaries, or the backups.
#[derive(Debug)]
pub(super) struct Tier {
    pub(super) peers: Vec<Upstream>,
    /// The weight each peer counts with (1 for plain round-robin).
    pub(super) weights: Vec<i64>,
    /// Sum of `weights`, down peers included, as Nginx's `total_weight`.
    pub(super) total_weight: u64,
    /// Running sums of `weights`: `ends[i]` is the sum up to and with `i`.
    pub(super) ends: Vec<u64>,
    /// Sum of the weights of the peers that are not `down`.
    pub(super) up_weight: i64,
    /// How many picks a recording may take before it starts again.
    pub(super) max_recording: u64,
    /// least_conn only: whether the tier has enough peers for the fast path.
    pub(super) lc_fast: bool,
    pub(super) state: Mutex<PickState>,
}

impl Tier {
    /// `walk_max`: up to how many peers least_conn always walks.
    pub(super) fn new(peers: Vec<Upstream>, strategy: Strategy, walk_max: usize) -> Tier {
        let unweighted = strategy == Strategy::RoundRobin;
        let weights: Vec<i64> = peers
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
        let up: Vec<bool> = peers.iter().map(|p| !p.config.down).collect();
        let up_weight = weights
            .iter()
            .zip(&up)
            .filter(|(_, u)| **u)
            .map(|(w, _)| w)
            .sum();
        // A cycle from all-zero takes `up_weight` picks (fewer when the
        // weights share a divisor); other cycles take as long.
        let max_recording = (2 * up_weight as u64).clamp(64, MAX_CYCLE);
        let smooth = weights
            .iter()
            .map(|&w| Smooth {
                current: 0,
                effective: w,
            })
            .collect();
        let lc_fast = strategy == Strategy::LeastConn && peers.len() > walk_max;
        let lc = if lc_fast {
            // Every peer starts loose; the first pick sorts those that can be.
            let loose: Vec<u32> = (0..peers.len() as u32)
                .filter(|&i| !peers[i as usize].config.down)
                .collect();
            let mut is_loose = vec![false; peers.len()];
            loose.iter().for_each(|&i| is_loose[i as usize] = true);
            LeastConn {
                conns: vec![0; peers.len()],
                levels: Levels::new(&weights, |i| peers[i].config.down),
                loose,
                is_loose,
                usable: Vec::new(),
            }
        } else {
            LeastConn {
                conns: vec![0; peers.len()],
                ..LeastConn::default()
            }
        };
        Tier {
            peers,
            weights,
            total_weight,
            ends,
            up_weight,
            max_recording,
            lc_fast,
            state: Mutex::new(PickState {
                smooth,
                cycle: None,
                at: None,
                recording: None,
                lc,
            }),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, PickState> {
        // The state is a few integers; a panic elsewhere cannot leave it in a
        // state worse than "slightly unfair", so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether peer `i` may be picked now (not tried, not down, not failed).
    pub(super) fn usable(&self, i: usize, tried: &Tried, now: u64) -> bool {
        let p = &self.peers[i];
        !tried.has(i) && !p.config.down && !p.is_failed(now)
    }

    /// Makes peer `i`'s weights plain numbers in `smooth` (where the walk
    /// and the loose peers keep them), before a failure changes them or
    /// shuts the peer's window: the cycle is written out, and least_conn
    /// takes the peer out of its levels.
    pub(super) fn detach(&self, st: &mut PickState, i: usize) {
        self.materialize(st);
        if self.lc_fast {
            Self::loosen(&mut st.smooth, &mut st.lc, i);
        }
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

/// The per-request picking state (Nginx's per-request peer data): which
/// tier is in use, which peers were tried, and ip_hash's running hash.
#[derive(Debug)]
pub struct Attempt {
    /// A peer was left out because it is at its `max_conns`: nothing to
    /// pick may only mean "wait" (see [`Selector::pick`]).
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

/// A picked upstream. While it lives, the upstream counts one more active
/// request: in its live state for `/status`, and under least_conn in the
/// tier it was picked from, which is what least_conn compares.
pub struct Pick {
    pub(super) tier: usize,
    pub(super) index: usize,
    /// The tier it came from, kept alive so that the drop can count the
    /// request finished there even after a reload dropped the selector.
    pub(super) owner: Arc<Tier>,
    /// Whether the tier counted it (least_conn with more than one peer).
    pub(super) counted: bool,
}

impl Pick {
    /// The upstream's live state (counters, address).
    pub fn live(&self) -> &Arc<LiveState> {
        &self.owner.peers[self.index].live
    }
}

impl std::fmt::Debug for Pick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the whole tier: one peer is what a pick is about.
        f.debug_struct("Pick")
            .field("tier", &self.tier)
            .field("index", &self.index)
            .field("addr", &self.live().addr)
            .finish()
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.live().active.fetch_sub(1, Ordering::Relaxed);
        if self.counted {
            self.owner.finish(self.index);
        }
        if self.owner.peers[self.index].config.max_conns != 0 {
            crate::balancer::upstream::FREED.notify_one();
        }
    }
}

/// What leaves peers out before a strategy picks: health checks,
/// `max_conns` and `slow_start`. Off (and free) unless one of them is
/// configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gate {
    /// Any of the three is configured.
    pub on: bool,
    /// `slow_start` in ms (0: none).
    pub slow_start_ms: u64,
}

/// The upstreams of one config version and how to pick among them.
#[derive(Debug)]
pub struct Selector {
    pub(super) strategy: Strategy,
    /// Shared with the picks taken from them (see [`Pick`]).
    pub(super) tiers: Vec<Arc<Tier>>,
    /// One primary and no backup: Nginx then skips failure accounting.
    pub(super) single: bool,
    /// (tier, index) of each upstream in file order, for `/status`.
    pub(super) order: Vec<(usize, usize)>,
    pub(super) gate: Gate,
}

impl Selector {
    /// Builds a selector over `upstreams` (file order matters: it is the
    /// order Nginx walks peers in).
    pub fn new(strategy: Strategy, upstreams: Vec<Upstream>) -> Selector {
        Selector::build(strategy, upstreams, LEAST_CONN_WALK_MAX)
    }

    /// `new` with the size up to which least_conn walks (tests lower it to
    /// drive the fast path with few peers).
    pub(super) fn build(strategy: Strategy, upstreams: Vec<Upstream>, walk_max: usize) -> Selector {
        let mut primary = Vec::new();
        let mut backup = Vec::new();
        let mut order = Vec::with_capacity(upstreams.len());
        for u in upstreams {
            if u.config.backup {
                order.push((1, backup.len()));
                backup.push(u);
            } else {
                order.push((0, primary.len()));
                primary.push(u);
            }
        }
        let single = primary.len() == 1 && backup.is_empty();
        let mut tiers = vec![Arc::new(Tier::new(primary, strategy, walk_max))];
        if !backup.is_empty() {
            tiers.push(Arc::new(Tier::new(backup, strategy, walk_max)));
        }
        Selector {
            strategy,
            tiers,
            single,
            order,
            gate: Gate::default(),
        }
    }

    /// The selector with `gate` in force: peers that are unhealthy, at
    /// their `max_conns`, or ramping up (a share of the picks) are left out
    /// as if this request had tried them, so every strategy, fast paths
    /// included, goes on to the next as Nginx does for a busy peer.
    pub fn gated(mut self, gate: Gate) -> Selector {
        self.gate = gate;
        self
    }

    /// Marks the peers of `tier` that the gate keeps out of this attempt.
    fn gate_out(&self, tier: &Tier, attempt: &mut Attempt, now: u64) {
        for (i, p) in tier.peers.iter().enumerate() {
            if attempt.tried.has(i) || p.config.down {
                continue;
            }
            let out = if !p.live.healthy.load(Ordering::Relaxed) {
                true
            } else if p.is_busy() {
                attempt.busy = true;
                true
            } else if attempt.no_ramp || i >= 128 {
                false
            } else {
                let share = p.ramp_permille(now, self.gate.slow_start_ms);
                // A draw from the request's own numbers (its picks and the
                // clock), spread by a multiplicative hash: no shared state.
                let out = share < 1000 && {
                    attempt.draws += 1;
                    let x = (now ^ attempt.draws.rotate_left(17) ^ (i as u64).rotate_left(40))
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    (x >> 32) % 1000 >= share
                };
                if out {
                    attempt.ramped_out |= 1u128 << i;
                }
                out
            };
            if out {
                attempt.tried.set(i);
            }
        }
    }

    /// Whether some upstream that could take requests is only at its
    /// `max_conns` now (a request that found nothing to pick may wait).
    pub fn any_busy(&self) -> bool {
        self.upstreams()
            .any(|u| !u.config.down && u.live.healthy.load(Ordering::Relaxed) && u.is_busy())
    }

    /// The strategy in force.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Every upstream, in file order.
    pub fn upstreams(&self) -> impl Iterator<Item = &Upstream> {
        self.order.iter().map(|&(t, i)| &self.tiers[t].peers[i])
    }

    /// The upstream a pick refers to.
    pub fn upstream(&self, pick: &Pick) -> &Upstream {
        &self.tiers[pick.tier].peers[pick.index]
    }

    /// Picks the next upstream for this request, or `None` when every
    /// primary and backup was tried or is unusable (then, as Nginx does,
    /// all failure marks are cleared for a quick recovery).
    pub fn pick(&self, attempt: &mut Attempt, now: u64) -> Option<Pick> {
        loop {
            let tier = self.tiers.get(attempt.tier)?;
            if self.gate.on {
                self.gate_out(tier, attempt, now);
            }
            let found = if self.single {
                let p = &tier.peers[0];
                (!attempt.tried.has(0) && !p.config.down).then_some(0)
            } else {
                let mut state = tier.lock();
                let found = match self.strategy {
                    Strategy::RoundRobin | Strategy::WeightedRoundRobin => {
                        tier.smooth(&mut state, &attempt.tried, now)
                    }
                    Strategy::LeastConn => tier.least_conn(&mut state, &attempt.tried, now),
                    Strategy::IpHash => match tier.ip_hash(attempt, now) {
                        Some(i) => Some(i),
                        None => tier.smooth(&mut state, &attempt.tried, now),
                    },
                };
                if let Some(i) = found {
                    // Nginx: a pick after the window restarts the window.
                    let live = &tier.peers[i].live;
                    let window = tier.peers[i].config.fail_timeout.as_millis() as u64;
                    if now.saturating_sub(live.checked.load(Ordering::Relaxed)) > window {
                        live.checked.store(now, Ordering::Relaxed);
                        // A probe of a failed peer shuts its window again
                        // until it answers: the picks in between skip it,
                        // which the fast paths do not follow by themselves.
                        if tier.peers[i].is_failed(now) {
                            tier.detach(&mut state, i);
                        }
                    }
                }
                found
            };
            if let Some(i) = found {
                attempt.tried.set(i);
                let live = &tier.peers[i].live;
                let before = live.active.fetch_add(1, Ordering::Relaxed);
                let pick = Pick {
                    tier: attempt.tier,
                    index: i,
                    owner: tier.clone(),
                    counted: self.strategy == Strategy::LeastConn && !self.single,
                };
                let max_conns = u64::from(tier.peers[i].config.max_conns);
                if max_conns != 0 && before >= max_conns {
                    // Another request took its last slot between the gate
                    // and here: the count decides, so `max_conns` is never
                    // passed. (Dropping the pick undoes its counts.)
                    attempt.busy = true;
                    drop(pick);
                    continue;
                }
                live.requests.fetch_add(1, Ordering::Relaxed);
                return Some(pick);
            }
            if attempt.ramped_out != 0 {
                // Only peers ramping up were left: they take it.
                attempt.tried.low &= !attempt.ramped_out;
                attempt.ramped_out = 0;
                attempt.no_ramp = true;
                continue;
            }
            if attempt.tier + 1 < self.tiers.len() {
                attempt.tier += 1;
                attempt.tried.clear();
                attempt.ramped_out = 0;
                attempt.no_ramp = false;
                continue;
            }
            if attempt.busy {
                // Busy, not broken: the failure marks stand (the request
                // may wait in the queue for a free slot).
                return None;
            }
            for t in &self.tiers {
                let _state = t.lock();
                for p in &t.peers {
                    p.live.fails.store(0, Ordering::Relaxed);
                }
            }
            return None;
        }
    }

    /// Records how an attempt ended (Nginx's `free` of the round-robin
    /// peer): a failure counts towards `max_fails` and lowers the effective
    /// weight; a success after a fresh window clears the failures.
    pub fn release(&self, pick: &Pick, failed: bool, now: u64) {
        let tier = &self.tiers[pick.tier];
        let peer = &tier.peers[pick.index];
        if failed {
            peer.live.failures.fetch_add(1, Ordering::Relaxed);
        }
        if self.single {
            return;
        }
        let live = &peer.live;
        let mut state = tier.lock();
        if failed {
            live.fails.fetch_add(1, Ordering::Relaxed);
            live.accessed.store(now, Ordering::Relaxed);
            live.checked.store(now, Ordering::Relaxed);
            let max_fails = peer.config.max_fails as i64;
            if max_fails != 0 {
                // The failure lowers a weight and may take the peer out of
                // the rounds: what the fast paths do not follow.
                tier.detach(&mut state, pick.index);
                let s = &mut state.smooth[pick.index];
                s.effective = (s.effective - tier.weights[pick.index] / max_fails).max(0);
            }
        } else if live.accessed.load(Ordering::Relaxed) < live.checked.load(Ordering::Relaxed) {
            // Back after its failure window: `slow_start` ramps from here.
            let fails = live.fails.swap(0, Ordering::Relaxed);
            if peer.config.max_fails != 0 && fails >= peer.config.max_fails {
                live.back_since.store(now, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {

    use crate::balancer::strategy::Attempt;
    use crate::balancer::strategy::testing::*;

    use crate::config::{Strategy, UpstreamConfig};
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::atomic::Ordering;

    #[test]
    fn failed_peer_is_skipped_until_fail_timeout_then_probed() {
        let s = selector(Strategy::WeightedRoundRobin, vec![up(1, 1), up(2, 1)]);
        let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let p = s.pick(&mut a, 100).expect("peer");
        assert_eq!(port(&s, &p), 1);
        s.release(&p, true, 100);
        // Same request goes on to the other peer.
        let p2 = s.pick(&mut a, 100).expect("peer");
        assert_eq!(port(&s, &p2), 2);
        drop((p, p2));
        // Within the window only peer 2 takes traffic.
        for _ in 0..5 {
            assert_eq!(one(&s, 5_000), 2);
        }
        // After the window peer 1 is probed once (the pick restarts its
        // window, as in Nginx), and a success clears its failures.
        let mut probe = None;
        for _ in 0..4 {
            let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
            let p = s.pick(&mut a, 10_200).expect("peer");
            if port(&s, &p) == 1 {
                probe = Some(p);
                break;
            }
        }
        let probe = probe.expect("peer 1 probed after fail_timeout");
        s.release(&probe, false, 10_200);
        assert_eq!(s.upstream(&probe).live.fails.load(Ordering::Relaxed), 0);
        let picks: Vec<u16> = (0..4).map(|_| one(&s, 10_300)).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 2, "{picks:?}");
    }

    #[test]
    fn failure_lowers_effective_weight_which_climbs_back() {
        let mut a = up(1, 10);
        a.max_fails = 2;
        let s = selector(Strategy::WeightedRoundRobin, vec![a, up(2, 10)]);
        let mut at = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let p = s.pick(&mut at, 0).expect("peer");
        assert_eq!(port(&s, &p), 1);
        s.release(&p, true, 0);
        assert_eq!(s.tiers[0].lock().smooth[0].effective, 5);
        one(&s, 0);
        assert_eq!(s.tiers[0].lock().smooth[0].effective, 6);
    }

    #[test]
    fn backups_only_when_no_primary_can() {
        let mut b = up(9, 1);
        b.backup = true;
        let mut d = up(2, 1);
        d.down = true;
        let s = selector(Strategy::WeightedRoundRobin, vec![up(1, 1), d, b]);
        assert_eq!(one(&s, 0), 1);
        let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let p = s.pick(&mut a, 0).expect("peer");
        s.release(&p, true, 0);
        let p = s.pick(&mut a, 0).expect("backup");
        assert_eq!(port(&s, &p), 9);
        assert_eq!(one(&s, 1), 9);
        // Nothing left: None, and the failure marks are cleared.
        s.release(&p, true, 1);
        assert!(s.pick(&mut a, 1).is_none());
        assert_eq!(one(&s, 2), 1);
    }

    #[test]
    fn a_peer_ramping_up_is_still_picked_when_it_is_the_only_one() {
        use crate::balancer::strategy::Gate;
        for strategy in [
            Strategy::RoundRobin,
            Strategy::WeightedRoundRobin,
            Strategy::IpHash,
            Strategy::LeastConn,
        ] {
            let s = selector(strategy, vec![up(1, 1), up(2, 1)]).gated(Gate {
                on: true,
                slow_start_ms: 60_000,
            });
            let now = 1_000_000;
            s.tiers[0].peers[0]
                .live
                .healthy
                .store(false, Ordering::Relaxed);
            s.tiers[0].peers[1]
                .live
                .back_since
                .store(now, Ordering::Relaxed);
            for _ in 0..200 {
                assert_eq!(one(&s, now), 2, "{strategy:?}");
            }
            // With both ramping, roughly a tenth of the picks would go to
            // each by the draw alone; none may be refused.
            s.tiers[0].peers[0]
                .live
                .healthy
                .store(true, Ordering::Relaxed);
            s.tiers[0].peers[0]
                .live
                .back_since
                .store(now, Ordering::Relaxed);
            for _ in 0..200 {
                one(&s, now);
            }
        }
    }

    #[test]
    fn a_failover_still_reaches_a_peer_ramping_up() {
        use crate::balancer::strategy::Gate;
        let s = selector(Strategy::RoundRobin, vec![up(1, 1), up(2, 1)]).gated(Gate {
            on: true,
            slow_start_ms: 60_000,
        });
        let now = 1_000_000;
        s.tiers[0].peers[1]
            .live
            .back_since
            .store(now, Ordering::Relaxed);
        for _ in 0..100 {
            let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
            let first = s.pick(&mut a, now).expect("a peer");
            if port(&s, &first) != 1 {
                continue;
            }
            // Peer 1 fails: the request goes on to the ramping peer 2,
            // even when the first pick's draw left it out.
            drop(first);
            let second = s.pick(&mut a, now).expect("the ramping peer");
            assert_eq!(port(&s, &second), 2);
        }
    }

    #[test]
    fn many_peers_beyond_128_are_tracked() {
        let ups: Vec<UpstreamConfig> = (1..=300).map(|p| up(p, 1)).collect();
        let s = selector(Strategy::RoundRobin, ups);
        let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let mut seen = std::collections::HashSet::new();
        while let Some(p) = s.pick(&mut a, 0) {
            assert!(seen.insert(port(&s, &p)));
        }
        assert_eq!(seen.len(), 300);
    }
}
