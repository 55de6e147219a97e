//! The checks behind the fuzz targets `request_head`, `chunked` and
//! `response_head` (fuzz/fuzz_targets/) and behind tests/h1_properties.rs,
//! which includes this file with `#[path]`: one copy of each rule, so the
//! stable test and the fuzzer hold the balancer's HTTP/1 fast path
//! (`spike::http1`, driven by `spike::balancer::h1`) to the same contract.
//!
//! - A request head the fast path takes (`Parsed::Fast`) is read the same
//!   way by an independent reading (httparse on its own, `http`'s types,
//!   the general path's rules) and by hyper's own server, fed the same
//!   bytes over an in-memory pipe: the fast path may only be narrower.
//! - `ChunkedScan` finds the same end however the body is split, never
//!   past what it was given, and agrees with a small reference decoder
//!   (RFC 9112 7.1) on whether the body is valid and where it ends.
//! - A response head is framed as RFC 9112 6.3 says, and its connection is
//!   kept only as RFC 9112 6.1 and 9.3 allow.
//!
//! Every check panics with the input escaped, so a fuzzer crash or a
//! failed test names the bytes.
//!
//! Only the crates the root Cargo.toml has are used (`http` through
//! `hyper::http`), so that the stable test needs no new dependency.

#![allow(dead_code)]

use std::convert::Infallible;
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::http::uri::PathAndQuery;
use hyper::http::{HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use spike::http1::request::{self, Kind, MAX_HEAD, MAX_HEADERS, Parsed, RequestHead};
use spike::http1::response::{
    self, ChunkedScan, Framing, MAX_CHUNK, MAX_RESPONSE_HEAD, Malformed, ParsedResponse,
    ResponseHead,
};

/// The replay limit the balancer passes (`forward::REPLAY_LIMIT`).
pub const REPLAY: u64 = spike::balancer::forward::REPLAY_LIMIT;

/// Bytes of chunk extensions and trailers a chunked body may carry
/// (`response::MAX_META`, private there; 16 KiB as documented).
pub const MAX_META: usize = 16 * 1024;

/// Discrepancies already reported (see fuzz/regressions/README.md), by
/// class. A check whose class is skipped lets exactly that class through,
/// so that a fuzzer can look past it; otherwise it panics like any other.
pub mod known {
    /// A status line without a reason phrase, or with obs-text in it:
    /// `response::parse` takes the reason's offset from a static "".
    pub const REASON: u32 = 1 << 0;
    /// 256 or more digits in a chunk size: `ChunkedScan::digits` (a `u8`)
    /// overflows.
    pub const SIZE_DIGITS: u32 = 1 << 1;
    /// A final status under 100 (`HTTP/1.1 000`) is taken.
    pub const STATUS: u32 = 1 << 2;
    /// An HTTP/1.0 response with Transfer-Encoding keeps its connection.
    pub const HTTP10_TE: u32 = 1 << 3;
    /// HTTP/1.0 `Connection: close, keep-alive` keeps the connection.
    pub const CLOSE_THEN_KEEP_ALIVE: u32 = 1 << 4;
    /// `Transfer-Encoding: chunked,` (an empty last list element) reads
    /// as not chunked.
    pub const TE_EMPTY_ELEMENT: u32 = 1 << 5;
    /// A Date named in Connection is dropped and none written.
    pub const DATE_DROPPED: u32 = 1 << 6;
    /// One-byte trailer lines escape the 16 KiB meta cap.
    pub const TINY_TRAILERS: u32 = 1 << 7;

    pub const NAMES: [(&str, u32); 8] = [
        ("reason", REASON),
        ("size-digits", SIZE_DIGITS),
        ("status", STATUS),
        ("http10-te", HTTP10_TE),
        ("close-then-keep-alive", CLOSE_THEN_KEEP_ALIVE),
        ("te-empty-element", TE_EMPTY_ELEMENT),
        ("date-dropped", DATE_DROPPED),
        ("tiny-trailers", TINY_TRAILERS),
    ];
}

/// Which known discrepancies the checks let through.
#[derive(Debug, Clone, Copy)]
pub struct Opts {
    pub skip: u32,
}

impl Opts {
    /// Every check, every known discrepancy a failure.
    pub const STRICT: Opts = Opts { skip: 0 };
    /// Every known discrepancy let through.
    pub const SKIP_KNOWN: Opts = Opts { skip: u32::MAX };

    pub fn skips(self, class: u32) -> bool {
        self.skip & class != 0
    }

    /// What the fuzz targets use: `H1_FUZZ_SKIP_KNOWN` unset is strict;
    /// `1` or `all` skips every known class; else a comma-separated list
    /// of names from [`known::NAMES`].
    pub fn from_env() -> Opts {
        static OPTS: OnceLock<Opts> = OnceLock::new();
        *OPTS.get_or_init(|| {
            let Ok(v) = std::env::var("H1_FUZZ_SKIP_KNOWN") else {
                return Opts::STRICT;
            };
            if v == "1" || v == "all" {
                return Opts::SKIP_KNOWN;
            }
            let mut skip = 0;
            for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                match known::NAMES.iter().find(|(n, _)| *n == name) {
                    Some((_, class)) => skip |= class,
                    None => panic!("H1_FUZZ_SKIP_KNOWN: no known class {name:?}"),
                }
            }
            Opts { skip }
        })
    }
}

/// `bytes` as a Rust byte-string literal body (`\r`, `\n`, `\xNN`).
pub fn esc(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 2);
    s.push_str("b\"");
    for &b in bytes.iter().take(4096) {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s.push('"');
    if bytes.len() > 4096 {
        let _ = write!(s, " (first 4096 of {} bytes)", bytes.len());
    }
    s
}

macro_rules! ensure {
    ($cond:expr, $input:expr, $($fmt:tt)+) => {
        if !$cond {
            panic!("{}\n  input: {}", format!($($fmt)+), esc($input));
        }
    };
}

fn lower(b: &[u8]) -> Vec<u8> {
    b.to_ascii_lowercase()
}

fn is(name: &[u8], want: &str) -> bool {
    name.eq_ignore_ascii_case(want.as_bytes())
}

