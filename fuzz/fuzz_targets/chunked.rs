//! Any bytes as a chunked body: `ChunkedScan` finds the same end whole,
//! in two pieces (the first input byte picks the cut) and byte by byte,
//! never past the input; agrees with the reference decoder (RFC 9112 7.1)
//! in fuzz/checks/h1.rs on validity, the end and the size limit (the
//! second byte picks the limit); and a body it ends is read to the same
//! end and length by hyper's server, when hyper takes it.
#![no_main]

#[path = "../checks/h1.rs"]
mod h1;

use libfuzzer_sys::fuzz_target;

/// Limits for `ChunkedScan::with_limit`, 0 for none.
const LIMITS: [u64; 8] = [0, 0, 0, 0, 1, 16, 100, 4096];

fuzz_target!(|data: &[u8]| {
    let [cut, limit, body @ ..] = data else {
        return;
    };
    let split = usize::from(*cut) * (body.len() + 1) / 256;
    let limit = LIMITS[usize::from(*limit & 7)];
    h1::check_chunked(body, split, limit, h1::Opts::from_env());
});
