//! `Idempotency-Key` on purchases (IETF httpapi draft): the node decides a
//! purchase once per key and answers every later request with that key the
//! same way, so the balancer may send a purchase again after its node died
//! mid-request. For that every purchase needs a key: one that arrives
//! without gets one here, made once per client request and kept across all
//! its attempts.
//!
//! Keys are 128 bits of SipHash-1-3 (std's `RandomState`, keyed from the
//! OS's randomness once per process) over a process-wide counter, written
//! as 32 lowercase hex digits: unique per request, different after every
//! restart, and not guessable from earlier keys, since the hash key never
//! leaves the process.

use std::hash::{BuildHasher, RandomState};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::header::HeaderValue;
use hyper::{HeaderMap, Method};

use crate::protocol::{IDEMPOTENCY_KEY, MADE_KEY, PURCHASE_PATH};

/// A fresh key: 32 lowercase hex digits, never the same twice in a process
/// and unpredictable across processes.
pub fn generate() -> HeaderValue {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = SEED.get_or_init(RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Two domain-separated hashes of the counter make 128 bits.
    let hi = seed.hash_one((n, 0u8));
    let lo = seed.hash_one((n, 1u8));
    let mut buf = [0u8; 32];
    write_hex(&mut buf[..16], hi);
    write_hex(&mut buf[16..], lo);
    HeaderValue::from_bytes(&buf).expect("hex digits are a valid header value")
}

fn write_hex(out: &mut [u8], v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in out.iter_mut().enumerate() {
        let shift = 60 - 4 * i as u32;
        *b = DIGITS[((v >> shift) & 0xf) as usize];
    }
}

/// Whether `value` is a key the node accepts: 1 to 64 characters from
/// `[A-Za-z0-9_.:@-]`, optionally inside double quotes (the draft's
/// sf-string form).
pub fn is_valid(value: &HeaderValue) -> bool {
    is_valid_bytes(value.as_bytes())
}

/// [`is_valid`] of a value as it came on the wire (see
/// [`crate::protocol::key_token`]).
pub fn is_valid_bytes(b: &[u8]) -> bool {
    crate::protocol::key_token(b).is_some()
}

/// Whether `path` (without the query) is a purchase: `/buy/ticket`, or
/// `/events/{event}/buy` (which passes a balancer only in front of
/// several sales, see `forward::closed`).
pub fn is_purchase(path: &str) -> bool {
    path == PURCHASE_PATH || crate::protocol::event_purchase(path).is_some()
}

/// What an `Idempotency-Key` makes of a request, on either path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPlan {
    /// An ordinary request: not a purchase, a purchase with a malformed or
    /// repeated key, or one whose method gets no key.
    Unkeyed,
    /// A purchase with exactly one well-formed key of the client's.
    Client,
    /// A `GET` or `POST` purchase without a key: it gets one here.
    Generate,
}

impl KeyPlan {
    /// Whether the request is a purchase with one well-formed key (the
    /// node then decides it once, however often it is sent, so it may be
    /// retried on another upstream).
    pub fn keyed(self) -> bool {
        self != KeyPlan::Unkeyed
    }
}

/// The plan for a request (`is_buy`: to the purchase path) with `keys`
/// `Idempotency-Key` values; `valid` says whether the one value is
/// well-formed (asked only when there is exactly one).
pub fn plan(is_buy: bool, method: &Method, keys: usize, valid: impl FnOnce() -> bool) -> KeyPlan {
    if !is_buy {
        return KeyPlan::Unkeyed;
    }
    match keys {
        0 if *method == Method::GET || *method == Method::POST => KeyPlan::Generate,
        1 if valid() => KeyPlan::Client,
        _ => KeyPlan::Unkeyed,
    }
}

/// For a request to `path`: adds a generated key to a `GET` or `POST`
/// purchase that has none, and says whether the request is a purchase that
/// carries exactly one well-formed key (see [`KeyPlan::keyed`]). A
/// client's own key is left exactly as it came; a malformed or repeated
/// one makes the request an ordinary, non-retried one.
pub fn ensure_key(method: &Method, path: &str, headers: &mut HeaderMap) -> bool {
    if !is_purchase(path) {
        return false;
    }
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let first = values.next();
    let keys = match (first, values.next()) {
        (None, _) => 0,
        (Some(_), None) => 1,
        (Some(_), Some(_)) => 2,
    };
    let plan = plan(true, method, keys, || first.is_some_and(is_valid));
    if plan == KeyPlan::Generate {
        headers.insert(IDEMPOTENCY_KEY, generate());
        headers.insert(MADE_KEY, HeaderValue::from_static("1"));
    }
    plan.keyed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generated_keys_are_32_hex_digits_and_distinct() {
        let keys: HashSet<Vec<u8>> = (0..10_000)
            .map(|_| generate().as_bytes().to_vec())
            .collect();
        assert_eq!(keys.len(), 10_000);
        for k in keys.iter().take(50) {
            assert_eq!(k.len(), 32);
            assert!(
                k.iter()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
            assert!(is_valid(&HeaderValue::from_bytes(k).expect("value")));
        }
    }

    #[test]
    fn the_node_s_key_syntax() {
        for ok in ["a", "\"a\"", "A-z_0.9:@x", &"k".repeat(64)] {
            assert!(is_valid(&HeaderValue::from_str(ok).expect("v")), "{ok}");
        }
        for bad in ["", "\"\"", "a b", "a/b", "\"a", &"k".repeat(65), "ä"] {
            let Ok(v) = HeaderValue::from_str(bad) else {
                continue;
            };
            assert!(!is_valid(&v), "{bad:?}");
        }
    }

    #[test]
    fn only_purchases_get_keys() {
        let mut h = HeaderMap::new();
        assert!(ensure_key(&Method::POST, "/buy/ticket", &mut h));
        let generated = h[IDEMPOTENCY_KEY].clone();
        assert!(ensure_key(&Method::POST, "/buy/ticket", &mut h));
        assert_eq!(h[IDEMPOTENCY_KEY], generated, "a key is never replaced");

        let mut h = HeaderMap::new();
        assert!(!ensure_key(&Method::POST, "/buy/tickets", &mut h));
        assert!(!ensure_key(&Method::POST, "/buy", &mut h));
        assert!(!ensure_key(&Method::DELETE, "/buy/ticket", &mut h));
        assert!(h.is_empty());

        let mut h = HeaderMap::new();
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("not valid"));
        assert!(!ensure_key(&Method::POST, "/buy/ticket", &mut h));
        assert_eq!(h[IDEMPOTENCY_KEY], "not valid");
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("k2"));
        h.remove(IDEMPOTENCY_KEY);
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("k1"));
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("k2"));
        assert!(!ensure_key(&Method::POST, "/buy/ticket", &mut h));
        assert_eq!(h.get_all(IDEMPOTENCY_KEY).iter().count(), 2);
    }
}
