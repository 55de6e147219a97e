//! Picking an upstream the way Nginx's upstream modules do, so that spike can
//! stand where Nginx stood and produce the same traffic split.
//!
//! - smooth weighted round-robin (`ngx_http_upstream_get_peer`): every
//!   eligible peer gains its effective weight, the largest current weight
//!   wins and loses the total; a failed peer's effective weight drops by
//!   `weight / max_fails` and climbs back by one per pick it takes part in;
//! - round-robin: the same with every weight taken as 1;
//! - ip_hash (`ngx_http_upstream_ip_hash_module`): hash 89, then
//!   `hash = (hash * 113 + byte) % 6271` over the first three octets of IPv4
//!   (all 16 of IPv6), then a walk over the weights; an unusable peer
//!   rehashes, and after 20 tries it falls back to weighted round-robin;
//! - least_conn (`ngx_http_upstream_least_conn_module`): fewest active
//!   requests relative to weight, ties broken by smooth weighted round-robin.
//!
//! All strategies honour `down`, `max_fails`/`fail_timeout` and `backup`
//! (backups are a second tier used only when no primary can be picked).
//!
//! The pick state is one small `std::sync::Mutex` per tier, global across the
//! runtime's threads (so the sequence is Nginx's one-worker sequence). It is
//! only ever held inside [`Selector::pick`], [`Selector::release`] and the
//! drop of a least_conn [`Pick`], none of which awaits.
//!
//! least_conn counts, per tier, the requests that this selector picked and
//! that are not finished (a request finishes when its [`Pick`] is dropped,
//! after the response body). After a reload the new selector starts from
//! zero, as a new Nginx worker does (each worker counts its own
//! connections), while the failure marks carry over. The old selector's
//! picks keep their tier alive and finish there, even after the selector
//! itself is gone. `/status` and the metrics show every request to an
//! address, old selector and new.
//!
//! Nginx walks every peer on every pick, so its cost grows with the number of
//! upstreams. Spike gives the same answers without the walk where it can:
//! - smooth WRR and round-robin: while every peer is healthy at full weight,
//!   only the current weights decide, and the walk returns to the state it
//!   started from after at most about `total_weight` picks. Those calm picks
//!   are recorded once, and from then on a pick replays the next one. A
//!   failure, or a retry that must skip tried peers, writes the current
//!   weights out and hands back to the walk, which records again once calm.
//!   A test drives both side by side with a transcription of Nginx's C;
//! - ip_hash: the walk over the weights is a binary search over their
//!   running sums (the same peer for every hash);
//! - least_conn: its tie-break advances only the tied peers, whose set
//!   changes with every pick and release, so there is no fixed order to
//!   replay. Instead the peers that are healthy at full weight are kept
//!   sorted, per weight, into levels by their count, each level a heap on
//!   the current weight. The lowest level of each weight holds its lowest
//!   `count / weight`, so the minimum and the peers tied at it are found
//!   across the weights, and a tie-break round is counted once per level
//!   instead of added to each peer. Peers that may be failed, are warming
//!   up after a failure, or were tried by the attempt stay out ("loose")
//!   and are looked at one by one, as the walk does. A pick or a finished
//!   request costs O(distinct weights + log n + loose peers); tiers of a few
//!   peers just walk. A test drives it side by side with a transcription of
//!   Nginx's C through failures, retries and requests that finish in any
//!   order.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Strategy;

use super::upstream::{LiveState, Upstream};

/// How many times ip_hash rehashes before it falls back to round-robin.
const IP_HASH_TRIES: u32 = 20;

/// Longest smooth-WRR cycle recorded (4 bytes a pick): 1 MiB.
const MAX_CYCLE: u64 = 1 << 18;

/// Up to this many peers in a tier least_conn walks them, as Nginx does:
/// so few are walked faster than they are kept sorted (measured).
const LEAST_CONN_WALK_MAX: usize = 6;

/// `Levels::set_of` of a `down` peer, which is in no level.
const NO_SET: u32 = u32::MAX;

/// Rounds a level counts before it folds them into its bases, so that
/// weight × rounds stays far inside 64 bits (weights are at most 10^6).
#[cfg(not(test))]
const MAX_ROUNDS: i64 = 1 << 32;
/// Tests fold all the time, so that the differential test covers it.
#[cfg(test)]
const MAX_ROUNDS: i64 = 3;

/// The smooth weighted round-robin numbers of one peer (Nginx's
/// `current_weight` and `effective_weight`).
#[derive(Debug, Clone, Copy, Default)]
struct Smooth {
    current: i64,
    effective: i64,
}

impl Smooth {
    /// One peer's part of an Nginx smooth-WRR round: its current weight grows
    /// by its effective weight, and an effective weight lowered by failures
    /// climbs back one toward `weight`. Returns what it adds to the round's
    /// total.
    fn step(&mut self, weight: i64) -> i64 {
        self.current += self.effective;
        let added = self.effective;
        if self.effective < weight {
            self.effective += 1;
        }
        added
    }
}

/// A run of smooth-WRR picks that ends in the state it started from, so
/// that it repeats for as long as nothing but the current weights decides.
#[derive(Debug)]
struct Cycle {
    /// The current weights at the start.
    start: Vec<i64>,
    /// The peer picked at each position.
    order: Vec<u32>,
}

/// The picking state of a tier.
#[derive(Debug)]
struct PickState {
    /// Nginx's per-peer numbers; stale while `at` is `Some`, and for the
    /// peers least_conn keeps sorted.
    smooth: Vec<Smooth>,
    /// The last cycle recorded.
    cycle: Option<Cycle>,
    /// `Some(p)`: the state is that of `cycle` after `p` picks, and the next
    /// pick is `cycle.order[p]`.
    at: Option<usize>,
    /// The calm walk since `start`, until it comes back there.
    recording: Option<Cycle>,
    /// least_conn's counts and its sorted peers (empty for the others).
    lc: LeastConn,
}

