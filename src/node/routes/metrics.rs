//! A node's `/healthz`, `/stats` and `/metrics`. `GET /metrics`
//! (Prometheus text format 0.0.4) is what `/stats` counts, in the form a
//! scraper wants, plus the store's latency. Written off the hot path; the
//! hot path only bumps the atomics of [`Stats`].
//!
//! [`Stats`]: crate::node::stats::Stats

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use hyper::StatusCode;

use super::reply::{Answer, json};
use crate::node::sales::Sales;
use crate::node::state::Node;
use crate::node::stats::Stats;
use crate::prometheus::{header, single};

/// `GET /healthz`: whether the node can sell: the store answers and holds
/// an initialised sale, and its clock is near this host's. A 503 says why.
pub async fn healthz(node: &Node) -> Answer {
    let (status, body) = health(node).await;
    json(status, &body)
}

/// `GET /stats`.
pub fn stats_json(node: &Node) -> Answer {
    json(StatusCode::OK, &stats(node))
}

/// A sale's counters as `/metrics` names them: name, help, value.
fn counters(s: &Stats) -> [(&'static str, &'static str, u64); 12] {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    [
        (
            "spike_node_sold_total",
            "Tickets this node sold.",
            load(&s.sold),
        ),
        (
            "spike_node_sold_out_total",
            "409 sold-out answers (from the store or from memory).",
            load(&s.sold_out),
        ),
        (
            "spike_node_already_bought_total",
            "409 answers to buyers at their limit, or whom the purchase would take over it.",
            load(&s.already_bought),
        ),
        (
            "spike_node_too_few_left_total",
            "409 answers to purchases of more tickets than were left (nothing sold).",
            load(&s.too_few_left),
        ),
        (
            "spike_node_replayed_total",
            "Answers that repeated an Idempotency-Key's first answer.",
            load(&s.replayed),
        ),
        (
            "spike_node_bad_requests_total",
            "Requests refused as malformed (400, 413, 414, 422).",
            load(&s.bad_requests),
        ),
        (
            "spike_node_store_purchases_total",
            "Purchases sent to the store (several may share one call).",
            load(&s.store_calls),
        ),
        (
            "spike_node_lease_calls_total",
            "Lease requests sent to the store, polls included.",
            load(&s.lease_calls),
        ),
        (
            "spike_node_expired_total",
            "Unpaid reservations this node's sweeps expired (their tickets went back on sale).",
            load(&s.expired),
        ),
        (
            "spike_node_order_calls_total",
            "Order calls (pay, cancel, read) sent to the store.",
            load(&s.order_calls),
        ),
        (
            "spike_node_unauthorized_total",
            "401 answers: with [auth], no valid buyer token or payment signature.",
            load(&s.unauthorized),
        ),
        (
            "spike_node_store_errors_total",
            "Store calls that failed or did not answer in time (each a 503).",
            load(&s.store_errors),
        ),
    ]
}

/// The node's metrics as Prometheus text.
pub fn render(node: &Node) -> String {
    let s = &node.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut out = String::with_capacity(3072);
    let counters = counters(s);
    for (name, help, value) in counters {
        single(&mut out, name, help, "counter", value);
    }
    if let Some(calls) = node.store().deduct_calls() {
        single(
            &mut out,
            "spike_node_redis_calls_total",
            "Calls to Redis that carried purchases and lease requests.",
            "counter",
            calls,
        );
    }
    let name = "spike_node_unavailable_total";
    header(
        &mut out,
        name,
        "503 answers to purchases, by reason.",
        "counter",
    );
    for (reason, n) in [
        ("busy", load(&s.busy)),
        ("store", load(&s.store_errors)),
        ("not_initialised", load(&s.not_initialised)),
        ("not_replicated", load(&s.not_replicated)),
    ] {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
    }
    single(
        &mut out,
        "spike_node_not_selling_total",
        "409 answers to purchases while the sale does not sell (not open yet, closed, paused).",
        "counter",
        load(&s.not_selling),
    );
    single(
        &mut out,
        "spike_node_lease_units",
        "Units of this node's lease not yet sent to the store.",
        "gauge",
        node.lease_left(),
    );
    single(
        &mut out,
        "spike_node_epoch",
        "The sale's epoch as this node last heard it (0 before any answer).",
        "gauge",
        node.epoch(),
    );
    s.store_latency.write(
        &mut out,
        "spike_node_store_latency_seconds",
        "Time a purchase or lease request waited for the store's answer.",
    );
    out
}

/// The gauges of a sale's state, with `/metrics`'s names and help.
const GAUGES: [(&str, &str); 2] = [
    (
        "spike_node_lease_units",
        "Units of this node's lease not yet sent to the store.",
    ),
    (
        "spike_node_epoch",
        "The sale's epoch as this node last heard it (0 before any answer).",
    ),
];