/// Elements of a comma-separated list (RFC 9110 5.6.1), trimmed of
/// spaces and tabs, empty ones left out.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|e| {
            let start = e
                .iter()
                .position(|&c| c != b' ' && c != b'\t')
                .unwrap_or(e.len());
            let end = e
                .iter()
                .rposition(|&c| c != b' ' && c != b'\t')
                .map_or(start, |i| i + 1);
            &e[start..end.max(start)]
        })
        .filter(|e| !e.is_empty())
}

// ---------------------------------------------------------------------------
// Request heads
// ---------------------------------------------------------------------------

/// What one request check saw, for the tests' shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Fast, and hyper's server read it the same way.
    Fast,
    Partial,
    General,
    /// General, with a body whose chunk sizes the balancer checks first.
    GeneralChunked,
}

/// Runs `request::parse` on `buf` (with `underscores` both ways) and, for a
/// head the fast path takes, every independent check and hyper's server.
pub fn check_request(buf: &[u8], replay: u64, limit: u64, opts: Opts) -> RequestOutcome {
    let outcome = check_request_inner(buf, replay, limit, opts);
    if std::env::var_os("H1_CHECKS_STATS").is_some() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        static SEEN: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];
        SEEN[outcome as usize].fetch_add(1, Relaxed);
        let total: usize = SEEN.iter().map(|c| c.load(Relaxed)).sum();
        if total.is_power_of_two() {
            eprintln!(
                "request heads: {total}: {} fast (compared with hyper), {} partial, {} general, {} general chunked",
                SEEN[0].load(Relaxed),
                SEEN[1].load(Relaxed),
                SEEN[2].load(Relaxed),
                SEEN[3].load(Relaxed)
            );
        }
    }
    outcome
}

fn check_request_inner(buf: &[u8], replay: u64, limit: u64, opts: Opts) -> RequestOutcome {
    let mut head = RequestHead::default();
    let parsed = request::parse(buf, &mut head, replay, limit, false);
    let mut head_u = RequestHead::default();
    let parsed_u = request::parse(buf, &mut head_u, replay, limit, true);
    ensure!(
        parsed == parsed_u,
        buf,
        "underscores_in_headers changed the decision: {parsed:?} without, {parsed_u:?} with"
    );
    match parsed {
        Parsed::Partial => {
            ensure!(
                buf.len() < MAX_HEAD,
                buf,
                "Partial for {} bytes, over MAX_HEAD",
                buf.len()
            );
            let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut hs);
            let r = req.parse(buf);
            ensure!(
                matches!(r, Ok(httparse::Status::Partial)),
                buf,
                "Partial, but httparse says {r:?}"
            );
            RequestOutcome::Partial
        }
        Parsed::General if head.chunked_body => {
            check_chunked_head(buf, &head);
            RequestOutcome::GeneralChunked
        }
        Parsed::General => RequestOutcome::General,
        Parsed::Fast => {
            check_fast(buf, &head, replay, limit, false);
            check_fast(buf, &head_u, replay, limit, true);
            ensure!(
                head.len == head_u.len
                    && head.target == head_u.target
                    && head.content_length == head_u.content_length
                    && head.close == head_u.close
                    && head.headers.len() == head_u.headers.len(),
                buf,
                "underscores_in_headers changed the head: {head:?} vs {head_u:?}"
            );
            check_prefixes(buf, &head, replay, limit);
            check_with_hyper(buf, &head, opts);
            RequestOutcome::Fast
        }
    }
}

/// A head handed to hyper with `chunked_body`: the balancer scans its
/// body from `head.len` before hyper reads it, so that must be where
/// hyper's body starts, and hyper must read that body as chunked: one
/// `Transfer-Encoding: chunked` line, no `Content-Length`, HTTP/1.1.
fn check_chunked_head(buf: &[u8], head: &RequestHead) {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "chunked_body, but httparse says {other:?}\n  input: {}",
            esc(buf)
        ),
    };
    ensure!(
        len == head.len,
        buf,
        "chunked_body from {}, but the head ends at {len}",
        head.len
    );
    ensure!(
        req.version == Some(1),
        buf,
        "chunked_body for version {:?}",
        req.version
    );
    let te: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|h| is(h.name.as_bytes(), "transfer-encoding"))
        .map(|h| h.value)
        .collect();
    let lengths = req
        .headers
        .iter()
        .filter(|h| is(h.name.as_bytes(), "content-length"))
        .count();
    ensure!(
        te.len() == 1 && is(te[0].trim_ascii(), "chunked") && lengths == 0,
        buf,
        "chunked_body with Transfer-Encoding {:?} and {lengths} Content-Length",
        te.iter().map(|v| esc(v)).collect::<Vec<_>>()
    );
}

