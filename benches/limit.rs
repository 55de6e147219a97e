//! What the per-client limits cost a request through the balancer: one
//! `limit_rate` decision (the bucket's lookup and update under its shard's
//! lock, with the clock read), for one busy client and across 100,000
//! clients (each lookup a cache miss), and one `limit_conns` slot taken and
//! given back. With no limit set the decision is one branch, measured too.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use spike::balancer::forward::limit;
use spike::balancer::limit::{ConnTable, LimitKey};
use spike::balancer::state::Shared;
use spike::config::Config;

fn shared(keys: &str) -> Shared {
    let text = format!(
        "[balancer]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{keys}\n\
         [[balancer.upstream]]\naddr = \"127.0.0.1:1\"\n"
    );
    let config = Config::parse(Path::new("bench.toml"), &text).expect("config");
    Shared::new(config, 1).expect("shared")
}

fn limits(c: &mut Criterion) {
    // The largest rate and burst: a loop of millions a second still fills
    // the one client's bucket, so its figure mixes passes and refusals
    // (the same lookup; a refusal skips the update).
    let s = shared("limit_rate = \"1000000r/s\"\nlimit_burst = 1000000\nlimit_nodelay = true");
    let active = s.current.load_full();
    let one = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    c.bench_function("limit_rate decision, one client", |b| {
        b.iter(|| black_box(limit::check(&s, &active, black_box(one), || None)))
    });

    let clients: Vec<IpAddr> = (0..100_000u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
        .collect();
    let mut i = 0;
    c.bench_function("limit_rate decision, 100,000 clients in turn", |b| {
        b.iter(|| {
            i = (i + 1) % clients.len();
            black_box(limit::check(&s, &active, black_box(clients[i]), || None))
        })
    });

    let none = shared("");
    let none_active = none.current.load_full();
    c.bench_function("no limit set", |b| {
        b.iter(|| limit::check(&none, &none_active, black_box(one), || None).expect("passes"))
    });

    let conns = ConnTable::default();
    let key = LimitKey::Addr(one);
    c.bench_function("limit_conns slot taken and given back", |b| {
        b.iter(|| drop(conns.acquire(black_box(&key), 50).expect("a slot")))
    });
}

criterion_group!(benches, limits);
criterion_main!(benches);
