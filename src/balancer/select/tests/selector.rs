//! What the selector does for every strategy: failure windows, backups,
//! the gate.

use super::*;
use crate::balancer::select::Attempt;

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
    assert_eq!(with_smooth(&s, |st| st.smooth[0].effective), 5);
    one(&s, 0);
    assert_eq!(with_smooth(&s, |st| st.smooth[0].effective), 6);
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
    use crate::balancer::select::Gate;
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
    use crate::balancer::select::Gate;
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
