//! A client's request head, parsed in place with `httparse`, and the
//! decision that matters most for safety: whether this path may forward it
//! at all. The fast path takes only requests whose framing cannot be read
//! two ways: HTTP/1.1 (or HTTP/1.0 that closes after it), one plain `Host`, an origin-form target of plain
//! characters, no `Transfer-Encoding`, at most one `Content-Length` of
//! plain digits within the replay limit, no `Expect`, no `Upgrade`, and a
//! `Connection` that says no more than `close` or `keep-alive`. Anything
//! else is handed, with every byte read so far, to hyper's server (the
//! general path, [`crate::balancer::proxy`]), which decides it exactly as
//! it did before this path existed: the fast path is never more lenient
//! than hyper, only narrower.

use std::mem::MaybeUninit;
use std::ops::Range;

use hyper::Method;

/// Most header lines the fast path parses (hyper's default limit too; more
/// is handed to hyper, which answers 431).
pub const MAX_HEADERS: usize = 100;

/// Longest head the fast path waits for; a longer one goes to hyper,
/// which reads up to its own limit and answers 431 beyond it.
pub const MAX_HEAD: usize = 16 * 1024;

/// What one header line is to the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Passed on as it came.
    Plain,
    /// Not passed on: hop-by-hop (`Connection`, `Keep-Alive`,
    /// `Proxy-Connection`, `TE`, `Trailer`), the client's own `X-Real-IP`
    /// (the balancer sets it), or a name with `_` when those are dropped.
    Dropped,
    /// `X-Forwarded-For`: joined into the one the balancer writes.
    ForwardedFor,
}

/// One header line, as offsets into the buffer the head was parsed from.
#[derive(Debug, Clone)]
pub struct HeaderLine {
    /// The name, as the client spelled it.
    pub name: Range<usize>,
    /// The value, as `httparse` delimited it.
    pub value: Range<usize>,
    /// What happens to it.
    pub kind: Kind,
}

/// A request head the fast path forwards.
#[derive(Debug, Default)]
pub struct RequestHead {
    /// Length of the head, blank line included: the body starts here.
    pub len: usize,
    /// The method (a standard one: the others go to hyper).
    pub method: Method,
    /// The origin-form target, path and query.
    pub target: Range<usize>,
    /// Where the path ends in the target (the `?`, or its end).
    pub path_end: usize,
    /// The header lines, in order.
    pub headers: Vec<HeaderLine>,
    /// The declared body length (0 without `Content-Length`).
    pub content_length: u64,
    /// The client asked to close after this request (an HTTP/1.0
    /// request always does: the fast path takes one only without
    /// `keep-alive`).
    pub close: bool,
    /// An HTTP/1.0 request: answered with the connection closed after it,
    /// and a chunked response's body sent as plain bytes up to the close.
    pub http10: bool,
    /// Number of `Idempotency-Key` lines, and the index of the first.
    pub keys: usize,
    /// Index of the first `Idempotency-Key` line.
    pub key_at: usize,
    /// Index of the `X-User-Id` line, if there is one.
    pub user_at: Option<usize>,
    /// Length of the request line, without its line end.
    pub request_line: usize,
    /// Length of the longest header line (name, colon, value as sent),
    /// without its line end.
    pub longest_header: usize,
    /// For a request handed to hyper: its body is framed by exactly one
    /// `Transfer-Encoding: chunked` and no `Content-Length`, so its chunk
    /// sizes can be checked before hyper reads them (see
    /// [`super::response::ChunkedScan::with_limit`]).
    pub chunked_body: bool,
    /// A GET without a body that asks to switch protocols (`Upgrade`, and
    /// `upgrade` in `Connection`: a WebSocket's handshake): the index of
    /// its `Upgrade` line. The fast path tunnels it
    /// (`crate::balancer::h1::tunnel`); both lines are dropped from what
    /// an ordinary request would send.
    pub upgrade: Option<usize>,
}

/// What to do with the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is complete and the fast path may forward it.
    Fast,
    /// More bytes are needed.
    Partial,
    /// hyper decides this one (and everything after it on the connection).
    General,
}

