//! The balancer's own HTTP/1 forwarding path: one task per client
//! connection that parses each request head in place, writes it to an
//! upstream connection it owns for the request (one write, head and body),
//! reads the response head in place and relays the body by its framing
//! without re-encoding it. No HTTP state machine on either side, no
//! channel, no connection task per upstream connection: what hyper's
//! server and client cost per proxied request (two state machines, a
//! header map built and encoded on each side, a channel and a task wake
//! between them) is what this path saves.
//!
//! It takes only the requests whose framing has one reading (see
//! [`crate::http1::request`]); the first request that is anything else
//! (HTTP/1.0 kept alive, a chunked or large body, `Expect`, an upgrade, an odd target
//! or `Host`, a head longer than 16 KiB, or anything `httparse` refuses)
//! is handed, with every byte read so far, to hyper's server and the
//! general path in [`super::proxy`], which keeps the connection from then
//! on. So the general path stays the reference for every rule about what
//! is refused, and the fast path can only be narrower, never more
//! lenient. `[balancer] fast_path = false` sends every connection to the
//! general path.
//!
//! Everything else is the policy's in [`super::forward`], the same for
//! both paths: this module is its [`Transport`] over raw bytes, on a TCP
//! socket or TLS over one ([`socket::Client`]; the sold-out
//! edge, the admission queue, failover and retries, the 502/504 choice are
//! decided there), plus what only bytes on a socket need: the framing of
//! [`crate::http1`], `response_timeout` for the head, `read_timeout` and
//! `send_timeout` between reads and writes of the body, the request
//! written once with `X-Forwarded-For`, `X-Real-IP` and the generated
//! `Idempotency-Key`, hop-by-hop headers dropped both ways, and a 502 for
//! a response that cannot be framed in one way.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use hyper::Method;
use tokio::net::TcpStream;

use crate::protocol::{self, buyer_from};
use crate::server::reuse::Idle;
use crate::server::{ConnContext, Handed};

use super::access_log;
use super::answer::LocalAnswer;
use super::forward::client::{Peer, client_ip_from};
use super::forward::headers::{write_forwarded_for, write_real_ip};
use super::forward::limit::{Admitted, Held};
use super::forward::{self, Conn, Failure, Plan, REPLAY_LIMIT, Reply, Transport};
use super::idempotency::{self, KeyPlan};
use super::pool::RawConn;
use super::select::Pick;
use super::state::Shared;
use super::upstream::{Upstream, now_ms};
use super::waiting_room::{self, Gate};
use crate::http1::date;
use crate::http1::request::{self, Kind, Parsed, RequestHead};
use crate::http1::response::{ChunkedScan, Framing, Malformed};

mod buffers;
mod exchange;
mod socket;
pub(crate) mod tunnel;

use buffers::{Buffers, Lent};
use exchange::{
    RawError, Upstreamed, exchange, has_sold_out_mark, lowercase_into, relay, sale_event,
};
use socket::{Client, READ_CHUNK, make_room};

/// The balancer's fast path as the accept loop sees it.
pub struct FastPath {
    /// The balancer's state.
    pub shared: Arc<Shared>,
    /// The worker thread whose upstream connections this uses.
    pub worker: usize,
}

impl crate::server::Front for FastPath {
    fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        ctx: ConnContext,
    ) -> crate::server::Handover {
        Box::pin(serve(self.shared.clone(), self.worker, stream, peer, ctx))
    }

    fn serve_tls(
        &self,
        stream: crate::server::tls::TlsClient,
        peer: SocketAddr,
        ctx: ConnContext,
    ) -> crate::server::TlsHandover {
        Box::pin(serve(self.shared.clone(), self.worker, stream, peer, ctx))
    }
}

