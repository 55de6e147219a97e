//! The forwarding policy, once for both forwarding paths: the fast path
//! over raw TCP ([`crate::balancer::h1`]) and hyper's
//! ([`crate::balancer::proxy`]). Each path is a [`Transport`]: it reads the
//! request its own way and carries bytes, and asks this module what to do;
//! [`run`] is the one attempt loop, generic over the transport (static
//! dispatch, nothing boxed, nothing allocated here per request).
//!
//! What is decided here:
//! - the edge's answer to a late buyer ([`edge`]), the client's address
//!   ([`client`]), the header policy ([`headers`]), the purchase's
//!   `Idempotency-Key` ([`crate::balancer::idempotency::plan`]) and so
//!   whether the request may be sent twice ([`Plan::retryable`]);
//! - what is refused before anything is sent ([`refusal`]); the answers
//!   the balancer makes itself are [`LocalAnswer`]s, counted here;
//! - the attempts, following Nginx's `proxy_next_upstream error timeout`:
//!   - a connect error or connect timeout: the request was not sent, so
//!     the next upstream is tried whatever the method;
//!   - any other error (reset, closed mid-response, a response that cannot
//!     be framed one way) or a response timeout: the request may have
//!     reached the upstream, so only requests that may be sent twice go on
//!     to the next upstream: idempotent methods (GET, HEAD, OPTIONS, PUT,
//!     DELETE; TRACE is refused), and purchases (`/buy/ticket`) carrying an
//!     `Idempotency-Key`, whatever their method, because the node decides
//!     a key once (see [`crate::balancer::idempotency`]; a purchase
//!     without a key gets one, kept across its attempts);
//!   - nothing left: 502, or 504 when the last failure was a timeout.
//!
//!   Before such a request gives up on an upstream, it is sent once more
//!   to the same upstream on a fresh (unpooled) connection, but only when
//!   the failed attempt went on a reused keep-alive connection and failed
//!   before a response came (closed or reset): that may only mean the idle
//!   connection went stale, which must never turn into a client-visible
//!   error or a failure mark. A failure on a fresh connection, or a
//!   malformed response, is the upstream's own and is not repeated there.
//!
//!   A client whose own request body fails (cut off, malformed chunk, past
//!   `max_body`) gets a 4xx, and the upstream it was streaming to is not
//!   marked failed: a client must not be able to take healthy upstreams
//!   out of the rotation.
//! - admission ([`admission`]): while every upstream is at its
//!   `max_conns`, a request waits for a slot, or gets a 503;
//! - the per-client limits ([`limit`]): `limit_rate` is asked by each
//!   transport once the request is read ([`limit::check`], before the
//!   edge), its delay and `limit_conns` here at the start of [`run`].

pub mod admission;
pub mod client;
pub mod edge;
pub mod headers;
pub mod limit;

/// The policy through a scripted transport.
#[cfg(test)]
mod tests;

use std::fmt::Display;
use std::net::IpAddr;
use std::time::Instant;

use hyper::{Method, StatusCode};

use crate::config::BalancerConfig;
use crate::protocol;

use super::access_log;
use super::answer::LocalAnswer;

use super::pool::ConnectError;
use super::select::{Attempt, Pick};
use super::state::{Active, Shared};
use super::upstream::{Upstream, now_ms};
use edge::EdgeAnswer;
use limit::{Admitted, Held};

/// Largest request body kept in memory so that it can be sent again to
/// another upstream; bigger bodies are streamed and not retried.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

/// Whether a method may be sent twice (RFC 9110 9.2.2).
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// What Nginx refuses before anything is sent, in its order: a missing,
/// repeated or malformed `Host` (`host_ok` false), a transfer coding other
/// than one `chunked` (`codings_ok` false, see
/// [`crate::http1::request::codings_are_chunked`]), CONNECT and TRACE, and
/// a declared body over `max_body`. (The fast path takes none of these: it
/// hands them to hyper's path, which asks here.)
pub fn refusal(
    method: &Method,
    host_ok: bool,
    codings_ok: bool,
    declared: Option<u64>,
    config: &BalancerConfig,
) -> Option<LocalAnswer> {
    if !host_ok {
        return Some(LocalAnswer::BadHost);
    }
    if !codings_ok {
        return Some(LocalAnswer::NotImplemented);
    }
    if *method == Method::CONNECT || *method == Method::TRACE {
        // Nginx's answer too: a tunnel or an echo of the request (with
        // whatever credentials it carries) is not what a balancer is for.
        return Some(LocalAnswer::MethodNotAllowed);
    }
    if config.max_body != 0 && declared.is_some_and(|n| n > config.max_body) {
        return Some(LocalAnswer::PayloadTooLarge);
    }
    None
}

