//! Any bytes as a client's request head: when the balancer's fast path
//! takes them (`Parsed::Fast`), an independent reading (httparse alone,
//! `http`'s types, the general path's rules) and hyper's own server must
//! read the same request, method, target, header lines and body length.
//! The fast path may be narrower than hyper, never more lenient.
//! See fuzz/checks/h1.rs.
#![no_main]

#[path = "../checks/h1.rs"]
mod h1;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    h1::check_request(data, h1::REPLAY, 1024 * 1024, h1::Opts::from_env());
});