/// Serves `stream` (a TCP socket, or TLS over one) until it closes
/// (`None`) or a request needs the general path (`Some`: the connection
/// and the bytes read ahead, that request's first).
///
/// This future is what every open connection holds, and most of them are
/// idle keep-alive clients: it holds the socket, a pointer to the rest of
/// the connection ([`Kept`]) and the wait for a next request. A request's
/// state (its head read, the upstream exchange, the relay) is boxed while
/// there is a request, and the buffers are given back between requests
/// when many connections are open.
pub fn serve<S: Client>(
    shared: Arc<Shared>,
    worker: usize,
    mut stream: S,
    peer: SocketAddr,
    ctx: ConnContext,
) -> impl Future<Output = Option<Handed<S>>> {
    // Not an `async fn`: its arguments would stay in the future for the
    // connection's life, beside the box they are moved into.
    let fast_path = shared.current.load().config.fast_path;
    let mut conn = Box::new(Kept {
        shared,
        worker,
        peer: Peer::new(peer),
        ctx,
        b: None,
        first: true,
    });
    async move {
        if !fast_path {
            return Some(Handed {
                stream,
                ahead: bytes::Bytes::new(),
                head_deadline: conn.ctx.first_head_deadline,
            });
        }
        loop {
            if conn.b.as_ref().is_none_or(|b| b.input.is_empty())
                && !next_bytes(&mut conn, &mut stream).await
            {
                return None;
            }
            match Box::pin(request(&mut conn, &mut stream)).await {
                Step::Again => {}
                Step::Close => return None,
                Step::General(head_deadline) => {
                    let ahead = conn
                        .b
                        .take()
                        .map(|mut b| std::mem::take(&mut b.input).freeze())
                        .unwrap_or_default();
                    return Some(Handed {
                        stream,
                        ahead,
                        head_deadline,
                    });
                }
            }
        }
    }
}

/// A fast-path connection, but for its socket: what it keeps from one
/// request to the next (boxed, see [`serve`]).
struct Kept {
    shared: Arc<Shared>,
    worker: usize,
    peer: Peer,
    ctx: ConnContext,
    /// The buffers; none while an idle connection has given them back.
    b: Option<Lent>,
    /// No request has begun yet.
    first: bool,
}

/// What the connection does after a request.
enum Step {
    /// Waits for (or reads) the next one.
    Again,
    /// Closes.
    Close,
    /// Goes to the general path with the request read so far, whose head
    /// must be in by then.
    General(tokio::time::Instant),
}

