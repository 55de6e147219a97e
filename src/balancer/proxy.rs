//! The hot path: one client request in, one upstream picked (and more on
//! failure), the response streamed back.
//!
//! Failover follows Nginx's `proxy_next_upstream error timeout`:
//! - a connect error or connect timeout: the request was not sent, so the
//!   next upstream is tried whatever the method;
//! - any other error (reset, closed mid-response) or a response timeout: the
//!   request may have reached the upstream, so only requests that may be
//!   sent twice go on to the next upstream: idempotent methods (GET, HEAD,
//!   OPTIONS, PUT, DELETE; TRACE is refused), and purchases (`/buy/ticket`) carrying
//!   an `Idempotency-Key`, whatever their method, because the node decides
//!   a key once (see [`super::idempotency`]; a purchase without a key gets
//!   one here, kept across its attempts);
//! - nothing left: 502, or 504 when the last failure was a timeout.
//!
//! Before such a request gives up on an upstream, it is sent once more to
//! the same upstream on a fresh (unpooled) connection, but only when the
//! failed attempt went on a reused keep-alive connection and failed before
//! a response came (closed or reset): that may only mean the idle connection
//! went stale, which must never turn into a client-visible error or a
//! failure mark. A failure on a fresh connection, or a malformed response,
//! is the upstream's own and is not repeated there. (A request that hyper
//! hands back unsent, because the reused connection closed first, simply
//! goes on the next idle or a new connection; see [`send`].)
//!
//! A client whose own request body fails (cut off, malformed chunk) gets a
//! 400, and the upstream it was streaming to is not marked failed: a client
//! must not be able to take healthy upstreams out of the rotation.
//!
//! Request bodies: a body of at most [`REPLAY_LIMIT`] bytes with a declared
//! `Content-Length` is read first so it can be replayed on another upstream
//! (Nginx buffers request bodies for the same reason), with `body_timeout`
//! between reads. Larger or chunked bodies are streamed straight through,
//! counted against `max_body`, and get exactly one attempt. Response bodies
//! are always streamed, with `read_timeout` between reads from the upstream
//! (`send_timeout`, for a client that stops reading, is on the client's
//! socket: see `crate::server`).
//!
//! Before any of that, what Nginx refuses is refused here too: a missing,
//! repeated or malformed `Host` (400), CONNECT and TRACE (405), a declared
//! body over `max_body` (413); and headers with `_` in their name are
//! dropped unless `underscores_in_headers` is on.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{
    CONNECTION, CONTENT_LENGTH, HOST, HeaderName, HeaderValue, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
};
use hyper::http::uri::PathAndQuery;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use ipnet::IpNet;

use crate::config::BalancerConfig;
use crate::protocol::{self, IDEMPOTENCY_KEY, SOLD_OUT_HEADER};

use super::answer::LocalAnswer;
use super::body::{BODY_TOO_LARGE, BodyState, ClientBody, StallTimer};
use super::idempotency;
use super::pool::{self, ConnectError, UpstreamConn};
use super::select::{Attempt, Pick};
use super::state::Shared;
use super::upstream::{Upstream, now_ms};

/// Largest request body kept in memory so that it can be sent again to
/// another upstream; bigger bodies are streamed and not retried.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

pub use super::pool::ReqBody;

/// What goes back to clients: an upstream's streamed body, or our own answer.
pub type RespBody = Either<Tracked, Full<Bytes>>;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus
/// the non-standard ones old clients still send.
const HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// An upstream's response body on its way to the client. Holding the
/// [`Pick`] keeps the request counted as active until the body is done,
/// which is what least_conn balances on; holding the connection lets it go
/// back to the idle stack once the body has been read to the end (a body
/// dropped half-read closes it, as hyper must).
pub struct Tracked {
    inner: Incoming,
    pick: Pick,
    homeward: Option<Homeward>,
    /// Longest silence of the upstream between two frames.
    read_timeout: Duration,
    /// `read_timeout` between reads of the upstream's body.
    stall: StallTimer,
}

/// An upstream that sent nothing of its response body for `read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?} in the middle of a response")]
pub struct ReadTimeout(Duration);

