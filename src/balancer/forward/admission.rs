//! Admission: while every upstream that could take a request is at its
//! `max_conns`, the request waits in a bounded queue for a free slot, up to
//! `queue_timeout`, and is refused with a 503 when the queue is full or the
//! wait too long.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::balancer::answer::LocalAnswer;
use crate::balancer::select::{Attempt, Pick, Selector};
use crate::balancer::state::{Active, Shared};
use crate::balancer::upstream::now_ms;
use crate::config::BalancerConfig;

/// The next upstream for a request, on either path: a pick; or, while
/// every upstream that could take it is at its `max_conns` and nothing has
/// been sent yet, a wait in the admission queue for a free slot and
/// another look. `Ok(None)`: nothing left to try; `Err`: the 503's body
/// (the queue is full, or the wait reached `queue_timeout`). The queue
/// slot ends with the pick.
pub(crate) async fn next_pick(
    shared: &Shared,
    active: &Active,
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
    async fn wait(&self, selector: &Selector) -> Result<(), LocalAnswer> {
        let freed = crate::balancer::upstream::FREED.notified();
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
