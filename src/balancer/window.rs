//! What the last seconds held, as data: the ring of counter samples over
//! the last [`WINDOW`] and the sale's reads ([`Recent`], kept in
//! `state::Shared`). `recent` fills it once a second and computes `/status`'s
//! rates from it; this module imports nothing of the balancer's, so the
//! state can hold it without importing the code that reads the state.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::prometheus::BUCKETS;

/// The span the rates and the p99 are measured over.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The sale's figures are shown (and exported) while younger than this;
/// older, the nodes stopped answering and the reason replaces them.
pub const SALE_FRESH: Duration = Duration::from_secs(5);

/// The balancer-wide totals one sample takes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Every answer: the upstreams', the balancer's own, the edge's.
    pub requests: u64,
    /// The 5xx among them (the upstreams' and the balancer's own).
    pub errors: u64,
    /// The edge's answers.
    pub edge: u64,
    /// The upstream latency histogram's buckets.
    pub latency: [u64; BUCKETS.len() + 1],
}

impl Counters {
    /// `self` plus what each counter grew by from `from` to `to`: a total
    /// that only grows, though an upstream a reload removed takes its
    /// counts with it (that second's growth is lost, not the window's).
    pub fn grown(&self, from: &Counters, to: &Counters) -> Counters {
        Counters {
            requests: self.requests + to.requests.saturating_sub(from.requests),
            errors: self.errors + to.errors.saturating_sub(from.errors),
            edge: self.edge + to.edge.saturating_sub(from.edge),
            latency: std::array::from_fn(|i| {
                self.latency[i] + to.latency[i].saturating_sub(from.latency[i])
            }),
        }
    }
}

/// The samples of the last [`WINDOW`]: totals that only grow (see
/// [`Counters::grown`]), and the counters as last read.
#[derive(Debug, Default)]
struct Ring {
    samples: VecDeque<(Instant, Counters)>,
    last_read: Counters,
}

/// One node's `/sale` answer, when it was read.
#[derive(Debug)]
pub struct SaleRead {
    pub at: Instant,
    /// The sale's epoch, to tell a reset from tickets sold.
    pub epoch: String,
    pub sold: u64,
}

/// What is known of the sale.
#[derive(Debug, Default)]
pub struct SaleState {
    /// The last snapshot a node gave, and when.
    pub last: Option<(Instant, serde_json::Value)>,
    /// Why there is no fresh snapshot (the last failed read).
    pub why: Option<String>,
    /// The reads of the last [`WINDOW`], for the sales per second.
    pub reads: VecDeque<SaleRead>,
}

/// The samples of the last [`WINDOW`] and the sale as last read. Locked
/// only by the sampling task and the admin endpoints.
#[derive(Debug, Default)]
pub struct Recent {
    ring: Mutex<Ring>,
    pub sale: Mutex<SaleState>,
}

/// The sale's figures for `/metrics`: tickets, sold, remaining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaleFigures {
    /// Tickets on sale.
    pub total: u64,
    /// Tickets taken.
    pub sold: u64,
    /// Tickets left.
    pub remaining: u64,
}

impl Recent {
    /// Adds the counters read at `at`, dropping samples older than the
    /// window.
    pub fn push(&self, at: Instant, read: Counters) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let total = match ring.samples.back() {
            Some((_, last)) => last.grown(&ring.last_read, &read),
            None => read,
        };
        ring.last_read = read;
        while ring
            .samples
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > WINDOW)
        {
            ring.samples.pop_front();
        }
        ring.samples.push_back((at, total));
    }

    /// The oldest sample and the totals now, given the counters now.
    pub fn span(&self, read: &Counters) -> Option<(Instant, Counters, Counters)> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let (oldest, then) = ring.samples.front()?;
        let (_, last) = ring.samples.back()?;
        Some((*oldest, *then, last.grown(&ring.last_read, read)))
    }

    /// Keeps a node's `/sale` answer (or why there is none), read at `at`.
    pub fn sale_read(&self, at: Instant, result: Result<serde_json::Value, String>) {
        let mut sale = self.sale.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(v) => {
                // As JSON text: a number or a string, whichever the node sends.
                let epoch = v["epoch"].to_string();
                let sold = v["sold"].as_u64().unwrap_or(0);
                while sale
                    .reads
                    .front()
                    .is_some_and(|r| at.duration_since(r.at) > WINDOW || r.epoch != epoch)
                {
                    sale.reads.pop_front();
                }
                sale.reads.push_back(SaleRead { at, epoch, sold });
                sale.last = Some((at, v));
                sale.why = None;
            }
            Err(why) => {
                sale.reads.clear();
                sale.why = Some(why);
            }
        }
    }

    /// Forgets the sale: the file has no `[sale]`.
    pub fn no_sale(&self) {
        *self.sale.lock().unwrap_or_else(|e| e.into_inner()) = SaleState::default();
    }

    /// The sale's figures while a node gave them lately (none without a
    /// `[sale]` or with every node silent: a gauge that stopped is better
    /// absent than stale).
    pub fn sale_figures(&self) -> Option<SaleFigures> {
        let sale = self.sale.lock().unwrap_or_else(|e| e.into_inner());
        let (at, v) = sale.last.as_ref()?;
        if sale.why.is_some() || at.elapsed() > SALE_FRESH {
            return None;
        }
        Some(SaleFigures {
            total: v["total"].as_u64()?,
            sold: v["sold"].as_u64()?,
            remaining: v["remaining"].as_u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_a_reload_removes_costs_one_second_of_growth_not_the_window() {
        let recent = Recent::default();
        let at = |s: u64| Instant::now() + Duration::from_secs(s);
        let read = |requests: u64| Counters {
            requests,
            ..Counters::default()
        };
        recent.push(at(0), read(100));
        // A reload took an upstream with 60 answers; the other grew by 10.
        recent.push(at(1), read(50));
        recent.push(at(2), read(60));
        let (_, then, now) = recent.span(&read(70)).expect("samples");
        assert_eq!(then.requests, 100);
        assert_eq!(now.requests, 120);
    }
}
