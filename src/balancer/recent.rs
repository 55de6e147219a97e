//! What the balancer did in the last seconds, for `/status` and its page:
//! requests, 5xx, edge answers and sales per second, and the p99 of the
//! upstreams' latency, over the last [`WINDOW`]; and the sale's figures as
//! a node last gave them (or why there are none).
//!
//! A task samples the hot path's counters once a second (relaxed loads of
//! the atomics the proxy bumps anyway: nothing is added to a request's
//! path) into a short ring, and reads a node's `/sale` once a second while
//! the file has a `[sale]` (a node serves it from a half-second cache).
//! `/status` compares the counters now with the oldest sample in the ring.
//! Computed here rather than in the page from two of its own samples:
//! `curl /status` and every viewer get the same figures, a page opened in
//! the middle of a flood shows the rate at its first paint, and the p99 of
//! the last seconds needs the histogram's buckets, which the page would
//! otherwise have to fetch and subtract itself.

use std::time::{Duration, Instant};

use crate::prometheus::BUCKETS;

use super::state::Shared;
use super::upstream::now_ms;
use super::window::{Counters, SALE_FRESH};
pub use super::window::{Recent, SaleFigures, WINDOW};

/// How often the counters are sampled and the sale is read.
const EVERY: Duration = Duration::from_secs(1);

/// How long one node may take to answer `/sale` before the next is asked.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// The balancer-wide totals now: a few hundred relaxed loads, off the hot
/// path.
fn counters(shared: &Shared) -> Counters {
    let mut c = Counters::default();
    for u in shared.current.load().selector.upstreams() {
        for (code, n) in u.live.responses_by_code() {
            c.requests += n;
            if code >= 500 {
                c.errors += n;
            }
        }
    }
    for (code, n) in shared.metrics.local_counts() {
        let n = n.load(std::sync::atomic::Ordering::Relaxed);
        c.requests += n;
        if code.starts_with('5') {
            c.errors += n;
        }
    }
    let q = &shared.metrics.queue;
    let busy = q.full.load(std::sync::atomic::Ordering::Relaxed)
        + q.timed_out.load(std::sync::atomic::Ordering::Relaxed);
    c.requests += busy;
    c.errors += busy;
    c.edge = shared
        .edge
        .sold_out_answers
        .load(std::sync::atomic::Ordering::Relaxed)
        + shared
            .edge
            .already_bought_answers
            .load(std::sync::atomic::Ordering::Relaxed);
    c.requests += c.edge;
    c.latency = shared.metrics.latency.counts();
    c
}

/// Samples the counters and reads the sale, once a second each, until the
/// balancer stops (the sale's read in its own loop: a node that does not
/// answer must not delay the samples).
pub async fn run(shared: std::sync::Arc<Shared>) {
    shared.recent.push(Instant::now(), counters(&shared));
    let sample = async {
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            shared.recent.push(Instant::now(), counters(&shared));
        }
    };
    let sale = async {
        loop {
            if shared.has_sale() {
                let result = read_sale(&shared).await;
                shared.recent.sale_read(Instant::now(), result);
            } else {
                shared.recent.no_sale();
            }
            tokio::time::sleep(EVERY).await;
        }
    };
    tokio::join!(sample, sale);
}

/// A node's `/sale`: healthy and live ones first; when none answers, what
/// each one asked said.
async fn read_sale(shared: &Shared) -> Result<serde_json::Value, String> {
    let active = shared.current.load_full();
    let names = shared.node_names();
    let now = now_ms();
    let mut order: Vec<_> = active.selector.upstreams().collect();
    order.sort_by_key(|u| u.state_name(now) != "up");
    let mut errors = Vec::new();
    for u in order.iter().filter(|u| !u.config.down) {
        let who = match names.get(&u.config.addr) {
            Some(name) => format!("{name} ({})", u.config.addr),
            None => u.config.addr.to_string(),
        };
        match tokio::time::timeout(
            ASK_TIMEOUT,
            super::sale::ask(u.config.internal_addr(), "/sale"),
        )
        .await
        {
            Ok(Ok(body)) => match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) if v.is_object() => return Ok(v),
                _ => errors.push(format!("{who}: not a sale snapshot")),
            },
            Ok(Err(e)) => errors.push(format!("{who}: {e}")),
            Err(_) => errors.push(format!("{who}: no answer in {ASK_TIMEOUT:?}")),
        }
    }
    Err(if errors.is_empty() {
        String::from("every upstream is marked down in the file")
    } else {
        errors.join("; ")
    })
}

/// The `q` quantile of the observations in buckets `counts`, in seconds,
/// interpolated linearly inside the bucket as Prometheus's
/// `histogram_quantile` does; the top finite bound when it falls in `+Inf`.
fn quantile(q: f64, counts: &[u64; BUCKETS.len() + 1]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = BUCKETS.get(i) else {
                return Some(BUCKETS[BUCKETS.len() - 1]);
            };
            let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
            return Some(lower + (upper - lower) * ((rank - below as f64) / n as f64));
        }
        below += n;
    }
    Some(BUCKETS[BUCKETS.len() - 1])
}

