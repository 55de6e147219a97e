//! The admin listener: `GET /` (the live status page), `GET /healthz`
//! (the process is alive), `GET /ready` (it should get traffic: what an L4
//! balancer's health check asks), `GET /status` (JSON), `GET /sale` (a node's snapshot), `GET /metrics`
//! (Prometheus text). Off the hot path, so it formats freely.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::state::{Active, Shared};
use super::upstream::Upstream;
use super::upstream::now_ms;

/// The live status page: one self-contained HTML file (no framework, no
/// CDN) that fetches `/status` every 2 s and redraws itself.
const STATUS_PAGE: &str = include_str!("status.html");

/// Answers one admin request.
pub async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    match (get, req.uri().path()) {
        (true, "/") => {
            let mut res = Response::new(Full::new(Bytes::from_static(STATUS_PAGE.as_bytes())));
            res.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            res
        }
        (true, "/sale") => {
            let (status, body) = super::sale::sale(shared, req.uri().query()).await;
            crate::server::json(status, body)
        }
        (true, "/healthz") => crate::server::json(StatusCode::OK, "{\"status\":\"ok\"}\n"),
        (true, "/ready") => {
            let (status, body) = ready(shared);
            crate::server::json(status, body)
        }
        (true, "/status") => crate::server::json(StatusCode::OK, status(shared)),
        (true, "/metrics") => crate::prometheus::response(metrics(shared)),
        _ => crate::server::json(
            StatusCode::NOT_FOUND,
            "{\"status\":\"not_found\",\"reason\":\"the admin listener serves /status, /sale, /healthz, /ready, /metrics and the status page at /\"}\n",
        ),
    }
}

/// `/ready`: whether this balancer should get traffic, for the health
/// check of what is in front of it (an L4 balancer, HAProxy's `option
/// httpchk`, a Kubernetes readiness probe). 503 while it drains after
/// SIGTERM, and while no upstream can be picked (each `down`, failed or
/// failing its health check: every request would be a 502 or 503 here, and
/// another balancer may have a way through); with `ready_before_open =
/// false`, 503 `not_open` until the sale's opening (the moments the edge
/// answers by: the store's once a node gave them, else the file's), so
/// that the tier in front sends nobody before the sale; 200 otherwise.
/// `/healthz` stays "the process is alive", which a restart cannot fix.
fn ready(shared: &Shared) -> (StatusCode, String) {
    if shared.draining.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"status\":\"draining\",\"reason\":\"the balancer is stopping: it serves on for drain_delay, then accepts no new connections\"}\n".to_string(),
        );
    }
    let active = shared.current.load();
    if active.config.waiting_room.is_some() && !shared.waiting_room.ready() {
        // Every purchase here would be a 503 until the line is heard.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"status\":\"unavailable\",\"reason\":\"the waiting room has not heard its line from the sale's store yet\"}\n".to_string(),
        );
    }
    if !active.config.ready_before_open {
        let opens_at_ms = shared.edge.moments_or_file(&active.config).opens_at_ms;
        if shared.edge.store_time.now_ms() < opens_at_ms {
            let when = crate::protocol::rfc3339_ms(opens_at_ms);
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{{\"status\":\"not_open\",\"reason\":\"the sale opens at {when}, and ready_before_open = false\",\"opens_at\":\"{when}\"}}\n"
                ),
            );
        }
    }
    let now = now_ms();
    let (mut usable, mut all) = (0usize, 0usize);
    for u in active.selector.upstreams() {
        all += 1;
        if matches!(u.state_name(now), "up" | "backup") {
            usable += 1;
        }
    }
    if usable == 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{{\"status\":\"unavailable\",\"reason\":\"no upstream can be picked: each of the {all} is down, marked failed or failing its health check\",\"upstreams\":{all},\"usable\":0}}\n"
            ),
        );
    }
    (
        StatusCode::OK,
        format!(
            "{{\"status\":\"ready\",\"reason\":\"{usable} of {all} upstreams can be picked\",\"upstreams\":{all},\"usable\":{usable}}}\n"
        ),
    )
}