/// A connection on its way back to its upstream's idle stack (the
/// upstream is the one of the [`Pick`] beside it).
struct Homeward {
    conn: UpstreamConn,
    worker: usize,
    workers: usize,
    max_idle: usize,
}

impl Tracked {
    fn give_back(&mut self) {
        if let Some(h) = self.homeward.take() {
            let idle = &self.pick.live().idle;
            idle.put(h.worker, h.workers, h.conn, now_ms(), h.max_idle);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                self.give_back();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.homeward = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                self.stall.progress();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let this = &mut *self;
                if this.stall.expired(this.read_timeout, cx) {
                    // The connection is mid-response: it cannot be reused.
                    this.homeward = None;
                    return Poll::Ready(Some(Err(Box::new(ReadTimeout(this.read_timeout)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // A body known to be empty (HEAD, 204, 304, Content-Length: 0) is
        // never polled: the connection is free as soon as the head is in.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

/// The client end of one connection, with its address already formatted for
/// `X-Forwarded-For` / `X-Real-IP`: made once per connection, so a request
/// from a direct client copies a shared value instead of formatting an IP.
#[derive(Debug, Clone)]
pub struct Peer {
    pub(super) ip: IpAddr,
    pub(super) value: HeaderValue,
}

impl Peer {
    /// The peer of a connection accepted from `addr`.
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = addr.ip().to_canonical();
        Peer {
            ip,
            value: ip_value(ip),
        }
    }
}

/// An IP address as a header value.
pub(super) fn ip_value(ip: IpAddr) -> HeaderValue {
    // An IP address is always a valid header value.
    HeaderValue::from_maybe_shared(Bytes::from(ip.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

enum Outgoing {
    Replay(Bytes),
    /// The client's body (until an attempt takes it), and what became of
    /// it.
    Stream(Option<ClientBody>, Arc<BodyState>),
}

impl Outgoing {
    /// How the client's own body failed, if it did: the client's fault.
    fn client_failed(&self) -> u8 {
        match self {
            Outgoing::Replay(_) => 0,
            Outgoing::Stream(_, state) => state.failed.load(Ordering::Relaxed),
        }
    }

    /// The streamed body's state, which `send` needs for its deadline.
    fn streaming(&self) -> Option<&BodyState> {
        match self {
            Outgoing::Replay(_) => None,
            Outgoing::Stream(_, state) => Some(state),
        }
    }
}

enum SendError {
    /// Connecting failed or timed out: the request was not sent.
    Connect(ConnectError),
    /// No response head within `response_timeout`.
    Timeout,
    /// Anything else; the request may have been sent.
    Other {
        error: hyper::Error,
        /// Whether it went on a reused keep-alive connection that failed
        /// before any byte of the response came: it may only have gone
        /// stale while idle.
        stale: bool,
    },
}

/// Whether `e` is the connection closing or breaking: not a malformed
/// response (the upstream answered, so it did the work) nor our own or the
/// client's error. (hyper reports a close after part of a response head
/// like one before any byte; [`UpstreamConn::received`] tells them apart.)
fn before_response(e: &hyper::Error) -> bool {
    !e.is_parse() && !e.is_parse_status() && !e.is_user() && !e.is_timeout()
}

/// Which connection a request may go on.
#[derive(Clone, Copy, PartialEq)]
enum Conn {
    /// An idle keep-alive connection, or a new one if none is left.
    Pooled,
    /// A new connection (the retry after a pooled one failed).
    Fresh,
}

/// Whether a method may be sent twice (RFC 9110 9.2.2).
pub(super) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Proxies one client request on worker `worker`'s upstream clients. Never
/// fails: errors become 502/504 answers.
pub async fn handle(
    shared: &Shared,
    worker: usize,
    peer: &Peer,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let start = Instant::now();
    let active = shared.current.load_full();
    let config = &active.config;
    let workers = shared.workers;
    let (mut parts, body) = req.into_parts();
    if !host_is_valid(&parts.headers, parts.version) {
        return local(shared, LocalAnswer::BadHost);
    }
    if parts.method == Method::CONNECT || parts.method == Method::TRACE {
        // Nginx's answer too: a tunnel or an echo of the request (with
        // whatever credentials it carries) is not what a balancer is for.
        return local(shared, LocalAnswer::MethodNotAllowed);
    }
    let declared = content_length(&parts.headers);
    if config.max_body != 0 && declared.is_some_and(|n| n > config.max_body) {
        return local(shared, LocalAnswer::PayloadTooLarge);
    }
    if !config.underscores_in_headers {
        drop_underscored(&mut parts.headers);
    }
    let is_buy = idempotency::is_purchase(parts.uri.path());
    if is_buy
        && shared.edge.active()
        && config.sold_out_at_edge
        && let Some(resp) = edge_answer(shared, &parts)
    {
        return resp;
    }
    let client = client_ip(peer.ip, &parts.headers, &config.trusted_proxies);
    prepare_request_headers(&mut parts.headers, peer, client);
    // A purchase with a key may be sent twice: the node decides a key once.
    let keyed = idempotency::ensure_key(&parts.method, parts.uri.path(), &mut parts.headers);
    let retryable = keyed || is_idempotent(&parts.method);
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));

    let mut outgoing = if body.is_end_stream() {
        Outgoing::Replay(Bytes::new())
    } else if declared.is_some_and(|n| n <= REPLAY_LIMIT) {
        match read_small_body(body, config.body_timeout).await {
            Some(bytes) => Outgoing::Replay(bytes),
            None => return local(shared, LocalAnswer::BadRequest),
        }
    } else {
        let state = Arc::new(BodyState::default());
        let body = ClientBody {
            inner: body,
            state: state.clone(),
            read: 0,
            max_body: config.max_body,
            body_timeout: config.body_timeout,
            stall: StallTimer::default(),
        };
        Outgoing::Stream(Some(body), state)
    };

    let mut attempt = Attempt::new(client);
    let mut timed_out = false;
    let mut sent = false;
    loop {
        let pick = match next_pick(shared, &active, &mut attempt, client, sent).await {
            Ok(Some(pick)) => pick,
            Ok(None) => break,
            Err(why) => return local(shared, why),
        };
        sent = true;
        let upstream = active.selector.upstream(&pick);
        let Some(first) = next_body(&mut outgoing) else {
            break;
        };
        let req = build(&parts.method, &path, &parts.headers, upstream, first);
        let streaming = outgoing.streaming();
        let mut result = send(
            upstream,
            worker,
            workers,
            config,
            req,
            Conn::Pooled,
            streaming,
        )
        .await;
        if let Err(SendError::Other { error, stale: true }) = &result
            && retryable
            && before_response(error)
            && let Some(again) = next_body(&mut outgoing)
        {
            tracing::debug!(upstream = %upstream.config.addr, %error, "retrying once on a fresh connection");
            let req = build(&parts.method, &path, &parts.headers, upstream, again);
            result = send(upstream, worker, workers, config, req, Conn::Fresh, None).await;
        }
        match result {
            Ok((resp, conn)) => {
                active.selector.release(&pick, false, now_ms());
                if is_buy
                    && config.sold_out_at_edge
                    && resp.status() == StatusCode::CONFLICT
                    && resp.headers().contains_key(SOLD_OUT_HEADER)
                {
                    shared.edge.poke();
                }
                let homeward = Homeward {
                    conn,
                    worker,
                    workers,
                    max_idle: config.keepalive,
                };
                return respond(shared, resp, pick, homeward, start, config.read_timeout);
            }
            Err(_) if outgoing.client_failed() != 0 => {
                // The client's body broke the attempt: a 4xx for the
                // client, no mark on an upstream that did nothing wrong.
                active.selector.release(&pick, false, now_ms());
                if outgoing.client_failed() == BODY_TOO_LARGE {
                    return local(shared, LocalAnswer::PayloadTooLarge);
                }
                return local(shared, LocalAnswer::BadRequest);
            }
            Err(e) => {
                active.selector.release(&pick, true, now_ms());
                let retry = match &e {
                    SendError::Connect(err) => {
                        tracing::warn!(upstream = %upstream.config.addr, error = %err, "upstream connect failed");
                        timed_out = false;
                        true
                    }
                    SendError::Timeout => {
                        tracing::warn!(upstream = %upstream.config.addr, "upstream response timed out");
                        timed_out = true;
                        retryable
                    }
                    SendError::Other { error, .. } => {
                        tracing::warn!(upstream = %upstream.config.addr, %error, "upstream request failed");
                        timed_out = false;
                        retryable
                    }
                };
                if !retry {
                    break;
                }
            }
        }
    }
    if timed_out {
        local(shared, LocalAnswer::GatewayTimeout)
    } else {
        local(shared, LocalAnswer::BadGateway)
    }
}

/// Reads a small declared-length body whole, so that it can be sent again;
/// `None` if the client breaks it or sends nothing for `body_timeout`
/// (a slow upload is fine, a stalled one is not). A body that arrives in
/// one frame is kept as it came, without a copy.
async fn read_small_body(mut body: Incoming, body_timeout: Duration) -> Option<Bytes> {
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    loop {
        let frame = match tokio::time::timeout(body_timeout, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(_))) | Err(_) => return None,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        match (&first, &mut more) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let mut m = BytesMut::with_capacity(f.len() + data.len());
                m.extend_from_slice(f);
                m.extend_from_slice(&data);
                more = Some(m);
            }
            (Some(_), Some(m)) => m.extend_from_slice(&data),
        }
    }
    Some(match more {
        Some(m) => m.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// The body for the next attempt, or `None` when a streamed body was
/// already used up by an earlier attempt.
fn next_body(outgoing: &mut Outgoing) -> Option<ReqBody> {
    match outgoing {
        Outgoing::Replay(b) => Some(Either::Left(Full::new(b.clone()))),
        Outgoing::Stream(s, _) => s.take().map(Either::Right),
    }
}

fn build(
    method: &Method,
    path: &PathAndQuery,
    headers: &HeaderMap,
    upstream: &Upstream,
    body: ReqBody,
) -> Request<ReqBody> {
    let mut req = Request::new(body);
    // Origin form: the connection already says which upstream.
    *req.uri_mut() = Uri::from(path.clone());
    *req.method_mut() = method.clone();
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers.clone();
    if !req.headers().contains_key(HOST) {
        req.headers_mut().insert(HOST, upstream.host.clone());
    }
    req
}

/// Sends `req` to `upstream` on worker `worker`'s connections, within
/// `response_timeout` for the response head. A pooled request goes on the
/// most recently used idle connection; one that closed under it hands the
/// request back unsent, and it goes on the next, then on a new connection.
/// Returns the connection with the response so that it can go back idle
/// once the body is read. With a `streaming` client body, the
/// `response_timeout` counts from the end of that body (see
/// [`BodyState::more_time`]).
async fn send(
    upstream: &Upstream,
    worker: usize,
    workers: usize,
    config: &BalancerConfig,
    req: Request<ReqBody>,
    conn: Conn,
    streaming: Option<&BodyState>,
) -> Result<(Response<Incoming>, UpstreamConn), SendError> {
    let attempt = async {
        let mut req = req;
        if conn == Conn::Pooled {
            while let Some(mut conn) =
                upstream
                    .live
                    .idle
                    .take(worker, workers, now_ms(), config.keepalive_timeout)
            {
                if conn.sender.ready().await.is_err() {
                    continue;
                }
                let received = conn.received();
                match conn.sender.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, conn)),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => {
                            return Err(SendError::Other {
                                error: e.into_error(),
                                stale: conn.received() == received,
                            });
                        }
                    },
                }
            }
        }
        let mut conn = pool::connect(upstream.config.addr, config.connect_timeout)
            .await
            .map_err(SendError::Connect)?;
        match conn.sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, conn)),
            Err(e) => Err(SendError::Other {
                error: e.into_error(),
                stale: false,
            }),
        }
    };
    let Some(body) = streaming else {
        return tokio::time::timeout(config.response_timeout, attempt)
            .await
            .unwrap_or(Err(SendError::Timeout));
    };
    tokio::pin!(attempt);
    let limit = tokio::time::sleep(config.response_timeout);
    tokio::pin!(limit);
    loop {
        tokio::select! {
            result = &mut attempt => return result,
            () = &mut limit => match body.more_time(config.response_timeout) {
                Some(more) => limit.as_mut().reset(tokio::time::Instant::now() + more),
                None => return Err(SendError::Timeout),
            },
        }
    }
}

fn respond(
    shared: &Shared,
    resp: Response<Incoming>,
    pick: Pick,
    homeward: Homeward,
    start: Instant,
    read_timeout: Duration,
) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    // The client talks to us, and we speak HTTP/1.1 (an HTTP/1.0 backend's
    // status line is not passed on; hyper still answers a 1.0 client in 1.0).
    parts.version = Version::HTTP_11;
    if parts.headers.contains_key(TRANSFER_ENCODING) {
        // hyper framed the body by Transfer-Encoding (RFC 9112 6.1: it
        // overrides a Content-Length), and the client gets it re-framed by
        // hyper; a length left in would cut the body short.
        parts.headers.remove(CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers);
    pick.live().count_response(parts.status.as_u16());
    shared.metrics.latency.observe(start.elapsed());
    Response::from_parts(
        parts,
        Either::Left(Tracked {
            inner: body,
            pick,
            homeward: Some(homeward),
            read_timeout,
            stall: StallTimer::default(),
        }),
    )
}

/// The answer the edge gives for a sold-out sale (see [`super::edge`]):
/// `already_bought` with the order for a buyer at the limit, `sold_out`
/// for everyone else; `None` (go to a node) for what only a node may
/// answer: a purchase with the client's own `Idempotency-Key` (it may be
/// the retry of a purchase that got an order), or a buyer id the node
/// would refuse (the node says why).
fn edge_answer(shared: &Shared, parts: &hyper::http::request::Parts) -> Option<Response<RespBody>> {
    if !matches!(parts.method, Method::GET | Method::POST)
        || parts.headers.contains_key(IDEMPOTENCY_KEY)
    {
        return None;
    }
    let sale = shared.edge.current()?;
    let limited = sale.per_user_limit > 0;
    let buyer = protocol::buyer_in(&parts.uri, &parts.headers, limited).ok()?;
    if limited && let Some(order) = sale.buyers.get(buyer) {
        shared
            .edge
            .already_bought_answers
            .fetch_add(1, Ordering::Relaxed);
        let body = protocol::already_bought_body(order);
        return Some(crate::server::json(StatusCode::CONFLICT, body).map(Either::Right));
    }
    shared.edge.sold_out_answers.fetch_add(1, Ordering::Relaxed);
    let mut resp = crate::server::json(
        StatusCode::CONFLICT,
        Bytes::from_static(protocol::SOLD_OUT_BODY),
    );
    resp.headers_mut()
        .insert(SOLD_OUT_HEADER, HeaderValue::from_static("1"));
    Some(resp.map(Either::Right))
}

/// The next upstream for a request, on either path: a pick; or, while
/// every upstream that could take it is at its `max_conns` and nothing has
/// been sent yet, a wait in the admission queue for a free slot and
/// another look. `Ok(None)`: nothing left to try; `Err`: the 503's body
/// (the queue is full, or the wait reached `queue_timeout`). The queue
/// slot ends with the pick.
pub(super) async fn next_pick(
    shared: &Shared,
    active: &super::state::Active,
    attempt: &mut Attempt,
    client: IpAddr,
    sent: bool,
) -> Result<Option<Pick>, LocalAnswer> {
    let mut queue: Option<QueueSlot<'_>> = None;
    loop {
        if let Some(pick) = active.selector.pick(attempt, now_ms()) {
            return Ok(Some(pick));
        }
        if sent || !attempt.busy {
            return Ok(None);
        }
        let slot = match queue.take() {
            Some(slot) => slot,
            None => QueueSlot::take(shared, &active.config)?,
        };
        slot.wait(&active.selector).await?;
        queue = Some(slot);
        *attempt = Attempt::new(client);
    }
}

/// A request's place in the admission queue, from its first wait to its
/// pick (or its 503): the queue's length counts it while it lives.
struct QueueSlot<'a> {
    shared: &'a Shared,
    since: Instant,
    deadline: tokio::time::Instant,
}