/// Waits for the next request's first bytes and reads what has come into
/// the buffers; `false` when the connection is to close instead (its
/// deadline passed, the client closed, the server stops, or the connection
/// was claimed for a new client).
async fn next_bytes<S: Client>(c: &mut Kept, stream: &mut S) -> bool {
    let first = c.first;
    // Between requests, with many connections open, the buffers go back at
    // once; with few, they are kept for the next request, until a crowd
    // forms.
    let mut kept = !first && c.b.is_some();
    if kept && c.ctx.crowded() {
        c.b = None;
        kept = false;
    }
    let until = if first {
        c.ctx.first_head_deadline
    } else {
        tokio::time::Instant::now() + c.ctx.keepalive_timeout
    };
    // Between requests, the connection may be closed to make room for a
    // new client (the first request is not waited for yet).
    let idle = if first { None } else { c.ctx.idle.as_ref() };
    if let Some(idle) = idle {
        idle.idle();
    }
    // A wake that brings no request byte (over TLS, ciphertext that is not
    // yet a whole record) waits on with the same deadline and the same idle
    // time: else a client that dribbles a record a byte at a time kept its
    // connection, and looked freshly idle, for as long as it liked.
    loop {
        loop {
            let crowd = |ctx: &ConnContext| kept && ctx.crowded();
            tokio::select! {
                // `poll_read_ready` keeps its waker in the socket's own
                // registration: no waiter node in this future, which every
                // idle connection holds (`readable()` is 152 bytes).
                ready = tokio::time::timeout_at(
                    until,
                    std::future::poll_fn(|cx| stream.poll_read_ready(cx)),
                ) => match ready {
                    Ok(Ok(())) => break,
                    _ => return false,
                },
                // One wake for the three reasons (a claim, the server's
                // stop, a crowd that formed), each looked at below.
                () = nudged(&c.ctx, crowd) => {}
            }
            if c.ctx.idle.as_ref().is_none_or(Idle::ends) {
                return false;
            }
            if crowd(&c.ctx) {
                c.b = None;
                kept = false;
                c.shared
                    .metrics
                    .buffers_given_back
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let b = c.b.get_or_insert_with(Lent::take);
        make_room(&mut b.input);
        match stream.try_read_some(&mut b.input) {
            Ok(0) => return false,
            // Busy only once bytes came: a wake with nothing to read leaves
            // the connection idle since when it was.
            Ok(_) if idle.is_some_and(|idle| !idle.busy()) => {
                // Claimed for a new client just as this one spoke.
                return false;
            }
            Ok(_) => return true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return false,
        }
    }
}

/// Resolves when the connection is nudged ([`Idle::nudged`]: claimed,
/// the server stopping, or `crowd` true); without a slot, when the server
/// stops.
async fn nudged(ctx: &ConnContext, crowd: impl Fn(&ConnContext) -> bool) {
    match &ctx.idle {
        Some(idle) => idle.nudged(|| crowd(ctx)).await,
        // Boxed: no connection of a server lacks a slot in practice.
        None => {
            let mut stop = ctx.stop.clone();
            let _ = Box::pin(stop.wait_for(|stop| *stop)).await;
        }
    }
}

/// Reads the rest of a request whose first bytes are in, and answers or
/// forwards it. Its state is boxed by [`serve`]: it lives only while there
/// is a request.
async fn request<S: Client>(c: &mut Kept, stream: &mut S) -> Step {
    let Kept {
        shared,
        worker,
        peer,
        ctx,
        b,
        first,
    } = c;
    let shared = &**shared;
    let b = &mut **b.get_or_insert_with(Lent::take);
    let active = shared.current.load_full();
    let config = &active.config;
    // A later head, within `header_read_timeout` of its first byte; the
    // first within `header_read_timeout` of the accept, as Nginx's
    // `client_header_timeout`: a client that sends its first byte late does
    // not get a second full period for the rest.
    let deadline = if *first {
        ctx.first_head_deadline
    } else {
        tokio::time::Instant::now() + ctx.header_read_timeout
    };
    *first = false;
    loop {
        let parsed = request::parse(
            &b.input,
            &mut b.head,
            REPLAY_LIMIT,
            config.max_body,
            config.underscores_in_headers,
        );
        // A head over Nginx's `large_client_header_buffers` limits is
        // refused on hyper's path, by the same rule.
        let parsed = match parsed {
            Parsed::Fast if forward::head_refusal(head_size(&b.head), config).is_some() => {
                Parsed::General
            }
            other => other,
        };
        match parsed {
            Parsed::Fast => break,
            Parsed::General => {
                if b.head.chunked_body
                    && let Err(why) = check_chunks(stream, &mut b.input, b.head.len, config).await
                {
                    let answer = match why {
                        Malformed::TooLarge => LocalAnswer::PayloadTooLarge,
                        _ => LocalAnswer::BadChunk,
                    };
                    write_local(shared, &mut b.out, answer, true, b.head.http10);
                    let _ = stream.send(&b.out, config.send_timeout).await;
                    stream.close(config.send_timeout).await;
                    return Step::Close;
                }
                shared
                    .metrics
                    .general_connections
                    .fetch_add(1, Ordering::Relaxed);
                return Step::General(deadline);
            }
            Parsed::Partial => {
                b.input.reserve(READ_CHUNK);
                match tokio::time::timeout_at(deadline, stream.read_more(&mut b.input)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return Step::Close,
                }
            }
        }
    }
    // A small declared body, read whole so that it can be sent again, with
    // `body_timeout` between reads.
    let end = b.head.len + b.head.content_length as usize;
    while b.input.len() < end {
        b.input.reserve(end - b.input.len());
        match tokio::time::timeout(config.body_timeout, stream.read_more(&mut b.input)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => {
                write_local(
                    shared,
                    &mut b.out,
                    LocalAnswer::BadRequest,
                    true,
                    b.head.http10,
                );
                let _ = stream.send(&b.out, config.send_timeout).await;
                stream.close(config.send_timeout).await;
                return Step::Close;
            }
        }
    }
    if b.head.upgrade.is_some() {
        // A WebSocket's handshake: the connection becomes a tunnel to an
        // upstream, and is done after it. Boxed: rare, and far larger than
        // a request.
        Box::pin(tunnel::run(shared, &active, peer, stream, b, end)).await;
        stream.close(config.send_timeout).await;
        return Step::Close;
    }
    let closing = b.head.close || ctx.stopping.load(Ordering::Relaxed);
    let keep = forward_request(shared, &active, *worker, peer, stream, b, end, closing).await;
    b.input.advance(end);
    if !keep || closing {
        stream.close(config.send_timeout).await;
        return Step::Close;
    }
    Step::Again
}

/// The sizes [`forward::head_refusal`] limits, of a head parsed in place.
fn head_size(head: &RequestHead) -> forward::HeadSize {
    forward::HeadSize {
        request_line: head.request_line,
        longest_header: head.longest_header,
        total: head.len,
    }
}

/// Checks the chunk sizes of a chunked request body before hyper reads
/// it: what has arrived of the body, and more as it comes, until the body
/// ends, its first [`REPLAY_LIMIT`] bytes are in, or the client pauses for
/// `body_timeout` (hyper then reads the rest as it did before). A size
/// past 2^63 - 1 or junk in the framing is the client's 400, and sizes
/// that add up past `max_body` its 413, before a byte of the body goes
/// anywhere: hyper takes any size up to 2^64 - 1 and would stream until
/// `max_body` ran out.
async fn check_chunks(
    stream: &mut impl Client,
    input: &mut BytesMut,
    head_len: usize,
    config: &crate::config::BalancerConfig,
) -> Result<(), Malformed> {
    let mut scan = ChunkedScan::with_limit(config.max_body);
    let mut scanned = head_len;
    loop {
        if scan.scan(&input[scanned..])?.is_some() {
            return Ok(());
        }
        scanned = input.len();
        if scanned - head_len >= REPLAY_LIMIT as usize {
            return Ok(());
        }
        input.reserve(READ_CHUNK);
        match tokio::time::timeout(config.body_timeout, stream.read_more(input)).await {
            Ok(Ok(n)) if n > 0 => {}
            // Cut off or paused: hyper answers as it always has.
            _ => return Ok(()),
        }
    }
}

/// Proxies the request in `b` (its bytes are `b.input[..end]`); the
/// future says whether the client connection may serve another request.
/// The decisions are made before it is first polled ([`prepare`]); it
/// holds only what answering or forwarding needs (it is boxed per
/// request).
#[allow(clippy::too_many_arguments)]
fn forward_request<'a, S: Client>(
    shared: &'a Shared,
    active: &'a super::state::Active,
    worker: usize,
    peer: &Peer,
    client: &'a mut S,
    b: &'a mut Buffers,
    end: usize,
    closing: bool,
) -> impl Future<Output = bool> + 'a {
    let config = &active.config;
    match prepare(shared, active, peer, b, end) {
        Next::Answer(reply, client_addr, start) => {
            let request = || logged(&b.head, &b.input[..end]);
            forward::log_reply(shared, active, request, client_addr, start, &reply);
            write_reply(&mut b.out, &reply, closing, b.head.http10);
            Either::Left {
                f: Either::Left {
                    f: async move { client.send(&b.out, config.send_timeout).await.is_ok() },
                },
            }
        }
        Next::Join(joining, client_addr, start) => Either::Left {
            f: Either::Right {
                f: async move {
                    // The one store call a buyer makes to take a place.
                    // Boxed: its future is 7.5 KB, and every request's box
                    // (see `request`) would otherwise be sized for it.
                    let reply = Box::pin(waiting_room::join(shared, active, joining)).await;
                    let request = || logged(&b.head, &b.input[..end]);
                    forward::log_reply(shared, active, request, client_addr, start, &reply);
                    write_reply(&mut b.out, &reply, closing, b.head.http10);
                    client.send(&b.out, config.send_timeout).await.is_ok()
                },
            },
        },
        Next::Forward(plan, admitted) => {
            // A purchase goes in a batch to a spike node (see
            // `crate::balancer::batch`; `exchange` asks the upstream).
            let batched = plan.is_buy
                && plan.keyed
                && config.batch_purchases
                && (b.head.method == Method::GET || b.head.method == Method::POST);
            let raw = Raw {
                worker,
                workers: shared.workers,
                config,
                batched,
                to_head: b.head.method == Method::HEAD,
                client,
                b,
                closing,
            };
            Either::Right {
                f: forward::run(shared, active, raw, plan, admitted),
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// One of two futures with the same output, without a box of its own.
    #[project = EitherProj]
    enum Either<A, B> {
        Left { #[pin] f: A },
        Right { #[pin] f: B },
    }
}

impl<A: Future, B: Future<Output = A::Output>> Future for Either<A, B> {
    type Output = A::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<A::Output> {
        match self.project() {
            EitherProj::Left { f } => f.poll(cx),
            EitherProj::Right { f } => f.poll(cx),
        }
    }
}

/// What becomes of the request in `b` once it has been read.
enum Next {
    /// The balancer answers it: a closed path, a per-client limit, or the
    /// edge; to this client, for the request begun then.
    Answer(Reply, IpAddr, Instant),
    /// It goes to upstreams: written into `b.out`, as every attempt sends
    /// it, once the limits have let it (see [`forward::limit`]).
    Forward(Plan, Admitted),
    /// Its buyer takes a place in the waiting room's line (this client, for
    /// the request begun then).
    Join(waiting_room::Joining, IpAddr, Instant),
}

/// The policy's decisions for the request in `b` (its bytes are
/// `b.input[..end]`), all made before anything is sent or awaited: a path
/// that is not forwarded ([`forward::closed`]), the client's address,
/// `limit_rate`'s 429, the edge's answer, or the request as the upstreams
/// get it, written once.
fn prepare(
    shared: &Shared,
    active: &super::state::Active,
    peer: &Peer,
    b: &mut Buffers,
    end: usize,
) -> Next {
    let start = Instant::now();
    let config = &active.config;
    let head = &b.head;
    let input = &b.input[..end];
    let path = &input[head.target.start..head.path_end];
    if let Some(closed) = forward::closed(path, config) {
        return Next::Answer(forward::local(shared, closed), peer.ip, start);
    }
    // `/buy/ticket`, or a sale's own `/events/{event}/buy` (several sales):
    // the same rule as hyper's path, so that both generate a key for it and
    // a retry on another node sells once.
    let is_buy = path == protocol::PURCHASE_PATH.as_bytes()
        || (path.ends_with(b"/buy")
            && std::str::from_utf8(path).is_ok_and(idempotency::is_purchase));
    let client_addr = client_of(head, input, peer, config);
    // The buyer token, asked only by a limit or the edge that needs it: a
    // scan of the few header lines is cheaper than indexing them always.
    let token = || {
        let named = |name: &'static [u8]| {
            head.headers
                .iter()
                .filter(move |h| input[h.name.clone()].eq_ignore_ascii_case(name))
                .map(|h| &input[h.value.clone()])
        };
        crate::auth::token_in(named(b"authorization").next(), named(b"cookie"))
    };
    let admitted = match forward::limit::check(shared, active, client_addr, token) {
        Ok(admitted) => admitted,
        Err(limited) => return Next::Answer(forward::local(shared, limited), client_addr, start),
    };
    let cookies = || {
        head.headers
            .iter()
            .filter(|h| input[h.name.clone()].eq_ignore_ascii_case(b"cookie"))
            .map(|h| &input[h.value.clone()])
    };
    // The sale a purchase names, read only in front of several sales
    // (by the waiting room and the edge, each when it needs it).
    let event = || {
        let query = (head.path_end < head.target.end)
            .then(|| &input[head.path_end + 1..head.target.end])
            .and_then(|q| std::str::from_utf8(q).ok());
        match std::str::from_utf8(path) {
            Ok(path) => protocol::purchase_event(path, query),
            // Not a purchase path (those are ASCII): names no sale.
            Err(_) => Ok(None),
        }
    };
    let shut = match waiting_room::gate(
        shared,
        active,
        is_buy,
        &head.method,
        head.keys > 0,
        cookies,
        token,
        client_addr,
        event,
    ) {
        Gate::Pass => None,
        Gate::Answer(reply) => return Next::Answer(reply, client_addr, start),
        Gate::Join(joining) => return Next::Join(joining, client_addr, start),
        Gate::Shut { reply, retry } => Some((reply, retry)),
    };
    let edge = forward::edge::answer(
        shared,
        active,
        is_buy,
        &head.method,
        head.keys > 0,
        |limited| {
            let query = (head.path_end < head.target.end)
                .then(|| &input[head.path_end + 1..head.target.end])
                .and_then(|q| std::str::from_utf8(q).ok());
            let user_id = head.user_at.map(|i| &input[head.headers[i].value.clone()]);
            buyer_from(query, user_id, limited)
        },
        || {
            (head.path_end < head.target.end)
                .then(|| &input[head.path_end + 1..head.target.end])
                .and_then(|q| std::str::from_utf8(q).ok())
        },
        token,
        event,
    );
    if let Some(edge) = edge {
        return Next::Answer(edge.into(), client_addr, start);
    }
    if let Some(reply) = shut.and_then(|(r, retry)| waiting_room::after_edge(retry, r)) {
        return Next::Answer(reply, client_addr, start);
    }
    // A purchase with a key may be sent twice: the node decides a key once.
    let key = idempotency::plan(is_buy, &head.method, head.keys, || {
        idempotency::is_valid_bytes(&input[head.headers[head.key_at].value.clone()])
    });
    let generated = (key == KeyPlan::Generate).then(idempotency::generate);
    write_request(
        &mut b.out,
        head,
        input,
        peer,
        client_addr,
        generated.as_ref().map(|v| v.as_bytes()),
    );
    Next::Forward(
        Plan::new(start, is_buy, client_addr, &head.method, key.keyed()),
        admitted,
    )
}

/// One request on the fast path, as the policy's [`Transport`]: the
/// request is written once into `b.out`, and each attempt sends those
/// bytes.
struct Raw<'a, S> {
    worker: usize,
    workers: usize,
    config: &'a crate::config::BalancerConfig,
    client: &'a mut S,
    b: &'a mut Buffers,
    /// The client's connection closes after this request.
    closing: bool,
    /// The request is a HEAD: its response has no body.
    to_head: bool,
    /// A purchase that goes in a batch to a node.
    batched: bool,
}

impl<S: Client> Transport for Raw<'_, S> {
    type Request = ();
    type Response = Upstreamed;
    type Error = RawError;
    type Output = bool;

    fn request(&mut self, _upstream: &Upstream) -> Option<()> {
        Some(())
    }

    fn send(
        &mut self,
        upstream: &Upstream,
        (): (),
        conn: Conn,
    ) -> impl Future<Output = Result<Upstreamed, Failure<RawError>>> {
        exchange(
            upstream,
            self.worker,
            self.workers,
            self.config,
            self.b,
            conn == Conn::Pooled,
            self.to_head,
            self.batched,
        )
    }

    fn client_fault(&self) -> Option<LocalAnswer> {
        // The body was read whole before the first attempt.
        None
    }

    fn status(&self, _conn: &Upstreamed) -> u16 {
        self.b.rhead.status
    }

    fn sold_out_mark(&self, _conn: &Upstreamed) -> bool {
        has_sold_out_mark(&self.b.rhead, &self.b.resp)
    }

    fn sold_out_event(&self, _conn: &Upstreamed) -> Option<&str> {
        sale_event(&self.b.rhead, &self.b.resp)
    }

    fn deliver(&mut self, conn: Upstreamed, pick: Pick, held: Held) -> impl Future<Output = bool> {
        let (worker, workers, keepalive) = (self.worker, self.workers, self.config.keepalive);
        // The pick (least_conn's count) ends with the upstream's body, and
        // the connection goes back idle then.
        let finish = move |conn: Option<RawConn>| {
            if let Some(conn) = conn {
                pick.live()
                    .raw_idle
                    .put(worker, workers, conn, now_ms(), keepalive);
            }
            drop(pick);
            drop(held);
        };
        let http10 = self.b.head.http10;
        relay(
            self.client,
            conn,
            self.b,
            self.config,
            self.closing,
            http10,
            finish,
        )
    }

    async fn reply(&mut self, reply: Reply) -> bool {
        write_reply(&mut self.b.out, &reply, self.closing, self.b.head.http10);
        self.client
            .send(&self.b.out, self.config.send_timeout)
            .await
            .is_ok()
    }

    fn logged(&self) -> (access_log::Request<'_>, Option<&str>) {
        logged(&self.b.head, &self.b.input)
    }

    fn body_size(&self, _conn: &Upstreamed) -> Option<u64> {
        match self.b.rhead.framing {
            Framing::Empty => Some(0),
            Framing::Length(n) => Some(n),
            Framing::Chunked | Framing::Close => None,
        }
    }
}

/// The client's address for the request parsed into `head` from `input`:
/// the peer, or behind `trusted_proxies` what `X-Forwarded-For` says.
fn client_of(
    head: &RequestHead,
    input: &[u8],
    peer: &Peer,
    config: &crate::config::BalancerConfig,
) -> IpAddr {
    client_ip_from(
        peer.ip,
        head.headers
            .iter()
            .filter(|h| h.kind == Kind::ForwardedFor)
            .map(|h| &input[h.value.clone()]),
        &config.trusted_proxies,
    )
}

/// The request parsed into `head` from `input`, as the access log shows
/// it, and its buyer token.
fn logged<'a>(
    head: &'a RequestHead,
    input: &'a [u8],
) -> (access_log::Request<'a>, Option<&'a str>) {
    let named = |name: &'static [u8]| {
        head.headers
            .iter()
            .filter(move |h| input[h.name.clone()].eq_ignore_ascii_case(name))
            .map(|h| &input[h.value.clone()])
    };
    let request = access_log::Request {
        method: head.method.as_str().as_bytes(),
        target: &input[head.target.clone()],
        version: if head.http10 { "HTTP/1.0" } else { "HTTP/1.1" },
        referer: named(b"referer").next(),
        user_agent: named(b"user-agent").next(),
        buyer: None,
    };
    let token = crate::auth::token_in(named(b"authorization").next(), named(b"cookie"));
    (request, token)
}

