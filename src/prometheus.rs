//! What the balancer's and the node's `/metrics` share: a latency histogram
//! a hot path can bump with a few relaxed atomic adds (no lock), and the
//! Prometheus text format (0.0.4) they are written in.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The `Content-Type` of Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Upper bounds of the latency histogram buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Durations in fixed buckets: fixed so that observing is one search and
/// two atomic adds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative); the last slot is `+Inf`.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation (a few relaxed atomic adds).
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The per-bucket counts (not cumulative; the last is `+Inf`): what the
    /// balancer's status samples to tell the p99 of the last seconds from
    /// the p99 since start.
    pub fn counts(&self) -> [u64; BUCKETS.len() + 1] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }

    /// Writes the histogram as metric `name` (its `_bucket`, `_sum` and
    /// `_count` samples).
    pub fn write(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        self.write_samples(out, name, "");
    }

    /// The samples of [`Histogram::write`] without the header, each with
    /// `labels` (`event="E"`, or empty) before `le`: one series of a
    /// labelled family (a node's sales), the header written once before.
    pub fn write_samples(&self, out: &mut String, name: &str, labels: &str) {
        let (open, sep) = if labels.is_empty() {
            ("", "")
        } else {
            ("{", ",")
        };
        let close = if labels.is_empty() { "" } else { "}" };
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "{name}_sum{open}{labels}{close} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{open}{labels}{close} {cumulative}");
    }
}

/// The `# HELP` and `# TYPE` lines of one metric.
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One metric with a single unlabelled sample.
pub fn single(out: &mut String, name: &str, help: &str, kind: &str, value: u64) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

/// A `200` answer in text format 0.0.4.
pub fn response(text: String) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let mut res = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(text)));
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE),
    );
    res
}
