//! The access log: one line per request, in Nginx's `combined` format or
//! as JSON, so that after a sale "I clicked at 10:00:00.1, why no ticket?"
//! has an answer (the client, the buyer, the upstream, the status, and how
//! long each took).
//!
//! Off the hot path: a request formats its line straight into its worker
//! thread's buffer (one of [`SHARDS`], behind a lock that only the writer
//! ever contends for, once a period; no allocation, no channel, no system
//! call); a writer thread of its own wakes every [`WRITE_PERIOD`], swaps
//! each buffer for an empty one and writes what it took. A request never
//! waits for the disk: when its buffer holds [`SHARD_BYTES`] (the disk
//! stalls, or the writer cannot keep up) the line is dropped and counted
//! (`/status`, `/metrics`, and a warning at most once per
//! [`DROP_WARN_PERIOD`]). The writer is never woken by a request, so a
//! line costs no futex call either. (The first version formatted each line
//! into a buffer of its own and sent it through a channel: 1.14× the CPU
//! per proxied request without the log, against 1.1× asked.) So a
//! thread's lines are in the order it logged them, and lines of different
//! threads are in order only to within a period, as with Nginx's
//! per-worker `access_log ... buffer=`.
//!
//! SIGUSR1 reopens the file (logrotate's `postrotate`: rename the file,
//! send SIGUSR1, and the new lines go to a new file at the old path), as
//! Nginx's `USR1` does.
//!
//! Times are to the response head, not to its last byte: `upstream_time`
//! is Nginx's `$upstream_header_time` and `request_time` from the
//! request's head to its response head going out; the size is the
//! response's `Content-Length` (`-` when it has none). A sale's answers
//! are small: the head is nearly all of their time.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::AccessLogFormat;

/// Buffers lines are written into; a thread takes one by its number (more
/// threads than this share them).
const SHARDS: usize = 16;

/// The most a buffer holds before lines are dropped: about 25,000 lines,
/// at 50,000 requests a second on one worker half a second of them, so a
/// writer late by a few periods loses nothing.
const SHARD_BYTES: usize = 4 * 1024 * 1024;

/// How often the writer takes what came and writes it.
const WRITE_PERIOD: Duration = Duration::from_millis(50);

/// Dropped lines are warned about at most this often.
const DROP_WARN_PERIOD: Duration = Duration::from_secs(5);

/// One thread's (or a few threads') lines since the writer last took them.
#[derive(Default)]
struct Shard {
    bytes: Vec<u8>,
    lines: u64,
    /// The time as lines show it, made once per second (combined) or per
    /// millisecond (JSON) by the first line that needs it.
    stamp: Stamp,
    /// The writer is gone (the stop): lines are dropped, and counted.
    closed: bool,
}

/// Aligned to a cache line: neighbouring shards are other threads'.
#[repr(align(64))]
#[derive(Default)]
struct Padded(Mutex<Shard>);

/// This thread's shard number.
fn shard_of_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    MINE.with(|m| *m)
}

fn lock(shard: &Padded) -> std::sync::MutexGuard<'_, Shard> {
    // A panic while formatting leaves at worst half a line.
    shard.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// The request side of a line: what the client asked.
#[derive(Debug, Default, Clone, Copy)]
pub struct Request<'a> {
    /// The method as sent.
    pub method: &'a [u8],
    /// The request target as sent (path and query).
    pub target: &'a [u8],
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: &'static str,
    /// `Referer`, if any.
    pub referer: Option<&'a [u8]>,
    /// `User-Agent`, if any.
    pub user_agent: Option<&'a [u8]>,
    /// The buyer, when a token verified (with `[auth]`).
    pub buyer: Option<&'a str>,
}

/// The answer side of a line.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// The client's address (after the PROXY protocol and
    /// `trusted_proxies`).
    pub client: IpAddr,
    /// The status sent.
    pub status: u16,
    /// The response body's declared size.
    pub bytes: Option<u64>,
    /// The upstream that answered; `None` for the balancer's own answers.
    pub upstream: Option<SocketAddr>,
    /// From the request's head to the upstream's response head.
    pub upstream_time: Option<Duration>,
    /// From the request's head to its response head going out.
    pub request_time: Duration,
}

