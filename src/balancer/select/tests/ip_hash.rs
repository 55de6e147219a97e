//! ip_hash, against Nginx's formula.

use super::*;
use crate::balancer::select::Attempt;

use crate::config::Strategy;
use std::net::IpAddr;

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
