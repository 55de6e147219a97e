//! Any bytes as an upstream's response head, to a HEAD request and to any
//! other: `response::parse` never panics, and a head it completes is
//! framed as RFC 9112 6.3 says and kept alive only as 6.1 and 9.3 allow,
//! read independently in fuzz/checks/h1.rs.
#![no_main]

#[path = "../checks/h1.rs"]
mod h1;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = h1::Opts::from_env();
    let other = h1::check_response(data, false, opts);
    let head = h1::check_response(data, true, opts);
    // Whether the request was HEAD changes only the framing.
    match (other, head) {
        (h1::ResponseOutcome::Complete(_), h1::ResponseOutcome::Complete(f)) => {
            assert_eq!(
                f,
                spike::http1::response::Framing::Empty,
                "a HEAD answer with a body"
            );
        }
        (a, b) => assert_eq!(a, b, "to_head changed more than the framing"),
    }
});
