//! The [`Selector`]: the tiers of one config version, each with the
//! picking state of the strategy in force, which it dispatches to (see
//! [`Algorithm`]); the gate that leaves peers out before any strategy
//! picks; and the [`Pick`] a request holds while it uses an upstream.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::balancer::upstream::{LiveState, Upstream};
use crate::config::Strategy;

use super::algorithm::Algorithm;
use super::attempt::Attempt;
use super::ip_hash::IpHashState;
use super::least_conn::{LEAST_CONN_WALK_MAX, LeastConnState};
use super::peers::Peers;
use super::smooth::SmoothState;

/// The picking state of a tier, of the strategy in force: an enum, so that
/// the dispatch is a match, not a virtual call.
#[derive(Debug)]
pub(super) enum State {
    /// Round-robin and smooth weighted round-robin.
    Smooth(SmoothState),
    LeastConn(LeastConnState),
    IpHash(IpHashState),
}

/// Runs `$body` on the state of the strategy in force, as `$a`.
macro_rules! dispatch {
    ($state:expr, $a:ident => $body:expr) => {
        match $state {
            State::Smooth($a) => $body,
            State::LeastConn($a) => $body,
            State::IpHash($a) => $body,
        }
    };
}

impl Algorithm for State {
    fn pick(&mut self, peers: &Peers, attempt: &mut Attempt, now: u64) -> Option<usize> {
        dispatch!(self, a => a.pick(peers, attempt, now))
    }

    fn detach(&mut self, peers: &Peers, i: usize) {
        dispatch!(self, a => a.detach(peers, i))
    }

    fn fail(&mut self, peers: &Peers, i: usize, penalty: i64) {
        dispatch!(self, a => a.fail(peers, i, penalty))
    }

    fn finish(&mut self, i: usize) {
        dispatch!(self, a => a.finish(i))
    }
}

/// One set of peers (the primaries, or the backups) and its picking state.
#[derive(Debug)]
pub(super) struct Tier {
    pub(super) peers: Peers,
    state: Mutex<State>,
}

impl Tier {
    /// `walk_max`: up to how many peers least_conn always walks.
    pub(super) fn new(upstreams: Vec<Upstream>, strategy: Strategy, walk_max: usize) -> Tier {
        let peers = Peers::new(upstreams, strategy);
        let state = match strategy {
            Strategy::RoundRobin | Strategy::WeightedRoundRobin => {
                State::Smooth(SmoothState::new(&peers))
            }
            Strategy::LeastConn => State::LeastConn(LeastConnState::new(&peers, walk_max)),
            Strategy::IpHash => State::IpHash(IpHashState::new(&peers)),
        };
        Tier {
            peers,
            state: Mutex::new(state),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few integers; a panic elsewhere cannot leave it in a
        // state worse than "slightly unfair", so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request the strategy counted has finished (its [`Pick`] is dropped).
    fn finish(&self, i: usize) {
        self.lock().finish(i);
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
                let found = state.pick(&tier.peers, attempt, now);
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
                            state.detach(&tier.peers, i);
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
                for p in t.peers.iter() {
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
                let penalty = tier.peers.weights[pick.index] / max_fails;
                state.fail(&tier.peers, pick.index, penalty);
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