/// least_conn's state of a tier.
#[derive(Debug, Default)]
struct LeastConn {
    /// Requests this selector picked for each peer and that are not finished
    /// (Nginx's `conns`): what least_conn compares.
    conns: Vec<u64>,
    /// The sorted peers (in tiers large enough for the fast path).
    levels: Levels,
    /// The peers (not `down`) kept out of `levels`, because they may fail
    /// (`fails >= max_fails`), are warming up after a failure (effective
    /// below weight), or were tried by the attempt at hand. Their weights
    /// are in `smooth`, and each pick looks at each of them, as the walk does.
    loose: Vec<u32>,
    /// Whether each peer is in `loose`.
    is_loose: Vec<bool>,
    /// The loose peers usable for the pick at hand (kept for its memory).
    usable: Vec<u32>,
}

/// least_conn's healthy peers sorted so that a pick needs no walk.
///
/// Nginx picks among the peers with the lowest `conns / weight` (a class),
/// and breaks ties by a smooth-WRR round over that class only. A class is
/// the union of "levels", one per weight: the peers of weight `w` with `c`
/// requests. A round adds `w` to the current weight of every healthy peer
/// of the class, so a level counts its rounds instead, and keeps of each
/// peer its `base` = current weight - `w` × rounds. Within a level the
/// largest base is the largest current weight; across the levels of a
/// class only the top of each can win. A pick or a finished request costs
/// O(distinct weights + log n).
#[derive(Debug, Default)]
struct Levels {
    /// One per distinct weight among the peers that are not `down`.
    sets: Vec<WeightSet>,
    /// The set of each peer (`NO_SET` for `down` peers).
    set_of: Vec<u32>,
    /// Each peer's position in its level's heap.
    pos: Vec<u32>,
}

/// The sorted peers of one weight, by how many requests they have.
#[derive(Debug)]
struct WeightSet {
    weight: i64,
    /// `levels[c]`: the peers with `c` requests.
    levels: Vec<Level>,
    /// How many peers the levels hold.
    members: usize,
    /// The lowest level that has a peer, when there is one: the only level
    /// of this weight that can be in the lowest class.
    low: usize,
}

/// The sorted peers of one weight with one number of requests.
#[derive(Debug, Default)]
struct Level {
    /// How many tie-break rounds these peers took part in (since the last
    /// fold, see `MAX_ROUNDS`).
    rounds: i64,
    /// A binary heap of peers, the largest base (then the lowest index, as
    /// Nginx's strict comparison keeps the first) on top.
    heap: Vec<Entry>,
}

/// A peer in a level's heap.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The peer's current weight minus its weight times the level's rounds.
    base: i64,
    peer: u32,
}

/// One least_conn pick, worked out before it is applied.
#[derive(Debug)]
struct Round {
    winner: usize,
    /// The winner's current weight after the round's additions.
    value: i64,
    /// Usable peers in the lowest class: with one, Nginx runs no tie-break.
    members: usize,
    /// The sum of their effective weights (the tie-break's total).
    total: i64,
    /// The class: `conns / weight`.
    conns: u64,
    weight: i64,
}

/// Nginx's comparison of `conns / weight`, cross-multiplied in unsigned
/// 64 bits as Nginx does (weights are at most 1,000,000).
fn ratio_cmp(c1: u64, w1: i64, c2: u64, w2: i64) -> std::cmp::Ordering {
    (c1 * w2 as u64).cmp(&(c2 * w1 as u64))
}

impl Round {
    /// Whether a peer with these numbers is in the round's class.
    fn holds(&self, conns: u64, weight: i64) -> bool {
        ratio_cmp(conns, weight, self.conns, self.weight).is_eq()
    }

    /// Offers some usable peers of one class, as a round of their own: a
    /// lower class starts the round afresh, the same class joins it, where
    /// the leader has the largest current weight, or the same and a lower
    /// index.
    fn offer(round: &mut Option<Round>, more: Round) {
        let Some(r) = round else {
            *round = Some(more);
            return;
        };
        match ratio_cmp(more.conns, more.weight, r.conns, r.weight) {
            std::cmp::Ordering::Less => *r = more,
            std::cmp::Ordering::Equal => {
                if more.value > r.value || (more.value == r.value && more.winner < r.winner) {
                    r.winner = more.winner;
                    r.value = more.value;
                }
                r.members += more.members;
                r.total += more.total;
            }
            std::cmp::Ordering::Greater => {}
        }
    }
}

/// Whether entry `a` sits above entry `b` in a level's heap. Without
/// short-circuits: the outcome is a coin toss, which a branch would mispredict.
fn above(a: Entry, b: Entry) -> bool {
    (a.base > b.base) | ((a.base == b.base) & (a.peer < b.peer))
}

impl Level {
    fn sift_up(&mut self, pos: &mut [u32], mut k: usize) {
        let item = self.heap[k];
        while k > 0 {
            let parent = (k - 1) / 2;
            if !above(item, self.heap[parent]) {
                break;
            }
            self.heap[k] = self.heap[parent];
            pos[self.heap[k].peer as usize] = k as u32;
            k = parent;
        }
        self.heap[k] = item;
        pos[item.peer as usize] = k as u32;
    }

    fn push(&mut self, pos: &mut [u32], entry: Entry) {
        self.heap.push(entry);
        self.sift_up(pos, self.heap.len() - 1);
    }

    /// Takes peer `i` out (it must be in this level); returns its base.
    /// The hole it leaves sinks to the bottom along the larger children,
    /// and the last entry fills it from there (Floyd's way: the last entry
    /// mostly belongs near the bottom, so this saves a comparison a level).
    fn remove(&mut self, pos: &mut [u32], i: usize) -> i64 {
        let mut k = pos[i] as usize;
        let base = self.heap[k].base;
        let last = self.heap.pop().expect("a peer is in the level it leaves");
        let n = self.heap.len();
        if k == n {
            return base;
        }
        loop {
            let left = 2 * k + 1;
            if left >= n {
                break;
            }
            let right = left + 1;
            let child = left + usize::from(right < n && above(self.heap[right], self.heap[left]));
            self.heap[k] = self.heap[child];
            pos[self.heap[k].peer as usize] = k as u32;
            k = child;
        }
        self.heap[k] = last;
        self.sift_up(pos, k);
        base
    }

