//! Active health checks (Nginx Plus's `health_check`, HAProxy's `check`):
//! every `interval`, a `GET` of the configured path on every upstream that
//! is not `down`, all at once, each on a fresh connection within `timeout`.
//! A 2xx passes. `fails` failures in a row take an upstream out before
//! buyers hit it (the selector's gate skips it); `passes` passes in a row
//! bring it back, ramped by `slow_start`. Passive `max_fails` goes on
//! beside it: either can keep an upstream out.
//!
//! For a spike node the path is `/healthz`, which fails when the node
//! cannot sell: its store unreachable, the sale not initialised, its clock
//! too far from Redis's. A node with `internal` is checked there.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::config::HealthCheck;

use super::state::Shared;
use super::upstream::{Upstream, now_ms};

/// Checks every upstream, round after round, while the balancer runs; idle
/// (one look a second at the config) while none is configured.
pub async fn run(shared: Arc<Shared>) {
    loop {
        let active = shared.current.load_full();
        let Some(check) = active.config.health.clone() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut probes = JoinSet::new();
        for u in active.selector.upstreams().filter(|u| !u.config.down) {
            let (u, check, shared) = (u.clone(), check.clone(), shared.clone());
            probes.spawn(async move {
                // None: no descriptor to ask with, which says nothing of
                // the upstream (it is neither a pass nor a fail).
                let Some(passed) = probe(&u, &check).await else {
                    return;
                };
                // A reload that removed (or changed) the check while this
                // one ran has reset what the checks said: this one is moot.
                if shared.current.load().config.health.as_ref() == Some(&check) {
                    record(&u, &check, passed);
                }
            });
        }
        drop(active);
        while probes.join_next().await.is_some() {}
        tokio::time::sleep(check.interval).await;
    }
}

/// One check: connect (to the upstream's internal address, where a node
/// with `internal` serves `/healthz`), `GET path`, a 2xx within `timeout`;
/// `None` when the balancer had no file descriptor to connect with.
async fn probe(u: &Upstream, check: &HealthCheck) -> Option<bool> {
    // One deadline for the connect and the answer together.
    let deadline = tokio::time::Instant::now() + check.timeout;
    let connect = tokio::time::timeout_at(deadline, TcpStream::connect(u.config.internal_addr()));
    let stream = match connect.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) if super::pool::io_out_of_files(&e) => {
            tracing::warn!(upstream = %u.config.addr, "no file descriptor left for a health check: skipped");
            return None;
        }
        _ => return Some(false),
    };
    let asked = async {
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::get(check.path.as_str())
            .header(hyper::header::HOST, u.host.clone())
            .header(hyper::header::USER_AGENT, "spike-health-check")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let res = sender.send_request(req).await.ok()?;
        Some(res.status().is_success())
    };
    Some(matches!(
        tokio::time::timeout_at(deadline, asked).await,
        Ok(Some(true))
    ))
}

/// Counts the result in a row, and moves the upstream out or back in.
fn record(u: &Upstream, check: &HealthCheck, passed: bool) {
    let live = &u.live;
    if passed {
        live.check_fails.store(0, Ordering::Relaxed);
        let passes = live.check_passes.fetch_add(1, Ordering::Relaxed) + 1;
        if passes >= check.passes && !live.healthy.swap(true, Ordering::AcqRel) {
            live.back_since.store(now_ms(), Ordering::Relaxed);
            tracing::info!(upstream = %u.config.addr, path = %check.path, "health check passes again: back in");
        }
    } else {
        live.check_passes.store(0, Ordering::Relaxed);
        let fails = live.check_fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= check.fails && live.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(upstream = %u.config.addr, path = %check.path, fails, "health check failed: taken out");
        }
    }
}