fn status(shared: &Shared) -> String {
    let active = shared.current.load();
    let now = now_ms();
    let names = shared.node_names();
    let upstreams: Vec<serde_json::Value> = active
        .selector
        .upstreams()
        .map(|u| {
            serde_json::json!({
                "name": names.get(&u.config.addr),
                "address": u.config.addr.to_string(),
                "resolve": u.config.name.as_ref().map(|n| resolve_status(shared, n)),
                "weight": u.config.weight,
                "state": u.state_name(now),
                "active": u.live.active.load(Ordering::Relaxed),
                "requests": u.live.requests.load(Ordering::Relaxed),
                "failures": u.live.failures.load(Ordering::Relaxed),
                "idle_connections": u.live.idle.len() + u.live.raw_idle.len(),
                "max_conns": u.config.max_conns,
                "share_permille": u.ramp_permille(now, active.config.slow_start.as_millis() as u64),
                "batches": {
                    "sent": u.live.batches.sent.load(Ordering::Relaxed),
                    "purchases": u.live.batches.purchases.load(Ordering::Relaxed),
                    "refused": u.live.batches.refused.load(Ordering::Relaxed),
                },
                "responses": u
                    .live
                    .responses_by_code()
                    .map(|(code, n)| (code.to_string(), serde_json::Value::from(n)))
                    .collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    // The balancer's own answers by status; the queue's 503s with them.
    let q = &shared.metrics.queue;
    let mut local: serde_json::Map<String, serde_json::Value> = shared
        .metrics
        .local_counts()
        .map(|(code, n)| (code.to_string(), n.load(Ordering::Relaxed).into()))
        .collect();
    // The queue's 503s join the no-upstream ones under one status.
    let busy = q.full.load(Ordering::Relaxed) + q.timed_out.load(Ordering::Relaxed);
    let no_upstream = local.get("503").and_then(|v| v.as_u64()).unwrap_or(0);
    local.insert("503".into(), (busy + no_upstream).into());
    serde_json::json!({
        "strategy": active.selector.strategy().as_str(),
        "version": active.version,
        "connections": shared.accept_share.open().sum::<u64>(),
        "last_reload": shared.last_reload().map(|r| {
            let mut v = serde_json::json!({
                "ok": r.error.is_none(),
                "at": humantime::format_rfc3339_seconds(r.at).to_string(),
            });
            if let Some(error) = r.error {
                v["error"] = error.into();
            } else {
                v["unchanged"] = r.unchanged.into();
            }
            if let Some(note) = r.note {
                v["note"] = note.into();
            }
            v
        }),
        "queue": {
            "waiting": shared.metrics.queue.waiting.load(Ordering::Relaxed),
            "limit": active.config.queue,
            "queued": shared.metrics.queue.queued.load(Ordering::Relaxed),
            "full": shared.metrics.queue.full.load(Ordering::Relaxed),
            "timed_out": shared.metrics.queue.timed_out.load(Ordering::Relaxed),
        },
        "draining": shared.draining.load(Ordering::Relaxed),
        "access_log": shared.access_log.as_ref().map(|l| serde_json::json!({
            "path": l.path().display().to_string(),
            "written": l.written.load(Ordering::Relaxed),
            "dropped": l.dropped.load(Ordering::Relaxed),
        })),
        "tunnels": {
            "open": shared.metrics.tunnels_open.load(Ordering::Relaxed),
            "total": shared.metrics.tunnels.load(Ordering::Relaxed),
        },
        "fast_path": {
            "on": active.config.fast_path,
            "general_connections": shared.metrics.general_connections.load(Ordering::Relaxed),
            "buffers_given_back": shared.metrics.buffers_given_back.load(Ordering::Relaxed),
        },
        "edge": {
            "on": active.config.sold_out_at_edge,
            "answering": shared.edge.active(),
            "sold_out_answers": shared.edge.sold_out_answers.load(Ordering::Relaxed),
            "already_bought_answers": shared.edge.already_bought_answers.load(Ordering::Relaxed),
            "not_selling_answers": shared.edge.not_selling_answers.load(Ordering::Relaxed),
            "store_clock_offset_ms": shared.edge.store_time.offset_ms(),
        },
        "local": local,
        "limits": limits_status(shared, &active.config.limits),
        "waiting_room": super::waiting_room::status(shared),
        "rates": super::recent::rates(shared),
        "sale": super::recent::sale(shared),
        "upstreams": upstreams,
    })
    .to_string()
}

/// An upstream host name's lookups (`resolve`), for `/status`: the name,
/// how often, when it last resolved, and, while it does not, the error
/// and since when (its upstream keeps its last address meanwhile).
fn resolve_status(shared: &Shared, name: &crate::config::UpstreamName) -> serde_json::Value {
    let state = shared.name_state(&name.host, name.port).unwrap_or_default();
    let at = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    serde_json::json!({
        "host": format!("{}:{}", name.host, name.port),
        "every_ms": name.every.as_millis() as u64,
        "resolved_at": state.resolved_at.map(at),
        "error": state.failing.as_ref().map(|(e, _)| e.clone()),
        "failing_since": state.failing.as_ref().map(|(_, since)| at(*since)),
    })
}

fn metrics(shared: &Shared) -> String {
    let active = shared.current.load();
    let m = &shared.metrics;
    let mut out = String::with_capacity(4096);
    // Writing to a String cannot fail; results are ignored below.
    out.push_str(
        "# HELP spike_balancer_requests_total Upstream responses by upstream and status code.\n",
    );
    out.push_str("# TYPE spike_balancer_requests_total counter\n");
    for u in active.selector.upstreams() {
        for (code, n) in u.live.responses_by_code() {
            let _ = writeln!(
                out,
                "spike_balancer_requests_total{{upstream=\"{}\",code=\"{code}\"}} {n}",
                u.config.addr,
            );
        }
    }
    per_upstream(
        &mut out,
        &active,
        "spike_balancer_upstream_errors_total",
        "Failed attempts (connect errors, resets, timeouts) by upstream.",
        "counter",
        |u| u.live.failures.load(Ordering::Relaxed),
    );
    per_upstream(
        &mut out,
        &active,
        "spike_balancer_upstream_active",
        "Requests in flight by upstream.",
        "gauge",
        |u| u.live.active.load(Ordering::Relaxed),
    );
    let local: Vec<_> = m.local_counts().collect();
    counters(
        &mut out,
        "spike_balancer_local_responses_total",
        "Answers made by the balancer itself.",
        "code",
        &local,
    );
    m.latency.write(
        &mut out,
        "spike_balancer_upstream_latency_seconds",
        "Time to the upstream's response head.",
    );
    crate::prometheus::single(
        &mut out,
        "spike_balancer_active_connections",
        "Open client connections.",
        "gauge",
        shared.accept_share.open().sum::<u64>(),
    );
    out.push_str(
        "# HELP spike_balancer_worker_connections Open client connections per worker thread.\n",
    );
    out.push_str("# TYPE spike_balancer_worker_connections gauge\n");
    for (w, open) in shared.accept_share.open().enumerate() {
        let _ = writeln!(
            out,
            "spike_balancer_worker_connections{{worker=\"{w}\"}} {open}"
        );
    }
    crate::prometheus::single(
        &mut out,
        "spike_balancer_general_path_connections_total",
        "Client connections handed from the fast path to hyper's server, for a request the fast path does not take.",
        "counter",
        m.general_connections.load(Ordering::Relaxed),
    );
    crate::prometheus::single(
        &mut out,
        "spike_balancer_idle_buffers_given_back_total",
        "Idle client connections that gave their buffers back when many connections opened after they went idle.",
        "counter",
        m.buffers_given_back.load(Ordering::Relaxed),
    );
    crate::prometheus::single(
        &mut out,
        "spike_balancer_tunnels_open",
        "Upgraded connections (WebSockets) tunnelled to an upstream now.",
        "gauge",
        m.tunnels_open.load(Ordering::Relaxed),
    );
    crate::prometheus::single(
        &mut out,
        "spike_balancer_tunnels_total",
        "Upgraded connections tunnelled to an upstream since start.",
        "counter",
        m.tunnels.load(Ordering::Relaxed),
    );
    if let Some(log) = &shared.access_log {
        crate::prometheus::single(
            &mut out,
            "spike_balancer_access_log_dropped_total",
            "Access log lines dropped because the writer could not keep up (no request waits for the log).",
            "counter",
            log.dropped.load(Ordering::Relaxed),
        );
    }
    let q = &m.queue;
    crate::prometheus::single(
        &mut out,
        "spike_balancer_queue_waiting",
        "Requests waiting for an upstream below its max_conns.",
        "gauge",
        q.waiting.load(Ordering::Relaxed) as u64,
    );
    counters(
        &mut out,
        "spike_balancer_queue_total",
        "Requests that waited in the queue, and the 503s it gave, by outcome.",
        "outcome",
        &[
            ("queued", &q.queued),
            ("full", &q.full),
            ("timed_out", &q.timed_out),
        ],
    );
    q.wait.write(
        &mut out,
        "spike_balancer_queue_wait_seconds",
        "How long the requests that waited in the queue waited.",
    );
    per_upstream(
        &mut out,
        &active,
        "spike_balancer_upstream_healthy",
        "1 while the active health check lets the upstream take requests.",
        "gauge",
        |u| u64::from(u.live.healthy.load(Ordering::Relaxed)),
    );
    counters(
        &mut out,
        "spike_balancer_edge_answers_total",
        "Purchases answered by the balancer itself: once the sale was sold out, and before its opening or after its closing (not_selling).",
        "status",
        &[
            ("sold_out", &shared.edge.sold_out_answers),
            ("already_bought", &shared.edge.already_bought_answers),
            ("not_selling", &shared.edge.not_selling_answers),
        ],
    );
    crate::prometheus::single(
        &mut out,
        "spike_balancer_edge_answering",
        "1 while the balancer answers the sold-out sale itself.",
        "gauge",
        u64::from(shared.edge.active()),
    );
    if let Some(sale) = shared.recent.sale_figures() {
        // Gauges, not counters: sold goes down when tickets come back. Every
        // balancer reports the same sale: take the max, never the sum.
        for (name, help, value) in [
            (
                "spike_sale_tickets",
                "The sale's tickets, as a node last read them from the store.",
                sale.total,
            ),
            (
                "spike_sale_sold",
                "The sale's tickets taken (reserved or paid), as a node last read them.",
                sale.sold,
            ),
            (
                "spike_sale_remaining",
                "The sale's tickets left, as a node last read them.",
                sale.remaining,
            ),
        ] {
            crate::prometheus::single(&mut out, name, help, "gauge", value);
        }
    }
    let l = &shared.limits;
    counters(
        &mut out,
        "spike_balancer_limited_total",
        "429s for a client over a per-client limit: limit_rate (with limit_burst) or limit_conns.",
        "limit",
        &[("rate", &l.rate_rejected), ("conns", &l.conns_rejected)],
    );
    crate::prometheus::single(
        &mut out,
        "spike_balancer_limit_delayed_total",
        "Requests delayed to limit_rate (without limit_nodelay).",
        "counter",
        l.delayed.load(Ordering::Relaxed),
    );
    crate::prometheus::single(
        &mut out,
        "spike_balancer_limit_clients",
        "Client addresses limit_rate keeps a bucket for.",
        "gauge",
        l.rate.len() as u64,
    );
    crate::prometheus::single(
        &mut out,
        "spike_balancer_limit_evicted_total",
        "Client buckets dropped to make room before they drained (the table was full).",
        "counter",
        l.rate.evicted.load(Ordering::Relaxed),
    );
    let w = super::waiting_room::status(shared);
    if w.on {
        for (name, help, kind, value) in [
            (
                "spike_waiting_room_waiting",
                "Buyers in the waiting room's line not admitted yet (every balancer's line: it is one).",
                "gauge",
                w.waiting,
            ),
            (
                "spike_waiting_room_joined",
                "Buyers who joined the line, pre-queue included.",
                "gauge",
                w.joined,
            ),
            (
                "spike_waiting_room_serving",
                "The serving mark: positions up to it are admitted.",
                "gauge",
                w.serving,
            ),
            (
                "spike_waiting_room_oldest_wait_milliseconds",
                "How long the first buyer not admitted has waited.",
                "gauge",
                (w.oldest_wait_s * 1000.0) as u64,
            ),
            (
                "spike_waiting_room_admit_rate_milli",
                "Positions admitted a second lately, in thousandths.",
                "gauge",
                (w.admit_rate * 1000.0) as u64,
            ),
            (
                "spike_waiting_room_waiting_answers_total",
                "202 waiting answers this balancer gave, each from memory.",
                "counter",
                w.waiting_answers,
            ),
            (
                "spike_waiting_room_passes_issued_total",
                "Passes this balancer handed out.",
                "counter",
                w.passes_issued,
            ),
            (
                "spike_waiting_room_passes_accepted_total",
                "Purchases this balancer let through on a valid pass.",
                "counter",
                w.passes_accepted,
            ),
            (
                "spike_waiting_room_passes_refused_total",
                "Passes refused: forged, expired, or another buyer's.",
                "counter",
                w.passes_refused,
            ),
            (
                "spike_waiting_room_passes_deferred_total",
                "Admitted buyers told to ask again in a second: this balancer's share of the admit rate was spent.",
                "counter",
                w.passes_deferred,
            ),
            (
                "spike_waiting_room_balancers",
                "Balancers moving the line (each hands out its share of the admit rate).",
                "gauge",
                w.balancers,
            ),
            (
                "spike_waiting_room_store_calls_total",
                "Store calls for buyers joining the line (the few a second that move it are apart).",
                "counter",
                w.join_calls,
            ),
            (
                "spike_waiting_room_tick_calls_total",
                "Store calls that move and read the line.",
                "counter",
                w.tick_calls,
            ),
        ] {
            crate::prometheus::single(&mut out, name, help, kind, value);
        }
    }
    crate::prometheus::single(
        &mut out,
        "spike_balancer_config_version",
        "Config version in force.",
        "gauge",
        active.version,
    );
    out
}

/// One Prometheus counter with a sample per value of `label`.
fn counters(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    samples: &[(&str, &std::sync::atomic::AtomicU64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, c) in samples {
        let _ = writeln!(
            out,
            "{name}{{{label}=\"{value}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
}

/// One Prometheus metric with a sample per upstream.
fn per_upstream<V: std::fmt::Display>(
    out: &mut String,
    active: &Active,
    name: &str,
    help: &str,
    kind: &str,
    value: impl Fn(&Upstream) -> V,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for u in active.selector.upstreams() {
        let _ = writeln!(out, "{name}{{upstream=\"{}\"}} {}", u.config.addr, value(u));
    }
}

/// `/status`'s `limits`: the per-client limits in force (`null` where a
/// limit is off) and what they refused, delayed and keep.
fn limits_status(shared: &Shared, limits: &crate::config::ClientLimits) -> serde_json::Value {
    let l = &shared.limits;
    serde_json::json!({
        "rate": limits.rate.map(|r| r.as_nginx()),
        "burst": limits.rate.map(|r| r.burst),
        "nodelay": limits.rate.map(|r| r.nodelay),
        "conns": (limits.conns > 0).then_some(limits.conns),
        "rate_rejected": l.rate_rejected.load(Ordering::Relaxed),
        "conns_rejected": l.conns_rejected.load(Ordering::Relaxed),
        "delayed": l.delayed.load(Ordering::Relaxed),
        "clients": l.rate.len(),
        "clients_in_flight": l.conns.len(),
        "evicted": l.rate.evicted.load(Ordering::Relaxed),
    })
}
