//! The balancer's HTTP/1 fast path (`spike::balancer::h1`) against the
//! same checks as the fuzz targets in fuzz/ (`request_head`, `chunked`,
//! `response_head`; the checks live in fuzz/checks/h1.rs and are included
//! here as they are), on a few thousand near-valid requests, chunked
//! bodies and response heads from a fixed-seed xorshift generator: no
//! nightly, no fuzzer, same inputs on every run.
//!
//! - A request the fast path takes is read the same way by httparse,
//!   `http`'s types and hyper's own server (fed the bytes over a pipe).
//! - `ChunkedScan` finds the same end however a body is split, and agrees
//!   with a reference RFC 9112 7.1 decoder.
//! - Response heads are framed as RFC 9112 6.3 says.
//!
//! Each test also asserts that its generator reached the interesting
//! cases (enough requests taken by the fast path that hyper's reading was
//! compared, every framing, valid and invalid bodies), so none passes for
//! lack of input.
//!
//! Discrepancies found and not fixed yet are classes in `h1::known`, with
//! their inputs under fuzz/regressions/ and listed in [`OPEN`]: the
//! property tests let exactly the open classes through, and
//! `fuzz_regressions_fail_only_their_own_check` keeps each saved input
//! failing the strict check until its class is fixed and taken out of
//! `OPEN`, and passing every check after.

#[path = "../fuzz/checks/h1.rs"]
mod h1;

use std::path::Path;

use h1::{Chunked, HyperChunked, Opts, RequestOutcome, ResponseOutcome};
use spike::http1::response::{Framing, Malformed};

/// xorshift64: small, fixed, good enough to pick cases.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn bytes(&mut self, n: usize, from: &[u8]) -> Vec<u8> {
        (0..n).map(|_| self.pick(from)).collect()
    }
}

const PLAIN_PATH: &[u8] =
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:@/";

/// Positions of every CRLF in `b`.
fn crlfs(b: &[u8]) -> Vec<usize> {
    b.windows(2)
        .enumerate()
        .filter(|(_, w)| *w == b"\r\n")
        .map(|(i, _)| i)
        .collect()
}