impl<'a> QueueSlot<'a> {
    /// A place in the queue, or the 503's body when it is full (`queue =
    /// 0`: it always is).
    fn take(shared: &'a Shared, config: &BalancerConfig) -> Result<Self, LocalAnswer> {
        let q = &shared.metrics.queue;
        if q.waiting.fetch_add(1, Ordering::AcqRel) >= config.queue {
            q.waiting.fetch_sub(1, Ordering::AcqRel);
            q.full.fetch_add(1, Ordering::Relaxed);
            return Err(LocalAnswer::QueueFull);
        }
        q.queued.fetch_add(1, Ordering::Relaxed);
        Ok(QueueSlot {
            shared,
            since: Instant::now(),
            deadline: tokio::time::Instant::now() + config.queue_timeout,
        })
    }

    /// Until some upstream may have a free slot (a request to one with
    /// `max_conns` ended, or 50 ms passed: the caller picks again either
    /// way), or the 503's body once `queue_timeout` has passed.
    pub(super) async fn wait(&self, selector: &super::select::Selector) -> Result<(), LocalAnswer> {
        let freed = super::upstream::FREED.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if !selector.any_busy() {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if now >= self.deadline {
            self.shared
                .metrics
                .queue
                .timed_out
                .fetch_add(1, Ordering::Relaxed);
            return Err(LocalAnswer::QueueTimeout);
        }
        // Woken or not, the caller looks again: an upstream may have come
        // back (its check passed, its failure window ended) without a
        // request ending anywhere.
        let nap = (self.deadline - now).min(Duration::from_millis(50));
        let _ = tokio::time::timeout(nap, freed).await;
        Ok(())
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        let q = &self.shared.metrics.queue;
        q.waiting.fetch_sub(1, Ordering::AcqRel);
        q.wait.observe(self.since.elapsed());
    }
}

/// An answer of the balancer's own, counted.
fn local(shared: &Shared, answer: LocalAnswer) -> Response<RespBody> {
    shared.metrics.count_local(answer);
    let mut resp = crate::server::json(answer.status(), Bytes::from_static(answer.body()));
    if let Some((name, value)) = answer.header() {
        resp.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    resp.map(Either::Right)
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy,
/// then the last address in `X-Forwarded-For` that is not a trusted proxy
/// (Nginx's realip with `real_ip_recursive on`).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    client_ip_from(
        peer,
        headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .map(HeaderValue::as_bytes),
        trusted,
    )
}

/// [`client_ip`] over the `X-Forwarded-For` values as they came, in order.
pub fn client_ip_from<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for value in forwarded_for.rev() {
        let Ok(s) = std::str::from_utf8(value) else {
            return client;
        };
        for item in s.rsplit(',') {
            let Ok(ip) = item.trim().parse::<IpAddr>() else {
                return client;
            };
            client = ip.to_canonical();
            if !is_trusted(&client) {
                return client;
            }
        }
    }
    client
}

