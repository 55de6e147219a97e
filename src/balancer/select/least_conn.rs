//! Nginx's least_conn (`ngx_http_upstream_least_conn_module`): fewest
//! active requests relative to weight, ties broken by a smooth-WRR round
//! over the tied peers; large tiers keep their healthy peers sorted.

use std::sync::atomic::Ordering;

use super::algorithm::Algorithm;
use super::attempt::Attempt;
use super::peers::{Peers, Tried};
use super::smooth::Smooth;

/// Up to this many peers in a tier least_conn walks them, as Nginx does:
/// so few are walked faster than they are kept sorted (measured).
pub(super) const LEAST_CONN_WALK_MAX: usize = 6;

/// `Levels::set_of` of a `down` peer, which is in no level.
pub(super) const NO_SET: u32 = u32::MAX;

/// Rounds a level counts before it folds them into its bases, so that
/// weight × rounds stays far inside 64 bits (weights are at most 10^6).
#[cfg(not(test))]
pub(super) const MAX_ROUNDS: i64 = 1 << 32;
/// Tests fold all the time, so that the differential test covers it.
#[cfg(test)]
pub(super) const MAX_ROUNDS: i64 = 3;

/// least_conn's state of a tier.
#[derive(Debug, Default)]
pub(super) struct LeastConn {
    /// Requests this selector picked for each peer and that are not finished
    /// (Nginx's `conns`): what least_conn compares.
    pub(super) conns: Vec<u64>,
    /// The sorted peers (in tiers large enough for the fast path).
    pub(super) levels: Levels,
    /// The peers (not `down`) kept out of `levels`, because they may fail
    /// (`fails >= max_fails`), are warming up after a failure (effective
    /// below weight), or were tried by the attempt at hand. Their weights
    /// are in `smooth`, and each pick looks at each of them, as the walk does.
    pub(super) loose: Vec<u32>,
    /// Whether each peer is in `loose`.
    pub(super) is_loose: Vec<bool>,
    /// The loose peers usable for the pick at hand (kept for its memory).
    pub(super) usable: Vec<u32>,
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
pub(super) struct Levels {
    /// One per distinct weight among the peers that are not `down`.
    pub(super) sets: Vec<WeightSet>,
    /// The set of each peer (`NO_SET` for `down` peers).
    pub(super) set_of: Vec<u32>,
    /// Each peer's position in its level's heap.
    pub(super) pos: Vec<u32>,
}

/// The sorted peers of one weight, by how many requests they have.
#[derive(Debug)]
pub(super) struct WeightSet {
    pub(super) weight: i64,
    /// `levels[c]`: the peers with `c` requests.
    pub(super) levels: Vec<Level>,
    /// How many peers the levels hold.
    pub(super) members: usize,
    /// The lowest level that has a peer, when there is one: the only level
    /// of this weight that can be in the lowest class.
    pub(super) low: usize,
}

/// The sorted peers of one weight with one number of requests.
#[derive(Debug, Default)]
pub(super) struct Level {
    /// How many tie-break rounds these peers took part in (since the last
    /// fold, see `MAX_ROUNDS`).
    pub(super) rounds: i64,
    /// A binary heap of peers, the largest base (then the lowest index, as
    /// Nginx's strict comparison keeps the first) on top.
    pub(super) heap: Vec<Entry>,
}

/// A peer in a level's heap.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    /// The peer's current weight minus its weight times the level's rounds.
    pub(super) base: i64,
    pub(super) peer: u32,
}

/// One least_conn pick, worked out before it is applied.
#[derive(Debug)]
pub(super) struct Round {
    pub(super) winner: usize,
    /// The winner's current weight after the round's additions.
    pub(super) value: i64,
    /// Usable peers in the lowest class: with one, Nginx runs no tie-break.
    pub(super) members: usize,
    /// The sum of their effective weights (the tie-break's total).
    pub(super) total: i64,
    /// The class: `conns / weight`.
    pub(super) conns: u64,
    pub(super) weight: i64,
}

