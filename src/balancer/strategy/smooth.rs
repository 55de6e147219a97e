//! Nginx's smooth weighted round-robin (`ngx_http_upstream_get_peer`),
//! and plain round-robin, which is the same with every weight 1. While every
//! peer is healthy at full weight the walk is recorded once as a cycle and
//! replayed; a failure or a retry writes the weights out and walks again.

use super::selector::{PickState, Smooth, Tier, Tried};

/// Longest smooth-WRR cycle recorded (4 bytes a pick): 1 MiB.
pub(super) const MAX_CYCLE: u64 = 1 << 18;

/// A run of smooth-WRR picks that ends in the state it started from, so
/// that it repeats for as long as nothing but the current weights decides.
#[derive(Debug)]
pub(super) struct Cycle {
    /// The current weights at the start.
    pub(super) start: Vec<i64>,
    /// The peer picked at each position.
    pub(super) order: Vec<u32>,
}

impl Tier {
    /// Whether every peer that is not `down` is healthy at full weight: then
    /// nothing but the current weights decides the picks, and a cycle
    /// recorded in such a calm replays them.
    pub(super) fn calm(&self, smooth: &[Smooth], now: u64) -> bool {
        smooth
            .iter()
            .zip(&self.weights)
            .zip(&self.peers)
            .all(|((s, &w), p)| p.config.down || (s.effective == w && !p.is_failed(now)))
    }

    /// Writes out the current weights of the cycle position the state is at,
    /// so that the walk can take over: from the cycle's start, `p` picks of
    /// which `k` went to peer `i` have added `p * w` and taken `k * total`.
    pub(super) fn materialize(&self, st: &mut PickState) {
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
    pub(super) fn smooth(&self, st: &mut PickState, tried: &Tried, now: u64) -> Option<usize> {
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
    pub(super) fn walk(&self, state: &mut [Smooth], tried: &Tried, now: u64) -> Option<usize> {
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
}

#[cfg(test)]
mod tests {

    use crate::balancer::strategy::testing::*;
    use crate::balancer::strategy::{Attempt, Pick};

    use crate::config::Strategy;
    use std::net::{IpAddr, Ipv4Addr};

    use std::time::Duration;

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
}
