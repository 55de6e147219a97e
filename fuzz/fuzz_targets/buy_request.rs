//! Any request target and X-User-Id header: the node's parsing either finds a
//! buyer id that is safe as a Redis field and in JSON, or refuses; never a
//! panic, never an unchecked id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spike::protocol::{MAX_BUYER_LEN, buyer_of};

fuzz_target!(|data: &[u8]| {
    // First byte: whether a buyer is required; then target, a NUL, header.
    let Some((&flag, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(2, |&b| b == 0);
    let target = parts.next().unwrap_or_default();
    let header = parts.next();
    let Ok(target) = std::str::from_utf8(target) else {
        return;
    };
    let mut builder = hyper::Request::builder().uri(target);
    if let Some(h) = header {
        builder = builder.header("x-user-id", h);
    }
    let Ok(req) = builder.body(()) else {
        return;
    };
    match buyer_of(&req, flag & 1 == 1) {
        Ok(id) => {
            assert!(id.len() <= MAX_BUYER_LEN);
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b)));
            if flag & 1 == 1 {
                assert!(!id.is_empty());
            }
        }
        Err(_) => {}
    }
});
