//! Nginx's smooth weighted round-robin (`ngx_http_upstream_get_peer`),
//! and plain round-robin, which is the same with every weight 1. While every
//! peer is healthy at full weight the walk is recorded once as a cycle and
//! replayed; a failure or a retry writes the weights out and walks again.

use super::algorithm::Algorithm;
use super::attempt::Attempt;
use super::peers::{Peers, Tried};

/// Longest smooth-WRR cycle recorded (4 bytes a pick): 1 MiB.
pub(super) const MAX_CYCLE: u64 = 1 << 18;

/// The smooth weighted round-robin numbers of one peer (Nginx's
/// `current_weight` and `effective_weight`).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Smooth {
    pub(super) current: i64,
    pub(super) effective: i64,
}

impl Smooth {
    /// Every peer's numbers at the start: no current weight, full weight.
    pub(super) fn fresh(peers: &Peers) -> Vec<Smooth> {
        peers
            .weights
            .iter()
            .map(|&w| Smooth {
                current: 0,
                effective: w,
            })
            .collect()
    }

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

    /// A failure: the effective weight drops by `penalty`, never below 0.
    pub(super) fn lower(&mut self, penalty: i64) {
        self.effective = (self.effective - penalty).max(0);
    }
}

/// A run of smooth-WRR picks that ends in the state it started from, so
/// that it repeats for as long as nothing but the current weights decides.
#[derive(Debug)]
pub(super) struct Cycle {
    /// The current weights at the start.
    pub(super) start: Vec<i64>,
    /// The peer picked at each position.
    pub(super) order: Vec<u32>,
}

/// Smooth WRR's state of a tier.
#[derive(Debug)]
pub(super) struct SmoothState {
    /// Nginx's per-peer numbers; stale while `at` is `Some`.
    pub(super) smooth: Vec<Smooth>,
    /// The last cycle recorded.
    pub(super) cycle: Option<Cycle>,
    /// `Some(p)`: the state is that of `cycle` after `p` picks, and the next
    /// pick is `cycle.order[p]`.
    pub(super) at: Option<usize>,
    /// The calm walk since `start`, until it comes back there.
    pub(super) recording: Option<Cycle>,
    /// How many picks a recording may take before it starts again.
    pub(super) max_recording: u64,
}

impl SmoothState {
    pub(super) fn new(peers: &Peers) -> SmoothState {
        // A cycle from all-zero takes `up_weight` picks (fewer when the
        // weights share a divisor); other cycles take as long.
        let max_recording = (2 * peers.up_weight as u64).clamp(64, MAX_CYCLE);
        SmoothState {
            smooth: Smooth::fresh(peers),
            cycle: None,
            at: None,
            recording: None,
            max_recording,
        }
    }

    /// Whether every peer that is not `down` is healthy at full weight: then
    /// nothing but the current weights decides the picks, and a cycle
    /// recorded in such a calm replays them.
    fn calm(&self, peers: &Peers, now: u64) -> bool {
        self.smooth
            .iter()
            .zip(&peers.weights)
            .zip(peers.iter())
            .all(|((s, &w), p)| p.config.down || (s.effective == w && !p.is_failed(now)))
    }

    /// Writes out the current weights of the cycle position the state is at,
    /// so that the walk can take over: from the cycle's start, `p` picks of
    /// which `k` went to peer `i` have added `p * w` and taken `k * total`.
    fn materialize(&mut self, peers: &Peers) {
        let (Some(p), Some(cycle)) = (self.at.take(), &self.cycle) else {
            return;
        };
        for (i, s) in self.smooth.iter_mut().enumerate() {
            let gained = if peers[i].config.down {
                0
            } else {
                peers.weights[i]
            };
            s.current = cycle.start[i] + p as i64 * gained;
            s.effective = peers.weights[i];
        }
        for &i in &cycle.order[..p] {
            self.smooth[i as usize].current -= peers.up_weight;
        }
    }

    /// Nginx's `ngx_http_upstream_get_peer`, replayed from the recorded
    /// cycle when the state allows it.
    pub(super) fn next(&mut self, peers: &Peers, tried: &Tried, now: u64) -> Option<usize> {
        if let (Some(p), Some(cycle)) = (self.at, &self.cycle) {
            let i = cycle.order[p] as usize;
            // Failure marks are shared with the selector of the previous
            // config, whose release may mark a peer behind this one's back.
            if tried.is_empty() && !peers[i].is_failed(now) {
                self.at = Some((p + 1) % cycle.order.len());
                return Some(i);
            }
            self.materialize(peers);
        }
        if !tried.is_empty() || !self.calm(peers, now) {
            self.recording = None;
            return walk(peers, &mut self.smooth, tried, now);
        }
        let recording = self.recording.get_or_insert_with(|| Cycle {
            start: self.smooth.iter().map(|s| s.current).collect(),
            order: Vec::new(),
        });
        let b = walk(peers, &mut self.smooth, tried, now)?;
        recording.order.push(b as u32);
        if self
            .smooth
            .iter()
            .zip(&recording.start)
            .all(|(s, &c)| s.current == c)
        {
            self.cycle = self.recording.take();
            self.at = Some(0);
        } else if recording.order.len() as u64 > self.max_recording {
            // Not back yet: the start may lie before the states repeat;
            // start again from a later state.
            self.recording = None;
        }
        Some(b)
    }
}

impl Algorithm for SmoothState {
    fn pick(&mut self, peers: &Peers, attempt: &mut Attempt, now: u64) -> Option<usize> {
        self.next(peers, &attempt.tried, now)
    }

    fn detach(&mut self, peers: &Peers, _i: usize) {
        self.materialize(peers);
    }

    fn fail(&mut self, peers: &Peers, i: usize, penalty: i64) {
        self.detach(peers, i);
        self.smooth[i].lower(penalty);
    }
}

/// Nginx's walk: every usable peer gains its effective weight, the
/// largest current weight wins and loses the round's total.
fn walk(peers: &Peers, state: &mut [Smooth], tried: &Tried, now: u64) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut total: i64 = 0;
    for i in 0..peers.len() {
        if !peers.usable(i, tried, now) {
            continue;
        }
        total += state[i].step(peers.weights[i]);
        let current = state[i].current;
        // Strictly greater: on a tie the earlier peer keeps the lead.
        if best.is_none_or(|b| current > state[b].current) {
            best = Some(i);
        }
    }
    let b = best?;
    state[b].current -= total;
    Some(b)
}