/// `/metrics` of a node of several sales: every family of [`render`],
/// each series labelled with its sale's `event`, for the sales this node
/// holds state for (those it was asked about); and how many it sells
/// and holds.
pub fn render_all(sales: &Sales) -> String {
    let mut nodes: Vec<std::sync::Arc<Node>> = sales.made();
    nodes.sort_by(|a, b| a.event().cmp(b.event()));
    let mut out = String::with_capacity(1024 + 2048 * nodes.len());
    single(
        &mut out,
        "spike_node_sales",
        "Sales this node sells (the file's).",
        "gauge",
        sales.len() as u64,
    );
    single(
        &mut out,
        "spike_node_sales_held",
        "Sales whose state this node holds: those asked about within their idle_after.",
        "gauge",
        nodes.len() as u64,
    );
    let all: Vec<_> = nodes
        .iter()
        .map(|n| (n.event(), counters(&n.stats)))
        .collect();
    for i in 0..12 {
        let (name, help, _) = all
            .first()
            .map_or(counters(&Stats::default())[i], |c| c.1[i]);
        header(&mut out, name, help, "counter");
        for (event, c) in &all {
            let _ = writeln!(out, "{name}{{event=\"{event}\"}} {}", c[i].2);
        }
    }
    let name = "spike_node_redis_calls_total";
    header(
        &mut out,
        name,
        "Calls to Redis that carried purchases and lease requests.",
        "counter",
    );
    for n in &nodes {
        if let Some(calls) = n.store().deduct_calls() {
            let _ = writeln!(out, "{name}{{event=\"{}\"}} {calls}", n.event());
        }
    }
    let name = "spike_node_unavailable_total";
    header(
        &mut out,
        name,
        "503 answers to purchases, by reason.",
        "counter",
    );
    for n in &nodes {
        let s = &n.stats;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        for (reason, v) in [
            ("busy", load(&s.busy)),
            ("store", load(&s.store_errors)),
            ("not_initialised", load(&s.not_initialised)),
            ("not_replicated", load(&s.not_replicated)),
        ] {
            let _ = writeln!(
                out,
                "{name}{{event=\"{}\",reason=\"{reason}\"}} {v}",
                n.event()
            );
        }
    }
    let name = "spike_node_not_selling_total";
    header(
        &mut out,
        name,
        "409 answers to purchases while the sale does not sell (not open yet, closed, paused).",
        "counter",
    );
    for n in &nodes {
        let v = n.stats.not_selling.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}{{event=\"{}\"}} {v}", n.event());
    }
    for (i, (name, help)) in GAUGES.iter().enumerate() {
        header(&mut out, name, help, "gauge");
        for n in &nodes {
            let v = if i == 0 { n.lease_left() } else { n.epoch() };
            let _ = writeln!(out, "{name}{{event=\"{}\"}} {v}", n.event());
        }
    }
    let name = "spike_node_store_latency_seconds";
    header(
        &mut out,
        name,
        "Time a purchase or lease request waited for the store's answer.",
        "histogram",
    );
    for n in &nodes {
        n.stats
            .store_latency
            .write_samples(&mut out, name, &format!("event=\"{}\"", n.event()));
    }
    out
}

/// `/stats` of a node of several sales: each sale it holds state for
/// (those asked about within their `idle_after`), by event, with the fields of a
/// single sale's `/stats`.
pub fn stats_all(sales: &Sales) -> Answer {
    let made = sales.made();
    let by_event: std::collections::BTreeMap<&str, StatsBody<'_>> =
        made.iter().map(|n| (n.event(), stats(n))).collect();
    json(
        StatusCode::OK,
        &AllStats {
            node: sales.name(),
            sales: sales.len(),
            sales_held: by_event.len(),
            by_event,
        },
    )
}

/// The body of [`stats_all`].
#[derive(serde::Serialize)]
struct AllStats<'a> {
    node: &'a str,
    sales: usize,
    sales_held: usize,
    #[serde(rename = "by_event")]
    by_event: std::collections::BTreeMap<&'a str, StatsBody<'a>>,
}

/// `/healthz` of a node of several sales: whether the store answers at
/// all (each sale's own state is at its `/sale?event=`).
pub async fn healthz_all(sales: &Sales) -> Answer {
    let ping = match sales.stores() {
        Some(stores) => stores.ping().await,
        None => Ok(()),
    };
    match ping {
        Ok(()) => json(
            StatusCode::OK,
            &serde_json::json!({"status": "ok", "sales": sales.len()}),
        ),
        Err(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({
                "status": "unavailable",
                "reason": format!("the store is unreachable: {e}"),
            }),
        ),
    }
}

/// The node's `/stats`: every field always present with one meaning, except
/// those that only exist with Redis or once read (absent, never `null`).
#[derive(serde::Serialize)]
struct StatsBody<'a> {
    node: &'a str,
    epoch: u64,
    per_user_limit: u64,
    lease: u64,
    sold_out: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    holders_known: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keys_known: Option<usize>,
    sold: u64,
    sold_out_answers: u64,
    already_bought: u64,
    too_few_left: u64,
    replayed: u64,
    store_calls: u64,
    lease_calls: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_calls: Option<u64>,
    store_errors: u64,
    bad_requests: u64,
    busy: u64,
    not_initialised: u64,
    not_selling: u64,
    not_replicated: u64,
    expired: u64,
    order_calls: u64,
    unauthorized: u64,
    holder_reads: u64,
    holder_changes: u64,
    buyers: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    clock_offset_ms: Option<i64>,
}

