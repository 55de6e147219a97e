//! hyper's forwarding path (the general path): a [`Transport`] for the
//! policy in [`super::forward`], over hyper's server for the client and
//! hyper's client, on the balancer's own keep-alive pools, for upstreams.
//! It takes every request the fast path ([`super::h1`]) hands over, and
//! every connection when `fast_path = false`.
//!
//! A request that hyper hands back unsent, because the reused connection
//! closed first, simply goes on the next idle or a new connection (see
//! `send`).
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
//! Before any of that, what Nginx refuses is refused here too (see
//! [`forward::refusal`]), and headers with `_` in their name are dropped
//! unless `underscores_in_headers` is on.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_LENGTH, HOST, HeaderName, HeaderValue, TRANSFER_ENCODING};
use hyper::http::uri::PathAndQuery;
use hyper::{HeaderMap, Method, Request, Response, Uri, Version};

use crate::config::BalancerConfig;
use crate::protocol::{self, IDEMPOTENCY_KEY, SOLD_OUT_HEADER};

use super::answer::LocalAnswer;
use super::body::{BODY_TOO_LARGE, BodyState, ClientBody, StallTimer};
use super::forward::client::{Peer, client_ip};
use super::forward::headers::{
    drop_underscored, from_h2, host_is_valid, prepare_request_headers, strip_hop_by_hop,
};
use super::forward::limit::Held;
use super::forward::{self, Conn, Failure, Plan, REPLAY_LIMIT, Reply, Transport};
use super::idempotency;
use super::pool::{self, UpstreamConn};
use super::select::Pick;
use super::state::Shared;
use super::upstream::{Upstream, now_ms};
use super::waiting_room::{self, Gate};

pub use super::pool::ReqBody;

/// What goes back to clients: an upstream's streamed body, or our own answer.
pub type RespBody = Either<Tracked, Full<Bytes>>;