/// A request head's sizes, as the limits of [`head_refusal`] count them:
/// the request line, the longest header line (name, `: `, value) and the
/// whole head, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeadSize {
    /// The request line, without its line end.
    pub request_line: usize,
    /// The longest header line, without its line end.
    pub longest_header: usize,
    /// The head, blank line included.
    pub total: usize,
}

/// Nginx's `large_client_header_buffers` (4 8k by default), once for both
/// paths: a request line over `max_header_line` is a 414, a header line
/// over it or a head over `max_head` a 431 (Nginx: 400 "Request Header Or
/// Cookie Too Large"). The fast path hands a head over either limit to
/// hyper's path, which asks here.
pub fn head_refusal(size: HeadSize, config: &BalancerConfig) -> Option<LocalAnswer> {
    if size.request_line > config.max_header_line {
        return Some(LocalAnswer::UriTooLong);
    }
    if size.longest_header > config.max_header_line || size.total > config.max_head {
        return Some(LocalAnswer::HeaderTooLarge);
    }
    None
}

/// In front of a sale (`public_only`), what is not for buyers: a request
/// whose path (as it came, without its query) is neither the nodes' public
/// API ([`protocol::is_public_path`], exact) nor under one of `pass_paths`
/// is the balancer's 404, and reaches no node, so the nodes' internal
/// routes (every buyer's order in `/holders`, the stats) never answer on
/// the public port. Both paths ask here first, before the edge. A path
/// with a `.` or `..` segment (plain or percent-encoded) or an empty one
/// (`//`) never passes by `pass_paths`: something behind the balancer that
/// normalises it could read it as another route. Without a `[sale]`,
/// every path passes, as in Nginx.
pub fn closed(path: &[u8], config: &BalancerConfig) -> Option<LocalAnswer> {
    // A node's batch of purchases comes from a balancer, never through
    // one: a client's would pass the edge, the waiting room and the
    // per-request limits by, whatever else passes.
    if path == protocol::PURCHASES_PATH.as_bytes() {
        return Some(LocalAnswer::NotFound);
    }
    if !config.public_only || protocol::is_public_path(path) {
        return None;
    }
    // With several sales a purchase names its sale in the path too. (With
    // one, `/buy/ticket` is the one purchase path: the edge and the
    // waiting room know it, and no other spelling passes them by.)
    if config.several_sales
        && std::str::from_utf8(path).is_ok_and(|p| protocol::event_purchase(p).is_some())
    {
        return None;
    }
    let passed = !config.pass_paths.is_empty()
        && is_plain_path(path)
        && config
            .pass_paths
            .iter()
            .any(|prefix| path.starts_with(prefix.as_bytes()));
    (!passed).then_some(LocalAnswer::NotFound)
}

/// Starts with `/`, and no segment after it is empty (but the last) or a
/// dot segment ([`is_dot_segment`]).
fn is_plain_path(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        return false;
    };
    let last = rest.split(|&b| b == b'/').count() - 1;
    rest.split(|&b| b == b'/')
        .enumerate()
        .all(|(i, seg)| (i == last || !seg.is_empty()) && !is_dot_segment(seg))
}

/// `.` or `..`, each dot plain or percent-encoded (`%2e`, `%2E`).
fn is_dot_segment(mut seg: &[u8]) -> bool {
    let mut dots = 0;
    while !seg.is_empty() {
        seg = match seg {
            [b'.', rest @ ..] => rest,
            [b'%', b'2', e, rest @ ..] if e.eq_ignore_ascii_case(&b'e') => rest,
            _ => return false,
        };
        dots += 1;
    }
    (1..=2).contains(&dots)
}

/// What the policy knows of one request once its transport has read it.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// When the request began (latency counts from here).
    pub start: Instant,
    /// To the purchase path.
    pub is_buy: bool,
    /// The client's address (see [`client`]); ip_hash hashes it.
    pub client: IpAddr,
    /// Whether it may be sent twice: an idempotent method, or a purchase
    /// with one well-formed key.
    pub retryable: bool,
    /// A purchase with one well-formed key (the client's or made here):
    /// the node sells once for it however often it is sent, which is what
    /// lets it go in a batch (see `crate::balancer::batch`).
    pub keyed: bool,
}

