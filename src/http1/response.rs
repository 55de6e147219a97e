//! An upstream's response head, parsed in place, and how its body is
//! framed (RFC 9112 6.3), so that the body can be relayed as it came and
//! the connection reused only when its end is known. A response the
//! balancer cannot frame in exactly one way is malformed: the client gets
//! a 502 (before any byte went out) or a cut connection (after).

use std::mem::MaybeUninit;
use std::ops::Range;

use super::request::MAX_HEADERS;

/// Longest response head read; a longer one is malformed (hyper's client
/// allows about as much).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Largest chunk size taken: 2^63 - 1, as Nginx (a size past it cannot be
/// a length any side can count to).
pub const MAX_CHUNK: u64 = i64::MAX as u64;

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304, or `Content-Length: 0`).
    #[default]
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked: relayed as it came, scanned for its end.
    Chunked,
    /// Until the upstream closes.
    Close,
}

/// An upstream's response that cannot be relayed: the upstream answered
/// (so it did the work), but not in a form with one meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Not parseable as an HTTP/1.x response head.
    #[error("the upstream's response head is malformed")]
    Head,
    /// A head longer than [`MAX_RESPONSE_HEAD`].
    #[error("the upstream's response head is too long")]
    TooLong,
    /// A status under 100: three digits, but no status a client can be
    /// told (hyper's client refuses it too).
    #[error("the upstream's status code is under 100")]
    Status,
    /// `101 Switching Protocols` to a request that asked for no upgrade.
    #[error("the upstream switched protocols unasked")]
    Switched,
    /// Several `Content-Length`s that differ, or one that is not digits.
    #[error("the upstream's Content-Length is ambiguous")]
    Length,
    /// A chunked body that breaks its framing.
    #[error("the chunked body is malformed")]
    Chunk,
    /// A chunk, or the chunks together, larger than the scan's limit
    /// (a request's `max_body`).
    #[error("the chunked body is larger than allowed")]
    TooLarge,
}

/// A response head as offsets into the buffer it was read into.
#[derive(Debug, Default)]
pub struct ResponseHead {
    /// Length of the head: the body starts here.
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: Range<usize>,
    /// Header lines passed on to the client (hop-by-hop ones, and a
    /// `Content-Length` beside `Transfer-Encoding`, are left out).
    pub headers: Vec<(Range<usize>, Range<usize>)>,
    /// How the body ends.
    pub framing: Framing,
    /// The upstream lets the connection be used again.
    pub keep_alive: bool,
    /// It carries a `Date`.
    pub has_date: bool,
}

/// What came of the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum ParsedResponse {
    /// A final response head.
    Complete,
    /// An informational (1xx) response of `n` bytes, to be skipped.
    Informational(usize),
    /// More bytes are needed.
    Partial,
}