    /// One more tie-break round for these peers of weight `w`.
    fn round(&mut self, w: i64) {
        self.rounds += 1;
        if self.rounds == MAX_ROUNDS {
            // The same shift for every base keeps the heap in order.
            for e in &mut self.heap {
                e.base += w * self.rounds;
            }
            self.rounds = 0;
        }
    }
}

impl Levels {
    /// The sets of a tier's peers, with no peer in them yet.
    fn new(weights: &[i64], down: impl Fn(usize) -> bool) -> Levels {
        let mut sets: Vec<WeightSet> = Vec::new();
        let set_of = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                if down(i) {
                    return NO_SET;
                }
                match sets.iter().position(|s| s.weight == w) {
                    Some(s) => s as u32,
                    None => {
                        sets.push(WeightSet {
                            weight: w,
                            levels: Vec::new(),
                            members: 0,
                            low: 0,
                        });
                        (sets.len() - 1) as u32
                    }
                }
            })
            .collect();
        Levels {
            sets,
            set_of,
            pos: vec![0; weights.len()],
        }
    }

    /// Puts peer `i` in the level of its count, with that current weight.
    fn insert(&mut self, conns: &[u64], i: usize, current: i64) {
        let set = &mut self.sets[self.set_of[i] as usize];
        let c = conns[i] as usize;
        if set.levels.len() <= c {
            set.levels.resize_with(c + 1, Level::default);
        }
        let level = &mut set.levels[c];
        let entry = Entry {
            base: current - set.weight * level.rounds,
            peer: i as u32,
        };
        level.push(&mut self.pos, entry);
        set.low = if set.members == 0 { c } else { set.low.min(c) };
        set.members += 1;
    }

    /// Takes peer `i` out of its level; returns its current weight.
    fn remove(&mut self, conns: &[u64], i: usize) -> i64 {
        let set = &mut self.sets[self.set_of[i] as usize];
        let c = conns[i] as usize;
        let level = &mut set.levels[c];
        let current = level.remove(&mut self.pos, i) + set.weight * level.rounds;
        set.members -= 1;
        if set.members > 0 && set.low == c && set.levels[c].heap.is_empty() {
            // Only failures and retries take a peer out, and the counts of
            // the peers of one weight are seldom far apart.
            set.low = (c + 1..set.levels.len())
                .find(|&l| !set.levels[l].heap.is_empty())
                .expect("a set with members has a level with a peer");
        }
        current
    }

    /// Moves peer `i` a level up (a pick, which took `taken` off its current
    /// weight) or down (a finished request).
    fn shift(&mut self, conns: &mut [u64], i: usize, up: bool, taken: i64) {
        let set = &mut self.sets[self.set_of[i] as usize];
        let c = conns[i] as usize;
        let level = &mut set.levels[c];
        let current = level.remove(&mut self.pos, i) + set.weight * level.rounds - taken;
        set.members -= 1;
        if set.low == c && set.levels[c].heap.is_empty() {
            // Up, the peer is the one above; down, `insert` lowers it.
            set.low = c + 1;
        }
        if up {
            conns[i] += 1;
        } else {
            conns[i] -= 1;
        }
        self.insert(conns, i, current);
    }
}

/// One set of peers: the primaries, or the backups.
#[derive(Debug)]
struct Tier {
    peers: Vec<Upstream>,
    /// The weight each peer counts with (1 for plain round-robin).
    weights: Vec<i64>,
    /// Sum of `weights`, down peers included, as Nginx's `total_weight`.
    total_weight: u64,
    /// Running sums of `weights`: `ends[i]` is the sum up to and with `i`.
    ends: Vec<u64>,
    /// Sum of the weights of the peers that are not `down`.
    up_weight: i64,
    /// How many picks a recording may take before it starts again.
    max_recording: u64,
    /// least_conn only: whether the tier has enough peers for the fast path.
    lc_fast: bool,
    state: Mutex<PickState>,
}