/// Parses the head at the start of `buf` into `head` (reusing its header
/// list). `limit` is `max_body`: a larger declared body goes to hyper,
/// which answers 413; `replay` is the largest body the fast path reads
/// whole; `underscores` keeps names with `_`.
pub fn parse(
    buf: &[u8],
    head: &mut RequestHead,
    replay: u64,
    limit: u64,
    underscores: bool,
) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    head.chunked_body = false;
    head.upgrade = None;
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        // Too long, too many headers, or malformed: hyper's answer (431,
        // 400), with the same parser underneath.
        _ => return Parsed::General,
    };
    let http10 = match req.version {
        Some(1) => false,
        Some(0) => true,
        _ => return Parsed::General,
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Parsed::General;
    };
    let method = match method {
        "GET" => Method::GET,
        "POST" => Method::POST,
        "HEAD" => Method::HEAD,
        "PUT" => Method::PUT,
        "DELETE" => Method::DELETE,
        "OPTIONS" => Method::OPTIONS,
        "PATCH" => Method::PATCH,
        _ => return Parsed::General,
    };
    if !is_plain_target(path.as_bytes()) {
        return Parsed::General;
    }
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let target = offset(path.as_bytes());
    let path_end = target.start + path.find('?').unwrap_or(path.len());
    head.headers.clear();
    // Room for a browser's headers at once, not a doubling from four.
    head.headers.reserve(16);
    head.len = len;
    head.method = method;
    head.target = target;
    head.path_end = path_end;
    head.content_length = 0;
    head.close = http10;
    head.http10 = http10;
    head.keys = 0;
    head.key_at = 0;
    head.user_at = None;
    // The request line ends where the first header (or the blank line)
    // begins.
    head.request_line = req
        .headers
        .first()
        .map_or(len.saturating_sub(2), |h| h.name.as_ptr() as usize - base)
        .saturating_sub(2);
    head.longest_header = 0;
    let mut hosts = 0;
    let mut lengths = 0;
    // `Transfer-Encoding` lines, and whether the one there is says just
    // `chunked`.
    let mut codings = 0;
    let mut chunked = false;
    let mut general = false;
    // An `Upgrade` line, and `upgrade` among `Connection`'s tokens.
    let mut upgrade_at = None;
    let mut asks_upgrade = false;
    // `keep-alive` among `Connection`'s tokens.
    let mut asks_keep_alive = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        // From the name's start to the value's end: the line as sent.
        let line =
            (h.value.as_ptr() as usize + h.value.len()).saturating_sub(name.as_ptr() as usize);
        head.longest_header = head.longest_header.max(line);
        let mut kind = Kind::Plain;
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                hosts += 1;
                if !is_authority(h.value) {
                    return Parsed::General;
                }
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                lengths += 1;
                match digits(h.value) {
                    Some(n) if n <= replay && (limit == 0 || n <= limit) => head.content_length = n,
                    _ => general = true,
                }
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                kind = Kind::Dropped;
                if !connection_is_plain(
                    h.value,
                    &mut head.close,
                    &mut asks_keep_alive,
                    &mut asks_upgrade,
                ) {
                    return Parsed::General;
                }
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                codings += 1;
                chunked = h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
            6 if name.eq_ignore_ascii_case(b"expect") => return Parsed::General,
            7 if name.eq_ignore_ascii_case(b"upgrade") => {
                if upgrade_at.is_some() {
                    return Parsed::General;
                }
                upgrade_at = Some(head.headers.len());
                kind = Kind::Dropped;
            }
            2 if name.eq_ignore_ascii_case(b"te") => kind = Kind::Dropped,
            7 if name.eq_ignore_ascii_case(b"trailer") => kind = Kind::Dropped,
            10 if name.eq_ignore_ascii_case(b"keep-alive") => kind = Kind::Dropped,
            16 if name.eq_ignore_ascii_case(b"proxy-connection") => kind = Kind::Dropped,
            9 if name.eq_ignore_ascii_case(b"x-real-ip") => kind = Kind::Dropped,
            // Only a balancer says it made a key (`protocol::MADE_KEY`).
            14 if name.eq_ignore_ascii_case(crate::protocol::MADE_KEY_NAME.as_bytes()) => {
                kind = Kind::Dropped
            }
            15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => kind = Kind::ForwardedFor,
            15 if name.eq_ignore_ascii_case(b"idempotency-key") => {
                if head.keys == 0 {
                    head.key_at = head.headers.len();
                }
                head.keys += 1;
            }
            9 if name.eq_ignore_ascii_case(b"x-user-id") => {
                if head.user_at.is_some() {
                    // Two buyer ids: hyper's path reads the first; keep
                    // one reading of who buys.
                    return Parsed::General;
                }
                head.user_at = Some(head.headers.len());
            }
            _ => {}
        }
        if !underscores && kind == Kind::Plain && name.contains(&b'_') {
            kind = Kind::Dropped;
        }
        head.headers.push(HeaderLine {
            name: offset(name),
            value: offset(h.value),
            kind,
        });
    }
    if codings > 0 {
        // `codings == 1 && chunked` is `codings_are_chunked`, counted in
        // the one pass.
        head.chunked_body = codings == 1 && chunked && lengths == 0;
        return Parsed::General;
    }
    if general || hosts != 1 || lengths > 1 {
        return Parsed::General;
    }
    // HTTP/1.0 with a connection kept open, or switching protocols, is
    // hyper's: a kept-alive 1.0 client needs every answer framed by
    // length and told `keep-alive`, which this path does not do.
    if http10 && (asks_keep_alive || asks_upgrade || upgrade_at.is_some()) {
        return Parsed::General;
    }
    if upgrade_at.is_some() || asks_upgrade {
        // Only a whole handshake is tunnelled: a GET, no body, both
        // lines. Anything else goes to hyper's path, which drops both.
        if !(upgrade_at.is_some() && asks_upgrade && head.method == Method::GET && lengths == 0) {
            return Parsed::General;
        }
        head.upgrade = upgrade_at;
    }
    if head
        .user_at
        .is_some_and(|i| head.headers[i].kind == Kind::Dropped)
    {
        head.user_at = None;
    }
    if head.keys > 0 && head.headers[head.key_at].kind == Kind::Dropped {
        // An underscore in `Idempotency-Key` cannot happen; a name the
        // lengths above did not match cannot be dropped here either.
        head.keys = 0;
    }
    Parsed::Fast
}

