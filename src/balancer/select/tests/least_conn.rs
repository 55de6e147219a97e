//! least_conn, its walk and its sorted fast path, against Nginx.

use super::super::least_conn::{LEAST_CONN_WALK_MAX, NO_SET};
use super::*;
use crate::balancer::select::{Attempt, Pick, Selector};
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
    with_least_conn(s, |st| {
        let lc = &st.lc;
        let current = (0..t.peers.len())
            .map(|i| {
                if st.fast && lc.levels.set_of[i] != NO_SET && !lc.is_loose[i] {
                    assert_eq!(
                        st.smooth[i].effective, t.peers.weights[i],
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
    })
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
                let (i, pick, released) = held.swap_remove(rng.below(held.len() as u64) as usize);
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
                if step >= 500 && with_least_conn(&s, |st| st.fast) {
                    let (is_loose, n_loose) =
                        with_least_conn(&s, |st| (st.lc.is_loose[i], st.lc.loose.len()));
                    picks += 1;
                    fast += u32::from(!is_loose);
                    loose += n_loose as u64;
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
        assert!(with_least_conn(&s, |st| st
            .lc
            .conns
            .iter()
            .all(|&c| c == 0)));
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
    assert_eq!(with_least_conn(&s, |st| st.lc.conns.clone()), vec![0]);
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
    assert!(with_least_conn(&new, |st| st
        .lc
        .conns
        .iter()
        .all(|&c| c == 0)));
}