/// Whether the request's `Host` is acceptable (RFC 9112 3.2): exactly one,
/// required from HTTP/1.1 clients (an HTTP/1.0 one may send none), and a
/// plain authority: a name or address and an optional port, no spaces, no
/// `/` and no `..`. Two Hosts would reach the backend as one joined value,
/// a missing one would be replaced by the upstream's address, and a path in
/// it reaches whatever builds URLs from it; all three are 400s in Nginx.
fn host_is_valid(h: &HeaderMap, version: Version) -> bool {
    let mut hosts = h.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => version < Version::HTTP_11,
        (Some(_), Some(_)) => false,
        (Some(v), None) => crate::http1::request::is_authority(v.as_bytes()),
    }
}

/// Removes request headers whose name has an underscore (Nginx's
/// `underscores_in_headers off`): CGI and WSGI backends turn `-` and `_`
/// alike into `_`, so `X_Real_IP` would override the `X-Real-IP` the
/// balancer sets.
fn drop_underscored(h: &mut HeaderMap) {
    if !h.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    // Rare: collected first, since the map cannot change while read.
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        h.remove(name);
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the (few) names present first: most messages carry at
    // most `Connection`, and a removal of an absent name still hashes it.
    let mut present = 0u8;
    for name in h.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Collected first (rarely anything: allocation only when a client
        // names an unusual header), since the map cannot change while read.
        let mut listed: Vec<HeaderName> = Vec::new();
        for v in h.get_all(CONNECTION) {
            let Ok(s) = v.to_str() else { continue };
            for token in s.split(',') {
                let token = token.trim();
                if token.is_empty()
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                    || token.eq_ignore_ascii_case("upgrade")
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                    && name != HOST
                {
                    listed.push(name);
                }
            }
        }
        for name in listed {
            h.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(name);
        }
    }
}