impl Plan {
    /// The plan of a request from `client` with `method`; `keyed`: a
    /// purchase with one well-formed `Idempotency-Key` (see
    /// [`KeyPlan::keyed`](super::idempotency::KeyPlan::keyed)).
    pub fn new(start: Instant, is_buy: bool, client: IpAddr, method: &Method, keyed: bool) -> Plan {
        Plan {
            start,
            is_buy,
            client,
            retryable: keyed || is_idempotent(method),
            keyed,
        }
    }
}

/// Which connection an attempt may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conn {
    /// An idle keep-alive connection, or a new one if none is left.
    Pooled,
    /// A new connection (the retry after a pooled one went stale).
    Fresh,
}

/// How one attempt at an upstream failed, as the policy sees it; `E` is
/// the transport's own error, for the log.
#[derive(Debug)]
pub enum Failure<E> {
    /// No connection: the request was not sent.
    Connect(ConnectError),
    /// No response head within `response_timeout`.
    Timeout,
    /// The connection broke, or the response cannot be framed one way:
    /// the request may have been sent. `stale`: it went on a reused
    /// keep-alive connection that broke before any byte of a response
    /// came, so it may only have gone stale while idle.
    Broken { stale: bool, error: E },
}

/// An answer the balancer makes itself, as a transport writes it: a JSON
/// body and at most one header besides `Content-Type`.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: ReplyBody,
    /// Name (lower case) and value.
    pub header: Option<(&'static str, &'static str)>,
    /// A `Set-Cookie` value (the waiting room's place or pass).
    pub cookie: Option<String>,
}

/// A [`Reply`]'s body.
#[derive(Debug)]
pub enum ReplyBody {
    Static(&'static [u8]),
    Owned(String),
}

impl ReplyBody {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            ReplyBody::Static(b) => b,
            ReplyBody::Owned(s) => s.as_bytes(),
        }
    }
}

impl From<LocalAnswer> for Reply {
    fn from(a: LocalAnswer) -> Reply {
        Reply {
            status: a.status(),
            body: ReplyBody::Static(a.body()),
            header: a.header(),
            cookie: None,
        }
    }
}

impl From<EdgeAnswer> for Reply {
    fn from(a: EdgeAnswer) -> Reply {
        match a {
            EdgeAnswer::SoldOut => Reply {
                status: StatusCode::CONFLICT,
                body: ReplyBody::Static(crate::protocol::SOLD_OUT_BODY),
                header: Some((crate::protocol::SOLD_OUT_HEADER_NAME, "1")),
                cookie: None,
            },
            EdgeAnswer::AlreadyBought(body) => Reply {
                status: StatusCode::CONFLICT,
                body: ReplyBody::Owned(body),
                header: None,
                cookie: None,
            },
            EdgeAnswer::NotSelling(body, retry_after) => Reply {
                status: StatusCode::CONFLICT,
                body: ReplyBody::Owned(body),
                header: retry_after.map(crate::balancer::answer::retry_after),
                cookie: None,
            },
        }
    }
}

/// Counts `answer` and makes it a [`Reply`].
pub fn local(shared: &Shared, answer: LocalAnswer) -> Reply {
    shared.metrics.count_local(answer);
    answer.into()
}

/// How one forwarding path carries a request to upstreams and an answer
/// back to its client: the mechanics, with no decision of its own (those
/// are [`run`]'s).
///
/// `async fn`s (an implementation may return its future directly, so as
/// not to wrap it in another), so [`run`] is monomorphized per transport
/// and nothing is boxed; a future's `Send` is checked where a concrete
/// transport's is needed (hyper's service), hence no `Send` bound here.
#[allow(async_fn_in_trait)]
pub trait Transport {
    /// The request as it goes to an upstream, once per attempt.
    type Request;
    /// An upstream's response head, and the connection it came on.
    type Response;
    /// How an exchange broke, for the log.
    type Error: Display;
    /// What the request ends with, for the client's connection.
    type Output;

    /// The request for one attempt at `upstream`; `None` when it cannot be
    /// sent again (a streamed body went with an earlier attempt).
    fn request(&mut self, upstream: &Upstream) -> Option<Self::Request>;

    /// One attempt: `request` to `upstream` on `conn`, until its response
    /// head, within `response_timeout`.
    async fn send(
        &mut self,
        upstream: &Upstream,
        request: Self::Request,
        conn: Conn,
    ) -> Result<Self::Response, Failure<Self::Error>>;