impl Tier {
    /// `walk_max`: up to how many peers least_conn always walks.
    fn new(peers: Vec<Upstream>, strategy: Strategy, walk_max: usize) -> Tier {
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

    fn lock(&self) -> MutexGuard<'_, PickState> {
        // The state is a few integers; a panic elsewhere cannot leave it in a
        // state worse than "slightly unfair", so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether peer `i` may be picked now (not tried, not down, not failed).
    fn usable(&self, i: usize, tried: &Tried, now: u64) -> bool {
        let p = &self.peers[i];
        !tried.has(i) && !p.config.down && !p.is_failed(now)
    }

    /// Whether every peer that is not `down` is healthy at full weight: then
    /// nothing but the current weights decides the picks, and a cycle
    /// recorded in such a calm replays them.
    fn calm(&self, smooth: &[Smooth], now: u64) -> bool {
        smooth
            .iter()
            .zip(&self.weights)
            .zip(&self.peers)
            .all(|((s, &w), p)| p.config.down || (s.effective == w && !p.is_failed(now)))
    }

    /// Writes out the current weights of the cycle position the state is at,
    /// so that the walk can take over: from the cycle's start, `p` picks of
    /// which `k` went to peer `i` have added `p * w` and taken `k * total`.
    fn materialize(&self, st: &mut PickState) {
        let (Some(p), Some(cycle)) = (st.at.take(), &st.cycle) else {
            return;
        };
        for (i, s) in st.smooth.iter_mut().enumerate() {
            let gained = if self.peers[i].config.down {
                0
            } else {
                self.weights[i]
            };
            s.current = cycle.start[i] + p as i64 * gained;
            s.effective = self.weights[i];
        }
        for &i in &cycle.order[..p] {
            st.smooth[i as usize].current -= self.up_weight;
        }
    }

    /// Nginx's `ngx_http_upstream_get_peer`, replayed from the recorded
    /// cycle when the state allows it.
    fn smooth(&self, st: &mut PickState, tried: &Tried, now: u64) -> Option<usize> {
        if let (Some(p), Some(cycle)) = (st.at, &st.cycle) {
            let i = cycle.order[p] as usize;
            // Failure marks are shared with the selector of the previous
            // config, whose release may mark a peer behind this one's back.
            if tried.is_empty() && !self.peers[i].is_failed(now) {
                st.at = Some((p + 1) % cycle.order.len());
                return Some(i);
            }
            self.materialize(st);
        }
        if !tried.is_empty() || !self.calm(&st.smooth, now) {
            st.recording = None;
            return self.walk(&mut st.smooth, tried, now);
        }
        let recording = st.recording.get_or_insert_with(|| Cycle {
            start: st.smooth.iter().map(|s| s.current).collect(),
            order: Vec::new(),
        });
        let b = self.walk(&mut st.smooth, tried, now)?;
        recording.order.push(b as u32);
        if st
            .smooth
            .iter()
            .zip(&recording.start)
            .all(|(s, &c)| s.current == c)
        {
            st.cycle = st.recording.take();
            st.at = Some(0);
        } else if recording.order.len() as u64 > self.max_recording {
            // Not back yet: the start may lie before the states repeat;
            // start again from a later state.
            st.recording = None;
        }
        Some(b)
    }

    /// Nginx's walk: every usable peer gains its effective weight, the
    /// largest current weight wins and loses the round's total.
    fn walk(&self, state: &mut [Smooth], tried: &Tried, now: u64) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut total: i64 = 0;
        for i in 0..self.peers.len() {
            if !self.usable(i, tried, now) {
                continue;
            }
            total += state[i].step(self.weights[i]);
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

    /// Makes peer `i`'s weights plain numbers in `smooth` (where the walk
    /// and the loose peers keep them), before a failure changes them or
    /// shuts the peer's window: the cycle is written out, and least_conn
    /// takes the peer out of its levels.
    fn detach(&self, st: &mut PickState, i: usize) {
        self.materialize(st);
        if self.lc_fast {
            Self::loosen(&mut st.smooth, &mut st.lc, i);
        }
    }

    /// Whether peer `i` can be failed: only such a peer's usability depends
    /// on the clock, so it stays loose, where each pick looks at it.
    fn suspect(&self, i: usize) -> bool {
        let p = &self.peers[i];
        p.config.max_fails != 0 && p.live.fails.load(Ordering::Relaxed) >= p.config.max_fails
    }

    /// Takes peer `i` out of the levels (if it is in them).
    fn loosen(smooth: &mut [Smooth], lc: &mut LeastConn, i: usize) {
        if lc.levels.set_of[i] == NO_SET || lc.is_loose[i] {
            return;
        }
        smooth[i].current = lc.levels.remove(&lc.conns, i);
        lc.is_loose[i] = true;
        lc.loose.push(i as u32);
    }

    /// Sorts back the loose peers that need not be loose any more, and
    /// takes out those the attempt tried.
    fn settle(&self, smooth: &mut [Smooth], lc: &mut LeastConn, tried: &Tried) {
        let mut k = 0;
        while k < lc.loose.len() {
            let i = lc.loose[k] as usize;
            if tried.has(i) || smooth[i].effective < self.weights[i] || self.suspect(i) {
                k += 1;
                continue;
            }
            lc.loose.swap_remove(k);
            lc.is_loose[i] = false;
            lc.levels.insert(&lc.conns, i, smooth[i].current);
        }
        for i in tried.iter() {
            Self::loosen(smooth, lc, i);
        }
    }

    /// Nginx's least_conn: fewest requests relative to weight; ties by
    /// smooth WRR. Counts the pick.
    fn least_conn(&self, st: &mut PickState, tried: &Tried, now: u64) -> Option<usize> {
        if self.lc_fast {
            return self.least_conn_fast(st, tried, now);
        }
        let b = self.least_conn_walk(&mut st.smooth, &st.lc.conns, tried, now)?;
        st.lc.conns[b] += 1;
        Some(b)
    }

    /// The walk's pick, worked out from the sorted peers and the loose ones.
    fn least_conn_fast(&self, st: &mut PickState, tried: &Tried, now: u64) -> Option<usize> {
        let PickState { smooth, lc, .. } = st;
        self.settle(smooth, lc, tried);
        lc.usable.clear();
        for &i in &lc.loose {
            if !tried.has(i as usize) && !self.peers[i as usize].is_failed(now) {
                lc.usable.push(i);
            }
        }
        loop {
            let round = self.least_conn_round(smooth, lc)?;
            let i = round.winner;
            // Failure marks are shared with the selector of the previous
            // config, whose release may mark a peer behind this one's back.
            if !lc.is_loose[i] && self.peers[i].is_failed(now) {
                Self::loosen(smooth, lc, i);
                continue;
            }
            let many = round.members > 1;
            let mut taken = 0;
            if many {
                for set in &mut lc.levels.sets {
                    if set.members > 0 && round.holds(set.low as u64, set.weight) {
                        set.levels[set.low].round(set.weight);
                    }
                }
                for &j in &lc.usable {
                    let j = j as usize;
                    if round.holds(lc.conns[j], self.weights[j]) {
                        smooth[j].step(self.weights[j]);
                    }
                }
                taken = round.total;
            }
            if lc.is_loose[i] {
                smooth[i].current -= taken;
                lc.conns[i] += 1;
            } else {
                lc.levels.shift(&mut lc.conns, i, true, taken);
            }
            return Some(i);
        }
    }

    /// Works out the next least_conn pick: the lowest class among the
    /// lowest level of each set and the usable loose peers, and the winner
    /// of its tie-break one round later.
    fn least_conn_round(&self, smooth: &[Smooth], lc: &LeastConn) -> Option<Round> {
        let mut round: Option<Round> = None;
        for set in &lc.levels.sets {
            if set.members == 0 {
                continue;
            }
            let level = &set.levels[set.low];
            let top = level.heap[0];
            let size = level.heap.len();
            let more = Round {
                winner: top.peer as usize,
                value: top.base + set.weight * (level.rounds + 1),
                members: size,
                total: size as i64 * set.weight,
                conns: set.low as u64,
                weight: set.weight,
            };
            Round::offer(&mut round, more);
        }
        for &i in &lc.usable {
            let i = i as usize;
            let s = smooth[i];
            let more = Round {
                winner: i,
                value: s.current + s.effective,
                members: 1,
                total: s.effective,
                conns: lc.conns[i],
                weight: self.weights[i],
            };
            Round::offer(&mut round, more);
        }
        round
    }

    /// Nginx's `ngx_http_upstream_get_least_conn_peer` as written: the
    /// lowest `conns / weight` (cross-multiplied), and when several peers
    /// share it a smooth-WRR round over those only, from the first of them.
    fn least_conn_walk(
        &self,
        state: &mut [Smooth],
        conns: &[u64],
        tried: &Tried,
        now: u64,
    ) -> Option<usize> {
        // Unsigned 64-bit products, as Nginx's (weights are at most 10^6).
        let active = |i: usize| conns[i];
        let weight = |i: usize| self.weights[i] as u64;
        let mut best: Option<usize> = None;
        let mut many = false;
        for i in 0..self.peers.len() {
            if !self.usable(i, tried, now) {
                continue;
            }
            match best {
                None => best = Some(i),
                Some(b) => {
                    let (lhs, rhs) = (active(i) * weight(b), active(b) * weight(i));
                    if lhs < rhs {
                        best = Some(i);
                        many = false;
                    } else if lhs == rhs {
                        many = true;
                    }
                }
            }
        }
        let mut b = best?;
        if many {
            let first = b;
            let mut total: i64 = 0;
            for i in first..self.peers.len() {
                if !self.usable(i, tried, now)
                    || active(i) * weight(first) != active(first) * weight(i)
                {
                    continue;
                }
                total += state[i].step(self.weights[i]);
                if state[i].current > state[b].current {
                    b = i;
                }
            }
            state[b].current -= total;
        }
        Some(b)
    }

    /// A request least_conn counted has finished (its [`Pick`] is dropped).
    fn finish(&self, i: usize) {
        let mut st = self.lock();
        let lc = &mut st.lc;
        debug_assert!(lc.conns[i] > 0, "peer {i} finished more than it took");
        if lc.conns[i] == 0 {
            return;
        }
        if self.lc_fast && !lc.is_loose[i] {
            lc.levels.shift(&mut lc.conns, i, false, 0);
        } else {
            lc.conns[i] -= 1;
        }
    }

    /// Nginx's ip_hash walk; `None` means "fall back to round-robin".
    fn ip_hash(&self, attempt: &mut Attempt, now: u64) -> Option<usize> {
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

/// Which peers one request already tried, like Nginx's `tried` bitmap. The
/// first 128 peers need no allocation.
#[derive(Debug, Default)]
struct Tried {
    low: u128,
    high: Vec<u64>,
}

impl Tried {
    fn has(&self, i: usize) -> bool {
        if i < 128 {
            return self.low & (1u128 << i) != 0;
        }
        let j = i - 128;
        self.high
            .get(j / 64)
            .is_some_and(|w| w & (1u64 << (j % 64)) != 0)
    }

    fn set(&mut self, i: usize) {
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

    fn is_empty(&self) -> bool {
        self.low == 0 && self.high.iter().all(|&w| w == 0)
    }

    /// The peers tried, in order.
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
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

    fn clear(&mut self) {
        self.low = 0;
        self.high.clear();
    }
}

/// The per-request picking state (Nginx's per-request peer data): which
/// tier is in use, which peers were tried, and ip_hash's running hash.
#[derive(Debug)]
pub struct Attempt {
    tier: usize,
    tried: Tried,
    key: [u8; 16],
    key_len: u8,
    hash: u32,
    hash_tries: u32,
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
            tier: 0,
            tried: Tried::default(),
            key,
            key_len,
            hash: 89,
            hash_tries: 0,
        }
    }

    fn key(&self) -> &[u8] {
        &self.key[..self.key_len as usize]
    }
}

/// A picked upstream. While it lives, the upstream counts one more active
/// request: in its live state for `/status`, and under least_conn in the
/// tier it was picked from, which is what least_conn compares.
pub struct Pick {
    tier: usize,
    index: usize,
    /// The tier it came from, kept alive so that the drop can count the
    /// request finished there even after a reload dropped the selector.
    owner: Arc<Tier>,
    /// Whether the tier counted it (least_conn with more than one peer).
    counted: bool,
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
    }
}

/// The upstreams of one config version and how to pick among them.
#[derive(Debug)]
pub struct Selector {
    strategy: Strategy,
    /// Shared with the picks taken from them (see [`Pick`]).
    tiers: Vec<Arc<Tier>>,
    /// One primary and no backup: Nginx then skips failure accounting.
    single: bool,
    /// (tier, index) of each upstream in file order, for `/status`.
    order: Vec<(usize, usize)>,
}

impl Selector {
    /// Builds a selector over `upstreams` (file order matters: it is the
    /// order Nginx walks peers in).
    pub fn new(strategy: Strategy, upstreams: Vec<Upstream>) -> Selector {
        Selector::build(strategy, upstreams, LEAST_CONN_WALK_MAX)
    }

    /// `new` with the size up to which least_conn walks (tests lower it to
    /// drive the fast path with few peers).
    fn build(strategy: Strategy, upstreams: Vec<Upstream>, walk_max: usize) -> Selector {
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
        }
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
                live.active.fetch_add(1, Ordering::Relaxed);
                live.requests.fetch_add(1, Ordering::Relaxed);
                return Some(Pick {
                    tier: attempt.tier,
                    index: i,
                    owner: tier.clone(),
                    counted: self.strategy == Strategy::LeastConn && !self.single,
                });
            }
            if attempt.tier + 1 < self.tiers.len() {
                attempt.tier += 1;
                attempt.tried.clear();
                continue;
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
            live.fails.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    fn up(port: u16, weight: u32) -> UpstreamConfig {
        UpstreamConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            backup: false,
            down: false,
        }
    }

    fn upstreams(ups: Vec<UpstreamConfig>) -> Vec<Upstream> {
        ups.into_iter()
            .map(|c| {
                let live = Arc::new(LiveState::new(c.addr));
                Upstream::new(c, live)
            })
            .collect()
    }

    fn selector(strategy: Strategy, ups: Vec<UpstreamConfig>) -> Selector {
        Selector::new(strategy, upstreams(ups))
    }

    fn port(s: &Selector, p: &Pick) -> u16 {
        s.upstream(p).config.addr.port()
    }

    fn one(s: &Selector, now: u64) -> u16 {
        let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let p = s.pick(&mut a, now).expect("a peer");
        port(s, &p)
    }

    /// The smooth WRR sequence computed by hand from Nginx's rule for
    /// weights a=1, b=2, c=3, d=4 (see the balancer tests for the table).
    const NGINX_1234: [u16; 10] = [4, 3, 2, 4, 1, 3, 4, 2, 3, 4];

    #[test]
    fn smooth_weighted_follows_nginx_sequence() {
        let s = selector(
            Strategy::WeightedRoundRobin,
            vec![up(1, 1), up(2, 2), up(3, 3), up(4, 4)],
        );
        let picks: Vec<u16> = (0..20).map(|_| one(&s, 0)).collect();
        assert_eq!(&picks[..10], &NGINX_1234);
        assert_eq!(&picks[10..], &NGINX_1234);
    }

    #[test]
    fn round_robin_ignores_weights() {
        let s = selector(Strategy::RoundRobin, vec![up(1, 1), up(2, 5), up(3, 9)]);
        let picks: Vec<u16> = (0..6).map(|_| one(&s, 0)).collect();
        assert_eq!(picks, vec![1, 2, 3, 1, 2, 3]);
    }

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

    #[test]
    fn least_conn_prefers_fewest_active_relative_to_weight() {
        let s = selector(Strategy::LeastConn, vec![up(1, 1), up(2, 1), up(3, 2)]);
        let mut held = Vec::new();
        // Ties start as smooth WRR: weight 2 wins first.
        let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        held.push(s.pick(&mut a, 0).expect("peer"));
        assert_eq!(port(&s, &held[0]), 3);
        // 3 has 1 active of weight 2 (0.5); 1 and 2 have 0: one of them next.
        let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let p = s.pick(&mut a, 0).expect("peer");
        assert_ne!(port(&s, &p), 3);
        held.push(p);
        let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let p = s.pick(&mut a, 0).expect("peer");
        assert_ne!(port(&s, &p), port(&s, &held[1]));
        held.push(p);
        // Now 1,1 and 1/2: peer 3 is least loaded.
        let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(port(&s, &s.pick(&mut a, 0).expect("peer")), 3);
        drop(held);
        for u in s.upstreams() {
            assert_eq!(u.live.active.load(Ordering::Relaxed), 0);
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

    /// An independent transcription of Nginx's `ngx_http_upstream_get_peer`
    /// and `ngx_http_upstream_free_round_robin_peer` for one tier, with the
    /// all-failed reset of `ngx_http_upstream_get_round_robin_peer`.
    struct NginxRoundRobin {
        weight: Vec<i64>,
        down: Vec<bool>,
        max_fails: Vec<u32>,
        fail_timeout: u64,
        current: Vec<i64>,
        effective: Vec<i64>,
        fails: Vec<u32>,
        checked: Vec<u64>,
        accessed: Vec<u64>,
    }

    impl NginxRoundRobin {
        /// `n` peers, weights and limits to be filled in by the test.
        fn new(n: usize, fail_timeout: u64) -> NginxRoundRobin {
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

        fn get_peer(&mut self, tried: &[bool], now: u64) -> Option<usize> {
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

        fn free(&mut self, i: usize, failed: bool, now: u64) {
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
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// The cycle, its write-out on failures and retries, and the return to
    /// it give exactly Nginx's picks, through failures, retries, down peers,
    /// failure windows that open and close, and probes answered late.
    #[test]
    fn fast_smooth_wrr_picks_exactly_what_nginx_walks() {
        let mut rng = Lcg(7);
        let mut on_cycle = 0u32;
        let mut picks = 0u32;
        for case in 0..300 {
            // Now and then many peers, past the 128 that Tried keeps inline.
            let n = if case % 50 == 0 {
                150
            } else {
                2 + rng.below(9) as usize
            };
            let strategy = if case % 3 == 0 {
                Strategy::RoundRobin
            } else {
                Strategy::WeightedRoundRobin
            };
            let fail_timeout = 1000;
            let mut model = NginxRoundRobin::new(n, fail_timeout);
            let mut ups = Vec::new();
            for i in 0..n {
                let mut u = up(i as u16 + 1, 1 + rng.below(5) as u32);
                u.down = rng.below(8) == 0;
                u.max_fails = rng.below(4) as u32;
                u.fail_timeout = Duration::from_millis(fail_timeout);
                model.weight[i] = if strategy == Strategy::RoundRobin {
                    1
                } else {
                    u.weight as i64
                };
                model.effective[i] = model.weight[i];
                model.down[i] = u.down;
                model.max_fails[i] = u.max_fails;
                ups.push(u);
            }
            let s = selector(strategy, ups);
            let mut now = 1;
            // Successful picks whose response is still on its way: a probe
            // of a peer whose window closed is answered only later, and
            // other picks must skip that peer meanwhile.
            let mut held: Vec<(usize, Pick)> = Vec::new();
            for step in 0..600 {
                now += rng.below(40);
                while !held.is_empty() && rng.below(3) == 0 {
                    let (i, pick) = held.swap_remove(rng.below(held.len() as u64) as usize);
                    s.release(&pick, false, now);
                    model.free(i, false, now);
                }
                let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
                let mut tried = vec![false; n];
                loop {
                    if step >= 400 {
                        picks += 1;
                        on_cycle += u32::from(s.tiers[0].lock().at.is_some());
                    }
                    let got = s.pick(&mut a, now).map(|p| (p.index, p));
                    let want = model.get_peer(&tried, now);
                    assert_eq!(got.as_ref().map(|g| g.0), want, "case {case} step {step}");
                    let Some((i, pick)) = got else { break };
                    tried[i] = true;
                    // Failures in the first third, then a calm in which
                    // every failure window closes.
                    let failed = step < 200 && rng.below(25) == 0;
                    if !failed && rng.below(2) == 0 {
                        held.push((i, pick));
                        break;
                    }
                    s.release(&pick, failed, now);
                    model.free(i, failed, now);
                    if !failed {
                        break;
                    }
                }
            }
        }
        // Long after the last failure, picks must come from the cycle again,
        // or the return to it is not working.
        assert!(
            on_cycle * 10 > picks * 9,
            "{on_cycle} of {picks} calm picks from the cycle"
        );
    }

    /// An independent transcription of Nginx's
    /// `ngx_http_upstream_get_least_conn_peer`, over the round-robin peers
    /// (whose `free` does the failure accounting).
    struct NginxLeastConn {
        rr: NginxRoundRobin,
        conns: Vec<u64>,
    }

    impl NginxLeastConn {
        fn get_peer(&mut self, tried: &[bool], now: u64) -> Option<usize> {
            let rr = &mut self.rr;
            let usable = |rr: &NginxRoundRobin, i: usize| {
                !(tried[i]
                    || rr.down[i]
                    || rr.max_fails[i] != 0
                        && rr.fails[i] >= rr.max_fails[i]
                        && now - rr.checked[i] <= rr.fail_timeout)
            };
            let conns = &self.conns;
            let mut best: Option<usize> = None;
            let mut many = false;
            let mut p = 0;
            for i in 0..tried.len() {
                if !usable(rr, i) {
                    continue;
                }
                let lower = best.is_none_or(|b| {
                    conns[i] * (rr.weight[b] as u64) < conns[b] * (rr.weight[i] as u64)
                });
                if lower {
                    best = Some(i);
                    many = false;
                    p = i;
                } else if let Some(b) = best
                    && conns[i] * (rr.weight[b] as u64) == conns[b] * (rr.weight[i] as u64)
                {
                    many = true;
                }
            }
            let Some(mut best) = best else {
                // "all peers failed, mark them as live for quick recovery"
                rr.fails.iter_mut().for_each(|f| *f = 0);
                return None;
            };
            let mut total = 0;
            if many {
                for i in p..tried.len() {
                    if conns[i] * (rr.weight[best] as u64) != conns[best] * (rr.weight[i] as u64)
                        || !usable(rr, i)
                    {
                        continue;
                    }
                    rr.current[i] += rr.effective[i];
                    total += rr.effective[i];
                    if rr.effective[i] < rr.weight[i] {
                        rr.effective[i] += 1;
                    }
                    if rr.current[i] > rr.current[best] {
                        best = i;
                    }
                }
            }
            rr.current[best] -= total;
            if now - rr.checked[best] > rr.fail_timeout {
                rr.checked[best] = now;
            }
            self.conns[best] += 1;
            Some(best)
        }

        /// Nginx's `free` lowers `conns` and accounts the failure at once;
        /// spike accounts at `release` and lowers its count when the `Pick`
        /// is dropped (after the body), so the model splits them the same.
        fn done(&mut self, i: usize) {
            self.conns[i] -= 1;
        }
    }

    /// The current and effective weights as the walk would see them, and
    /// the counts.
    fn least_conn_state(s: &Selector) -> (Vec<i64>, Vec<i64>, Vec<u64>) {
        let t = &s.tiers[0];
        let st = t.lock();
        let lc = &st.lc;
        let current = (0..t.peers.len())
            .map(|i| {
                if t.lc_fast && lc.levels.set_of[i] != NO_SET && !lc.is_loose[i] {
                    assert_eq!(
                        st.smooth[i].effective, t.weights[i],
                        "sorted at full weight"
                    );
                    let levels = &lc.levels;
                    let set = &levels.sets[levels.set_of[i] as usize];
                    let level = &set.levels[lc.conns[i] as usize];
                    level.heap[levels.pos[i] as usize].base + set.weight * level.rounds
                } else {
                    st.smooth[i].current
                }
            })
            .collect();
        let effective = st.smooth.iter().map(|s| s.effective).collect();
        (current, effective, lc.conns.clone())
    }

    /// The sorted peers, their lazy rounds and the return to them give
    /// exactly Nginx's picks (and current weights) through weights of all
    /// kinds, down peers, failures, retries, failure windows that open and
    /// close, and requests that stay open for a while and finish in any
    /// order, so counts rise and fall.
    #[test]
    fn fast_least_conn_picks_exactly_what_nginx_walks() {
        let mut rng = Lcg(11);
        let mut fast = 0u32;
        let mut loose = 0u64;
        let mut peers = 0u64;
        let mut picks = 0u32;
        for case in 0..300 {
            // Now and then many peers, past the 128 that Tried keeps inline.
            let n = match case % 50 {
                0 => 150,
                25 => 40,
                _ => 2 + rng.below(12) as usize,
            };
            // All equal, a few, or many distinct weights.
            let max_weight = [1, 5, 5, 40][case % 4];
            // Mostly the fast path at every size; now and then the walk
            // for few peers, as in production.
            let walk_max = if case % 7 == 0 {
                LEAST_CONN_WALK_MAX
            } else {
                0
            };
            let fail_timeout = 1000;
            let mut model = NginxLeastConn {
                rr: NginxRoundRobin::new(n, fail_timeout),
                conns: vec![0; n],
            };
            let mut ups = Vec::new();
            for i in 0..n {
                let mut u = up(i as u16 + 1, 1 + rng.below(max_weight) as u32);
                u.down = rng.below(8) == 0;
                u.max_fails = rng.below(4) as u32;
                u.fail_timeout = Duration::from_millis(fail_timeout);
                model.rr.weight[i] = u.weight as i64;
                model.rr.effective[i] = u.weight as i64;
                model.rr.down[i] = u.down;
                model.rr.max_fails[i] = u.max_fails;
                ups.push(u);
            }
            let s = Selector::build(Strategy::LeastConn, upstreams(ups), walk_max);
            let mut now = 1;
            // Requests whose response is still on its way, and whether their
            // headers came (then `release` has run).
            let mut held: Vec<(usize, Pick, bool)> = Vec::new();
            for step in 0..800 {
                now += rng.below(40);
                // Load rises and falls in waves, so counts go up and down.
                let busy = (step / 50) % 2 == 0;
                let finish_odds = if busy { 4 } else { 2 };
                while !held.is_empty() && rng.below(finish_odds) == 0 {
                    let (i, pick, released) =
                        held.swap_remove(rng.below(held.len() as u64) as usize);
                    if !released {
                        s.release(&pick, false, now);
                        model.rr.free(i, false, now);
                    }
                    drop(pick);
                    model.done(i);
                }
                let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
                let mut tried = vec![false; n];
                loop {
                    let got = s.pick(&mut a, now).map(|p| (p.index, p));
                    let want = model.get_peer(&tried, now);
                    assert_eq!(got.as_ref().map(|g| g.0), want, "case {case} step {step}");
                    let Some((i, pick)) = got else { break };
                    if step >= 500 && s.tiers[0].lc_fast {
                        let st = s.tiers[0].lock();
                        picks += 1;
                        fast += u32::from(!st.lc.is_loose[i]);
                        loose += st.lc.loose.len() as u64;
                        peers += (0..n).filter(|&i| !model.rr.down[i]).count() as u64;
                    }
                    tried[i] = true;
                    // Failures in the first part, then a calm in which every
                    // failure window closes.
                    let failed = step < 300 && rng.below(20) == 0;
                    if failed {
                        // As the proxy: released, dropped, then the retry.
                        s.release(&pick, true, now);
                        model.rr.free(i, true, now);
                        drop(pick);
                        model.done(i);
                        continue;
                    }
                    let released = rng.below(2) == 0;
                    if released {
                        s.release(&pick, false, now);
                        model.rr.free(i, false, now);
                    }
                    held.push((i, pick, released));
                    break;
                }
                let (current, effective, conns) = least_conn_state(&s);
                for i in (0..n).filter(|&i| !model.rr.down[i]) {
                    assert_eq!(
                        current[i], model.rr.current[i],
                        "case {case} step {step} peer {i}"
                    );
                    assert_eq!(
                        effective[i], model.rr.effective[i],
                        "case {case} step {step}"
                    );
                }
                assert_eq!(conns, model.conns, "case {case} step {step}");
            }
            drop(held);
            assert!(s.tiers[0].lock().lc.conns.iter().all(|&c| c == 0));
            for u in s.upstreams() {
                assert_eq!(u.live.active.load(Ordering::Relaxed), 0);
            }
        }
        // Long after the last failure, the peers must be sorted again and
        // win most picks from there, or the fast path is not working.
        assert!(
            fast * 10 > picks * 8 && loose * 8 < peers,
            "{fast} of {picks} calm picks from the sorted peers; {loose} of {peers} peers loose"
        );
    }

    /// A lone upstream is picked without the tier's lock (as Nginx's
    /// `single`), so its picks are not counted there, nor finished.
    #[test]
    fn least_conn_single_upstream_counts_nothing() {
        let s = selector(Strategy::LeastConn, vec![up(1, 3)]);
        let held: Vec<Pick> = (0..3)
            .map(|_| {
                let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
                s.pick(&mut a, 0).expect("peer")
            })
            .collect();
        assert_eq!(s.tiers[0].peers[0].live.active.load(Ordering::Relaxed), 3);
        drop(held);
        assert_eq!(s.tiers[0].lock().lc.conns, vec![0]);
        assert_eq!(s.tiers[0].peers[0].live.active.load(Ordering::Relaxed), 0);
    }

    /// The selector of the previous config shares the failure marks: a peer
    /// it marks failed is skipped by the new one, sorted or not.
    #[test]
    fn least_conn_skips_a_peer_the_previous_selector_failed() {
        let configs: Vec<UpstreamConfig> = (1..=3).map(|p| up(p, 1)).collect();
        let old = Selector::build(Strategy::LeastConn, upstreams(configs), 0);
        let carried: Vec<Upstream> = old.upstreams().cloned().collect();
        let new = Selector::build(Strategy::LeastConn, carried, 0);
        // Sorts the peers of the new selector.
        let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(port(&new, &new.pick(&mut a, 0).expect("peer")), 1);
        let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let p = old.pick(&mut a, 0).expect("peer");
        assert_eq!(port(&old, &p), 1);
        old.release(&p, true, 0);
        // Nginx's next picks without peer 1: 2 and 3 tie every time (each
        // pick is over before the next), and smooth WRR alternates them.
        let picks: Vec<u16> = (0..3)
            .map(|_| {
                let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
                port(&new, &new.pick(&mut a, 1).expect("peer"))
            })
            .collect();
        assert_eq!(picks, vec![2, 3, 2]);
    }

    /// A reload builds a new selector over the same live states; requests
    /// picked by the old one may finish after that, and after the old one is
    /// gone. They count in their own tier only, so the new selector starts
    /// from zero, as a new Nginx worker does.
    #[test]
    fn least_conn_picks_outlive_a_reload() {
        let configs: Vec<UpstreamConfig> = (1..=12).map(|p| up(p, 1 + p as u32 % 3)).collect();
        let old = Selector::build(Strategy::LeastConn, upstreams(configs.clone()), 0);
        let mut held = Vec::new();
        for _ in 0..20 {
            let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
            held.push(old.pick(&mut a, 0).expect("peer"));
        }
        let carried: Vec<Upstream> = old.upstreams().cloned().collect();
        let mut old = Some(old);
        let new = Selector::build(Strategy::LeastConn, carried, 0);
        let fresh = Selector::build(Strategy::LeastConn, upstreams(configs), 0);
        let mut new_held = Vec::new();
        for k in 0..30 {
            if k == 10 {
                old = None;
            }
            if k % 3 == 0 {
                held.pop();
            }
            let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
            let p = new.pick(&mut a, 0).expect("peer");
            let mut a = Attempt::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
            let q = fresh.pick(&mut a, 0).expect("peer");
            assert_eq!(p.index, q.index, "pick {k}");
            new_held.push((p, q));
        }
        assert!(old.is_none());
        drop(held);
        drop(new_held);
        for u in new.upstreams() {
            assert_eq!(u.live.active.load(Ordering::Relaxed), 0);
        }
        assert!(new.tiers[0].lock().lc.conns.iter().all(|&c| c == 0));
    }
}