/// The independent reading of a head the fast path took.
fn check_fast(buf: &[u8], head: &RequestHead, replay: u64, limit: u64, underscores: bool) {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("Fast, but httparse says {other:?}\n  input: {}", esc(buf)),
    };
    ensure!(
        len == head.len,
        buf,
        "head.len {} but httparse read {len}",
        head.len
    );
    ensure!(len <= buf.len(), buf, "head longer than the input");
    // HTTP/1.1, or HTTP/1.0 that closes after it (checked with
    // `Connection` below).
    ensure!(
        matches!(req.version, Some(0 | 1)),
        buf,
        "Fast for version {:?}",
        req.version
    );
    let http10 = req.version == Some(0);
    ensure!(
        head.http10 == http10,
        buf,
        "http10 {} for version {:?}",
        head.http10,
        req.version
    );

    // The method: a standard one the general path proxies (not CONNECT or
    // TRACE, which it answers 405), spelled exactly.
    let method = req.method.expect("complete");
    ensure!(
        ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"].contains(&method),
        buf,
        "Fast for method {method:?}"
    );
    ensure!(
        method == head.method.as_str(),
        buf,
        "method {method:?} read as {}",
        head.method
    );

    // The target: origin form, one reading as `http`'s types.
    let path = req.path.expect("complete");
    ensure!(
        buf.get(head.target.clone()) == Some(path.as_bytes()),
        buf,
        "head.target {:?} is not the request target {path:?}",
        head.target
    );
    ensure!(
        path.starts_with('/'),
        buf,
        "target {path:?} is not origin-form"
    );
    ensure!(
        !path.bytes().any(|c| c == b'#' || c <= b' ' || c >= 0x7f),
        buf,
        "target {path:?} has a fragment, a space, a control or non-ASCII byte"
    );
    match PathAndQuery::from_str(path) {
        Ok(pq) => ensure!(
            pq.as_str() == path,
            buf,
            "PathAndQuery reads {path:?} as {pq:?}"
        ),
        Err(e) => panic!("PathAndQuery refuses {path:?}: {e}\n  input: {}", esc(buf)),
    }
    match Uri::from_str(path) {
        Ok(uri) => {
            ensure!(
                uri.scheme().is_none()
                    && uri.authority().is_none()
                    && uri.path_and_query().map(|p| p.as_str()) == Some(path),
                buf,
                "Uri reads {path:?} as {uri:?}"
            );
            let want_end = head.target.start + path.find('?').unwrap_or(path.len());
            ensure!(
                head.path_end == want_end,
                buf,
                "path_end {} but the path ends at {want_end}",
                head.path_end
            );
            ensure!(
                &buf[head.target.start..head.path_end] == uri.path().as_bytes(),
                buf,
                "the path is {:?} to http::Uri",
                uri.path()
            );
        }
        Err(e) => panic!("Uri refuses {path:?}: {e}\n  input: {}", esc(buf)),
    }

    // Header lines: the same as httparse's, each valid for `http`.
    ensure!(
        head.headers.len() == req.headers.len(),
        buf,
        "{} header lines, httparse read {}",
        head.headers.len(),
        req.headers.len()
    );
    let mut hosts = 0;
    let mut lengths = Vec::new();
    let mut close = false;
    let mut keep_alive = false;
    let mut keys = Vec::new();
    let mut users = Vec::new();
    for (i, (mine, theirs)) in head.headers.iter().zip(req.headers.iter()).enumerate() {
        let name = theirs.name.as_bytes();
        let value = theirs.value;
        ensure!(
            buf.get(mine.name.clone()) == Some(name) && buf.get(mine.value.clone()) == Some(value),
            buf,
            "header {i} is {:?}: {:?}, httparse read {:?}: {:?}",
            buf.get(mine.name.clone()).map(String::from_utf8_lossy),
            buf.get(mine.value.clone()).map(String::from_utf8_lossy),
            theirs.name,
            String::from_utf8_lossy(value)
        );
        ensure!(
            HeaderName::from_bytes(name).is_ok(),
            buf,
            "header name {:?} is not a valid http::HeaderName",
            theirs.name
        );
        ensure!(
            HeaderValue::from_bytes(value).is_ok(),
            buf,
            "header value {} is not a valid http::HeaderValue",
            esc(value)
        );
        for refused in ["transfer-encoding", "expect", "upgrade"] {
            ensure!(!is(name, refused), buf, "Fast with a {refused} header");
        }
        let mut kind = Kind::Plain;
        if is(name, "host") {
            hosts += 1;
            ensure!(plain_authority(value), buf, "Fast with Host {}", esc(value));
        } else if is(name, "content-length") {
            lengths.push(value);
        } else if is(name, "connection") {
            kind = Kind::Dropped;
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                ensure!(
                    token.is_empty() || is(token, "close") || is(token, "keep-alive"),
                    buf,
                    "Fast with Connection {} (names a header the general path removes)",
                    esc(value)
                );
                close |= is(token, "close");
                keep_alive |= is(token, "keep-alive");
            }
        } else if [
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "x-real-ip",
        ]
        .iter()
        .any(|n| is(name, n))
        {
            kind = Kind::Dropped;
        } else if is(name, "x-forwarded-for") {
            kind = Kind::ForwardedFor;
        } else if is(name, "idempotency-key") {
            keys.push(i);
        } else if is(name, "x-user-id") {
            users.push(i);
        }
        if kind == Kind::Plain && !underscores && name.contains(&b'_') {
            kind = Kind::Dropped;
        }
        ensure!(
            mine.kind == kind,
            buf,
            "header {:?} is {:?}, should be {kind:?} (underscores {underscores})",
            theirs.name,
            mine.kind
        );
    }
    ensure!(hosts == 1, buf, "Fast with {hosts} Host headers");
    ensure!(
        lengths.len() <= 1,
        buf,
        "Fast with {} Content-Lengths",
        lengths.len()
    );
    let declared = match lengths.first() {
        None => 0,
        Some(v) => {
            ensure!(
                !v.is_empty() && v.iter().all(u8::is_ascii_digit),
                buf,
                "Fast with Content-Length {}",
                esc(v)
            );
            let n = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
            ensure!(
                n.is_some(),
                buf,
                "Fast with Content-Length {} (overflows)",
                esc(v)
            );
            n.unwrap_or_default()
        }
    };
    ensure!(
        head.content_length == declared,
        buf,
        "content_length {} but Content-Length says {declared}",
        head.content_length
    );
    ensure!(
        declared <= replay,
        buf,
        "Fast with a body of {declared} > replay {replay}"
    );
    ensure!(
        limit == 0 || declared <= limit,
        buf,
        "Fast with a body of {declared} > max_body {limit}"
    );
    ensure!(!(http10 && keep_alive), buf, "Fast for HTTP/1.0 kept alive");
    ensure!(
        head.close == (close || http10),
        buf,
        "close {} but Connection says {close} (HTTP/1.0: {http10})",
        head.close
    );
    ensure!(
        head.keys == keys.len() && (keys.is_empty() || head.key_at == keys[0]),
        buf,
        "keys {} at {}, but Idempotency-Key lines are {keys:?}",
        head.keys,
        head.key_at
    );
    ensure!(
        users.len() <= 1,
        buf,
        "Fast with {} X-User-Id lines",
        users.len()
    );
    ensure!(
        head.user_at == users.first().copied(),
        buf,
        "user_at {:?}, but X-User-Id lines are {users:?}",
        head.user_at
    );
}