/// An upstream's response body on its way to the client. Holding the
/// [`Pick`] keeps the request counted as active until the body is done,
/// which is what least_conn balances on; holding the connection lets it go
/// back to the idle stack once the body has been read to the end (a body
/// dropped half-read closes it, as hyper must).
pub struct Tracked {
    /// A first frame read ahead (see `first_chunk`), given out first.
    first: Option<Frame<Bytes>>,
    inner: Incoming,
    pick: Pick,
    /// The request's place in `limit_conns`, until its body is done.
    _held: Held,
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
        if let Some(frame) = self.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                self.give_back();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.homeward = None;
                // Said as the fast path says it, with the upstream.
                tracing::warn!(upstream = %self.pick.live().addr, error = %e, "upstream connection broke in the middle of a response");
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
                    tracing::warn!(upstream = %this.pick.live().addr, timeout = ?this.read_timeout, "the upstream sent nothing in the middle of a response");
                    return Poll::Ready(Some(Err(Box::new(ReadTimeout(this.read_timeout)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
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

/// Whether `e` is the connection closing or breaking: not a malformed
/// response (the upstream answered, so it did the work) nor our own or the
/// client's error. (hyper reports a close after part of a response head
/// like one before any byte; [`UpstreamConn::received`] tells them apart.)
fn before_response(e: &hyper::Error) -> bool {
    !e.is_parse() && !e.is_parse_status() && !e.is_user() && !e.is_timeout()
}

/// Proxies one client request on worker `worker`'s upstream clients. Never
/// fails: errors become 502/504 answers.
pub async fn handle(
    shared: &Arc<Shared>,
    worker: usize,
    peer: &Peer,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let active = shared.current.load_full();
    // In a block of its own, so that what the request was read into is
    // not kept beside the attempts (this future is the connection's, per
    // request).
    {
        let start = Instant::now();
        let config = &active.config;
        let (mut parts, body) = req.into_parts();
        if parts.version == Version::HTTP_2 {
            from_h2(&mut parts.headers, &parts.uri);
        }
        let declared = content_length(&parts.headers);
        let host_ok = host_is_valid(&parts.headers, parts.version);
        let codings_ok = crate::http1::request::codings_are_chunked(
            parts
                .headers
                .get_all(TRANSFER_ENCODING)
                .iter()
                .map(HeaderValue::as_bytes),
        );
        if let Some(refused) = forward::head_refusal(head_size(&parts), config)
            .or_else(|| forward::refusal(&parts.method, host_ok, codings_ok, declared, config))
        {
            let r = forward::local(shared, refused);
            return early(shared, &active, &parts, peer.ip, start, r);
        }
        if let Some(closed) = forward::closed(parts.uri.path().as_bytes(), config) {
            let r = forward::local(shared, closed);
            return early(shared, &active, &parts, peer.ip, start, r);
        }
        if !config.underscores_in_headers {
            drop_underscored(&mut parts.headers);
        }
        let is_buy = idempotency::is_purchase(parts.uri.path());
        let client = client_ip(peer.ip, &parts.headers, &config.trusted_proxies);
        if let Some(protocol) = super::upgrade::asked(&parts, &body) {
            // A WebSocket's handshake: tunnelled, as on the fast path (the
            // limits and the edge are for purchases).
            return super::upgrade::run(shared, &active, peer, client, parts, protocol, start)
                .await;
        }
        let admitted = match forward::limit::check(shared, &active, client, || {
            crate::auth::token_of(&parts.headers)
        }) {
            Ok(admitted) => admitted,
            Err(limited) => {
                let r = forward::local(shared, limited);
                return early(shared, &active, &parts, client, start, r);
            }
        };
        let client_key = parts.headers.contains_key(IDEMPOTENCY_KEY);
        let shut = match waiting_room::gate(
            shared,
            &active,
            is_buy,
            &parts.method,
            client_key,
            || {
                parts
                    .headers
                    .get_all(hyper::header::COOKIE)
                    .iter()
                    .map(HeaderValue::as_bytes)
            },
            || crate::auth::token_of(&parts.headers),
            client,
            || protocol::purchase_event(parts.uri.path(), parts.uri.query()),
        ) {
            Gate::Pass => None,
            Gate::Answer(r) => return early(shared, &active, &parts, client, start, r),
            Gate::Join(joining) => {
                let r = waiting_room::join(shared, &active, joining).await;
                return early(shared, &active, &parts, client, start, r);
            }
            Gate::Shut { reply, retry } => Some((reply, retry)),
        };
        let edge = forward::edge::answer(
            shared,
            &active,
            is_buy,
            &parts.method,
            client_key,
            |limited| protocol::buyer_in(&parts.uri, &parts.headers, limited),
            || parts.uri.query(),
            || crate::auth::token_of(&parts.headers),
            || protocol::purchase_event(parts.uri.path(), parts.uri.query()),
        );
        if let Some(edge) = edge {
            return early(shared, &active, &parts, client, start, edge.into());
        }
        if let Some(r) = shut.and_then(|(r, retry)| waiting_room::after_edge(retry, r)) {
            return early(shared, &active, &parts, client, start, r);
        }
        prepare_request_headers(&mut parts.headers, peer, client);
        // A purchase with a key may be sent twice: the node decides a key once.
        let keyed = idempotency::ensure_key(&parts.method, parts.uri.path(), &mut parts.headers);
        let plan = Plan::new(start, is_buy, client, &parts.method, keyed);
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));

        let outgoing = if body.is_end_stream() {
            Outgoing::Replay(Bytes::new())
        } else if declared.is_some_and(|n| n <= REPLAY_LIMIT) {
            match read_small_body(body, config.body_timeout).await {
                Some(bytes) => Outgoing::Replay(bytes),
                None => {
                    let r = forward::local(shared, LocalAnswer::BadRequest);
                    return early(shared, &active, &parts, client, start, r);
                }
            }
        } else {
            if declared.is_none() {
                // A body of unknown length goes on chunked, whatever the
                // method: hyper's client sends none for a GET, HEAD or
                // DELETE unless told (Nginx and HAProxy forward it).
                parts
                    .headers
                    .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            }
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
        let t = Hyper {
            worker,
            workers: shared.workers,
            config,
            version: version_text(parts.version),
            method: parts.method,
            path,
            headers: parts.headers,
            outgoing,
        };
        forward::run(shared, &active, t, plan, admitted)
    }
    .await
}

/// One request on hyper's path, as the policy's [`Transport`].
struct Hyper<'a> {
    worker: usize,
    workers: usize,
    config: &'a BalancerConfig,
    /// The client's HTTP version, for the access log.
    version: &'static str,
    method: Method,
    path: PathAndQuery,
    /// The headers as they go to every upstream (see [`build`]).
    headers: HeaderMap,
    outgoing: Outgoing,
}

impl Transport for Hyper<'_> {
    type Request = Request<ReqBody>;
    type Response = (Response<Incoming>, UpstreamConn, Option<Frame<Bytes>>);
    type Error = hyper::Error;
    type Output = Response<RespBody>;

    fn request(&mut self, upstream: &Upstream) -> Option<Request<ReqBody>> {
        let body = next_body(&mut self.outgoing)?;
        Some(build(
            &self.method,
            &self.path,
            &self.headers,
            upstream,
            body,
        ))
    }

    async fn send(
        &mut self,
        upstream: &Upstream,
        request: Request<ReqBody>,
        conn: Conn,
    ) -> Result<Self::Response, Failure<hyper::Error>> {
        let streaming = match conn {
            Conn::Pooled => self.outgoing.streaming(),
            Conn::Fresh => None,
        };
        let (resp, conn) = send(
            upstream,
            self.worker,
            self.workers,
            self.config,
            request,
            conn,
            streaming,
        )
        .await?;
        first_chunk(resp, conn).await
    }

    fn client_fault(&self) -> Option<LocalAnswer> {
        match self.outgoing.client_failed() {
            0 => None,
            BODY_TOO_LARGE => Some(LocalAnswer::PayloadTooLarge),
            _ => Some(LocalAnswer::BadRequest),
        }
    }

    fn status(&self, (resp, _, _): &Self::Response) -> u16 {
        resp.status().as_u16()
    }

    fn sold_out_mark(&self, (resp, _, _): &Self::Response) -> bool {
        resp.headers().contains_key(SOLD_OUT_HEADER)
    }

    fn sold_out_event<'r>(&self, (resp, _, _): &'r Self::Response) -> Option<&'r str> {
        resp.headers()
            .get(protocol::SALE_EVENT_HEADER)
            .and_then(|v| v.to_str().ok())
    }

