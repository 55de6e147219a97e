//! What one pick costs (lock, pick, release, and the drop that ends the
//! request) for each strategy at 4, 64 and 1,024 upstreams, every upstream
//! healthy. Round-robin and smooth WRR replay a recorded cycle, ip_hash
//! searches the running sums of the weights, and least_conn keeps its peers
//! sorted by count and current weight (it walks tiers of a few peers, as
//! Nginx does), so their cost barely grows. (The warm-up is far longer than
//! one cycle, so it is measured replaying.) Each request ends before the
//! next pick, so every least_conn pick is a tie between all the peers: a
//! whole smooth-WRR round for the walk, the largest heaps for the sorted
//! peers.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use spike::balancer::select::{Attempt, Selector};
use spike::balancer::upstream::{LiveState, Upstream, now_ms};
use spike::config::{Strategy, UpstreamConfig};

fn selector(strategy: Strategy, n: usize) -> Selector {
    let ups = (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, (i >> 8) as u8, i as u8, 1], 8080));
            let config = UpstreamConfig {
                weight: 1 + (i % 5) as u32,
                ..UpstreamConfig::new(addr)
            };
            Upstream::new(config, Arc::new(LiveState::new(addr)))
        })
        .collect();
    Selector::new(strategy, ups)
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for strategy in [
        Strategy::RoundRobin,
        Strategy::WeightedRoundRobin,
        Strategy::IpHash,
        Strategy::LeastConn,
    ] {
        for n in [4usize, 64, 1024] {
            let s = selector(strategy, n);
            let mut client: u32 = 0;
            group.bench_with_input(BenchmarkId::new(strategy.as_str(), n), &n, |b, _| {
                b.iter(|| {
                    client = client.wrapping_add(257);
                    let ip = IpAddr::V4(Ipv4Addr::from(client));
                    let mut attempt = Attempt::new(ip);
                    let now = now_ms();
                    let p = s.pick(&mut attempt, now).expect("a peer");
                    s.release(&p, false, now);
                    black_box(&p);
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    targets = pick
}
criterion_main!(benches);
