//! Nginx's least_conn (`ngx_http_upstream_least_conn_module`): fewest
//! active requests relative to weight, ties broken by a smooth-WRR round
//! over the tied peers; large tiers keep their healthy peers sorted.

use std::sync::atomic::Ordering;

use super::selector::{PickState, Smooth, Tier, Tried};

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

impl Tier {
    /// Whether peer `i` can be failed: only such a peer's usability depends
    /// on the clock, so it stays loose, where each pick looks at it.
    pub(super) fn suspect(&self, i: usize) -> bool {
        let p = &self.peers[i];
        p.config.max_fails != 0 && p.live.fails.load(Ordering::Relaxed) >= p.config.max_fails
    }

    /// Takes peer `i` out of the levels (if it is in them).
    pub(super) fn loosen(smooth: &mut [Smooth], lc: &mut LeastConn, i: usize) {
        if lc.levels.set_of[i] == NO_SET || lc.is_loose[i] {
            return;
        }
        smooth[i].current = lc.levels.remove(&lc.conns, i);
        lc.is_loose[i] = true;
        lc.loose.push(i as u32);
    }

    /// Sorts back the loose peers that need not be loose any more, and
    /// takes out those the attempt tried.
    pub(super) fn settle(&self, smooth: &mut [Smooth], lc: &mut LeastConn, tried: &Tried) {
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
    pub(super) fn least_conn(&self, st: &mut PickState, tried: &Tried, now: u64) -> Option<usize> {
        if self.lc_fast {
            return self.least_conn_fast(st, tried, now);
        }
        let b = self.least_conn_walk(&mut st.smooth, &st.lc.conns, tried, now)?;
        st.lc.conns[b] += 1;
        Some(b)
    }

    /// The walk's pick, worked out from the sorted peers and the loose ones.
    pub(super) fn least_conn_fast(
        &self,
        st: &mut PickState,
        tried: &Tried,
        now: u64,
    ) -> Option<usize> {
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
    pub(super) fn least_conn_round(&self, smooth: &[Smooth], lc: &LeastConn) -> Option<Round> {
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
    pub(super) fn least_conn_walk(
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
    pub(super) fn finish(&self, i: usize) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::strategy::testing::*;
    use crate::balancer::strategy::{Attempt, Pick, Selector};
    use crate::balancer::upstream::Upstream;
    use crate::config::{Strategy, UpstreamConfig};
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

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