/// The general path's rule for `Host` (`forward::headers::host_is_valid`), written
/// anew: a reg-name, IPv4 or `[IPv6]` and an optional port, nothing that
/// could be a path or two values, no `..`.
fn plain_authority(v: &[u8]) -> bool {
    const OK: &[u8] = b"-._~%!$&'()*+,;=:[]";
    !v.is_empty()
        && !v.windows(2).any(|w| w == b"..")
        && v.iter()
            .all(|c| c.is_ascii_alphanumeric() || OK.contains(c))
}

/// Every strict prefix of a head the fast path takes is `Partial` (so a
/// head that arrives in pieces is decided as if whole), and the head alone
/// is decided as with whatever followed it.
fn check_prefixes(buf: &[u8], head: &RequestHead, replay: u64, limit: u64) {
    let n = head.len;
    let mut cuts = vec![
        0,
        n / 2,
        n.saturating_sub(1),
        n.saturating_sub(2),
        n.saturating_sub(3),
    ];
    if n <= 160 {
        cuts.extend(0..n);
    }
    for cut in cuts.into_iter().filter(|&c| c < n) {
        let mut h = RequestHead::default();
        let p = request::parse(&buf[..cut], &mut h, replay, limit, false);
        ensure!(
            p == Parsed::Partial,
            buf,
            "the first {cut} bytes of a Fast head of {n} are {p:?}, not Partial"
        );
    }
    let mut h = RequestHead::default();
    let p = request::parse(&buf[..n], &mut h, replay, limit, false);
    ensure!(
        p == Parsed::Fast
            && h.len == n
            && h.target == head.target
            && h.content_length == head.content_length,
        buf,
        "the head alone is {p:?} {h:?}, with what follows it Fast {head:?}"
    );
}

/// What hyper's server made of one request.
#[derive(Debug)]
pub struct HyperSaw {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    /// In `HeaderMap` order: names lower-cased, grouped by name in the
    /// order each name first came, values in the order they came.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The body's length, or why hyper could not read it.
    pub body: Result<usize, String>,
}

/// What hyper's server made of a connection's bytes.
#[derive(Debug)]
pub struct HyperRun {
    /// Each request it handed to the service, in order.
    pub requests: Vec<HyperSaw>,
    /// How the connection ended, if not cleanly.
    pub error: Option<String>,
    /// The first line of what it answered.
    pub answer: String,
}

/// A request pipelined after the one under test: hyper reading it as the
/// second request proves it took exactly the bytes the fast path did.
pub const SECOND: &[u8] = b"GET /second HTTP/1.1\r\nHost: second\r\nConnection: close\r\n\r\n";

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Feeds `wire` to hyper's HTTP/1 server as the balancer's general path
/// builds it (`crate::server`: keep-alive, 96 KiB buffer) over an
/// in-memory pipe whose other end then shuts its write side, with a
/// service that reads each body and answers 200. `half_close` is on (it
/// only keeps hyper from dropping the last request at the pipe's EOF), so
/// a hyper that wants more bytes than there are fails instead of waiting.
pub fn hyper_reads(wire: &[u8]) -> HyperRun {
    let wire = wire.to_vec();
    runtime().block_on(async move {
        let seen: Arc<Mutex<Vec<HyperSaw>>> = Arc::default();
        let record = seen.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let record = record.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes().len())
                    .map_err(|e| format!("{e}"));
                record.lock().expect("not poisoned").push(HyperSaw {
                    method: parts.method.clone(),
                    uri: parts.uri.clone(),
                    version: parts.version,
                    headers: parts
                        .headers
                        .iter()
                        .map(|(n, v)| (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()))
                        .collect(),
                    body,
                });
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        });
        let (mut client, server) = tokio::io::duplex(wire.len() + 64 * 1024);
        let _ = client.write_all(&wire).await;
        let _ = client.shutdown().await;
        let mut builder = http1::Builder::new();
        builder
            .keep_alive(true)
            .half_close(true)
            .max_buf_size(96 * 1024);
        let conn = builder.serve_connection(TokioIo::new(server), service);
        // Never expected: the pipe's EOF ends any wait.
        let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), client.read_to_end(&mut answer)).await;
        let answer = answer
            .split(|&b| b == b'\n')
            .next()
            .map(|l| String::from_utf8_lossy(l).trim_end().to_owned())
            .unwrap_or_default();
        let error = match ended {
            Err(_) => Some("hyper did not finish within 10 s".to_owned()),
            Ok(Err(e)) => Some(format!("{e}")),
            Ok(Ok(())) => None,
        };
        let requests = std::mem::take(&mut *seen.lock().expect("not poisoned"));
        HyperRun {
            requests,
            error,
            answer,
        }
    })
}