/// The request as the upstream gets it, into `out`: the request line with
/// HTTP/1.1, the client's headers as they came less the hop-by-hop ones
/// and `X-Real-IP`, one `X-Forwarded-For` (the client's, then the peer),
/// `X-Real-IP`, a generated `Idempotency-Key` if any, and the body.
fn write_request(
    out: &mut Vec<u8>,
    head: &RequestHead,
    input: &[u8],
    peer: &Peer,
    client: IpAddr,
    generated_key: Option<&[u8]>,
) {
    out.clear();
    // One allocation for the connection's first request, not a doubling
    // from 8 bytes up.
    out.reserve(1024);
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(&input[head.target.clone()]);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded = false;
    for h in &head.headers {
        match h.kind {
            Kind::Plain => {
                lowercase_into(out, &input[h.name.clone()]);
                out.extend_from_slice(b": ");
                out.extend_from_slice(&input[h.value.clone()]);
                out.extend_from_slice(b"\r\n");
            }
            Kind::Dropped => {}
            Kind::ForwardedFor if forwarded => {}
            Kind::ForwardedFor => {
                // One line where the first was: every value the client
                // sent, in order, then the peer.
                forwarded = true;
                let values = head
                    .headers
                    .iter()
                    .filter(|h| h.kind == Kind::ForwardedFor)
                    .map(|v| &input[v.value.clone()]);
                write_forwarded_for(out, values, peer);
            }
        }
    }
    if !forwarded {
        write_forwarded_for(out, std::iter::empty(), peer);
    }
    write_real_ip(out, peer, client);
    if let Some(key) = generated_key {
        out.extend_from_slice(b"idempotency-key: ");
        out.extend_from_slice(key);
        // The node may keep a key of ours with its order alone
        // (`protocol::MADE_KEY`); a client's such line was dropped.
        out.extend_from_slice(b"\r\nspike-made-key: 1\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&input[head.len..]);
}

/// The status line's version, and its space: an HTTP/1.0 client is
/// answered in HTTP/1.0, as hyper's server answers it, so that both paths
/// say the same.
pub(super) fn version_of_answer(http10: bool) -> &'static [u8] {
    if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " }
}

/// An answer of the balancer's own, counted, into `out`.
fn write_local(shared: &Shared, out: &mut Vec<u8>, answer: LocalAnswer, close: bool, http10: bool) {
    write_reply(out, &forward::local(shared, answer), close, http10);
}

/// An answer of the balancer's own, a JSON body, into `out`.
fn write_reply(out: &mut Vec<u8>, reply: &Reply, close: bool, http10: bool) {
    let status = reply.status;
    let body = reply.body.as_bytes();
    out.clear();
    out.reserve(512 + body.len());
    out.extend_from_slice(version_of_answer(http10));
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\n");
    if let Some((name, value)) = reply.header {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(cookie) = &reply.cookie {
        out.extend_from_slice(b"set-cookie: ");
        out.extend_from_slice(cookie.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(n.format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    date::write_header(out);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}
