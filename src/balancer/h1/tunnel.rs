//! Upgraded connections (a WebSocket's handshake: `Upgrade` and
//! `Connection: upgrade` on a GET without a body) tunnelled to an
//! upstream, as Nginx does with its usual two `proxy_set_header` lines and
//! HAProxy does on its own: a waiting room's live position and a sale's
//! live counter are natural WebSocket users.
//!
//! The handshake goes to one picked upstream on a new connection (never a
//! pooled one: it will not come back), with both lines; a connect failure
//! moves on to the next upstream, as for any request. The upstream's `101`
//! goes to the client as it came, and from then on bytes are copied both
//! ways until both ends have closed, or neither has sent anything for
//! `tunnel_timeout` (HAProxy's `timeout tunnel`). Any other answer is
//! relayed as an ordinary response, and the client's connection closes
//! after it. The pick is held while the tunnel lasts (`least_conn` counts
//! it, and `/status`'s `tunnels` does).
//!
//! The per-client limits and the edge are for purchases, and do not apply
//! here.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::buffers::Buffers;
use super::socket::{Client, READ_CHUNK, read_some};
use super::{client_of, logged, write_reply, write_request};
use crate::balancer::answer::LocalAnswer;
use crate::balancer::forward::client::Peer;
use crate::balancer::forward::{self, admission};
use crate::balancer::pool;
use crate::balancer::select::Attempt;
use crate::balancer::state::{Active, Shared};
use crate::balancer::upstream::now_ms;
use crate::http1::response::{self, ParsedResponse};

/// The longest upstream answer head to a handshake.
const MAX_HANDSHAKE_HEAD: usize = 16 * 1024;