/// Whether a request's `Transfer-Encoding` lines (`values`) say what the
/// balancer can frame and forward: none, or exactly one line of exactly
/// one `chunked`. Anything else (`gzip, chunked`, `chunked, chunked`, two
/// lines) is a coding the balancer would have to decode or would forward
/// without: Nginx answers 501, and so do both paths (the fast path hands
/// every `Transfer-Encoding` to hyper's, which refuses by this rule).
pub fn codings_are_chunked<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> bool {
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(v), None) => v.trim_ascii().eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => false,
    }
}

/// Plain digits, at most 19 of them (so the sum cannot overflow).
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// Whether `Connection` says only `close`, `keep-alive` and `upgrade` (in
/// any case, with optional spaces); each sets its flag. A header named
/// there sends the request to hyper's path, which removes the names.
fn connection_is_plain(
    v: &[u8],
    close: &mut bool,
    keep_alive: &mut bool,
    upgrade: &mut bool,
) -> bool {
    for token in super::hop::connection_tokens(v) {
        if token.eq_ignore_ascii_case(b"keep-alive") {
            *keep_alive = true;
            continue;
        }
        if token.eq_ignore_ascii_case(b"close") {
            *close = true;
            continue;
        }
        if token.eq_ignore_ascii_case(b"upgrade") {
            *upgrade = true;
            continue;
        }
        return false;
    }
    true
}

/// An origin-form target of RFC 3986 path and query characters only:
/// starts with `/`, no fragment, nothing that `http::Uri` or a backend
/// might read in two ways. Anything else (absolute form, `*`, quotes,
/// braces, bytes over 0x7e) is for hyper's path to accept or refuse.
pub fn is_plain_target(t: &[u8]) -> bool {
    t.first() == Some(&b'/')
        && t.iter()
            .all(|&c| is_plain_uri_char(c) || matches!(c, b'@' | b'/' | b'?'))
}

/// `host [":" port]` as RFC 3986 allows it (reg-name, IPv4, `[IPv6]`),
/// without `..`: the one rule for `Host`, in this path and in
/// [`crate::balancer::proxy`]. Two Hosts would reach the backend as one
/// joined value, and a path in it reaches whatever builds URLs from it.
pub fn is_authority(b: &[u8]) -> bool {
    let mut previous = 0u8;
    for &c in b {
        if !(PLAIN[c as usize] || c == b'[' || c == b']') || (c == b'.' && previous == b'.') {
            return false;
        }
        previous = c;
    }
    !b.is_empty()
}

/// RFC 3986's unreserved characters, sub-delims, `%` and `:`: what both a
/// plain target and a plain authority may hold.
fn is_plain_uri_char(c: u8) -> bool {
    PLAIN[c as usize]
}