/// hyper's server must read the head the fast path took just as the fast
/// path does: method, target, version, every header line, body length.
fn check_with_hyper(buf: &[u8], head: &RequestHead, _opts: Opts) {
    let mut wire = buf[..head.len].to_vec();
    wire.resize(head.len + head.content_length as usize, b'b');
    wire.extend_from_slice(SECOND);
    let run = hyper_reads(&wire);
    let Some(saw) = run.requests.first() else {
        panic!(
            "the fast path took a request hyper's server refuses: {} (answered {:?})\n  input: {}",
            run.error.as_deref().unwrap_or("no request"),
            run.answer,
            esc(buf)
        );
    };
    // After a `Connection: close` request hyper reads no further.
    let want = if head.close { 1 } else { 2 };
    let second_ok = head.close || run.requests.get(1).is_some_and(|r| r.uri == "/second");
    ensure!(
        run.error.is_none() && run.requests.len() == want && second_ok,
        buf,
        "hyper did not end the request where the fast path does: {} requests ({:?}), error {:?}",
        run.requests.len(),
        run.requests
            .iter()
            .map(|r| r.uri.to_string())
            .collect::<Vec<_>>(),
        run.error
    );
    ensure!(
        saw.method == head.method,
        buf,
        "hyper read method {}, fast path {}",
        saw.method,
        head.method
    );
    let version = if head.http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    ensure!(
        saw.version == version,
        buf,
        "hyper read version {:?}, the fast path {version:?}",
        saw.version
    );
    let target = &buf[head.target.clone()];
    ensure!(
        saw.uri.scheme().is_none()
            && saw.uri.authority().is_none()
            && saw.uri.path_and_query().map(|p| p.as_str().as_bytes()) == Some(target),
        buf,
        "hyper read the target as {:?}, fast path as {}",
        saw.uri,
        esc(target)
    );
    ensure!(
        saw.uri.path().as_bytes() == &buf[head.target.start..head.path_end],
        buf,
        "hyper's path is {:?}, the fast path's {}",
        saw.uri.path(),
        esc(&buf[head.target.start..head.path_end])
    );
    // The fast path's lines, grouped as a HeaderMap groups them.
    let mut grouped: Vec<(Vec<u8>, Vec<Vec<u8>>)> = Vec::new();
    for h in &head.headers {
        let name = lower(&buf[h.name.clone()]);
        let value = buf[h.value.clone()].to_vec();
        match grouped.iter_mut().find(|(n, _)| *n == name) {
            Some((_, values)) => values.push(value),
            None => grouped.push((name, vec![value])),
        }
    }
    let mine: Vec<(Vec<u8>, Vec<u8>)> = grouped
        .into_iter()
        .flat_map(|(n, vs)| vs.into_iter().map(move |v| (n.clone(), v)))
        .collect();
    if saw.headers != mine {
        let show = |hs: &[(Vec<u8>, Vec<u8>)]| {
            hs.iter()
                .map(|(n, v)| format!("{}: {}", String::from_utf8_lossy(n), esc(v)))
                .collect::<Vec<_>>()
        };
        panic!(
            "hyper read the headers as {:?}, the fast path as {:?}\n  input: {}",
            show(&saw.headers),
            show(&mine),
            esc(buf)
        );
    }
    ensure!(
        saw.body == Ok(head.content_length as usize),
        buf,
        "hyper read a body of {:?}, the fast path expects {}",
        saw.body,
        head.content_length
    );
}

// ---------------------------------------------------------------------------
// Chunked bodies
// ---------------------------------------------------------------------------

/// What a chunked body is, read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// The body ends after this many bytes.
    Ends(usize),
    /// Valid so far; more is needed.
    Incomplete,
    /// Not a chunked body.
    Invalid,
    /// Chunk sizes that add up past the scan's limit.
    TooLarge,
}

fn of_scan(r: Result<Option<usize>, Malformed>) -> Chunked {
    match r {
        Ok(Some(n)) => Chunked::Ends(n),
        Ok(None) => Chunked::Incomplete,
        Err(Malformed::Chunk) => Chunked::Invalid,
        Err(Malformed::TooLarge) => Chunked::TooLarge,
        Err(other) => panic!("ChunkedScan returned {other:?}"),
    }
}

/// `ChunkedScan::with_limit(limit)` on `parts` in order, as the relay and
/// the request pre-check feed it.
pub fn scan_parts(parts: &[&[u8]], limit: u64) -> Chunked {
    let mut scan = ChunkedScan::with_limit(limit);
    let mut before = 0;
    for part in parts {
        match scan.scan(part) {
            Ok(Some(n)) => {
                assert!(
                    n <= part.len(),
                    "ChunkedScan ended at {n}, past its {} bytes",
                    part.len()
                );
                return Chunked::Ends(before + n);
            }
            Ok(None) => before += part.len(),
            Err(e) => return of_scan(Err(e)),
        }
    }
    Chunked::Incomplete
}

/// A reference reading of RFC 9112 7.1, written for these checks:
///
/// ```text
/// chunked-body = *chunk last-chunk trailer-section CRLF
/// chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
/// chunk-size   = 1*HEXDIG            ; at most 2^63 - 1 (as Nginx)
/// last-chunk   = 1*"0" [ chunk-ext ] CRLF
/// chunk-ext    = *( BWS ";" ... )    ; opaque up to its CRLF
/// trailer-section = *( field-line CRLF )   ; opaque lines
/// ```
///
/// CRLF everywhere: a bare CR or LF is invalid. Spaces and tabs may follow
/// the size (BWS, as hyper and Nginx read it). Extension and trailer lines
/// are taken as opaque bytes up to their CRLF: a token or quoted-string in
/// them cannot hold a CR or LF, so reading them any closer could make a
/// body invalid but never move its end. They count against [`MAX_META`]:
/// with `count_cr`, each line's CR counts as one of its bytes (as the scan
/// counts), without it only the bytes between `;` (or the line's start)
/// and the CR; either reading is accepted. `limit` (0: none): sizes that
/// add up past it are `TooLarge` once their size line's CRLF is read.
/// Returns the reading and the data bytes of the chunks read.
pub fn reference_chunked(b: &[u8], count_cr: bool, limit: u64) -> (Chunked, u64) {
    use Chunked::*;
    let mut i = 0;
    let mut meta = 0usize;
    let mut data: u64 = 0;
    // Past the meta cap: `Invalid`, tested at every byte that counts.
    macro_rules! count {
        () => {{
            meta += 1;
            if meta > MAX_META {
                return (Invalid, data);
            }
        }};
    }
    // The rest of an extension or trailer line, up to its CR (every byte
    // counted; the CR too with `count_cr`); a bare LF is `Invalid`.
    macro_rules! to_cr {
        () => {{
            loop {
                match b.get(i) {
                    None => return (Incomplete, data),
                    Some(b'\n') => return (Invalid, data),
                    Some(b'\r') => break,
                    Some(_) => {
                        count!();
                        i += 1;
                    }
                }
            }
            if count_cr {
                meta += 1;
            }
        }};
    }
    loop {
        // chunk-size
        let mut size: u64 = 0;
        let mut digits = 0;
        loop {
            let Some(&c) = b.get(i) else {
                return (Incomplete, data);
            };
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => break,
            };
            size = match size.checked_mul(16).map(|s| s + u64::from(d)) {
                Some(s) if s <= MAX_CHUNK => s,
                _ => return (Invalid, data),
            };
            digits += 1;
            i += 1;
        }
        if digits == 0 {
            return (Invalid, data);
        }
        // BWS, then an extension or the CRLF.
        while matches!(b.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        match b.get(i) {
            None => return (Incomplete, data),
            Some(b';') => {
                i += 1;
                to_cr!();
            }
            Some(b'\r') => {}
            Some(_) => return (Invalid, data),
        }
        // CRLF
        i += 1; // the CR
        match b.get(i) {
            None => return (Incomplete, data),
            Some(b'\n') => i += 1,
            Some(_) => return (Invalid, data),
        }
        if limit != 0 && data.saturating_add(size) > limit {
            return (TooLarge, data);
        }
        if size == 0 {
            break;
        }
        // chunk-data CRLF
        let left = b.len() - i;
        if (left as u64) < size {
            return (Incomplete, data);
        }
        i += size as usize;
        data += size;
        for want in [b'\r', b'\n'] {
            match b.get(i) {
                None => return (Incomplete, data),
                Some(&c) if c == want => i += 1,
                Some(_) => return (Invalid, data),
            }
        }
    }
    // trailer-section CRLF
    loop {
        match b.get(i) {
            None => return (Incomplete, data),
            Some(b'\r') => {
                return match b.get(i + 1) {
                    None => (Incomplete, data),
                    Some(b'\n') => (Ends(i + 2), data),
                    Some(_) => (Invalid, data),
                };
            }
            Some(b'\n') => return (Invalid, data),
            Some(_) => {}
        }
        to_cr!();
        match b.get(i + 1) {
            None => return (Incomplete, data),
            Some(b'\n') => i += 2,
            Some(_) => return (Invalid, data),
        }
    }
}

