//! Upgrades (a WebSocket's handshake) on hyper's path: connections the
//! fast path handed over, and every one with `fast_path = false`, plain or
//! TLS.
//! The same rules as the fast path's tunnel ([`super::h1::tunnel`]): a GET
//! without a body with `Upgrade` and `upgrade` in `Connection` goes to one
//! picked upstream on a new connection (never a pooled one) with both
//! lines and `X-Forwarded-For`/`X-Real-IP`, a connect failure moving on to
//! the next upstream; the upstream's `101` goes back with its headers, and
//! then bytes are copied both ways until both ends have closed or nothing
//! moved for `tunnel_timeout`. Any other answer is relayed as an ordinary
//! response and the client's connection closes after it. The pick is held
//! while the tunnel lasts; `/status`'s `tunnels` counts it.
//!
//! hyper's client gives the upstream's socket up after its `101`
//! ([`pool::connect_upgradable`]), and hyper's server the client's, once
//! its `101` is written, to the [`Then`] the response carries (see
//! [`crate::server::upgrade`]).
//!
//! HTTP/2 has no `Upgrade` (a connection-level header, refused by its
//! framing), and extended CONNECT (RFC 8441) is not offered: over h2 a
//! browser opens its WebSocket on an HTTP/1.1 connection, and a client
//! that sends the lines anyway has them dropped by its own h2 layer, so
//! the request goes on as a plain GET.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HOST, HeaderValue, UPGRADE};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};

use crate::server::upgrade::Then;

use super::answer::LocalAnswer;
use super::forward::client::Peer;
use super::forward::headers::{prepare_request_headers, strip_hop_by_hop};
use super::forward::{self, admission};
use super::pool;
use super::proxy::{self, RespBody};
use super::select::Attempt;
use super::state::{Active, Shared};
use super::upstream::now_ms;

/// The protocol a request asks to switch to, if it is a handshake the
/// balancer tunnels: HTTP/1.1, a GET without a body, one `Upgrade`, and
/// `upgrade` among `Connection`'s tokens (the fast path's rule).
pub(super) fn asked(parts: &Parts, body: &Incoming) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 || parts.method != Method::GET || !body.is_end_stream() {
        return None;
    }
    let mut upgrades = parts.headers.get_all(UPGRADE).iter();
    let (Some(protocol), None) = (upgrades.next(), upgrades.next()) else {
        return None;
    };
    let asks = parts.headers.get_all(CONNECTION).iter().any(|v| {
        crate::http1::hop::connection_tokens(v.as_bytes())
            .any(|t| t.eq_ignore_ascii_case(b"upgrade"))
    });
    asks.then(|| protocol.clone())
}

/// Sends the handshake in `parts` (asking for `protocol`) to an upstream,
/// and answers with its `101` and a [`Then`] that tunnels the two
/// connections, or with whatever else it said.
pub(super) async fn run(
    shared: &Arc<Shared>,
    active: &Active,
    peer: &Peer,
    client: IpAddr,
    mut parts: Parts,
    protocol: HeaderValue,
    start: Instant,
) -> Response<RespBody> {
    let config = &active.config;
    let local = |parts: &Parts, why: LocalAnswer| {
        proxy::early(
            shared,
            active,
            parts,
            client,
            start,
            forward::local(shared, why),
        )
    };
    let mut headers = parts.headers.clone();
    prepare_request_headers(&mut headers, peer, client);
    headers.insert(UPGRADE, protocol);
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();

    let mut attempt = Attempt::new(client);
    let mut short_of_files = false;
    let (pick, mut sender) = loop {
        let pick = match admission::next_pick(shared, active, &mut attempt, client, false).await {
            Ok(Some(pick)) => pick,
            Ok(None) if short_of_files => return local(&parts, LocalAnswer::OutOfFiles),
            Ok(None) => return local(&parts, LocalAnswer::BadGateway),
            Err(why) => return local(&parts, why),
        };
        let addr = active.selector.upstream(&pick).config.addr;
        match pool::connect_upgradable(addr, config.connect_timeout).await {
            Ok(sender) => break (pick, sender),
            Err(error) => {
                tracing::warn!(upstream = %addr, %error, "upstream connect failed (an upgrade)");
                // Out of descriptors is the balancer's shortage, not the
                // upstream's failure (as on the forwarding paths).
                short_of_files = pool::out_of_files(&error);
                active.selector.release(&pick, !short_of_files, now_ms());
            }
        }
    };
    let upstream = active.selector.upstream(&pick);
    let addr = upstream.config.addr;
    let mut req = Request::new(Either::Left(Full::new(Bytes::new())));
    *req.method_mut() = Method::GET;
    *req.uri_mut() = Uri::try_from(target).unwrap_or_else(|_| Uri::from_static("/"));
    if !headers.contains_key(HOST) {
        headers.insert(HOST, upstream.host.clone());
    }
    *req.headers_mut() = headers;
    // The head, and the upstream's socket after a `101`, within
    // `response_timeout`.
    let handshake = async {
        let mut resp = sender.send_request(req).await?;
        let upgraded = if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            Some(hyper::upgrade::on(&mut resp).await?)
        } else {
            None
        };
        Ok::<_, hyper::Error>((resp, upgraded))
    };
    let (resp, upgraded) = match tokio::time::timeout(config.response_timeout, handshake).await {
        Ok(Ok(done)) => done,
        Ok(Err(error)) => {
            tracing::warn!(upstream = %addr, %error, "upstream upgrade failed");
            active.selector.release(&pick, true, now_ms());
            return local(&parts, LocalAnswer::BadGateway);
        }
        Err(_) => {
            tracing::warn!(upstream = %addr, "upstream upgrade timed out");
            active.selector.release(&pick, true, now_ms());
            return local(&parts, LocalAnswer::GatewayTimeout);
        }
    };
    active.selector.release(&pick, false, now_ms());
    let status = resp.status().as_u16();
    pick.live().count_response(status);
    let bytes = if upgraded.is_some() {
        None
    } else {
        resp.body().size_hint().exact()
    };
    parts.headers.remove(UPGRADE);
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    forward::log_line(
        shared,
        active,
        proxy::logged(
            &parts.method,
            target.as_bytes(),
            proxy::version_text(parts.version),
            &parts.headers,
        ),
        client,
        start,
        status,
        bytes,
        Some((addr, start.elapsed())),
    );
    let Some(upstream_io) = upgraded else {
        return proxy::refused_upgrade(resp, pick, config.read_timeout);
    };
    let (mut head, _) = resp.into_parts();
    let protocol = head.headers.get(UPGRADE).cloned();
    strip_hop_by_hop(&mut head.headers);
    if let Some(p) = protocol {
        head.headers.insert(UPGRADE, p);
    }
    head.headers
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    head.version = Version::HTTP_11;
    head.extensions = Default::default();
    let shared = shared.clone();
    let idle = config.tunnel_timeout;
    head.extensions
        .insert(Then::new(move |client_io| async move {
            let metrics = &shared.metrics;
            metrics.tunnels.fetch_add(1, Ordering::Relaxed);
            metrics.tunnels_open.fetch_add(1, Ordering::Relaxed);
            let upstream_io = hyper_util::rt::TokioIo::new(upstream_io);
            super::h1::tunnel::pipe(
                tokio::io::split(client_io),
                tokio::io::split(upstream_io),
                idle,
            )
            .await;
            metrics.tunnels_open.fetch_sub(1, Ordering::Relaxed);
            // Held while the tunnel lasts (least_conn counts it).
            drop(pick);
        }));
    Response::from_parts(head, Either::Right(Full::new(Bytes::new())))
}
