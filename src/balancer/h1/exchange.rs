//! One attempt on an upstream connection, in bytes: [`exchange`] writes the
//! request and reads the response head (within `response_timeout`), and
//! [`relay`] writes the head to the client and relays the body by its
//! framing, without re-encoding it.

use std::io;

use bytes::Buf;
use tokio::io::AsyncWriteExt;

use super::buffers::Buffers;
use super::socket::{Client, READ_CHUNK, make_room, read_some};
use crate::balancer::batch::{self, BatchError};
use crate::balancer::forward::Failure;
use crate::balancer::pool::{self, RawConn};
use crate::balancer::upstream::{Upstream, now_ms};
use crate::http1::date;
use crate::http1::response::{self, ChunkedScan, Framing, Malformed, ParsedResponse, ResponseHead};
use crate::protocol::SOLD_OUT_HEADER_NAME;

/// How an exchange with an upstream broke: its socket, or a response
/// that cannot be framed one way.
#[derive(Debug)]
pub(super) enum RawError {
    /// The socket failed.
    Io(io::Error),
    /// The response cannot be framed one way.
    Malformed(Malformed),
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawError::Io(e) => e.fmt(f),
            RawError::Malformed(m) => m.fmt(f),
        }
    }
}

/// Where a response came from: the connection the rest of its body comes
/// on, or a batch, which brought all of it.
pub(super) enum Upstreamed {
    /// A connection of this request's own.
    Conn(RawConn),
    /// A batch's answer, whole in the buffer; the node's address.
    Whole(std::net::SocketAddr),
}

impl Upstreamed {
    fn addr(&self) -> std::net::SocketAddr {
        match self {
            Upstreamed::Conn(c) => c.addr,
            Upstreamed::Whole(addr) => *addr,
        }
    }

    fn into_conn(self) -> Option<RawConn> {
        match self {
            Upstreamed::Conn(c) => Some(c),
            Upstreamed::Whole(_) => None,
        }
    }

    /// Reads more of the response, if it has a connection to read from.
    async fn read_more(&self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        match self {
            Upstreamed::Conn(c) => read_some(&c.stream, buf).await,
            // A batch's answer is whole: nothing more comes.
            Upstreamed::Whole(_) => Ok(0),
        }
    }
}

/// One attempt: the request in `b.out` to `upstream` (in a batch when
/// `batched` and the node takes batches; else on an idle connection when
/// `pooled`, else a new one), and its response head into `b.rhead`, all
/// within `response_timeout`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn exchange(
    upstream: &Upstream,
    worker: usize,
    workers: usize,
    config: &crate::config::BalancerConfig,
    b: &mut Buffers,
    pooled: bool,
    to_head: bool,
    batched: bool,
) -> Result<Upstreamed, Failure<RawError>> {
    let attempt = async {
        if batched
            && upstream.config.node
            && !upstream
                .live
                .batches
                .refused
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            let target = batch::Target {
                addr: upstream.config.internal_addr(),
                connect_timeout: config.connect_timeout,
                response_timeout: config.response_timeout,
            };
            let malformed = |m| Failure::Broken {
                stale: false,
                error: RawError::Malformed(m),
            };
            match batch::submit(&upstream.live, worker, target, &b.out).await {
                Ok(answer) => {
                    b.resp.clear();
                    b.resp.extend_from_slice(&answer);
                    loop {
                        match response::parse(&b.resp, &mut b.rhead, to_head) {
                            Ok(ParsedResponse::Complete) => {
                                // Whole, or the node's answer was cut.
                                let whole = match b.rhead.framing {
                                    Framing::Empty => true,
                                    Framing::Length(n) => (b.resp.len() - b.rhead.len) as u64 == n,
                                    Framing::Chunked | Framing::Close => false,
                                };
                                if !whole {
                                    return Err(malformed(Malformed::Head));
                                }
                                return Ok(Upstreamed::Whole(upstream.config.addr));
                            }
                            Ok(ParsedResponse::Informational(n)) => b.resp.advance(n),
                            Ok(ParsedResponse::Partial) => return Err(malformed(Malformed::Head)),
                            Err(m) => return Err(malformed(m)),
                        }
                    }
                }
                // An older node (this purchase, and every later one to it,
                // goes alone), or a batch refused whole before any of it
                // ran (this one goes alone, to hear the node's answer).
                Err(BatchError::Refused | BatchError::Declined) => {}
                Err(BatchError::NotSent(e)) => return Err(Failure::Connect(e)),
                // No answer within `response_timeout`: a 504, as alone.
                Err(BatchError::Broken(e)) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(Failure::Timeout);
                }
                Err(BatchError::Broken(e)) => {
                    return Err(Failure::Broken {
                        stale: false,
                        error: RawError::Io(e),
                    });
                }
                Err(BatchError::Malformed) => return Err(malformed(Malformed::Head)),
            }
        }
        let reused = if pooled {
            upstream
                .live
                .raw_idle
                .take(worker, workers, now_ms(), config.keepalive_timeout)
        } else {
            None
        };
        let stale_possible = reused.is_some();
        let mut conn = match reused {
            Some(conn) => conn,
            // A bare socket closes as it is shed: no wait before the retry.
            None => upstream
                .live
                .connect_or_shed(std::time::Duration::ZERO, || {
                    pool::connect_raw(upstream.config.addr, config.connect_timeout)
                })
                .await
                .map_err(Failure::Connect)?,
        };
        let broken = |error: io::Error, got: bool| Failure::Broken {
            stale: stale_possible && !got,
            error: RawError::Io(error),
        };
        if let Err(e) = conn.stream.write_all(&b.out).await {
            return Err(broken(e, false));
        }
        b.resp.clear();
        // Whether any byte of a response came (an informational one
        // included, though it is dropped from the buffer): only a
        // connection that said nothing may have merely gone stale.
        let mut got = false;
        loop {
            make_room(&mut b.resp);
            match read_some(&conn.stream, &mut b.resp).await {
                Ok(0) => {
                    return Err(broken(
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the upstream closed before a response",
                        ),
                        got,
                    ));
                }
                Ok(_) => got = true,
                Err(e) => return Err(broken(e, got)),
            }
            loop {
                match response::parse(&b.resp, &mut b.rhead, to_head) {
                    Ok(ParsedResponse::Complete) => {
                        // A chunked body's first size line, when it came
                        // with the head, is checked before anything goes
                        // to the client: malformed (a size past 2^63 - 1,
                        // junk), it is the upstream's 502, not a 200 cut
                        // off; as hyper's path decides on its first frame.
                        if b.rhead.framing == Framing::Chunked
                            && let Err(m) = first_size_line(&b.resp[b.rhead.len..])
                        {
                            return Err(Failure::Broken {
                                stale: false,
                                error: RawError::Malformed(m),
                            });
                        }
                        return Ok(Upstreamed::Conn(conn));
                    }
                    Ok(ParsedResponse::Informational(n)) => b.resp.advance(n),
                    Ok(ParsedResponse::Partial) => break,
                    Err(m) => {
                        return Err(Failure::Broken {
                            stale: false,
                            error: RawError::Malformed(m),
                        });
                    }
                }
            }
        }
    };
    tokio::time::timeout(config.response_timeout, attempt)
        .await
        .unwrap_or(Err(Failure::Timeout))
}