/// How a chunked body fared with hyper's server, as a request's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HyperChunked {
    /// Not compared (the scan did not find an end).
    NotRun,
    /// hyper read the same body: same data length, same end.
    Agrees,
    /// hyper refused the body (it is stricter: trailers as fields, ...).
    Refused,
}

/// The outcome of [`check_chunked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkedOutcome {
    pub scan: Chunked,
    pub hyper: HyperChunked,
}

/// `ChunkedScan::with_limit(limit)` on `body` whole, in two pieces cut at
/// `split`, and byte by byte when short: the same answer each time, never
/// an end past the input, and the reference decoder's answer. A body the
/// scan ends is then sent to hyper's server as a chunked request body
/// with a request pipelined after it: if hyper takes it, it must read the
/// same data and end where the scan ends.
pub fn check_chunked(body: &[u8], split: usize, limit: u64, opts: Opts) -> ChunkedOutcome {
    // Known: the scan counts a size's digits in a `u8`, which overflows at
    // the 256th (leading zeros have no limit): a panic in a debug build,
    // in a release one a size line of 256 digits then read as one of none.
    let long_size = body
        .split(|b| !b.is_ascii_hexdigit())
        .any(|run| run.len() >= 255);
    if long_size && opts.skips(known::SIZE_DIGITS) {
        return ChunkedOutcome {
            scan: Chunked::Invalid,
            hyper: HyperChunked::NotRun,
        };
    }
    let whole = {
        let mut scan = ChunkedScan::with_limit(limit);
        let r = scan.scan(body);
        if let Ok(Some(n)) = r {
            ensure!(
                n <= body.len(),
                body,
                "the end {n} is past the input's {}",
                body.len()
            );
        }
        of_scan(r)
    };
    let split = split.min(body.len());
    let two = scan_parts(&[&body[..split], &body[split..]], limit);
    ensure!(
        two == whole,
        body,
        "split at {split}: {two:?}, whole: {whole:?} (limit {limit})"
    );
    if body.len() <= 256 {
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let one = scan_parts(&bytes, limit);
        ensure!(
            one == whole,
            body,
            "byte by byte: {one:?}, whole: {whole:?} (limit {limit})"
        );
    }
    if limit != 0 {
        // A limit only ever turns an answer into TooLarge.
        let unlimited = of_scan(ChunkedScan::default().scan(body));
        ensure!(
            whole == unlimited || whole == Chunked::TooLarge,
            body,
            "limit {limit}: {whole:?}, without: {unlimited:?}"
        );
    }
    let (strict, data) = reference_chunked(body, true, limit);
    let (loose, _) = reference_chunked(body, false, limit);
    if whole != strict && whole != loose {
        if opts.skips(known::TINY_TRAILERS) && known_chunked(body, whole, loose) {
            return ChunkedOutcome {
                scan: whole,
                hyper: HyperChunked::NotRun,
            };
        }
        panic!(
            "ChunkedScan says {whole:?}, the reference {strict:?} (CR counted) / {loose:?} (not), limit {limit}\n  input: {}",
            esc(body)
        );
    }
    let hyper = match whole {
        Chunked::Ends(n) => chunked_with_hyper(body, n, data),
        _ => HyperChunked::NotRun,
    };
    ChunkedOutcome { scan: whole, hyper }
}

/// hyper's server on `body[..end]` as a chunked request body.
fn chunked_with_hyper(body: &[u8], end: usize, data: u64) -> HyperChunked {
    let mut wire =
        b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    wire.extend_from_slice(&body[..end]);
    wire.extend_from_slice(SECOND);
    let run = hyper_reads(&wire);
    match run.requests.first() {
        Some(first) if first.body.is_ok() => {
            ensure!(
                first.body == Ok(data as usize),
                body,
                "hyper read {:?} bytes of chunk data, the reference {data}",
                first.body
            );
            ensure!(
                run.error.is_none() && run.requests.len() == 2 && run.requests[1].uri == "/second",
                body,
                "hyper's chunked body does not end where the scan's does ({end}): then {:?}, error {:?}",
                run.requests
                    .iter()
                    .skip(1)
                    .map(|r| r.uri.to_string())
                    .collect::<Vec<_>>(),
                run.error
            );
            HyperChunked::Agrees
        }
        _ => {
            if std::env::var_os("H1_CHECKS_DEBUG").is_some() {
                eprintln!(
                    "hyper refused a chunked body the scan ends at {end}: {:?} / {:?}\n  body: {}",
                    run.error,
                    run.requests.first().map(|r| &r.body),
                    esc(&body[..end])
                );
            }
            HyperChunked::Refused
        }
    }
}