/// [`is_plain_uri_char`] as a table: every request's target and `Host` go
/// through it byte by byte, and a lookup is one load where the chain of
/// comparisons was a dozen.
static PLAIN: [bool; 256] = super::alphanumeric_and(b"-._~%!$&'()*+,;=:");

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables are the rules they replaced: the chain of comparisons for
    /// a character, and "no `..`, every character plain or a bracket" for an
    /// authority, over every byte and every pair of bytes.
    #[test]
    fn the_tables_are_the_rules() {
        fn plain_rule(c: u8) -> bool {
            c.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:".contains(&c)
        }
        fn authority_rule(b: &[u8]) -> bool {
            !b.is_empty()
                && !b.windows(2).any(|w| w == b"..")
                && b.iter().all(|&c| plain_rule(c) || matches!(c, b'[' | b']'))
        }
        for c in 0..=255u8 {
            assert_eq!(is_plain_uri_char(c), plain_rule(c), "{c}");
            for d in 0..=255u8 {
                let pair = [c, d];
                assert_eq!(is_authority(&pair), authority_rule(&pair), "{pair:?}");
                let three = [b'a', c, d];
                assert_eq!(is_authority(&three), authority_rule(&three), "{three:?}");
            }
        }
        assert!(!is_authority(b""));
        assert!(is_authority(b"[::1]:8080") && is_authority(b"a.b.c"));
        assert!(!is_authority(b"a..b") && !is_authority(b"a/b"));
    }

    fn parsed(raw: &[u8]) -> (Parsed, RequestHead) {
        let mut head = RequestHead::default();
        let p = parse(raw, &mut head, 64 * 1024, 1024 * 1024, false);
        (p, head)
    }

    #[test]
    fn an_ordinary_get_is_fast() {
        let raw = b"GET /buy/ticket?user=u1 HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nConnection: keep-alive\r\nX_Real_IP: 6.6.6.6\r\n\r\nnext";
        let (p, head) = parsed(raw);
        assert_eq!(p, Parsed::Fast);
        assert_eq!(head.len, raw.len() - 4);
        assert_eq!(&raw[head.target.clone()], b"/buy/ticket?user=u1");
        assert_eq!(&raw[head.target.start..head.path_end], b"/buy/ticket");
        let kinds: Vec<Kind> = head.headers.iter().map(|h| h.kind).collect();
        assert_eq!(
            kinds,
            [
                Kind::Plain,
                Kind::ForwardedFor,
                Kind::Dropped,
                Kind::Dropped
            ]
        );
        assert!(!head.close);
    }

    #[test]
    fn partial_heads_wait_and_long_ones_go_to_hyper() {
        assert_eq!(parsed(b"GET / HTTP/1.1\r\nHost: a\r\n").0, Parsed::Partial);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 1, b'a');
        assert_eq!(parsed(&long).0, Parsed::General);
    }

    #[test]
    fn everything_ambiguous_or_unusual_goes_to_hyper() {
        let general: &[&[u8]] = &[
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a/../b\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: a\r\nUpgrade: b\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a\"b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a{b} HTTP/1.1\r\nHost: a\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"PROPFIND / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-User-Id: a\r\nX-User-Id: b\r\n\r\n",
        ];
        for raw in general {
            assert_eq!(
                parsed(raw).0,
                Parsed::General,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn a_websocket_handshake_is_marked_for_a_tunnel() {
        let (p, head) = parsed(
            b"GET /live HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n",
        );
        assert_eq!(p, Parsed::Fast);
        let at = head.upgrade.expect("an upgrade");
        assert_eq!(head.headers[at].kind, Kind::Dropped);
        let (p, head) = parsed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!((p, head.upgrade), (Parsed::Fast, None));
    }

    #[test]
    fn a_plain_chunked_body_is_marked_for_its_check() {
        let (p, head) = parsed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert_eq!(p, Parsed::General);
        assert!(head.chunked_body);
        for raw in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n",
        ] {
            let (_, head) = parsed(raw);
            assert!(!head.chunked_body, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn only_one_plain_chunked_is_a_coding_the_balancer_frames() {
        let ok = |v: &[&[u8]]| codings_are_chunked(v.iter().copied());
        assert!(ok(&[]));
        assert!(ok(&[b"chunked"]));
        assert!(ok(&[b" Chunked "]));
        assert!(!ok(&[b"gzip, chunked"]));
        assert!(!ok(&[b"chunked, chunked"]));
        assert!(!ok(&[b"chunked", b"chunked"]));
        assert!(!ok(&[b"gzip"]));
        assert!(!ok(&[b"identity"]));
    }

    #[test]
    fn connection_close_and_lengths() {
        let raw = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: Keep-Alive, CLOSE\r\n\r\nhello";
        let (p, head) = parsed(raw);
        assert_eq!(p, Parsed::Fast);
        assert!(head.close);
        assert_eq!(head.content_length, 5);
        assert_eq!(digits(b"18446744073709551615"), None);
        assert_eq!(digits(b"0012"), Some(12));
    }

    #[test]
    fn http10_is_fast_only_when_it_closes() {
        let (p, head) = parsed(b"GET /buy HTTP/1.0\r\nHost: a\r\nUser-Agent: ab\r\n\r\n");
        assert_eq!(p, Parsed::Fast);
        assert!(head.http10 && head.close);
        let (p, head) = parsed(b"GET /buy HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(p, Parsed::Fast);
        assert!(!head.http10 && !head.close);
        for raw in [
            &b"GET / HTTP/1.0\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n"[..],
            b"GET / HTTP/1.0\r\nHost: a\r\nConnection: close, keep-alive\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
        ] {
            assert_eq!(
                parsed(raw).0,
                Parsed::General,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