/// Parses the response head at the start of `buf` into `head`. `to_head`:
/// the request was HEAD, so no body follows whatever the head says.
pub fn parse(
    buf: &[u8],
    head: &mut ResponseHead,
    to_head: bool,
) -> Result<ParsedResponse, Malformed> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => {
            return Ok(ParsedResponse::Partial);
        }
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Err(Malformed::TooLong);
        }
        Err(_) => return Err(Malformed::Head),
    };
    let (Some(version), Some(status)) = (res.version, res.code) else {
        return Err(Malformed::Head);
    };
    if status == 101 {
        return Err(Malformed::Switched);
    }
    if status < 100 {
        return Err(Malformed::Status);
    }
    if (100..200).contains(&status) {
        return Ok(ParsedResponse::Informational(len));
    }
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    head.len = len;
    head.status = status;
    // httparse gives a reason that is missing, or has bytes past 0x7e, as
    // a static "" outside `buf`: no reason then.
    head.reason = match res.reason {
        Some(r) if (base..=base + buf.len()).contains(&(r.as_ptr() as usize)) => {
            offset(r.as_bytes())
        }
        _ => 0..0,
    };
    head.headers.clear();
    head.headers.reserve(16);
    head.has_date = false;
    let (mut close, mut keep) = (false, false);
    // The last non-empty coding of all `Transfer-Encoding` lines together
    // (RFC 9110 5.6.1: empty list elements do not count), and whether
    // there was any such line.
    let mut coding: Option<&[u8]> = None;
    let mut codings = false;
    let mut length: Option<u64> = None;
    // The first length's digits, the one `Content-Length` passed on.
    let mut length_at: Option<Range<usize>> = None;
    // Names listed in `Connection` are hop-by-hop too; rare, so looked
    // for only when some `Connection` lists more than close/keep-alive.
    let mut listed = false;
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        match name.len() {
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep = true;
                    } else if !token.is_empty() {
                        listed = true;
                    }
                }
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                // Only the last coding decides whether it is chunked
                // (RFC 9112 6.3): `gzip, chunked` is; `chunked, gzip`
                // ends at close.
                codings = true;
                for c in h.value.split(|&b| b == b',') {
                    let c = c.trim_ascii();
                    if !c.is_empty() {
                        coding = Some(c);
                    }
                }
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                for part in h.value.split(|&b| b == b',') {
                    let part = part.trim_ascii();
                    if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                        return Err(Malformed::Length);
                    }
                    let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
                    if length.is_some_and(|l| l != n) {
                        return Err(Malformed::Length);
                    }
                    length = Some(n);
                    if length_at.is_none() {
                        length_at = Some(offset(part));
                    }
                }
                continue;
            }
            _ => {}
        }
        if !is_hop_by_hop(name) {
            head.headers.push((offset(name), offset(h.value)));
        }
    }
    if listed {
        drop_listed(buf, &res, head);
    }
    head.has_date = head
        .headers
        .iter()
        .any(|(name, _)| buf[name.clone()].eq_ignore_ascii_case(b"date"));
    let chunked = codings.then(|| coding.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
    if chunked.is_none() && length.is_some() {
        // The length goes on (RFC 9112 6.1: beside Transfer-Encoding it is
        // dropped, since the coding decides), once and as one number:
        // `Content-Length: 5, 5` or two equal lines are `5` (RFC 9110
        // 8.6 lets a recipient take them so; HAProxy passes them on so).
        let name = res
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| offset(h.name.as_bytes()))
            .ok_or(Malformed::Length)?;
        head.headers
            .push((name, length_at.ok_or(Malformed::Length)?));
    }
    head.framing = if to_head || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(0)) => Framing::Empty,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    // RFC 9112 9.3: an HTTP/1.1 connection persists unless `close`; an
    // HTTP/1.0 one only with `keep-alive`, and never after a
    // Transfer-Encoding (6.1: faulty framing in HTTP/1.0).
    let persists = if version == 1 {
        !close
    } else {
        keep && !close && !codings
    };
    head.keep_alive = persists && head.framing != Framing::Close;
    Ok(ParsedResponse::Complete)
}

/// Hop-by-hop response headers (see [`super::hop`]); `Transfer-Encoding`
/// is written anew when chunked.
fn is_hop_by_hop(name: &[u8]) -> bool {
    super::hop::hop_by_hop_index(name).is_some()
}

/// Removes from `head` the headers named in the response's `Connection`.
fn drop_listed(buf: &[u8], res: &httparse::Response<'_, '_>, head: &mut ResponseHead) {
    let mut names: Vec<&[u8]> = Vec::new();
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            for token in super::hop::connection_tokens(h.value) {
                if !token.eq_ignore_ascii_case(b"close")
                    && !token.eq_ignore_ascii_case(b"keep-alive")
                    && !super::hop::is_never_hop_by_hop(token)
                {
                    names.push(token);
                }
            }
        }
    }
    head.headers.retain(|(name, _)| {
        let name = &buf[name.clone()];
        !names.iter().any(|n| n.eq_ignore_ascii_case(name))
    });
}

/// Where a chunked body ends, found by reading its framing as it passes
/// (RFC 9112 7.1), strictly: hex sizes up to [`MAX_CHUNK`], extensions up
/// to the line's CRLF, CRLF after every chunk's data, trailer lines, and
/// no bare CR or LF anywhere.
#[derive(Debug, Default)]
pub struct ChunkedScan {
    state: ChunkState,
    size: u64,
    digits: u8,
    /// Bytes of extensions and trailers so far, against [`MAX_META`].
    meta: usize,
    /// Most data bytes in all, 0 for no limit beyond [`MAX_CHUNK`].
    limit: u64,
    /// Data bytes declared so far.
    data: u64,
}

