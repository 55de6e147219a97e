//! `GET /holders` at 100,000 holders (issue 26): what the node pays to
//! write the list and a balancer's edge to read it into its map, in the
//! bytes it sends now ([`HoldersView::encode`]) against the JSON it sent
//! before (the same fields, serde_json), in one run. The sizes are printed
//! beside the times.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use spike::balancer::edge::SoldOut;
use spike::node::store::HolderSeed;
use spike::protocol::HoldersView;

/// The JSON body `/holders` had before: the same fields.
#[derive(serde::Serialize, serde::Deserialize)]
struct JsonView {
    epoch: u64,
    released: u64,
    per_user_limit: u64,
    seed: [u64; 2],
    buyers: Vec<[u64; 2]>,
    ask: Vec<u64>,
}

const HOLDERS: u64 = 100_000;

fn view() -> HoldersView {
    let seed = HolderSeed(0x5eed, 0xfeed);
    HoldersView {
        epoch: 1_796_605_317_350,
        released: 0,
        per_user_limit: 1,
        seed: [seed.0, seed.1],
        // Orders numbered as a sale numbers them, buyers hashed as a node
        // hashes them.
        buyers: (1..=HOLDERS)
            .map(|i| [seed.hash(&format!("buyer{i:07}")), i])
            .collect(),
        ask: Vec::new(),
    }
}

fn holders(c: &mut Criterion) {
    let v = view();
    let json = JsonView {
        epoch: v.epoch,
        released: v.released,
        per_user_limit: v.per_user_limit,
        seed: v.seed,
        buyers: v.buyers.clone(),
        ask: v.ask.clone(),
    };
    let json_body = serde_json::to_vec(&json).expect("json");
    let bytes = v.encode();
    eprintln!(
        "holders={HOLDERS} json_bytes={} binary_bytes={} ratio={:.2}",
        json_body.len(),
        bytes.len(),
        json_body.len() as f64 / bytes.len() as f64
    );
    let mut group = c.benchmark_group("holders_100k");
    group.sample_size(20);
    group.bench_function("json_write", |b| {
        b.iter(|| serde_json::to_vec(black_box(&json)).expect("json"))
    });
    group.bench_function("binary_write", |b| b.iter(|| black_box(&v).encode()));
    group.bench_function("json_read_into_edge", |b| {
        b.iter(|| {
            let j: JsonView = serde_json::from_slice(black_box(&json_body)).expect("json");
            SoldOut::from_view(HoldersView {
                epoch: j.epoch,
                released: j.released,
                per_user_limit: j.per_user_limit,
                seed: j.seed,
                buyers: j.buyers,
                ask: j.ask,
            })
        })
    });
    group.bench_function("binary_read_into_edge", |b| {
        b.iter(|| SoldOut::from_view(HoldersView::decode(black_box(&bytes)).expect("bytes")))
    });
    group.finish();
}

criterion_group!(benches, holders);
criterion_main!(benches);