/// Tunnels the handshake in `b` (its bytes are `b.input[..end]`) from
/// `client`, and whatever follows; the connection is done after it.
pub(super) async fn run(
    shared: &Shared,
    active: &Active,
    peer: &Peer,
    client: &mut impl Client,
    b: &mut Buffers,
    end: usize,
) {
    let start = Instant::now();
    let config = &active.config;
    let head = &b.head;
    let input = &b.input[..end];
    let client_addr = client_of(head, input, peer, config);
    let answer = |b: &mut Buffers, why: LocalAnswer| {
        let reply = forward::local(shared, why);
        let request = || logged(&b.head, &b.input[..end]);
        forward::log_reply(shared, active, request, client_addr, start, &reply);
        write_reply(&mut b.out, &reply, true, false);
    };
    if let Some(closed) = forward::closed(&input[head.target.start..head.path_end], config) {
        answer(b, closed);
        let _ = client.send(&b.out, config.send_timeout).await;
        return;
    }
    let Some(at) = head.upgrade else { return };
    write_request(&mut b.out, head, input, peer, client_addr, None);
    // The head ends with its blank line: the two lines go before it.
    b.out.truncate(b.out.len().saturating_sub(2));
    b.out.extend_from_slice(b"upgrade: ");
    b.out
        .extend_from_slice(&input[head.headers[at].value.clone()]);
    b.out.extend_from_slice(b"\r\nconnection: upgrade\r\n\r\n");

    let mut attempt = Attempt::new(client_addr);
    let (pick, mut conn) = loop {
        let pick =
            match admission::next_pick(shared, active, &mut attempt, client_addr, false).await {
                Ok(Some(pick)) => pick,
                Ok(None) => {
                    answer(b, LocalAnswer::BadGateway);
                    let _ = client.send(&b.out, config.send_timeout).await;
                    return;
                }
                Err(why) => {
                    answer(b, why);
                    let _ = client.send(&b.out, config.send_timeout).await;
                    return;
                }
            };
        let addr = active.selector.upstream(&pick).config.addr;
        match pool::connect_raw(addr, config.connect_timeout).await {
            Ok(conn) => break (pick, conn),
            Err(error) => {
                tracing::warn!(upstream = %addr, %error, "upstream connect failed (an upgrade)");
                active.selector.release(&pick, true, now_ms());
            }
        }
    };
    let upstream = active.selector.upstream(&pick).config.addr;
    let handshake = async {
        conn.stream.write_all(&b.out).await?;
        b.resp.clear();
        loop {
            if b.resp.capacity() - b.resp.len() < 1024 {
                b.resp.reserve(READ_CHUNK);
            }
            if read_some(&conn.stream, &mut b.resp).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the upstream closed before its answer",
                ));
            }
            if b.resp.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(());
            }
            if b.resp.len() > MAX_HANDSHAKE_HEAD {
                return Err(std::io::Error::other("an answer head over 16 KiB"));
            }
        }
    };
    match tokio::time::timeout(config.response_timeout, handshake).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%upstream, %error, "upstream upgrade failed");
            active.selector.release(&pick, true, now_ms());
            answer(b, LocalAnswer::BadGateway);
            let _ = client.send(&b.out, config.send_timeout).await;
            return;
        }
        Err(_) => {
            tracing::warn!(%upstream, "upstream upgrade timed out");
            active.selector.release(&pick, true, now_ms());
            answer(b, LocalAnswer::GatewayTimeout);
            let _ = client.send(&b.out, config.send_timeout).await;
            return;
        }
    }
    active.selector.release(&pick, false, now_ms());
    let upstream_time = start.elapsed();
    let switched = b.resp.starts_with(b"HTTP/1.1 101 ") || b.resp.starts_with(b"HTTP/1.0 101 ");
    let status = if switched {
        101
    } else {
        match response::parse(&b.resp, &mut b.rhead, false) {
            Ok(ParsedResponse::Complete) => b.rhead.status,
            _ => {
                tracing::warn!(%upstream, "upstream answered an upgrade with a head that cannot be relayed");
                answer(b, LocalAnswer::BadGateway);
                let _ = client.send(&b.out, config.send_timeout).await;
                return;
            }
        }
    };
    pick.live().count_response(status);
    let bytes = if switched {
        None
    } else {
        match b.rhead.framing {
            response::Framing::Empty => Some(0),
            response::Framing::Length(n) => Some(n),
            _ => None,
        }
    };
    forward::log_line(
        shared,
        active,
        logged(&b.head, &b.input[..end]),
        client_addr,
        start,
        status,
        bytes,
        Some((upstream, upstream_time)),
    );
    if !switched {
        // Refused: an ordinary answer, then the connection closes (it was
        // asked to change protocols, and did not).
        super::relay(
            client,
            super::Upstreamed::Conn(conn),
            b,
            config,
            true,
            false,
            drop,
        )
        .await;
        return;
    }
    shared
        .metrics
        .tunnels
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared
        .metrics
        .tunnels_open
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The 101 and whatever the upstream sent with it; then what the client
    // sent after its handshake.
    let opened = async {
        client.send(&b.resp, config.send_timeout).await?;
        if b.input.len() > end {
            conn.stream.write_all(&b.input[end..]).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    if tokio::time::timeout(config.send_timeout, opened)
        .await
        .is_ok_and(|r| r.is_ok())
    {
        pipe(
            tokio::io::split(&mut *client),
            conn.stream.split(),
            config.tunnel_timeout,
        )
        .await;
    }
    shared
        .metrics
        .tunnels_open
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    drop(pick);
}

/// Copies bytes both ways between a client's and an upstream's
/// connection, each as its reading and writing halves, until both ends
/// have closed (an end that closes has the other's writing side shut after
/// it), either breaks, or nothing has moved for `idle`. Also hyper's
/// path's tunnels ([`crate::balancer::upgrade`]).
pub(crate) async fn pipe(
    (mut cr, mut cw): (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
    (mut ur, mut uw): (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
    idle: Duration,
) {
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    let (mut client_open, mut upstream_open) = (true, true);
    let quiet = tokio::time::sleep(idle);
    tokio::pin!(quiet);
    while client_open || upstream_open {
        let moved = tokio::select! {
            r = cr.read(&mut up), if client_open => carry(r, &up, &mut uw, &mut client_open, idle).await,
            r = ur.read(&mut down), if upstream_open => carry(r, &down, &mut cw, &mut upstream_open, idle).await,
            () = &mut quiet => return,
        };
        match moved {
            Some(true) => quiet.as_mut().reset(tokio::time::Instant::now() + idle),
            Some(false) => {}
            None => return,
        }
    }
}

/// One read of a tunnel's side (`read`, into `buf`) carried to the other
/// side's `to`: `Some(true)` when bytes moved, `Some(false)` when the side
/// closed (`open` is cleared and `to` shut for writing), `None` when
/// either broke, or the write did not finish within `idle` (a peer that
/// stops reading: the quiet timer is not polled while a write waits, and
/// the tunnel held its place under the connection cap for good).
async fn carry(
    read: std::io::Result<usize>,
    buf: &[u8],
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    open: &mut bool,
    idle: Duration,
) -> Option<bool> {
    match read {
        Ok(0) => {
            *open = false;
            let _ = to.shutdown().await;
            Some(false)
        }
        // Flushed: under TLS a write may stay in rustls's buffer.
        Ok(n) => {
            let written = async {
                to.write_all(&buf[..n]).await?;
                to.flush().await
            };
            match tokio::time::timeout(idle, written).await {
                Ok(Ok(())) => Some(true),
                _ => None,
            }
        }
        Err(_) => None,
    }
}