    fn logged(&self) -> (super::access_log::Request<'_>, Option<&str>) {
        logged(
            &self.method,
            self.path.as_str().as_bytes(),
            self.version,
            &self.headers,
        )
    }

    fn body_size(&self, (resp, _, _): &Self::Response) -> Option<u64> {
        resp.body().size_hint().exact()
    }

    async fn deliver(
        &mut self,
        (resp, conn, first): Self::Response,
        pick: Pick,
        held: Held,
    ) -> Response<RespBody> {
        let homeward = Homeward {
            conn,
            worker: self.worker,
            workers: self.workers,
            max_idle: self.config.keepalive,
        };
        respond(
            resp,
            first,
            pick,
            held,
            Some(homeward),
            self.config.read_timeout,
        )
    }

    async fn reply(&mut self, r: Reply) -> Response<RespBody> {
        reply(r)
    }
}

/// How long a chunked response's first frame is waited for before its head
/// goes to the client: bytes that came with the head are decoded by then.
const FIRST_CHUNK_WAIT: Duration = Duration::from_millis(2);

/// How long a connect out of descriptors waits, after closing an
/// upstream's idle connections, for their tasks to close the sockets
/// before it tries once more (see [`super::upstream::LiveState::shed_idle`]).
const SHED_WAIT: Duration = Duration::from_millis(20);

/// For a chunked response, its first frame if it comes within
/// [`FIRST_CHUNK_WAIT`] (kept, to go first), so that a chunk size past
/// 2^63 - 1 or junk in the framing of the bytes that came with the head is
/// the upstream's 502, as on the fast path, not a 200 cut off. Others, and
/// a first chunk still on its way, go on at once.
async fn first_chunk(
    mut resp: Response<Incoming>,
    conn: UpstreamConn,
) -> Result<(Response<Incoming>, UpstreamConn, Option<Frame<Bytes>>), Failure<hyper::Error>> {
    if !resp.headers().contains_key(TRANSFER_ENCODING) || resp.body().is_end_stream() {
        return Ok((resp, conn, None));
    }
    match tokio::time::timeout(FIRST_CHUNK_WAIT, resp.body_mut().frame()).await {
        Ok(Some(Err(error))) => Err(Failure::Broken {
            stale: false,
            error,
        }),
        Ok(Some(Ok(frame))) => Ok((resp, conn, Some(frame))),
        Ok(None) | Err(_) => Ok((resp, conn, None)),
    }
}

/// An answer of the balancer's own before any attempt, logged.
pub(super) fn early(
    shared: &Shared,
    active: &super::state::Active,
    parts: &hyper::http::request::Parts,
    client: std::net::IpAddr,
    start: Instant,
    r: Reply,
) -> Response<RespBody> {
    let request = || {
        let target = parts.uri.path_and_query();
        logged(
            &parts.method,
            target.map_or(b"/".as_slice(), |p| p.as_str().as_bytes()),
            version_text(parts.version),
            &parts.headers,
        )
    };
    forward::log_reply(shared, active, request, client, start, &r);
    reply(r)
}

/// `HTTP/1.0` or `HTTP/1.1`, as the access log writes the version.
pub(super) fn version_text(v: Version) -> &'static str {
    if v == Version::HTTP_10 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    }
}