/// Most bytes of chunk extensions and trailers in one body (hyper's limit
/// for extensions is 16 KiB too).
const MAX_META: usize = 16 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    SizeSpace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl ChunkedScan {
    /// A scan that also fails with [`Malformed::TooLarge`] once the chunk
    /// sizes declared add up to more than `limit` (0: no limit), as soon
    /// as the size line says so (Nginx's 413 for `client_max_body_size`).
    pub fn with_limit(limit: u64) -> ChunkedScan {
        ChunkedScan {
            limit,
            ..ChunkedScan::default()
        }
    }

    /// Reads `buf` onward from where the last call stopped: `Ok(Some(n))`
    /// when the body ends after the first `n` bytes of `buf`, `Ok(None)`
    /// when all of it belongs to the body and more is to come.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, Malformed> {
        self.scan_data(buf, |_| {})
    }

    /// [`ChunkedScan::scan`], also telling `on_data` where each run of
    /// chunk data lies in `buf`: what an HTTP/1.0 client, which cannot
    /// read chunked framing, is sent of the body.
    pub fn scan_data(
        &mut self,
        buf: &[u8],
        mut on_data: impl FnMut(Range<usize>),
    ) -> Result<Option<usize>, Malformed> {
        use ChunkState::*;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = match b {
                            b'0'..=b'9' => b - b'0',
                            b'a'..=b'f' => b - b'a' + 10,
                            _ => b - b'A' + 10,
                        };
                        // Any number of leading zeros (as hyper and
                        // Nginx), but no size past MAX_CHUNK.
                        if self.size > MAX_CHUNK >> 4 {
                            return Err(Malformed::Chunk);
                        }
                        self.size = (self.size << 4) | u64::from(d);
                        self.digits = self.digits.saturating_add(1);
                    }
                    _ if self.digits == 0 => return Err(Malformed::Chunk),
                    b' ' | b'\t' => self.state = SizeSpace,
                    b';' => self.state = Extension,
                    b'\r' => self.state = SizeLf,
                    _ => return Err(Malformed::Chunk),
                },
                SizeSpace => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = Extension,
                    b'\r' => self.state = SizeLf,
                    _ => return Err(Malformed::Chunk),
                },
                Extension => {
                    self.meta += 1;
                    match b {
                        b'\r' => self.state = SizeLf,
                        b'\n' => return Err(Malformed::Chunk),
                        _ if self.meta > MAX_META => return Err(Malformed::Chunk),
                        _ => {}
                    }
                }
                SizeLf => {
                    if b != b'\n' {
                        return Err(Malformed::Chunk);
                    }
                    self.data = self.data.saturating_add(self.size);
                    if self.limit != 0 && self.data > self.limit {
                        return Err(Malformed::TooLarge);
                    }
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                    self.digits = 0;
                }
                Data => {
                    let take =
                        (buf.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= take as u64;
                    on_data(i..i + take);
                    i += take;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err(Malformed::Chunk);
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(Malformed::Chunk);
                    }
                    self.state = Size;
                }
                TrailerStart => match b {
                    b'\r' => self.state = EndLf,
                    b'\n' => return Err(Malformed::Chunk),
                    _ => {
                        self.meta += 1;
                        if self.meta > MAX_META {
                            return Err(Malformed::Chunk);
                        }
                        self.state = Trailer;
                    }
                },
                Trailer => match b {
                    b'\r' => {
                        self.meta += 1;
                        self.state = TrailerLf;
                    }
                    b'\n' => return Err(Malformed::Chunk),
                    _ => {
                        self.meta += 1;
                        if self.meta > MAX_META {
                            return Err(Malformed::Chunk);
                        }
                    }
                },
                TrailerLf => {
                    if b != b'\n' {
                        return Err(Malformed::Chunk);
                    }
                    self.state = TrailerStart;
                }
                EndLf => {
                    if b != b'\n' {
                        return Err(Malformed::Chunk);
                    }
                    self.state = Done;
                    return Ok(Some(i + 1));
                }
                Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(raw: &[u8], to_head: bool) -> Result<ResponseHead, Malformed> {
        let mut head = ResponseHead::default();
        match parse(raw, &mut head, to_head)? {
            ParsedResponse::Complete => Ok(head),
            other => panic!("{other:?}"),
        }
    }

    fn names(raw: &[u8], head: &ResponseHead) -> Vec<String> {
        head.headers
            .iter()
            .map(|(n, _)| String::from_utf8_lossy(&raw[n.clone()]).to_lowercase())
            .collect()
    }

    #[test]
    fn framing_by_rfc_9112() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let h = head_of(raw, false).expect("ok");
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive);
        assert_eq!(h.len, raw.len() - 5);

        // Both: the coding decides and the length is dropped.
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let h = head_of(raw, false).expect("ok");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(names(raw, &h).is_empty());

        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
        assert_eq!(head_of(raw, false).expect("ok").framing, Framing::Close);
        let raw = b"HTTP/1.1 200 OK\r\n\r\n";
        let h = head_of(raw, false).expect("ok");
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.keep_alive);
        let raw = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n";
        assert_eq!(head_of(raw, false).expect("ok").framing, Framing::Empty);
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        assert_eq!(head_of(raw, true).expect("ok").framing, Framing::Empty);
        let raw = b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n";
        assert!(!head_of(raw, false).expect("ok").keep_alive);
        let raw = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n";
        assert!(head_of(raw, false).expect("ok").keep_alive);
        let raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n";
        assert!(!head_of(raw, false).expect("ok").keep_alive);
    }

    #[test]
    fn ambiguous_lengths_are_malformed() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
        ] {
            assert_eq!(head_of(raw, false).err(), Some(Malformed::Length));
        }
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(head_of(raw, false).expect("ok").framing, Framing::Length(2));
        // Equal lengths go on as one.
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 2,2\r\n\r\n",
        ] {
            let head = head_of(raw, false).expect("ok");
            let lengths: Vec<&[u8]> = head
                .headers
                .iter()
                .filter(|(n, _)| raw[n.clone()].eq_ignore_ascii_case(b"content-length"))
                .map(|(_, v)| &raw[v.clone()])
                .collect();
            assert_eq!(lengths, [&b"2"[..]], "{}", String::from_utf8_lossy(raw));
        }
        let raw = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        assert_eq!(head_of(raw, false).err(), Some(Malformed::Switched));
    }

    #[test]
    fn hop_by_hop_and_listed_headers_are_not_passed_on() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Keep: 1\r\nContent-Length: 0\r\n\r\n";
        let h = head_of(raw, false).expect("ok");
        assert_eq!(names(raw, &h), ["x-keep", "content-length"]);
    }

    #[test]
    fn informational_responses_are_skipped() {
        let mut head = ResponseHead::default();
        let raw = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n";
        assert_eq!(
            parse(raw, &mut head, false),
            Ok(ParsedResponse::Informational(40))
        );
    }

    #[test]
    fn chunked_scan_finds_the_end_in_any_split() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..body.len() {
            let mut scan = ChunkedScan::default();
            let first = scan.scan(&body[..split]).expect("valid");
            let found = match first {
                Some(n) => n,
                None => split + scan.scan(&body[split..]).expect("valid").expect("ends"),
            };
            assert_eq!(found, end, "split at {split}");
        }
    }

    #[test]
    fn chunked_scan_is_strict() {
        for bad in [
            &b"g\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"8000000000000000\r\n",
            b"5 x\r\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\n\n",
        ] {
            let mut scan = ChunkedScan::default();
            assert_eq!(
                scan.scan(bad),
                Err(Malformed::Chunk),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut scan = ChunkedScan::default();
        assert_eq!(scan.scan(b"7fffffffffffffff\r\n"), Ok(None));
        let mut scan = ChunkedScan::with_limit(10);
        assert_eq!(scan.scan(b"5\r\nhello\r\n5\r\nworld\r\n"), Ok(None));
        assert_eq!(scan.scan(b"1\r\n"), Err(Malformed::TooLarge));
        let mut scan = ChunkedScan::with_limit(10);
        assert_eq!(scan.scan(b"ffffffffffffffff\r\n"), Err(Malformed::Chunk));
    }

    #[test]
    fn chunked_data_comes_out_whole_in_any_split() {
        let body = b"5;a=b\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
        for split in 0..=body.len() {
            let mut scan = ChunkedScan::default();
            let mut data = Vec::new();
            let (a, b) = body.split_at(split);
            let end = match scan.scan_data(a, |r| data.extend_from_slice(&a[r])) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    let n = scan
                        .scan_data(b, |r| data.extend_from_slice(&b[r]))
                        .expect("valid")
                        .expect("ends");
                    split + n
                }
                Err(e) => panic!("{e:?}"),
            };
            assert_eq!(end, body.len(), "split at {split}");
            assert_eq!(data, b"hello world", "split at {split}");
        }
    }
}