/// One or two of the mutations that matter to HTTP/1 framing, on `b`.
fn mutate(rng: &mut Rng, b: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(2) {
        let ends = crlfs(b);
        match rng.below(12) {
            // A bare LF.
            0 if !ends.is_empty() => {
                b.remove(rng.pick(&ends));
            }
            // A bare CR.
            1 if !ends.is_empty() => {
                b.remove(rng.pick(&ends) + 1);
            }
            // A CRLF twice: the head ends early.
            2 if !ends.is_empty() => {
                let at = rng.pick(&ends);
                b.splice(at..at, *b"\r\n");
            }
            // Two lines joined.
            3 if !ends.is_empty() => {
                let at = rng.pick(&ends);
                b.drain(at..at + 2);
            }
            // A space (or tab) before a colon.
            4 => {
                if let Some(at) = b.iter().position(|&c| c == b':') {
                    let colons: Vec<usize> = b
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| **c == b':')
                        .map(|(i, _)| i)
                        .collect();
                    let at = rng.pick(&colons).max(at);
                    b.insert(at, rng.pick(b" \t"));
                }
            }
            // obs-fold: a continuation line.
            5 if ends.len() > 1 => {
                let at = ends[1 + rng.below(ends.len() - 1)] + 2;
                b.splice(
                    at..at,
                    rng.pick(&[&b" folded\r\n"[..], b"\tx\r\n", b" \r\n"])
                        .iter()
                        .copied(),
                );
            }
            // Leading empty lines.
            6 => {
                b.splice(
                    0..0,
                    rng.pick(&[&b"\r\n"[..], b"\n", b"\r\n\r\n"])
                        .iter()
                        .copied(),
                );
            }
            // A stray byte.
            7 => {
                let at = rng.below(b.len() + 1);
                b.insert(at, rng.pick(b"\0\r\n \t\x7f\x80\xff:;,\"\\"));
            }
            // A byte changed.
            8 if !b.is_empty() => {
                let at = rng.below(b.len());
                b[at] = rng.next() as u8;
            }
            // Cut short.
            9 if !b.is_empty() => {
                b.truncate(rng.below(b.len()));
            }
            // Two spaces (or a tab) in the first line.
            10 => {
                if let Some(at) = b.iter().position(|&c| c == b' ') {
                    b.splice(
                        at..at + 1,
                        rng.pick(&[&b"  "[..], b"\t", b" \t"]).iter().copied(),
                    );
                }
            }
            // A header line with leading whitespace.
            _ if ends.len() > 1 => {
                let at = ends[rng.below(ends.len() - 1)] + 2;
                b.insert(at, b' ');
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

fn request(rng: &mut Rng) -> Vec<u8> {
    const STANDARD: &[&str] = &["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"];
    const ODD_METHODS: &[&str] = &["get", "CONNECT", "TRACE", "PROPFIND", "GE\x7fT", "", "X-Y"];
    let method = if rng.chance(88) {
        rng.pick(STANDARD)
    } else {
        rng.pick(ODD_METHODS)
    };
    let target: Vec<u8> = if rng.chance(85) {
        let mut t = b"/".to_vec();
        let n = rng.below(24);
        t.extend(rng.bytes(n, PLAIN_PATH));
        if rng.chance(50) {
            t.extend_from_slice(rng.pick(&[
                &b"?user=u1"[..],
                b"?a=1&b=2",
                b"?",
                b"??x",
                b"?q=%20",
            ]));
        }
        if rng.chance(20) {
            t = b"/buy/ticket?user=u42".to_vec();
        }
        t
    } else {
        rng.pick(&[
            &b"*"[..],
            b"http://a/b",
            b"/a\"b",
            b"/a{b}",
            b"/\x80",
            b"/a#f",
            b"//x",
            b"/%zz",
            b"/a|b",
            b"/a\\b",
            b"/a^b",
            b"/`",
            b"a/b",
            b"/a[b]",
            b"/a<b>",
        ])
        .to_vec()
    };
    let version = if rng.chance(88) {
        "HTTP/1.1"
    } else {
        rng.pick(&[
            "HTTP/1.0",
            "HTTP/2.0",
            "HTTP/1.2",
            "http/1.1",
            "HTTP/1.10",
            "HTTP/11",
            "HTTP/0.9",
        ])
    };
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let host = |rng: &mut Rng| -> Vec<u8> {
        rng.pick(&[
            &b"a"[..],
            b"example.com:8080",
            b"10.0.0.1",
            b"[::1]:80",
            b"my_host",
            b"a.b-c~d",
        ])
        .to_vec()
    };
    match rng.below(100) {
        0..88 => {
            let v = host(rng);
            headers.push((b"Host".to_vec(), v));
        }
        88..92 => {}
        92..96 => {
            let (a, b) = (host(rng), host(rng));
            headers.push((b"Host".to_vec(), a));
            headers.push((b"host".to_vec(), b));
        }
        _ => {
            let v = rng
                .pick(&[&b""[..], b"a/b", b"a..b", b"a b", b"\x80", b"a@b", b"a,b"])
                .to_vec();
            headers.push((b"Host".to_vec(), v));
        }
    }
    const EXTRAS: &[(&[u8], &[&[u8]])] = &[
        (b"X-Forwarded-For", &[b"1.2.3.4", b"1.2.3.4, 5.6.7.8", b""]),
        (b"X-Real-IP", &[b"6.6.6.6"]),
        (
            b"Connection",
            &[
                b"keep-alive",
                b"close",
                b"Keep-Alive, CLOSE",
                b"close, X-Secret",
                b"upgrade",
                b"",
                b" , ,",
            ],
        ),
        (b"Keep-Alive", &[b"timeout=5"]),
        (b"TE", &[b"trailers"]),
        (b"Trailer", &[b"X"]),
        (b"Proxy-Connection", &[b"keep-alive"]),
        (b"X_Under", &[b"1"]),
        (b"X-User-Id", &[b"u1", b"bad id"]),
        (
            b"Idempotency-Key",
            &[b"0123456789abcdef0123456789abcdef", b"k"],
        ),
        (b"Accept", &[b"*/*"]),
        (b"User-Agent", &[b"x\x80y", b"curl/8"]),
        (b"X-Empty", &[b""]),
        (b"Cookie", &[b"a=b; c=d"]),
        (b"Upgrade", &[b"websocket"]),
        (b"Expect", &[b"100-continue"]),
        (
            b"Transfer-Encoding",
            &[
                b"chunked",
                b"Chunked",
                b"gzip, chunked",
                b"chunked, gzip",
                b" chunked",
                b"identity",
            ],
        ),
        (b"Transfer_Encoding", &[b"chunked"]),
        (b"Content_Length", &[b"5"]),
        (b"X-Tab", &[b"a\tb"]),
        (b"content-length", &[b"0", b"+1", b"1,1", b"0x10", b"-1"]),
    ];
    for _ in 0..rng.below(5) {
        let (name, values) = rng.pick(EXTRAS);
        let value = rng.pick(values);
        // Mostly rare: the headers that send a request to hyper.
        let refusing = [
            &b"Upgrade"[..],
            b"Expect",
            b"Transfer-Encoding",
            b"content-length",
        ];
        if refusing.contains(&name) && !rng.chance(25) {
            continue;
        }
        let name = if rng.chance(15) {
            name.to_ascii_uppercase()
        } else {
            name.to_vec()
        };
        headers.push((name, value.to_vec()));
    }
    let mut body = Vec::new();
    if matches!(method, "POST" | "PUT" | "PATCH") || rng.chance(10) {
        match rng.below(100) {
            0..70 => {
                let n = if rng.chance(5) {
                    5000 + rng.below(70_000)
                } else {
                    rng.below(300)
                };
                headers.push((b"Content-Length".to_vec(), n.to_string().into_bytes()));
                body = rng.bytes(n, b"xyz\r\n\0");
            }
            70..85 => {
                let odd = rng.pick(&[
                    &b"+1"[..],
                    b"-1",
                    b"0x10",
                    b"1,1",
                    b"1, 1",
                    b" 5",
                    b"00012",
                    b"99999999",
                    b"18446744073709551616",
                    b"1e3",
                    b"",
                    b"0000000000000000000012",
                ]);
                headers.push((b"Content-Length".to_vec(), odd.to_vec()));
            }
            _ => {
                let (a, b) = (
                    rng.below(20),
                    if rng.chance(50) { 3 } else { rng.below(20) },
                );
                headers.push((b"Content-Length".to_vec(), a.to_string().into_bytes()));
                headers.push((b"Content-Length".to_vec(), b.to_string().into_bytes()));
                body = rng.bytes(a, b"ab");
            }
        }
    }
    if body.is_empty() && rng.chance(6) {
        // A chunked body: hyper's, after the balancer checked its sizes.
        headers.push((b"Transfer-Encoding".to_vec(), b"chunked".to_vec()));
        body = b"5\r\nhello\r\n0\r\n\r\n".to_vec();
    }
    if headers.len() > 1 && rng.chance(50) {
        let (i, j) = (rng.below(headers.len()), rng.below(headers.len()));
        headers.swap(i, j);
    }
    let mut b = Vec::new();
    b.extend_from_slice(method.as_bytes());
    b.push(b' ');
    b.extend_from_slice(&target);
    b.push(b' ');
    b.extend_from_slice(version.as_bytes());
    b.extend_from_slice(b"\r\n");
    for (n, v) in &headers {
        b.extend_from_slice(n);
        b.extend_from_slice(if rng.chance(10) { b":" } else { b": " });
        b.extend_from_slice(v);
        if rng.chance(5) {
            b.push(b' ');
        }
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"\r\n");
    b.extend_from_slice(&body);
    if rng.chance(20) {
        b.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
    }
    if rng.chance(35) {
        mutate(rng, &mut b);
    }
    b
}

/// The fast path and hyper's server, on 3000 generated requests.
#[test]
fn requests_the_fast_path_takes_are_read_alike_by_hyper() {
    let mut rng = Rng::new(0x5eed_0001);
    let (mut fast, mut partial, mut general, mut chunked) = (0, 0, 0, 0);
    let mut fast_with_body = 0;
    let n = 3000;
    for _ in 0..n {
        let raw = request(&mut rng);
        let limit = rng.pick(&[0, 4096, 1 << 20]);
        match h1::check_request(&raw, h1::REPLAY, limit, Opts::STRICT) {
            RequestOutcome::Fast => {
                fast += 1;
                let mut head = spike::http1::request::RequestHead::default();
                spike::http1::request::parse(&raw, &mut head, h1::REPLAY, limit, false);
                if head.content_length > 0 {
                    fast_with_body += 1;
                }
            }
            RequestOutcome::Partial => partial += 1,
            RequestOutcome::General => general += 1,
            RequestOutcome::GeneralChunked => chunked += 1,
        }
    }
    eprintln!("requests: {fast} fast, {partial} partial, {general} general, {chunked} chunked");
    // The differential comparison with hyper ran on a good share.
    assert!(
        fast >= n / 4,
        "only {fast} of {n} requests were Fast (and compared with hyper)"
    );
    assert!(
        fast_with_body >= 100,
        "only {fast_with_body} Fast requests had a body"
    );
    assert!(
        general >= n / 10,
        "only {general} of {n} requests went to hyper"
    );
    assert!(
        partial >= n / 50,
        "only {partial} of {n} requests were Partial"
    );
    assert!(
        chunked >= n / 100,
        "only {chunked} of {n} requests had their chunk sizes checked"
    );
}

/// The premise of the generator: these are taken, and hyper agrees.
#[test]
fn plain_requests_are_fast_and_hyper_agrees() {
    let cases: &[&[u8]] = &[
        b"GET /buy/ticket?user=u1 HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nConnection: keep-alive\r\nX_Real_IP: 6.6.6.6\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: Keep-Alive, CLOSE\r\n\r\nhello",
        b"\r\nDELETE /a/b;c=d HTTP/1.1\nhost: [::1]:80\nX: a\x80b\n\n",
        b"PATCH /%7e HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\na: 3\r\nContent-Length: 00003\r\n\r\nabc",
    ];
    for raw in cases {
        assert_eq!(
            h1::check_request(raw, h1::REPLAY, 1 << 20, Opts::STRICT),
            RequestOutcome::Fast,
            "{}",
            h1::esc(raw)
        );
    }
    // And the harness itself sees a disagreement: hyper refuses a
    // request the fast path never takes, and reads two pipelined ones.
    let refused = h1::hyper_reads(
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    );
    assert!(refused.requests.is_empty() && refused.error.is_some());
    assert!(
        refused.answer.starts_with("HTTP/1.1 400"),
        "{}",
        refused.answer
    );
    let mut two = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc".to_vec();
    two.extend_from_slice(h1::SECOND);
    let two = h1::hyper_reads(&two);
    assert!(two.error.is_none(), "{:?}", two.error);
    assert_eq!(two.requests.len(), 2);
    assert_eq!(two.requests[0].body, Ok(3));
    assert_eq!(two.requests[1].uri, "/second");
}

// ---------------------------------------------------------------------------
// Chunked bodies
// ---------------------------------------------------------------------------

fn chunked_body(rng: &mut Rng) -> Vec<u8> {
    let mut b = Vec::new();
    let ext = |rng: &mut Rng, b: &mut Vec<u8>| {
        if rng.chance(25) {
            let e: &[u8] = rng.pick(&[
                &b";a=b"[..],
                b";name=\"q;x\"",
                b"; a",
                b" ;a",
                b"\t;a=1",
                b";",
                b";\x80\x7f",
                b";a=\"x\\\"y\"",
            ]);
            b.extend_from_slice(e);
        }
    };
    for _ in 0..rng.below(5) {
        let size = if rng.chance(90) {
            1 + rng.below(40)
        } else {
            100 + rng.below(3000)
        };
        let hex = if rng.chance(50) {
            format!("{size:x}")
        } else {
            format!("{size:X}")
        };
        if rng.chance(10) {
            b.extend(std::iter::repeat_n(b'0', 1 + rng.below(20)));
        }
        b.extend_from_slice(hex.as_bytes());
        ext(rng, &mut b);
        b.extend_from_slice(b"\r\n");
        let data = rng.bytes(size, b"abc\r\n0;");
        b.extend_from_slice(&data);
        b.extend_from_slice(b"\r\n");
    }
    if rng.chance(6) {
        // Sizes at and past the limit, and odd spellings.
        b.extend_from_slice(rng.pick(&[
            &b"7fffffffffffffff\r\nab"[..],
            b"8000000000000000\r\n",
            b"10000000000000000\r\n",
            b"ffffffffffffffff\r\n",
            b"0000000000000000000000001\r\nx\r\n",
            b"-1\r\n",
            b"0x5\r\n",
            b" 5\r\n",
            b"5 \r\nhello\r\n",
            b"5\t \r\nhello\r\n",
            b"5 5\r\n",
            b"\r\n",
        ]));
    }
    b.extend(std::iter::repeat_n(
        b'0',
        1 + usize::from(rng.chance(10)) * rng.below(4),
    ));
    ext(rng, &mut b);
    if rng.chance(3) {
        // An extension at the meta cap.
        b.push(b';');
        b.extend(std::iter::repeat_n(b'e', h1::MAX_META - 4 + rng.below(8)));
    }
    b.extend_from_slice(b"\r\n");
    for _ in 0..rng.below(3) {
        // (An obs-fold line now and then: hyper refuses it, the scan
        // passes it as an opaque line.)
        let folded = rng.chance(10);
        b.extend_from_slice(if folded {
            b" folded"
        } else {
            rng.pick(&[&b"X-T: 1"[..], b"A:b", b"Expires: never", b"Y:"])
        });
        b.extend_from_slice(b"\r\n");
    }
    if rng.chance(3) {
        // Trailers over the meta cap, in lines of 100 bytes.
        for _ in 0..170 {
            b.extend(std::iter::repeat_n(b't', 98));
            b.extend_from_slice(b"\r\n");
        }
    }
    b.extend_from_slice(b"\r\n");
    if rng.chance(30) {
        b.extend_from_slice(rng.pick(&[&b"HTTP/1.1 200 OK\r\n"[..], b"0\r\n\r\n", b"x"]));
    }
    if rng.chance(40) {
        mutate(rng, &mut b);
    }
    if rng.chance(5) {
        // One chunk's data a byte too long or short.
        if let Some(at) = b.windows(4).position(|w| w == b"\r\n\r\n") {
            if rng.chance(50) {
                b.insert(at, b'z')
            } else if at > 0 {
                b.remove(at - 1);
            }
        }
    }
    b
}

/// `ChunkedScan` on 4000 generated bodies, each also split at random.
#[test]
fn chunked_scan_agrees_with_the_reference_in_any_split() {
    let mut rng = Rng::new(0x5eed_0002);
    let (mut ends, mut incomplete, mut invalid, mut too_large) = (0, 0, 0, 0);
    let (mut agrees, mut refused) = (0, 0);
    let n = 4000;
    for _ in 0..n {
        let body = chunked_body(&mut rng);
        let split = rng.below(body.len() + 1);
        let limit = if rng.chance(70) {
            0
        } else {
            rng.pick(&[1, 16, 100, 4096])
        };
        let outcome = h1::check_chunked(&body, split, limit, open());
        match outcome.scan {
            Chunked::Ends(_) => ends += 1,
            Chunked::Incomplete => incomplete += 1,
            Chunked::Invalid => invalid += 1,
            Chunked::TooLarge => too_large += 1,
        }
        match outcome.hyper {
            HyperChunked::Agrees => agrees += 1,
            HyperChunked::Refused => refused += 1,
            HyperChunked::NotRun => {}
        }
    }
    eprintln!(
        "chunked: {ends} end ({agrees} read alike by hyper, {refused} refused by it), \
         {incomplete} incomplete, {invalid} invalid, {too_large} too large"
    );
    assert!(
        agrees >= ends * 3 / 4,
        "hyper read only {agrees} of the {ends} bodies that ended"
    );
    assert!(
        too_large >= n / 50,
        "only {too_large} of {n} bodies were too large"
    );
    assert!(ends >= n / 3, "only {ends} of {n} bodies ended");
    assert!(
        invalid >= n / 10,
        "only {invalid} of {n} bodies were invalid"
    );
    assert!(
        incomplete >= n / 50,
        "only {incomplete} of {n} bodies were incomplete"
    );
}

/// The reference decoder itself, on bodies whose reading is known, so that
/// agreeing with it means something.
#[test]
fn the_reference_decoder_reads_rfc_9112() {
    let body = b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
    for count_cr in [true, false] {
        assert_eq!(
            h1::reference_chunked(body, count_cr, 0).0,
            Chunked::Ends(body.len() - 4)
        );
        assert_eq!(
            h1::reference_chunked(b"0\r\n\r\n", count_cr, 0).0,
            Chunked::Ends(5)
        );
        assert_eq!(
            h1::reference_chunked(b"A\r\n0123456789\r\n0\r\n\r\n", count_cr, 0).0,
            Chunked::Ends(20)
        );
        assert_eq!(
            h1::reference_chunked(b"5\r\nhel", count_cr, 0).0,
            Chunked::Incomplete
        );
        assert_eq!(
            h1::reference_chunked(b"7fffffffffffffff\r\n", count_cr, 0).0,
            Chunked::Incomplete
        );
        for bad in [
            &b"g\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"8000000000000000\r\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\n\n",
            b"0\r\n\r\r",
        ] {
            assert_eq!(
                h1::reference_chunked(bad, count_cr, 0).0,
                Chunked::Invalid,
                "{}",
                h1::esc(bad)
            );
        }
    }
    let mut big = b"0;".to_vec();
    big.extend(std::iter::repeat_n(b'e', h1::MAX_META + 1));
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(h1::reference_chunked(&big, false, 0).0, Chunked::Invalid);
    assert_eq!(
        h1::check_chunked(&big, 7, 0, Opts::STRICT).scan,
        Chunked::Invalid
    );
    // Sizes past a limit, as soon as the size line ends; the data read.
    let two = b"5\r\nhello\r\n6\r\nworld!\r\n0\r\n\r\n";
    assert_eq!(h1::reference_chunked(two, true, 10), (Chunked::TooLarge, 5));
    assert_eq!(
        h1::reference_chunked(two, true, 11),
        (Chunked::Ends(two.len()), 11)
    );
    assert_eq!(
        h1::check_chunked(two, 3, 10, Opts::STRICT),
        h1::ChunkedOutcome {
            scan: Chunked::TooLarge,
            hyper: HyperChunked::NotRun
        }
    );
    assert_eq!(
        h1::check_chunked(two, 3, 0, Opts::STRICT),
        h1::ChunkedOutcome {
            scan: Chunked::Ends(two.len()),
            hyper: HyperChunked::Agrees
        }
    );
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

fn response(rng: &mut Rng) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(if rng.chance(80) {
        b"HTTP/1.1 "
    } else if rng.chance(80) {
        b"HTTP/1.0 "
    } else {
        rng.pick(&[&b"HTTP/2 "[..], b"HTTP/1.1  ", b"http/1.1 ", b"HTTP/1.2 "])
    });
    let status: &[u8] = if rng.chance(95) {
        rng.pick(&[
            &b"200"[..],
            b"200",
            b"200",
            b"201",
            b"204",
            b"206",
            b"301",
            b"304",
            b"404",
            b"500",
            b"502",
            b"999",
            b"100",
            b"101",
            b"103",
            b"199",
        ])
    } else {
        rng.pick(&[&b"000"[..], b"099", b"20", b"2000", b"abc"])
    };
    b.extend_from_slice(status);
    // No reason phrase, or one with obs-text: rare, as they hit a known
    // crash (see `h1::check_response`).
    b.extend_from_slice(if rng.chance(94) {
        rng.pick(&[&b" OK"[..], b" ", b" Not Found", b" x\ty"])
    } else {
        rng.pick(&[&b""[..], b" Very \x80 Fine"])
    });
    b.extend_from_slice(b"\r\n");
    let mut headers: Vec<(&[u8], &[u8])> = Vec::new();
    if rng.chance(45) {
        let te: &[u8] = rng.pick(&[
            &b"chunked"[..],
            b"Chunked",
            b"gzip, chunked",
            b"chunked, gzip",
            b"chunked,",
            b"chunked, ",
            b"gzip",
            b"identity",
            b"",
            b" chunked ",
            b"gzip,chunked",
        ]);
        headers.push((b"Transfer-Encoding", te));
        if rng.chance(15) {
            headers.push((
                b"transfer-encoding",
                rng.pick(&[&b"chunked"[..], b"gzip", b""]),
            ));
        }
    }
    if rng.chance(55) {
        let cl: &[u8] = if rng.chance(75) {
            rng.pick(&[&b"0"[..], b"5", b"12", b"5, 5", b"0005"])
        } else {
            rng.pick(&[
                &b"5, 6"[..],
                b"+5",
                b"0x5",
                b"",
                b"00000000000000000005",
                b"99999999999999999999",
                b"5,",
            ])
        };
        headers.push((b"Content-Length", cl));
        if rng.chance(15) {
            headers.push((b"content-length", rng.pick(&[&b"5"[..], b"6"])));
        }
    }
    if rng.chance(40) {
        let c: &[u8] = rng.pick(&[
            &b"close"[..],
            b"keep-alive",
            b"Keep-Alive",
            b"close, keep-alive",
            b"keep-alive, close",
            b"X-Secret",
            b"keep-alive, X-Secret",
            b"Date",
            b"content-length",
            b"",
        ]);
        headers.push((b"Connection", c));
    }
    if rng.chance(50) {
        headers.push((b"Date", b"Sun, 06 Nov 1994 08:49:37 GMT"));
    }
    for _ in 0..rng.below(4) {
        headers.push(rng.pick(&[
            (&b"X-Secret"[..], &b"1"[..]),
            (b"Content-Type", b"text/plain"),
            (b"Server", b"x"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Upgrade", b"h2"),
            (b"Trailer", b"X"),
            (b"Proxy-Connection", b"close"),
            (b"spike-sold-out", b"1"),
            (b"X-Obs", b"a\x80b"),
        ]));
    }
    if headers.len() > 1 && rng.chance(50) {
        let (i, j) = (rng.below(headers.len()), rng.below(headers.len()));
        headers.swap(i, j);
    }
    for (n, v) in headers {
        b.extend_from_slice(n);
        b.extend_from_slice(b": ");
        b.extend_from_slice(v);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"\r\n");
    if rng.chance(50) {
        b.extend_from_slice(rng.pick(&[
            &b"hello"[..],
            b"5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
        ]));
    }
    if rng.chance(25) {
        mutate(rng, &mut b);
    }
    b
}

/// `response::parse` on 4000 generated heads, for HEAD and other requests.
#[test]
fn response_framing_follows_rfc_9112() {
    let mut rng = Rng::new(0x5eed_0003);
    let n = 4000;
    let (mut empty, mut length, mut chunked, mut close) = (0, 0, 0, 0);
    let (mut informational, mut partial, mut malformed, mut skipped) = (0, 0, 0, 0);
    for _ in 0..n {
        let raw = response(&mut rng);
        let other = h1::check_response(&raw, false, open());
        let to_head = h1::check_response(&raw, true, open());
        match (other, to_head) {
            (ResponseOutcome::Complete(_), ResponseOutcome::Complete(f)) => {
                assert_eq!(
                    f,
                    Framing::Empty,
                    "a HEAD answer with a body: {}",
                    h1::esc(&raw)
                );
            }
            (a, b) => assert_eq!(
                a,
                b,
                "to_head changed more than the framing: {}",
                h1::esc(&raw)
            ),
        }
        match other {
            ResponseOutcome::Complete(Framing::Empty) => empty += 1,
            ResponseOutcome::Complete(Framing::Length(_)) => length += 1,
            ResponseOutcome::Complete(Framing::Chunked) => chunked += 1,
            ResponseOutcome::Complete(Framing::Close) => close += 1,
            ResponseOutcome::Informational => informational += 1,
            ResponseOutcome::Partial => partial += 1,
            ResponseOutcome::Malformed(_) => malformed += 1,
            ResponseOutcome::Skipped => skipped += 1,
        }
    }
    eprintln!(
        "responses: {empty} empty, {length} length, {chunked} chunked, {close} close, \
         {informational} 1xx, {partial} partial, {malformed} malformed, {skipped} skipped (known crash)"
    );
    for (what, count) in [
        ("Empty", empty),
        ("Length", length),
        ("Chunked", chunked),
        ("Close", close),
    ] {
        assert!(
            count >= n / 20,
            "only {count} of {n} responses were framed {what}"
        );
    }
    assert!(informational >= n / 100, "only {informational} 1xx");
    assert!(partial >= n / 100, "only {partial} partial");
    assert!(malformed >= n / 20, "only {malformed} malformed");
    assert!(skipped <= n / 10, "{skipped} of {n} skipped as known");
}

/// Ambiguous lengths are refused, and the check sees them.
#[test]
fn ambiguous_response_lengths_are_refused() {
    for raw in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
    ] {
        assert_eq!(
            h1::check_response(raw, false, Opts::STRICT),
            ResponseOutcome::Malformed(Malformed::Length)
        );
    }
    assert_eq!(
        h1::check_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
            Opts::STRICT
        ),
        ResponseOutcome::Complete(Framing::Chunked)
    );
}

// ---------------------------------------------------------------------------
// What the fuzzer found
// ---------------------------------------------------------------------------

/// The known discrepancies not fixed yet (fuzz/regressions/README.md).
/// A fix takes its class out of this list: its saved inputs must then
/// pass every check.
const OPEN: &[u32] = &[];

/// The class of a saved input, from its file name.
fn class_of(name: &str) -> u32 {
    const PREFIXES: &[(&str, u32)] = &[
        ("no-reason-phrase", h1::known::REASON),
        ("reason-", h1::known::REASON),
        ("size-digits", h1::known::SIZE_DIGITS),
        ("status-", h1::known::STATUS),
        ("http10-te", h1::known::HTTP10_TE),
        (
            "http10-close-then-keep-alive",
            h1::known::CLOSE_THEN_KEEP_ALIVE,
        ),
        ("te-empty", h1::known::TE_EMPTY_ELEMENT),
        ("date-dropped", h1::known::DATE_DROPPED),
        ("tiny-trailer", h1::known::TINY_TRAILERS),
    ];
    PREFIXES
        .iter()
        .find(|(p, _)| name.starts_with(p))
        .map_or(0, |(_, c)| *c)
}

/// The checks with the open classes let through.
fn open() -> Opts {
    Opts {
        skip: OPEN.iter().fold(0, |all, class| all | class),
    }
}

/// Every input saved under fuzz/regressions/<target>/: (file name, bytes).
fn regressions(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            found.push((name, std::fs::read(&path).expect("readable")));
        }
    }
    found.sort();
    found
}