/// A request on hyper's path as the access log shows it, and its buyer
/// token.
pub(super) fn logged<'a>(
    method: &'a Method,
    target: &'a [u8],
    version: &'static str,
    headers: &'a HeaderMap,
) -> (super::access_log::Request<'a>, Option<&'a str>) {
    let request = super::access_log::Request {
        method: method.as_str().as_bytes(),
        target,
        version,
        referer: headers
            .get(hyper::header::REFERER)
            .map(HeaderValue::as_bytes),
        user_agent: headers
            .get(hyper::header::USER_AGENT)
            .map(HeaderValue::as_bytes),
        buyer: None,
    };
    (request, crate::auth::token_of(headers))
}

fn reply(r: Reply) -> Response<RespBody> {
    let body = match r.body {
        forward::ReplyBody::Static(b) => Bytes::from_static(b),
        forward::ReplyBody::Owned(s) => Bytes::from(s),
    };
    let mut resp = crate::server::json(r.status, body);
    if let Some((name, value)) = r.header {
        resp.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    if let Some(cookie) = r.cookie.and_then(|c| HeaderValue::try_from(c).ok()) {
        resp.headers_mut().insert(hyper::header::SET_COOKIE, cookie);
    }
    resp.map(Either::Right)
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
) -> Result<(Response<Incoming>, UpstreamConn), Failure<hyper::Error>> {
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
                            let error = e.into_error();
                            return Err(Failure::Broken {
                                stale: conn.received() == received && before_response(&error),
                                error,
                            });
                        }
                    },
                }
            }
        }
        // A hyper connection's socket is its task's, closed when that task
        // next runs (on its own worker): a moment before the retry.
        let mut conn = upstream
            .live
            .connect_or_shed(SHED_WAIT, || {
                pool::connect(upstream.config.addr, config.connect_timeout)
            })
            .await
            .map_err(Failure::Connect)?;
        match conn.sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, conn)),
            Err(e) => Err(Failure::Broken {
                error: e.into_error(),
                stale: false,
            }),
        }
    };
    let Some(body) = streaming else {
        return tokio::time::timeout(config.response_timeout, attempt)
            .await
            .unwrap_or(Err(Failure::Timeout));
    };
    tokio::pin!(attempt);
    let limit = tokio::time::sleep(config.response_timeout);
    tokio::pin!(limit);
    loop {
        tokio::select! {
            result = &mut attempt => return result,
            () = &mut limit => match body.more_time(config.response_timeout) {
                Some(more) => limit.as_mut().reset(tokio::time::Instant::now() + more),
                None => return Err(Failure::Timeout),
            },
        }
    }
}

/// The upstream's response as it goes to the client (the policy has
/// counted it).
fn respond(
    resp: Response<Incoming>,
    first: Option<Frame<Bytes>>,
    pick: Pick,
    held: Held,
    homeward: Option<Homeward>,
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
    } else if !is_one_plain_length(&parts.headers)
        && let Some(n) = body.size_hint().exact()
    {
        // `Content-Length: 5, 5` or two equal lines, which hyper took as
        // 5: passed on as one number, as the fast path does.
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    }
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(
        parts,
        Either::Left(Tracked {
            first,
            inner: body,
            pick,
            _held: held,
            homeward,
            read_timeout,
            stall: StallTimer::default(),
        }),
    )
}

/// An upstream's answer other than `101` to a request to switch
/// protocols, relayed as an ordinary response on a connection not kept:
/// the client's closes after it (it asked to change protocols, and did
/// not), as on the fast path.
pub(super) fn refused_upgrade(
    resp: Response<Incoming>,
    pick: Pick,
    read_timeout: Duration,
) -> Response<RespBody> {
    let mut resp = respond(resp, None, pick, Held::default(), None, read_timeout);
    resp.headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The sizes [`forward::head_refusal`] limits, as the head would be
/// written: `METHOD target HTTP/1.1`, and `name: value` per header.
fn head_size(parts: &hyper::http::request::Parts) -> forward::HeadSize {
    let target = parts.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let request_line = parts.method.as_str().len() + 1 + target + 9;
    let mut longest_header = 0;
    let mut total = request_line + 2 + 2;
    for (name, value) in &parts.headers {
        let line = name.as_str().len() + 2 + value.len();
        longest_header = longest_header.max(line);
        total += line + 2;
    }
    forward::HeadSize {
        request_line,
        longest_header,
        total,
    }
}

/// No `Content-Length`, or one line of plain digits.
fn is_one_plain_length(h: &HeaderMap) -> bool {
    let mut lengths = h.get_all(CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (None, _) => true,
        (Some(v), None) => v.as_bytes().iter().all(u8::is_ascii_digit),
        (Some(_), Some(_)) => false,
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}