/// Checks a chunked body's first size line, if `body` holds all of it.
fn first_size_line(body: &[u8]) -> Result<(), Malformed> {
    let Some(end) = body.windows(2).position(|w| w == b"\r\n") else {
        // Not all here (or junk without a line end, which the relay finds).
        return Ok(());
    };
    ChunkedScan::default().scan(&body[..end + 2]).map(|_| ())
}

/// Writes the response in `b.rhead`/`b.resp` to the client and relays its
/// body; returns whether the client connection may go on. Once the last
/// byte has come from the upstream, and before the client is sent the end
/// of the response, `finish` gets the connection if it may be used again
/// (so a client's next request finds it idle, and least_conn sees the
/// request over); a relay that fails drops `finish` uncalled. For an
/// HTTP/1.0 client (`http10`), a chunked body goes as its data alone,
/// ended by the close.
pub(super) async fn relay(
    client: &mut impl Client,
    conn: Upstreamed,
    b: &mut Buffers,
    config: &crate::config::BalancerConfig,
    closing: bool,
    http10: bool,
    finish: impl FnOnce(Option<RawConn>),
) -> bool {
    let rh = &b.rhead;
    let framing = rh.framing;
    let dechunk = http10 && framing == Framing::Chunked;
    let close_client = closing || framing == Framing::Close || dechunk;
    let out = &mut b.out;
    out.clear();
    out.extend_from_slice(super::version_of_answer(http10));
    let mut code = itoa::Buffer::new();
    out.extend_from_slice(code.format(rh.status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(&b.resp[rh.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    for (name, value) in &rh.headers {
        lowercase_into(out, &b.resp[name.clone()]);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&b.resp[value.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Chunked && !dechunk {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !rh.has_date {
        date::write_header(out);
    }
    if close_client {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let mut reusable = rh.keep_alive;
    b.resp.advance(rh.len);
    if dechunk {
        return relay_dechunked(client, conn, b, config, reusable, finish).await;
    }
    // How much of the body is still to come, and where it ends in what
    // was read.
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunks = ChunkedScan::default();
    let mut done = framing == Framing::Empty;
    let mut first = true;
    loop {
        let take = if done {
            0
        } else {
            match framing {
                Framing::Empty => 0,
                Framing::Length(_) => {
                    let n = (b.resp.len() as u64).min(left) as usize;
                    left -= n as u64;
                    done = left == 0;
                    n
                }
                Framing::Chunked => match chunks.scan(&b.resp) {
                    Ok(Some(n)) => {
                        done = true;
                        n
                    }
                    Ok(None) => b.resp.len(),
                    Err(error) => {
                        tracing::warn!(upstream = %conn.addr(), %error, "upstream body cut off");
                        if first {
                            // The head is good: the client learns of the
                            // failure from a body that ends too soon.
                            let _ = client.send(out, config.send_timeout).await;
                        }
                        return false;
                    }
                },
                Framing::Close => b.resp.len(),
            }
        };
        if done {
            // Bytes after the response: the upstream is out of step.
            reusable &= take == b.resp.len();
            let conn = conn.into_conn().filter(|_| reusable);
            finish(conn);
            let sent = if first {
                out.extend_from_slice(&b.resp[..take]);
                client.send(out, config.send_timeout).await
            } else {
                client.send(&b.resp[..take], config.send_timeout).await
            };
            b.resp.clear();
            return sent.is_ok() && !close_client;
        }
        let sent = if first {
            first = false;
            out.extend_from_slice(&b.resp[..take]);
            client.send(out, config.send_timeout).await
        } else if take > 0 {
            client.send(&b.resp[..take], config.send_timeout).await
        } else {
            Ok(())
        };
        if sent.is_err() {
            return false;
        }
        b.resp.clear();
        b.resp.reserve(READ_CHUNK);
        match tokio::time::timeout(config.read_timeout, conn.read_more(&mut b.resp)).await {
            Ok(Ok(0)) if framing == Framing::Close => {
                finish(None);
                return false;
            }
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => {
                tracing::warn!(upstream = %conn.addr(), "upstream closed in the middle of a response");
                return false;
            }
            Ok(Err(error)) => {
                tracing::warn!(upstream = %conn.addr(), %error, "upstream connection broke in the middle of a response");
                return false;
            }
            Err(_) => {
                tracing::warn!(upstream = %conn.addr(), timeout = ?config.read_timeout, "the upstream sent nothing in the middle of a response");
                return false;
            }
        }
    }
}

/// The body of a chunked response, as its data alone, to an HTTP/1.0
/// client (whose connection closes after it); the head is in `b.out`.
/// Rare (the nodes' answers have a length), so the data is copied.
async fn relay_dechunked(
    client: &mut impl Client,
    conn: Upstreamed,
    b: &mut Buffers,
    config: &crate::config::BalancerConfig,
    reusable: bool,
    finish: impl FnOnce(Option<RawConn>),
) -> bool {
    let mut chunks = ChunkedScan::default();
    loop {
        let scanned = {
            let (resp, out) = (&b.resp, &mut b.out);
            chunks.scan_data(resp, |data| out.extend_from_slice(&resp[data]))
        };
        match scanned {
            Ok(Some(end)) => {
                // Bytes after the response: the upstream is out of step.
                finish(conn.into_conn().filter(|_| reusable && end == b.resp.len()));
                let _ = client.send(&b.out, config.send_timeout).await;
                b.resp.clear();
                return false;
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(upstream = %conn.addr(), %error, "upstream body cut off");
                let _ = client.send(&b.out, config.send_timeout).await;
                return false;
            }
        }
        if !b.out.is_empty() && client.send(&b.out, config.send_timeout).await.is_err() {
            return false;
        }
        b.out.clear();
        b.resp.clear();
        b.resp.reserve(READ_CHUNK);
        match tokio::time::timeout(config.read_timeout, conn.read_more(&mut b.resp)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => {
                tracing::warn!(upstream = %conn.addr(), "upstream closed or stalled in the middle of a response");
                return false;
            }
        }
    }
}

/// Appends a header name in lower case: how hyper writes names, so that
/// an upstream sees the same bytes from either path.
pub(super) fn lowercase_into(out: &mut Vec<u8>, name: &[u8]) {
    out.extend(name.iter().map(u8::to_ascii_lowercase));
}

/// The sale a node's `sold_out` answer names (`Spike-Event`, in front
/// of several sales).
pub(super) fn sale_event<'a>(rh: &ResponseHead, resp: &'a [u8]) -> Option<&'a str> {
    let name = crate::protocol::SALE_EVENT_HEADER_NAME.as_bytes();
    rh.headers
        .iter()
        .find(|(n, _)| resp[n.clone()].eq_ignore_ascii_case(name))
        .and_then(|(_, v)| std::str::from_utf8(&resp[v.clone()]).ok())
}

/// Whether the response head carries the node's sold-out mark.
pub(super) fn has_sold_out_mark(rh: &ResponseHead, resp: &[u8]) -> bool {
    let mark = SOLD_OUT_HEADER_NAME.as_bytes();
    rh.headers
        .iter()
        .any(|(name, _)| resp[name.clone()].eq_ignore_ascii_case(mark))
}