/// Nginx's comparison of `conns / weight`, cross-multiplied in unsigned
/// 64 bits as Nginx does (weights are at most 1,000,000).
pub(super) fn ratio_cmp(c1: u64, w1: i64, c2: u64, w2: i64) -> std::cmp::Ordering {
    (c1 * w2 as u64).cmp(&(c2 * w1 as u64))
}

impl Round {
    /// Whether a peer with these numbers is in the round's class.
    pub(super) fn holds(&self, conns: u64, weight: i64) -> bool {
        ratio_cmp(conns, weight, self.conns, self.weight).is_eq()
    }

    /// Offers some usable peers of one class, as a round of their own: a
    /// lower class starts the round afresh, the same class joins it, where
    /// the leader has the largest current weight, or the same and a lower
    /// index.
    pub(super) fn offer(round: &mut Option<Round>, more: Round) {
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
pub(super) fn above(a: Entry, b: Entry) -> bool {
    (a.base > b.base) | ((a.base == b.base) & (a.peer < b.peer))
}

impl Level {
    pub(super) fn sift_up(&mut self, pos: &mut [u32], mut k: usize) {
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

    pub(super) fn push(&mut self, pos: &mut [u32], entry: Entry) {
        self.heap.push(entry);
        self.sift_up(pos, self.heap.len() - 1);
    }

    /// Takes peer `i` out (it must be in this level); returns its base.
    /// The hole it leaves sinks to the bottom along the larger children,
    /// and the last entry fills it from there (Floyd's way: the last entry
    /// mostly belongs near the bottom, so this saves a comparison a level).
    pub(super) fn remove(&mut self, pos: &mut [u32], i: usize) -> i64 {
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
    pub(super) fn round(&mut self, w: i64) {
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
    pub(super) fn new(weights: &[i64], down: impl Fn(usize) -> bool) -> Levels {
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
    pub(super) fn insert(&mut self, conns: &[u64], i: usize, current: i64) {
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
    pub(super) fn remove(&mut self, conns: &[u64], i: usize) -> i64 {
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
    pub(super) fn shift(&mut self, conns: &mut [u64], i: usize, up: bool, taken: i64) {
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

/// least_conn's state of a tier: the smooth-WRR numbers its tie-breaks
/// use, and its counts (sorted, in tiers large enough for the fast path).
#[derive(Debug)]
pub(super) struct LeastConnState {
    /// The tie-breaks' numbers; stale for the peers kept sorted.
    pub(super) smooth: Vec<Smooth>,
    pub(super) lc: LeastConn,
    /// Whether the tier has enough peers for the fast path.
    pub(super) fast: bool,
}

impl LeastConnState {
    /// `walk_max`: up to how many peers least_conn always walks.
    pub(super) fn new(peers: &Peers, walk_max: usize) -> LeastConnState {
        let fast = peers.len() > walk_max;
        let lc = if fast {
            // Every peer starts loose; the first pick sorts those that can be.
            let loose: Vec<u32> = (0..peers.len() as u32)
                .filter(|&i| !peers[i as usize].config.down)
                .collect();
            let mut is_loose = vec![false; peers.len()];
            loose.iter().for_each(|&i| is_loose[i as usize] = true);
            LeastConn {
                conns: vec![0; peers.len()],
                levels: Levels::new(&peers.weights, |i| peers[i].config.down),
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
        LeastConnState {
            smooth: Smooth::fresh(peers),
            lc,
            fast,
        }
    }

    /// The walk's pick, worked out from the sorted peers and the loose ones.
    fn pick_fast(&mut self, peers: &Peers, tried: &Tried, now: u64) -> Option<usize> {
        let LeastConnState { smooth, lc, .. } = self;
        settle(peers, smooth, lc, tried);
        lc.usable.clear();
        for &i in &lc.loose {
            if !tried.has(i as usize) && !peers[i as usize].is_failed(now) {
                lc.usable.push(i);
            }
        }
        loop {
            let round = next_round(peers, smooth, lc)?;
            let i = round.winner;
            // Failure marks are shared with the selector of the previous
            // config, whose release may mark a peer behind this one's back.
            if !lc.is_loose[i] && peers[i].is_failed(now) {
                loosen(smooth, lc, i);
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
                    if round.holds(lc.conns[j], peers.weights[j]) {
                        smooth[j].step(peers.weights[j]);
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
}

impl Algorithm for LeastConnState {
    /// Nginx's least_conn: fewest requests relative to weight; ties by
    /// smooth WRR. Counts the pick.
    fn pick(&mut self, peers: &Peers, attempt: &mut Attempt, now: u64) -> Option<usize> {
        if self.fast {
            return self.pick_fast(peers, &attempt.tried, now);
        }
        let b = walk(peers, &mut self.smooth, &self.lc.conns, &attempt.tried, now)?;
        self.lc.conns[b] += 1;
        Some(b)
    }

    /// Takes the peer out of the levels: its weights become plain numbers
    /// in `smooth`, where the walk and the loose peers keep them.
    fn detach(&mut self, _peers: &Peers, i: usize) {
        if self.fast {
            loosen(&mut self.smooth, &mut self.lc, i);
        }
    }

    fn fail(&mut self, peers: &Peers, i: usize, penalty: i64) {
        self.detach(peers, i);
        self.smooth[i].lower(penalty);
    }

    /// A request least_conn counted has finished (its pick is dropped).
    fn finish(&mut self, i: usize) {
        let lc = &mut self.lc;
        debug_assert!(lc.conns[i] > 0, "peer {i} finished more than it took");
        if lc.conns[i] == 0 {
            return;
        }
        if self.fast && !lc.is_loose[i] {
            lc.levels.shift(&mut lc.conns, i, false, 0);
        } else {
            lc.conns[i] -= 1;
        }
    }
}

/// Whether peer `i` can be failed: only such a peer's usability depends
/// on the clock, so it stays loose, where each pick looks at it.
fn suspect(peers: &Peers, i: usize) -> bool {
    let p = &peers[i];
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
fn settle(peers: &Peers, smooth: &mut [Smooth], lc: &mut LeastConn, tried: &Tried) {
    let mut k = 0;
    while k < lc.loose.len() {
        let i = lc.loose[k] as usize;
        if tried.has(i) || smooth[i].effective < peers.weights[i] || suspect(peers, i) {
            k += 1;
            continue;
        }
        lc.loose.swap_remove(k);
        lc.is_loose[i] = false;
        lc.levels.insert(&lc.conns, i, smooth[i].current);
    }
    for i in tried.iter() {
        loosen(smooth, lc, i);
    }
}

/// Works out the next least_conn pick: the lowest class among the
/// lowest level of each set and the usable loose peers, and the winner
/// of its tie-break one round later.
fn next_round(peers: &Peers, smooth: &[Smooth], lc: &LeastConn) -> Option<Round> {
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
            weight: peers.weights[i],
        };
        Round::offer(&mut round, more);
    }
    round
}

/// Nginx's `ngx_http_upstream_get_least_conn_peer` as written: the
/// lowest `conns / weight` (cross-multiplied), and when several peers
/// share it a smooth-WRR round over those only, from the first of them.
fn walk(
    peers: &Peers,
    state: &mut [Smooth],
    conns: &[u64],
    tried: &Tried,
    now: u64,
) -> Option<usize> {
    // Unsigned 64-bit products, as Nginx's (weights are at most 10^6).
    let active = |i: usize| conns[i];
    let weight = |i: usize| peers.weights[i] as u64;
    let mut best: Option<usize> = None;
    let mut many = false;
    for i in 0..peers.len() {
        if !peers.usable(i, tried, now) {
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
        for i in first..peers.len() {
            if !peers.usable(i, tried, now)
                || active(i) * weight(first) != active(first) * weight(i)
            {
                continue;
            }
            total += state[i].step(peers.weights[i]);
            if state[i].current > state[b].current {
                b = i;
            }
        }
        state[b].current -= total;
    }
    Some(b)
}