    /// After a failed attempt: the client's own fault, if it was (its body
    /// broke or ran past `max_body`).
    fn client_fault(&self) -> Option<LocalAnswer>;

    /// The response's status, and whether it carries the node's sold-out
    /// mark.
    fn status(&self, response: &Self::Response) -> u16;
    fn sold_out_mark(&self, response: &Self::Response) -> bool;

    /// The sale a `sold_out` answer names (`Spike-Event`, from a node of
    /// several sales); `None` when it names none.
    fn sold_out_event<'r>(&'r self, _response: &'r Self::Response) -> Option<&'r str> {
        None
    }

    /// Passes the response on to the client; `pick` and `held` must live
    /// until the upstream's body is done (least_conn counts the pick until
    /// then, `limit_conns` the request).
    async fn deliver(&mut self, response: Self::Response, pick: Pick, held: Held) -> Self::Output;

    /// Answers the client itself.
    async fn reply(&mut self, reply: Reply) -> Self::Output;

    /// The request as the access log shows it, and its buyer token (asked
    /// only when there is an access log).
    fn logged(&self) -> (access_log::Request<'_>, Option<&str>);

    /// The response body's declared size, for the access log.
    fn body_size(&self, response: &Self::Response) -> Option<u64>;
}

/// Writes the access log line of a request (when there is an access log):
/// `request` and its buyer `token` as [`Transport::logged`] gives them,
/// the client, and the answer.
#[allow(clippy::too_many_arguments)]
pub fn log_line(
    shared: &Shared,
    active: &Active,
    (mut request, token): (access_log::Request<'_>, Option<&str>),
    client: IpAddr,
    start: Instant,
    status: u16,
    bytes: Option<u64>,
    upstream: Option<(std::net::SocketAddr, std::time::Duration)>,
) {
    let Some(log) = &shared.access_log else {
        return;
    };
    // The buyer only when the token verifies with the edge's keys.
    let buyer = token
        .zip(active.auth.as_ref())
        .and_then(|(token, auth)| auth.verify(token).ok());
    request.buyer = buyer.as_ref().map(|b| b.id.as_str());
    log.log(
        &request,
        &access_log::Outcome {
            client,
            status,
            bytes,
            upstream: upstream.map(|u| u.0),
            upstream_time: upstream.map(|u| u.1),
            request_time: start.elapsed(),
        },
    );
}

/// Writes the access log line of the balancer's own answer `reply` (when
/// there is an access log: `logged` is asked only then).
pub fn log_reply<'a>(
    shared: &Shared,
    active: &Active,
    logged: impl FnOnce() -> (access_log::Request<'a>, Option<&'a str>),
    client: IpAddr,
    start: Instant,
    reply: &Reply,
) {
    if shared.access_log.is_some() {
        let bytes = Some(reply.body.as_bytes().len() as u64);
        let status = reply.status.as_u16();
        log_line(shared, active, logged(), client, start, status, bytes, None);
    }
}

/// The balancer's own answer `reply` to the request `t` carries, logged.
async fn answer<T: Transport>(
    shared: &Shared,
    active: &Active,
    t: &mut T,
    plan: &Plan,
    reply: Reply,
) -> T::Output {
    log_reply(
        shared,
        active,
        || t.logged(),
        plan.client,
        plan.start,
        &reply,
    );
    t.reply(reply).await
}

/// The attempt loop: first the per-client limits' delay and `limit_conns`
/// for a request `limit_rate` `admitted` (see [`limit::enter`]); then picks
/// upstreams (waiting for a free slot when all are at their `max_conns`),
/// sends the request through `t`, retries as the policy allows, and hands
/// on the first response or answers 502/504 (503 when no upstream was
/// usable at all).
///
/// A plain `fn` returning an `async` block, which holds its captures once:
/// an `async fn` would keep its arguments twice, and the fast path boxes
/// this future per request.
#[allow(clippy::manual_async_fn)]
pub fn run<'a, T: Transport + 'a>(
    shared: &'a Shared,
    active: &'a Active,
    mut t: T,
    mut plan: Plan,
    admitted: Admitted,
) -> impl Future<Output = T::Output> + 'a {
    async move {
        let held = if admitted == Admitted::FREE {
            Held::default()
        } else {
            let delayed = admitted.delays();
            match limit::enter(shared, &active.config, admitted).await {
                Ok(held) => {
                    if delayed {
                        // The latency measured is the upstream's.
                        plan.start = Instant::now();
                    }
                    held
                }
                Err(why) => return answer(shared, active, &mut t, &plan, local(shared, why)).await,
            }
        };
        let mut attempt = Attempt::new(plan.client);
        let mut timed_out = false;
        let mut short_of_files = false;
        // Some attempt went out and got no answer: the upstream may have
        // acted on it, so the answer cannot be the 503 that says nothing
        // was done.
        let mut delivered = false;
        let mut sent = false;
        loop {
            let pick = match admission::next_pick(shared, active, &mut attempt, plan.client, sent)
                .await
            {
                Ok(Some(pick)) => pick,
                Ok(None) => break,
                Err(why) => return answer(shared, active, &mut t, &plan, local(shared, why)).await,
            };
            sent = true;
            let upstream = active.selector.upstream(&pick);
            let Some(request) = t.request(upstream) else {
                break;
            };
            // In a block of its own, so that the attempt's result is not
            // kept beside the response's relay.
            let response = {
                let mut result = t.send(upstream, request, Conn::Pooled).await;
                if let Err(Failure::Broken { stale: true, error }) = &result
                    && plan.retryable
                    && let Some(again) = t.request(upstream)
                {
                    tracing::debug!(upstream = %upstream.config.addr, %error, "retrying once on a fresh connection");
                    result = t.send(upstream, again, Conn::Fresh).await;
                }
                match result {
                    Ok(response) => response,
                    Err(failure) => {
                        if let Some(fault) = t.client_fault() {
                            // The client's body broke the attempt: a 4xx
                            // for the client, no mark on an upstream that
                            // did nothing wrong.
                            active.selector.release(&pick, false, now_ms());
                            return answer(shared, active, &mut t, &plan, local(shared, fault))
                                .await;
                        }
                        short_of_files =
                            matches!(&failure, Failure::Connect(e) if super::pool::out_of_files(e));
                        if short_of_files {
                            // The balancer's own shortage: no mark on the
                            // upstream. The next may still have an idle
                            // connection, which needs no new descriptor.
                            active.selector.release(&pick, false, now_ms());
                            tracing::warn!(upstream = %upstream.config.addr, "no file descriptor left for an upstream connection, even after closing its idle ones");
                            continue;
                        }
                        active.selector.release(&pick, true, now_ms());
                        timed_out = matches!(failure, Failure::Timeout);
                        delivered |= !matches!(failure, Failure::Connect(_));
                        let retry = match &failure {
                            Failure::Connect(error) => {
                                tracing::warn!(upstream = %upstream.config.addr, %error, "upstream connect failed");
                                true
                            }
                            Failure::Timeout => {
                                tracing::warn!(upstream = %upstream.config.addr, "upstream response timed out");
                                plan.retryable
                            }
                            Failure::Broken { error, .. } => {
                                tracing::warn!(upstream = %upstream.config.addr, %error, "upstream request failed");
                                plan.retryable
                            }
                        };
                        if retry {
                            continue;
                        }
                        break;
                    }
                }
            };
            active.selector.release(&pick, false, now_ms());
            let status = t.status(&response);
            if plan.is_buy
                && active.config.sold_out_at_edge
                && status == StatusCode::CONFLICT.as_u16()
                && t.sold_out_mark(&response)
            {
                if active.config.several_sales {
                    // The edge of the sale the node says sold out, and of
                    // no other.
                    if let Some(event) = t.sold_out_event(&response) {
                        shared.edge.sales.poke(event);
                    }
                } else {
                    shared.edge.poke();
                }
            }
            pick.live().count_response(status);
            let upstream_time = plan.start.elapsed();
            shared.metrics.latency.observe(upstream_time);
            if shared.access_log.is_none() {
                return t.deliver(response, pick, held).await;
            }
            let bytes = t.body_size(&response);
            let addr = upstream.config.addr;
            let out = t.deliver(response, pick, held).await;
            log_line(
                shared,
                active,
                t.logged(),
                plan.client,
                plan.start,
                status,
                bytes,
                Some((addr, upstream_time)),
            );
            return out;
        }
        // Nothing tried means nothing was usable: the service is down for
        // a while (a 503 that says when to come back), not an upstream
        // that failed this request (502, as in Nginx).
        let why = if !sent {
            LocalAnswer::NoUpstream
        } else if short_of_files && !delivered {
            LocalAnswer::OutOfFiles
        } else if timed_out {
            LocalAnswer::GatewayTimeout
        } else {
            LocalAnswer::BadGateway
        };
        answer(shared, active, &mut t, &plan, local(shared, why)).await
    }
}
