//! Smooth weighted round-robin and round-robin, against Nginx.

use super::*;
use crate::balancer::select::{Attempt, Pick};

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
                    on_cycle += u32::from(with_smooth(&s, |st| st.at.is_some()));
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
