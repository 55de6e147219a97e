//! HTTP/1.1 framing for the balancer's own forwarding path, and nothing
//! else: a client's request head parsed in place ([`request`]), an
//! upstream's response head and how its body is framed, with the chunked
//! scanner ([`response`]), the hop-by-hop names and `Connection` tokens
//! both sides drop ([`hop`]), and the `Date` header ([`date`]). No policy
//! (what is forwarded where, what is retried) lives here: that is
//! `crate::balancer::forward`'s; this module imports nothing of the
//! balancer's, so the fuzz targets and property tests drive it alone.

pub mod date;
pub mod hop;
pub mod request;
pub mod response;

/// A table of the bytes that are ASCII letters or digits or in `extra`:
/// the character classes that every request checks byte by byte (a
/// target's, a `Host`'s, a buyer id's), as one load per byte instead of a
/// chain of comparisons.
pub const fn alphanumeric_and(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = (c as u8).is_ascii_alphanumeric();
        c += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}