/// An open access log: the buffers its writer thread takes lines from.
pub struct AccessLog {
    shards: Arc<[Padded]>,
    format: AccessLogFormat,
    path: PathBuf,
    /// Lines the writer wrote.
    pub written: Arc<AtomicU64>,
    /// Lines dropped because the channel was full.
    pub dropped: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("path", &self.path)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Opens (creates, appends to) `path` and starts its writer thread.
    pub fn open(path: &Path, format: AccessLogFormat) -> std::io::Result<AccessLog> {
        let file = open_file(path)?;
        let shards: Arc<[Padded]> = (0..SHARDS).map(|_| Padded::default()).collect();
        let written = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let reopen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            shards: shards.clone(),
            path: path.to_path_buf(),
            file: Some(file),
            written: written.clone(),
            dropped: dropped.clone(),
            reopen: reopen.clone(),
            stop: stop.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("spike-access-log".into())
            .spawn(move || writer.run())?;
        Ok(AccessLog {
            shards,
            format,
            path: path.to_path_buf(),
            written,
            dropped,
            reopen,
            stop,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Where it writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks the writer to reopen the file (SIGUSR1), within a period.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::SeqCst);
    }

    /// Writes what is queued, flushes, and ends the writer (at the stop).
    pub fn finish(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Writes one line into this thread's buffer; never waits for the
    /// disk (a full buffer, or a log already finished, drops it).
    pub fn log(&self, r: &Request<'_>, o: &Outcome) {
        let at_ms = crate::node::store::now_millis();
        let Some(shard) = self.shards.get(shard_of_thread()) else {
            return;
        };
        let mut shard = lock(shard);
        if shard.closed || shard.bytes.len() >= SHARD_BYTES {
            drop(shard);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Shard { bytes, stamp, .. } = &mut *shard;
        let time = stamp.of(self.format, at_ms);
        match self.format {
            AccessLogFormat::Combined => combined(bytes, time, r, o),
            AccessLogFormat::Json => json(bytes, time, r, o),
        }
        shard.lines += 1;
    }
}

fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// `$remote_addr - $remote_user [$time_local] "$request" $status
/// $body_bytes_sent "$http_referer" "$http_user_agent"`, Nginx's
/// `combined`, with the buyer as `$remote_user`, then `"$upstream_addr"
/// $upstream_header_time $request_time`; `time` is `$time_local`.
fn combined(out: &mut Vec<u8>, time: &str, r: &Request<'_>, o: &Outcome) {
    // Written straight into the line: no buffer of its own.
    let _ = write!(out, "{} - ", o.client);
    match r.buyer {
        Some(b) => escape_combined(out, b.as_bytes()),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" [");
    out.extend_from_slice(time.as_bytes());
    out.extend_from_slice(b"] \"");
    escape_combined(out, r.method);
    out.push(b' ');
    escape_combined(out, r.target);
    out.push(b' ');
    out.extend_from_slice(r.version.as_bytes());
    out.extend_from_slice(b"\" ");
    out.extend_from_slice(itoa::Buffer::new().format(o.status).as_bytes());
    out.push(b' ');
    match o.bytes {
        Some(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
        None => out.push(b'-'),
    }
    for v in [r.referer, r.user_agent] {
        out.extend_from_slice(b" \"");
        match v {
            Some(v) => escape_combined(out, v),
            None => out.push(b'-'),
        }
        out.push(b'"');
    }
    match o.upstream {
        Some(u) => {
            let _ = write!(out, " \"{u}\" ");
        }
        None => out.extend_from_slice(b" \"-\" "),
    }
    match o.upstream_time {
        Some(t) => seconds(out, t),
        None => out.push(b'-'),
    }
    out.push(b' ');
    seconds(out, o.request_time);
    out.push(b'\n');
}

/// One JSON object a line; `"time"` (`time`) first.
fn json(out: &mut Vec<u8>, time: &str, r: &Request<'_>, o: &Outcome) {
    out.extend_from_slice(b"{\"time\":\"");
    out.extend_from_slice(time.as_bytes());
    let _ = write!(out, "\",\"client\":\"{}\",\"buyer\":", o.client);
    json_string(out, r.buyer.map(str::as_bytes));
    out.extend_from_slice(b",\"method\":");
    json_string(out, Some(r.method));
    out.extend_from_slice(b",\"target\":");
    json_string(out, Some(r.target));
    out.extend_from_slice(b",\"protocol\":\"");
    out.extend_from_slice(r.version.as_bytes());
    out.extend_from_slice(b"\",\"status\":");
    out.extend_from_slice(itoa::Buffer::new().format(o.status).as_bytes());
    out.extend_from_slice(b",\"bytes\":");
    match o.bytes {
        Some(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"referer\":");
    json_string(out, r.referer);
    out.extend_from_slice(b",\"user_agent\":");
    json_string(out, r.user_agent);
    match o.upstream {
        Some(u) => {
            let _ = write!(out, ",\"upstream\":\"{u}\",\"upstream_time\":");
        }
        None => out.extend_from_slice(b",\"upstream\":null,\"upstream_time\":"),
    }
    match o.upstream_time {
        Some(t) => seconds(out, t),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"request_time\":");
    seconds(out, o.request_time);
    out.extend_from_slice(b"}\n");
}

/// Seconds with milliseconds, as Nginx writes its times (`0.002`).
fn seconds(out: &mut Vec<u8>, d: Duration) {
    let ms = d.as_millis();
    let _ = write!(out, "{}.{:03}", ms / 1000, ms % 1000);
}

/// Nginx's escaping of a logged value: `"`, `\`, and bytes outside
/// printable ASCII as `\xXX`, so a client cannot forge a line or a field.
fn escape_combined(out: &mut Vec<u8>, v: &[u8]) {
    for &b in v {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
        }
    }
}

/// A JSON string (or `null`); bytes outside printable ASCII as `\u00XX`,
/// so every line is valid UTF-8 and valid JSON whatever the client sent.
fn json_string(out: &mut Vec<u8>, v: Option<&[u8]>) {
    let Some(v) = v else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'"');
    for &b in v {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x20..0x7f => out.push(b),
            _ => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
    }
    out.push(b'"');
}

/// The time as a line shows it, made once per second (combined) or per
/// millisecond (JSON), per shard.
#[derive(Default)]
struct Stamp {
    at: Option<u64>,
    text: String,
}

impl Stamp {
    fn of(&mut self, format: AccessLogFormat, at_ms: u64) -> &str {
        let key = match format {
            AccessLogFormat::Combined => at_ms / 1000,
            AccessLogFormat::Json => at_ms,
        };
        if self.at != Some(key) {
            self.at = Some(key);
            self.text = match format {
                AccessLogFormat::Combined => time_local(at_ms / 1000),
                AccessLogFormat::Json => crate::protocol::rfc3339_ms(at_ms),
            };
        }
        &self.text
    }
}

/// Nginx's `$time_local` in UTC: `06/Dec/2026:22:13:49 +0000`.
fn time_local(unix_s: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let rfc =
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix_s))
            .to_string();
    // "2026-12-06T22:13:49Z"
    let (year, month, day, time) = (&rfc[0..4], &rfc[5..7], &rfc[8..10], &rfc[11..19]);
    let month = month
        .parse::<usize>()
        .ok()
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
        .copied()
        .unwrap_or("Jan");
    format!("{day}/{month}/{year}:{time} +0000")
}

/// The writer thread's side.
struct Writer {
    shards: Arc<[Padded]>,
    path: PathBuf,
    file: Option<std::fs::File>,
    written: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self) {
        // Swapped with each shard's buffer in turn: the buffers keep their
        // room, and a line is never copied.
        let mut taken: Vec<u8> = Vec::with_capacity(256 * 1024);
        let mut dropped_said = 0u64;
        let mut warned_at: Option<std::time::Instant> = None;
        loop {
            let stopping = self.stop.load(Ordering::SeqCst);
            let mut n = 0u64;
            let shards = self.shards.clone();
            for shard in shards.iter() {
                let mut s = lock(shard);
                if stopping {
                    // Under the lock: a line is either in what is taken
                    // now, or sees the log closed and is counted dropped.
                    s.closed = true;
                }
                if s.bytes.is_empty() {
                    continue;
                }
                std::mem::swap(&mut s.bytes, &mut taken);
                n += std::mem::take(&mut s.lines);
                drop(s);
                self.write(&taken);
                taken.clear();
            }
            self.written.fetch_add(n, Ordering::Relaxed);
            if self.reopen.swap(false, Ordering::SeqCst) {
                match open_file(&self.path) {
                    Ok(f) => {
                        self.file = Some(f);
                        tracing::info!(path = %self.path.display(), "access log reopened");
                    }
                    Err(e) => {
                        tracing::error!(path = %self.path.display(), error = %e, "cannot reopen the access log; lines are lost until the next SIGUSR1");
                        self.file = None;
                    }
                }
            }
            let dropped = self.dropped.load(Ordering::Relaxed);
            if dropped > dropped_said && warned_at.is_none_or(|at| at.elapsed() >= DROP_WARN_PERIOD)
            {
                tracing::warn!(
                    dropped_since_last_said = dropped - dropped_said,
                    "access log lines dropped: the writer could not keep up (the disk is slow or full); requests were not held up"
                );
                dropped_said = dropped;
                warned_at = Some(std::time::Instant::now());
            }
            if stopping {
                return;
            }
            std::thread::sleep(WRITE_PERIOD);
        }
    }