/// Where `name` is in [`HOP_BY_HOP`] (`Connection` is 0).
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "te" => Some(3),
        "trailer" => Some(4),
        "transfer-encoding" => Some(5),
        "upgrade" => Some(6),
        _ => None,
    }
}

/// Hop-by-hop headers out, `X-Forwarded-For` appended, `X-Real-IP` set;
/// `Host` is left as the client sent it.
fn prepare_request_headers(h: &mut HeaderMap, peer: &Peer, client: IpAddr) {
    strip_hop_by_hop(h);
    let xff = if h.contains_key(X_FORWARDED_FOR) {
        let mut xff = BytesMut::with_capacity(64);
        for v in h.get_all(X_FORWARDED_FOR) {
            xff.extend_from_slice(v.as_bytes());
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(peer.value.as_bytes());
        HeaderValue::from_maybe_shared(xff.freeze()).ok()
    } else {
        Some(peer.value.clone())
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR, v);
    }
    let real = if client == peer.ip {
        peer.value.clone()
    } else {
        ip_value(client)
    };
    h.insert(X_REAL_IP, real);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(HOST, HeaderValue::from_static("example.com"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["host", "x-keep"]);

        // Every hop-by-hop name goes, with or without `Connection`.
        let mut h = HeaderMap::new();
        for name in &HOP_BY_HOP[1..] {
            h.insert(name, HeaderValue::from_static("x"));
        }
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep"]);
    }

    #[test]
    fn host_must_be_one_plain_authority() {
        let with = |hosts: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in hosts {
                h.append(HOST, HeaderValue::from_static(v));
            }
            h
        };
        for ok in ["a", "example.com:8080", "10.0.0.1", "[::1]:80", "my_host"] {
            assert!(host_is_valid(&with(&[ok]), Version::HTTP_11), "{ok}");
        }
        for bad in ["", "a b", "a/../b", "a/b", "..", "a..b"] {
            assert!(!host_is_valid(&with(&[bad]), Version::HTTP_11), "{bad:?}");
        }
        let two = with(&["good.example", "evil.example"]);
        assert!(!host_is_valid(&two, Version::HTTP_11));
        assert!(!host_is_valid(&HeaderMap::new(), Version::HTTP_11));
        assert!(host_is_valid(&HeaderMap::new(), Version::HTTP_10));
    }

    #[test]
    fn underscored_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("x_real_ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        drop_underscored(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep"]);
    }

    #[test]
    fn forwarded_for_is_appended_and_real_ip_set() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        let peer = Peer::new("10.0.0.1:5000".parse().expect("addr"));
        prepare_request_headers(&mut h, &peer, peer.ip);
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 10.0.0.1");
        assert_eq!(h[X_REAL_IP], "10.0.0.1");

        // A direct client: both headers are its address; a client behind a
        // trusted proxy: X-Real-IP is the client, X-Forwarded-For ends with
        // the proxy.
        let mut h = HeaderMap::new();
        prepare_request_headers(&mut h, &peer, peer.ip);
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1");
        assert_eq!(h[X_REAL_IP], "10.0.0.1");
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("5.5.5.5"));
        let v4mapped = Peer::new("[::ffff:10.0.0.2]:1".parse().expect("addr"));
        prepare_request_headers(&mut h, &v4mapped, "5.5.5.5".parse().expect("ip"));
        assert_eq!(h[X_FORWARDED_FOR], "5.5.5.5, 10.0.0.2");
        assert_eq!(h[X_REAL_IP], "5.5.5.5");
    }

    #[test]
    fn client_ip_skips_trusted_proxies_from_the_right() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let mut h = HeaderMap::new();
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("6.6.6.6, 5.5.5.5, 10.1.1.1"),
        );
        let proxy: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "5.5.5.5".parse::<IpAddr>().expect("ip")
        );
        let stranger: IpAddr = "7.7.7.7".parse().expect("ip");
        assert_eq!(client_ip(stranger, &h, &trusted), stranger);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
    }
}