/// Known: trailer lines of one byte are never held to the meta cap (the
/// scan counts a trailer line's first byte without testing the cap, and a
/// CR is never tested), so a body with more than 16 KiB of them passes.
fn known_chunked(body: &[u8], scan: Chunked, reference: Chunked) -> bool {
    reference == Chunked::Invalid && scan != Chunked::Invalid && body.len() > MAX_META
}

// ---------------------------------------------------------------------------
// Response heads
// ---------------------------------------------------------------------------

/// What one response check saw, for the tests' shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseOutcome {
    Complete(Framing),
    Informational,
    Partial,
    Malformed(Malformed),
    /// Not run: a known crash (`Opts::SKIP_KNOWN` only).
    Skipped,
}

/// `response::parse` on `buf` for a request that was HEAD (`to_head`) or
/// not, checked against RFC 9112 6.1, 6.3 and 9.3 read independently.
pub fn check_response(buf: &[u8], to_head: bool, opts: Opts) -> ResponseOutcome {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut hs);
    let theirs = res.parse(buf);
    // Known: a status line with no reason phrase (`HTTP/1.1 200\r\n`):
    // httparse gives a static "" for the reason, not a slice of `buf`, and
    // `parse` takes its offset from `buf` (an overflow: a panic in a debug
    // build, a range far outside the buffer in a release one, which the
    // relay then slices).
    let reason_outside = res.reason.is_some_and(|r| {
        let (p, b) = (r.as_ptr() as usize, buf.as_ptr() as usize);
        p < b || p > b + buf.len()
    });
    if reason_outside && opts.skips(known::REASON) {
        return ResponseOutcome::Skipped;
    }
    let mut head = ResponseHead::default();
    let r = response::parse(buf, &mut head, to_head);
    match r {
        Err(Malformed::Head) => {
            ensure!(
                matches!(theirs, Err(e) if e != httparse::Error::TooManyHeaders),
                buf,
                "Malformed::Head, but httparse says {theirs:?}"
            );
            ResponseOutcome::Malformed(Malformed::Head)
        }
        Err(Malformed::TooLong) => {
            ensure!(
                matches!(theirs, Err(httparse::Error::TooManyHeaders))
                    || (matches!(theirs, Ok(httparse::Status::Partial))
                        && buf.len() >= MAX_RESPONSE_HEAD),
                buf,
                "Malformed::TooLong, but httparse says {theirs:?} for {} bytes",
                buf.len()
            );
            ResponseOutcome::Malformed(Malformed::TooLong)
        }
        Ok(ParsedResponse::Partial) => {
            ensure!(
                matches!(theirs, Ok(httparse::Status::Partial)) && buf.len() < MAX_RESPONSE_HEAD,
                buf,
                "Partial, but httparse says {theirs:?} for {} bytes",
                buf.len()
            );
            ResponseOutcome::Partial
        }
        Err(e @ (Malformed::Chunk | Malformed::TooLarge)) => {
            panic!("parse returned {e:?}\n  input: {}", esc(buf))
        }
        Err(Malformed::Status) => {
            ensure!(
                matches!(theirs, Ok(httparse::Status::Complete(_)))
                    && res.code.is_some_and(|c| c < 100),
                buf,
                "Malformed::Status, but the status is {:?} ({theirs:?})",
                res.code
            );
            ResponseOutcome::Malformed(Malformed::Status)
        }
        Err(Malformed::Switched) => {
            ensure!(
                matches!(theirs, Ok(httparse::Status::Complete(_))) && res.code == Some(101),
                buf,
                "Switched, but the status is {:?} ({theirs:?})",
                res.code
            );
            ResponseOutcome::Malformed(Malformed::Switched)
        }
        Ok(ParsedResponse::Informational(n)) => {
            ensure!(
                theirs == Ok(httparse::Status::Complete(n))
                    && res
                        .code
                        .is_some_and(|c| (100..200).contains(&c) && c != 101),
                buf,
                "Informational({n}), but httparse says {theirs:?}, status {:?}",
                res.code
            );
            ResponseOutcome::Informational
        }
        Err(Malformed::Length) => {
            let Ok(httparse::Status::Complete(_)) = theirs else {
                panic!(
                    "Malformed::Length, but httparse says {theirs:?}\n  input: {}",
                    esc(buf)
                );
            };
            ensure!(
                content_length(res.headers) == Err(()),
                buf,
                "Malformed::Length for Content-Lengths {:?}",
                content_length(res.headers)
            );
            ResponseOutcome::Malformed(Malformed::Length)
        }
        Ok(ParsedResponse::Complete) => {
            let Ok(httparse::Status::Complete(len)) = theirs else {
                panic!(
                    "Complete, but httparse says {theirs:?}\n  input: {}",
                    esc(buf)
                );
            };
            ensure!(
                len == head.len,
                buf,
                "head.len {} but httparse read {len}",
                head.len
            );
            let status = res.code.expect("complete");
            ensure!(
                buf.get(head.reason.clone()) == res.reason.map(str::as_bytes),
                buf,
                "reason {:?}, httparse read {:?}",
                head.reason,
                res.reason
            );
            ensure!(
                head.status == status,
                buf,
                "status {} but httparse read {status}",
                head.status
            );
            check_complete(buf, &res, &head, to_head, opts);
            ResponseOutcome::Complete(head.framing)
        }
    }
}

/// All `Content-Length` values (each list element of each line): `Ok(None)`
/// for none, `Ok(Some(n))` when all are the same plain digits, else `Err`.
fn content_length(headers: &[httparse::Header<'_>]) -> Result<Option<u64>, ()> {
    let mut n = None;
    for h in headers
        .iter()
        .filter(|h| is(h.name.as_bytes(), "content-length"))
    {
        for part in h.value.split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            let v: u64 = std::str::from_utf8(part)
                .map_err(|_| ())?
                .parse()
                .map_err(|_| ())?;
            if n.is_some_and(|m| m != v) {
                return Err(());
            }
            n = Some(v);
        }
    }
    Ok(n)
}