/// The body of `GET /stats`.
fn stats(node: &Node) -> StatsBody<'_> {
    let s = &node.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let known = node.holders_known();
    StatsBody {
        node: node.name(),
        epoch: node.epoch(),
        per_user_limit: node.per_user_limit(),
        lease: node.lease_left(),
        sold_out: node.is_sold_out(),
        holders_known: known.map(|k| k.0),
        keys_known: known.map(|k| k.1),
        sold: load(&s.sold),
        sold_out_answers: load(&s.sold_out),
        already_bought: load(&s.already_bought),
        too_few_left: load(&s.too_few_left),
        replayed: load(&s.replayed),
        store_calls: load(&s.store_calls),
        lease_calls: load(&s.lease_calls),
        redis_calls: node.store().deduct_calls(),
        store_errors: load(&s.store_errors),
        bad_requests: load(&s.bad_requests),
        busy: load(&s.busy),
        not_initialised: load(&s.not_initialised),
        not_selling: load(&s.not_selling),
        not_replicated: load(&s.not_replicated),
        expired: load(&s.expired),
        order_calls: load(&s.order_calls),
        holder_reads: load(&s.holder_reads),
        holder_changes: load(&s.holder_changes),
        unauthorized: load(&s.unauthorized),
        buyers: buyers(node),
        clock_offset_ms: node.store().clock_offset_ms(),
    }
}

/// The body of `GET /healthz`, fields in alphabetical order (as they were
/// when written through `serde_json::Value`, so the bytes stay the same).
#[derive(serde::Serialize)]
struct Health {
    /// Who the buyers are: `verified` (a token with `[auth]`),
    /// `unverified` (a limit on ids the client states), `anonymous`.
    buyers: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    clock_offset_ms: Option<i64>,
    /// A `Value`, not the struct, so that its fields keep `Value`'s
    /// (alphabetical) order.
    #[serde(skip_serializing_if = "Option::is_none")]
    durability: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    durability_problems: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<String>,
    status: &'static str,
}

/// Who the node's buyers are, for `/healthz` and `/stats`: a per-user
/// limit without `[auth]` holds only for honest clients, and an operator
/// must see that on the dashboard, not only in a start-up warning.
pub fn buyers(node: &Node) -> &'static str {
    crate::auth::buyers_kind(node.per_user_limit(), node.auth().is_some())
}

/// `GET /healthz`: 200 when the node can sell; otherwise 503 and the
/// reason (the store unreachable, the sale not initialised, Redis's clock
/// too far from this host's).
async fn health(node: &Node) -> (StatusCode, Health) {
    let buyers = buyers(node);
    let unavailable = |reason: String, clock_offset_ms: Option<i64>| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Health {
                buyers,
                clock_offset_ms,
                durability: None,
                durability_problems: None,
                reason: Some(reason),
                replicas: None,
                status: "unavailable",
            },
        )
    };
    // A snapshot, not a bare ping: it proves the store answers and says
    // whether there is a sale to sell from, in one constant-time call.
    match node.store().snapshot().await {
        Err(e) => return unavailable(format!("the store is unreachable: {e}"), None),
        Ok(snap) if !snap.initialised => {
            return unavailable(
                "the sale is not initialised: run spike stock init".to_string(),
                None,
            );
        }
        Ok(_) => {}
    }
    let offset = node.store().clock_offset_ms();
    if let (Some(off), Some(max)) = (offset, node.max_clock_offset())
        && off.unsigned_abs() > max.as_millis() as u64
    {
        return unavailable(
            format!(
                "Redis's clock is {off} ms from this host's (more than max_clock_offset {max:?}); deadlines stay safe, but fix the clock"
            ),
            Some(off),
        );
    }
    let mut body = Health {
        buyers,
        clock_offset_ms: offset,
        durability: None,
        durability_problems: None,
        reason: None,
        replicas: None,
        status: "ok",
    };
    // Reported, not failed: a Redis that may forget is the operator's to
    // fix, and failing every node's health would stop the sale outright.
    // Too few replicas is another matter: no sale can be acknowledged, so
    // the node cannot sell, and a balancer should know it.
    let mut status = StatusCode::OK;
    if let Ok(Some(durability)) = node.store().durability().await {
        if durability.replicas_wanted > 0 {
            let able = durability
                .replicas_good
                .or(durability.replicas_connected)
                .unwrap_or(0);
            body.replicas = Some(format!("{able} of {}", durability.replicas_wanted));
        }
        if let Some((able, wanted)) = durability.replicas_short() {
            status = StatusCode::SERVICE_UNAVAILABLE;
            body.status = "degraded";
            body.reason = Some(format!(
                "{able} of the {wanted} Redis replica(s) that must acknowledge a sale are connected: no sale can be answered 200"
            ));
        }
        body.durability_problems = Some(durability.problems());
        body.durability = serde_json::to_value(&durability).ok();
    }
    (status, body)
}