/// `/status`'s `rates`: per second over the window so far (up to
/// [`WINDOW`]), and the p99 of the upstream answers in it (`null` when
/// there were none).
pub fn rates(shared: &Shared) -> serde_json::Value {
    let read = counters(shared);
    let at = Instant::now();
    let (seconds, then, now) = match shared.recent.span(&read) {
        Some((t, then, now)) if at.duration_since(t) >= Duration::from_millis(200) => {
            (at.duration_since(t).as_secs_f64(), then, now)
        }
        // The balancer started a moment ago: nothing to compare with yet.
        _ => return serde_json::json!({ "window_seconds": 0.0 }),
    };
    let per_second = |now: u64, then: u64| round(now.saturating_sub(then) as f64 / seconds, 1);
    let latency: [u64; BUCKETS.len() + 1] =
        std::array::from_fn(|i| now.latency[i].saturating_sub(then.latency[i]));
    let sale = shared.recent.sale.lock().unwrap_or_else(|e| e.into_inner());
    let sales = match (sale.reads.front(), sale.reads.back()) {
        (Some(first), Some(last)) if last.at.duration_since(first.at) >= EVERY / 2 => Some(round(
            last.sold.saturating_sub(first.sold) as f64
                / last.at.duration_since(first.at).as_secs_f64(),
            1,
        )),
        _ => None,
    };
    drop(sale);
    serde_json::json!({
        "window_seconds": round(seconds, 1),
        "requests_per_second": per_second(now.requests, then.requests),
        "errors_per_second": per_second(now.errors, then.errors),
        "edge_answers_per_second": per_second(now.edge, then.edge),
        "sales_per_second": sales,
        "upstream_answers": latency.iter().sum::<u64>(),
        "p99_ms": quantile(0.99, &latency).map(|s| round(s * 1000.0, 2)),
    })
}

/// `/status`'s `sale`: the snapshot a node gave lately and its age, or why
/// there is none.
pub fn sale(shared: &Shared) -> serde_json::Value {
    let several = shared.several_sales();
    if !several.is_empty() {
        // One snapshot a second of every sale would be as many store
        // reads as sales: each one is read when asked, at `/sale?event=`.
        const SHOWN: usize = 20;
        return serde_json::json!({
            "configured": true,
            "sales": several.len(),
            "events": &several[..several.len().min(SHOWN)],
            "reason": "several sales: each one's figures at this listener's /sale?event=EVENT",
        });
    }
    if !shared.has_sale() {
        return serde_json::json!({
            "configured": false,
            "reason": "no sale configured: the file has no [sale]",
        });
    }
    let sale = shared.recent.sale.lock().unwrap_or_else(|e| e.into_inner());
    let fresh = sale
        .last
        .as_ref()
        .filter(|(at, _)| sale.why.is_none() && at.elapsed() <= SALE_FRESH);
    // The stored limit when a node told it, else the file's.
    let limit = fresh
        .and_then(|(_, v)| v["per_user_limit"].as_u64())
        .or_else(|| shared.sale_limit());
    // A sale whose limit is not known yet counts as limited: better
    // "unverified" for a moment than "anonymous" by mistake.
    let buyers = crate::auth::buyers_kind(
        limit.unwrap_or(1),
        shared.current.load().config.auth.is_some(),
    );
    match fresh {
        Some((at, v)) => serde_json::json!({
            "configured": true,
            "buyers": buyers,
            "snapshot": v,
            "read_ms_ago": at.elapsed().as_millis() as u64,
        }),
        None => {
            // Said with the states as they are now: the read may have
            // failed before the health check marked the nodes.
            let now = now_ms();
            let all_down = shared
                .current
                .load()
                .selector
                .upstreams()
                .all(|u| matches!(u.state_name(now), "down" | "unhealthy" | "failed"));
            let reason = match (&sale.why, &sale.last) {
                (Some(why), _) if all_down => {
                    format!("every node is down: no sale figures ({why})")
                }
                (Some(why), _) => format!("no node gave the sale's figures ({why})"),
                (None, Some((at, _))) => format!(
                    "the last figures are {} s old: no node answered since",
                    at.elapsed().as_secs()
                ),
                (None, None) => String::from("not read from a node yet"),
            };
            serde_json::json!({ "configured": true, "buyers": buyers, "reason": reason })
        }
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (x * k).round() / k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_p99_interpolates_inside_its_bucket_as_prometheus_does() {
        let mut counts = [0u64; BUCKETS.len() + 1];
        assert_eq!(quantile(0.99, &counts), None);
        // 100 answers within 1 ms (the second bucket, 0.5 to 1 ms).
        counts[1] = 100;
        let p = quantile(0.99, &counts).expect("p99");
        assert!((p - 0.000995).abs() < 1e-9, "{p}");
        // One slow answer in +Inf out of two: the top finite bound.
        let mut slow = [0u64; BUCKETS.len() + 1];
        slow[0] = 1;
        slow[BUCKETS.len()] = 1;
        assert_eq!(quantile(0.99, &slow), Some(5.0));
    }
}