fn check_complete(
    buf: &[u8],
    res: &httparse::Response<'_, '_>,
    head: &ResponseHead,
    to_head: bool,
    opts: Opts,
) {
    let status = head.status;
    let version = res.version.expect("complete");
    let headers = res.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    let te: Vec<&[u8]> = headers
        .clone()
        .filter(|(n, _)| is(n, "transfer-encoding"))
        .map(|(_, v)| v)
        .collect();
    let connection: Vec<&[u8]> = headers
        .clone()
        .filter(|(n, _)| is(n, "connection"))
        .flat_map(|(_, v)| list(v))
        .collect();
    let any_close = connection.iter().any(|t| is(t, "close"));
    let any_keep = connection.iter().any(|t| is(t, "keep-alive"));

    // A status code the client can be told: three digits (what hyper's
    // client takes, `StatusCode::from_u16`: 100 to 999; 1xx are not final).
    ensure!(
        (200..=999).contains(&status) || opts.skips(known::STATUS),
        buf,
        "a final response with status {status}: hyper's client refuses it (the general path \
         answers 502), and the relay would write the status line \"HTTP/1.1 {status} ...\""
    );

    // RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message means faulty
    // framing: the connection must not be used again (hyper's client
    // refuses such a response outright).
    if version == 0 && !te.is_empty() {
        ensure!(
            !head.keep_alive || opts.skips(known::HTTP10_TE),
            buf,
            "an HTTP/1.0 response with Transfer-Encoding keeps the upstream connection \
             (RFC 9112 6.1: faulty framing, close after it; hyper's client refuses it: the \
             general path answers 502); framing {:?}",
            head.framing
        );
    }

    // RFC 9112 6.3.
    let want = if to_head || status == 204 || status == 304 {
        Framing::Empty
    } else if !te.is_empty() {
        // The final coding of the combined list, empty elements ignored.
        let last = te.iter().flat_map(|v| list(v)).last();
        if last.is_some_and(|c| is(c, "chunked")) {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match content_length(res.headers) {
            Err(()) => panic!(
                "Complete with Content-Lengths no single length reads from (RFC 9112 6.3 item 5: \
                 invalid framing)\n  input: {}",
                esc(buf)
            ),
            Ok(None) => Framing::Close,
            Ok(Some(0)) => Framing::Empty,
            Ok(Some(n)) => Framing::Length(n),
        }
    };
    if head.framing != want {
        // Known: a list whose last element is empty (`chunked,`) is read
        // by its literal last element, as hyper does.
        let te_last_literal = te
            .last()
            .and_then(|v| v.rsplit(|&b| b == b',').next())
            .map(|c| c.trim_ascii());
        let literal_is_empty = te_last_literal.is_some_and(|c| c.is_empty());
        if !(opts.skips(known::TE_EMPTY_ELEMENT)
            && literal_is_empty
            && want == Framing::Chunked
            && head.framing == Framing::Close)
        {
            panic!(
                "framing {:?}, RFC 9112 6.3 says {want:?} (to_head {to_head}, status {status})\n  input: {}",
                head.framing,
                esc(buf)
            );
        }
    }

    // RFC 9112 9.3: `close` ends the connection after this response; an
    // HTTP/1.0 one persists only with `keep-alive`; a body that ends at
    // close ends it too.
    let persists = if version == 1 {
        !any_close
    } else {
        any_keep && !any_close
    };
    // RFC 9112 6.1: never after Transfer-Encoding in HTTP/1.0.
    let persists = persists && (version == 1 || te.is_empty());
    let want_keep = persists && head.framing != Framing::Close;
    if head.keep_alive != want_keep {
        let known_order = opts.skips(known::CLOSE_THEN_KEEP_ALIVE)
            && version == 0
            && any_close
            && any_keep
            && head.keep_alive;
        let known_te = opts.skips(known::HTTP10_TE) && version == 0 && !te.is_empty();
        ensure!(
            known_order || known_te,
            buf,
            "keep_alive {} but the connection {} be used again (HTTP/1.{version}, Connection \
             tokens {:?}, framing {:?})",
            head.keep_alive,
            if want_keep { "may" } else { "may not" },
            connection
                .iter()
                .map(|t| String::from_utf8_lossy(t))
                .collect::<Vec<_>>(),
            head.framing
        );
    }

    // What goes on to the client: no hop-by-hop header, nothing named in
    // Connection, one Content-Length when it framed the body.
    let listed: Vec<&[u8]> = connection
        .iter()
        .copied()
        .filter(|t| !is(t, "close") && !is(t, "keep-alive"))
        .collect();
    let mut lengths = 0;
    for (name, value) in &head.headers {
        ensure!(
            name.end <= head.len && value.end <= head.len,
            buf,
            "a passed-on header {name:?}: {value:?} lies outside the head"
        );
        let n = &buf[name.clone()];
        for hop in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            ensure!(!is(n, hop), buf, "the hop-by-hop {hop} is passed on");
        }
        // (The Content-Length that frames the body stays whatever
        // Connection says: the client needs it.)
        ensure!(
            is(n, "content-length") || !listed.iter().any(|l| l.eq_ignore_ascii_case(n)),
            buf,
            "{} is passed on though Connection names it",
            String::from_utf8_lossy(n)
        );
        if is(n, "content-length") {
            lengths += 1;
        }
    }
    let has_length = matches!(content_length(res.headers), Ok(Some(_)));
    ensure!(
        lengths == usize::from(te.is_empty() && has_length),
        buf,
        "{lengths} Content-Length passed on (Transfer-Encoding {}, a length {has_length})",
        !te.is_empty()
    );
    // The client gets a Date (RFC 9110 6.6.1): the upstream's, passed on,
    // or one the relay writes when `has_date` is false. So `has_date` must
    // say exactly whether a Date is passed on (one named in Connection is
    // not).
    let date_passed = head
        .headers
        .iter()
        .any(|(n, _)| is(&buf[n.clone()], "date"));
    let upstream_date = headers.clone().any(|(n, _)| is(n, "date"));
    ensure!(
        head.has_date == date_passed
            || (opts.skips(known::DATE_DROPPED) && head.has_date == upstream_date),
        buf,
        "has_date {} but a Date passed on {date_passed}: the client gets {} Date          (RFC 9110 6.6.1)",
        head.has_date,
        if date_passed { "two" } else { "no" }
    );
}