    fn write(&mut self, buf: &[u8]) {
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_all(buf)
        {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the access log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> Outcome {
        Outcome {
            client: "203.0.113.9".parse().expect("ip"),
            status: 200,
            bytes: Some(12),
            upstream: Some("127.0.0.1:3001".parse().expect("addr")),
            upstream_time: Some(Duration::from_micros(2500)),
            request_time: Duration::from_millis(1003),
        }
    }

    fn request() -> Request<'static> {
        Request {
            method: b"GET",
            target: b"/buy/ticket?u=\"x\"",
            version: "HTTP/1.1",
            referer: None,
            user_agent: Some(b"curl/8 \xff"),
            buyer: Some("alice"),
        }
    }

    #[test]
    fn combined_is_nginx_combined_with_the_upstream_and_times() {
        let mut out = Vec::new();
        combined(&mut out, &time_local(1_796_595_229), &request(), &outcome());
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "203.0.113.9 - alice [06/Dec/2026:22:13:49 +0000] \"GET /buy/ticket?u=\\x22x\\x22 HTTP/1.1\" 200 12 \"-\" \"curl/8 \\xFF\" \"127.0.0.1:3001\" 0.002 1.003\n"
        );
    }

    #[test]
    fn json_is_one_valid_object_whatever_the_client_sent() {
        let mut out = Vec::new();
        let mut o = outcome();
        o.upstream = None;
        o.upstream_time = None;
        o.bytes = None;
        json(&mut out, "2026-12-06T22:13:49.123Z", &request(), &o);
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.ends_with("}\n"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["client"], "203.0.113.9");
        assert_eq!(v["buyer"], "alice");
        assert_eq!(v["target"], "/buy/ticket?u=\"x\"");
        assert_eq!(v["user_agent"], "curl/8 \u{ff}");
        assert_eq!(v["status"], 200);
        assert!(v["upstream"].is_null() && v["bytes"].is_null() && v["referer"].is_null());
        assert_eq!(v["request_time"], 1.003);
    }

    /// Lines from several threads at once, then the stop: every line
    /// logged before `finish` is in the file, whole (each thread writes
    /// into its own buffer, and the writer takes a buffer at a time), and
    /// a line after it is counted as dropped, not lost without a trace.
    #[test]
    fn lines_from_many_threads_are_all_written_whole_and_later_ones_counted() {
        let dir = std::env::temp_dir().join(format!("spike-access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        let log = Arc::new(AccessLog::open(&path, AccessLogFormat::Combined).expect("open"));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for _ in 0..5_000 {
                        log.log(&request(), &outcome());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        log.finish();
        log.log(&request(), &outcome());
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        assert!(
            lines.iter().all(|l| l.starts_with("203.0.113.9 - alice [")
                && l.ends_with("\"127.0.0.1:3001\" 0.002 1.003")),
            "a line cut or mixed"
        );
        assert_eq!(log.written.load(Ordering::Relaxed), 20_000);
        assert_eq!(log.dropped.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