fn replay(target: &str, input: &[u8], opts: Opts) {
    match target {
        "request_head" => {
            h1::check_request(input, h1::REPLAY, 1024 * 1024, opts);
        }
        "chunked" => {
            // As fuzz_targets/chunked.rs reads its input.
            if let [cut, limit, body @ ..] = input {
                let limits = [0, 0, 0, 0, 1, 16, 100, 4096];
                let split = usize::from(*cut) * (body.len() + 1) / 256;
                h1::check_chunked(body, split, limits[usize::from(*limit & 7)], opts);
            }
        }
        "response_head" => {
            h1::check_response(input, false, opts);
            h1::check_response(input, true, opts);
        }
        _ => unreachable!(),
    }
}

/// Each saved input: while its class is open, it still fails the strict
/// checks (the finding is real) and passes every other check (letting its
/// own class through, nothing else); once fixed, it passes them all.
#[test]
fn fuzz_regressions_fail_only_their_own_check() {
    let mut n = 0;
    for target in ["request_head", "chunked", "response_head"] {
        for (name, input) in regressions(target) {
            let class = class_of(&name);
            assert!(class != 0, "{target}/{name}: no class for this name");
            n += 1;
            if !OPEN.contains(&class) {
                replay(target, &input, Opts::STRICT);
                continue;
            }
            replay(target, &input, Opts { skip: class });
            let strict = std::panic::catch_unwind(|| replay(target, &input, Opts::STRICT));
            assert!(
                strict.is_err(),
                "{target}/{name} passes the strict checks: take its class out of OPEN"
            );
        }
    }
    assert!(
        n >= OPEN.len(),
        "only {n} saved inputs under fuzz/regressions/"
    );
}
