//! The node's local share of its lease: how many more purchases it may send
//! to the store before asking for more stock.
//!
//! One atomic word, so a million buyers contend on a compare-and-swap, not a
//! lock (the reference design serialised them through a channel held across
//! its Redis call). The word holds a generation beside the count: a reset
//! of the sale starts a new generation, and a unit taken before it can no
//! longer come back into the new sale's count.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Low bits: units left; high bits: the generation.
const LEFT_BITS: u32 = 40;
const LEFT_MASK: u64 = (1 << LEFT_BITS) - 1;

fn split(word: u64) -> (u64, u64) {
    (word >> LEFT_BITS, word & LEFT_MASK)
}

fn join(generation: u64, left: u64) -> u64 {
    (generation << LEFT_BITS) | left.min(LEFT_MASK)
}

/// Units this node may still send, and a way to wait for more.
#[derive(Debug, Default)]
pub struct Lease {
    word: AtomicU64,
    /// Units taken and not yet kept or given back: purchases in flight.
    in_flight: AtomicU64,
    changed: Notify,
    waiting: AtomicUsize,
}

impl Lease {
    /// An empty lease: the first buyer asks the store.
    pub fn new() -> Lease {
        Lease::default()
    }

    /// Takes `want` units at once (a purchase of several tickets), or as
    /// many as are left when fewer are (the store takes the rest from the
    /// free stock or other leases), or `None` when none is left. The units
    /// go back when the returned [`Unit`] is dropped without
    /// [`Unit::keep`], so a failed or abandoned purchase (store down,
    /// client gone) never leaks stock.
    pub fn take(&self, want: u64) -> Option<Unit<'_>> {
        let want = want.max(1);
        self.word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let (g, left) = split(w);
                (left > 0).then(|| join(g, left - left.min(want)))
            })
            .ok()
            .map(|w| {
                let (generation, left) = split(w);
                let count = left.min(want);
                self.in_flight.fetch_add(count, Ordering::AcqRel);
                Unit {
                    lease: self,
                    generation,
                    count,
                    kept: false,
                }
            })
    }

    /// Units out with purchases in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Units left.
    pub fn left(&self) -> u64 {
        split(self.word.load(Ordering::Acquire)).1
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        split(self.word.load(Ordering::Acquire)).0
    }

    /// Adds `units` granted by the store to generation `generation` (nothing
    /// when the sale was reset meanwhile).
    pub fn add(&self, generation: u64, units: u64) {
        if units > 0 {
            self.update(generation, |left| left + units);
        }
    }

    /// Never more than `units`. Used with 0 once the store says the sale is
    /// sold out (then no lease holds anything). Not with a store figure
    /// otherwise: answers can be handled out of the store's order, and an
    /// older figure would lose units granted since.
    pub fn clamp(&self, generation: u64, units: u64) {
        let _ = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let (g, left) = split(w);
                (g == generation && left > units).then(|| join(g, units))
            });
    }

    /// A new sale: no units, and none taken before comes back.
    pub fn reset(&self) {
        let _ = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some(join(split(w).0 + 1, 0))
            });
        self.wake();
    }

    fn update(&self, generation: u64, f: impl Fn(u64) -> u64) {
        let changed = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let (g, left) = split(w);
                (g == generation).then(|| join(g, f(left)))
            })
            .is_ok();
        if changed {
            self.wake();
        }
    }

    /// Wakes the buyers waiting for units (cheap when none waits).
    pub fn wake(&self) {
        // Pairs with the fence in `changed`: either this sees the waiter, or
        // the waiter's check sees what changed before this call.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// Waits until the lease changes (units added or returned, a purchase
    /// done, a reset) or `until`; false when the time ran out.
    pub async fn changed(&self, until: tokio::time::Instant, check: impl Fn() -> bool) -> bool {
        let notified = self.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // Counted down however the wait ends, a buyer who hangs up included:
        // a count left up would make every `wake` take Notify's lock.
        let _waiting = Waiting(&self.waiting);
        std::sync::atomic::fence(Ordering::SeqCst);
        // Checked after registering, so a change between the caller's look
        // and this wait is not missed.
        check() || tokio::time::timeout_at(until, notified).await.is_ok()
    }
}

/// One buyer counted as waiting, until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Units taken from a [`Lease`] for one purchase (one per ticket),
/// returned on drop unless kept.
#[must_use = "a unit is returned as soon as it is dropped"]
#[derive(Debug)]
pub struct Unit<'a> {
    lease: &'a Lease,
    generation: u64,
    /// How many (1 or more).
    count: u64,
    kept: bool,
}

impl Unit<'_> {
    /// The units taken (fewer than wanted when the lease had fewer).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The tickets were sold: the units are spent.
    pub fn keep(mut self) {
        self.kept = true;
        self.lease.in_flight.fetch_sub(self.count, Ordering::AcqRel);
        self.lease.wake();
    }
}

impl Drop for Unit<'_> {
    fn drop(&mut self) {
        if !self.kept {
            let n = self.count;
            self.lease.in_flight.fetch_sub(n, Ordering::AcqRel);
            self.lease.update(self.generation, |left| left + n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn never_goes_below_zero_under_contention() {
        let l = Arc::new(Lease::new());
        l.add(0, 1000);
        let kept = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (l, kept) = (l.clone(), kept.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        if let Some(u) = l.take(1) {
                            u.keep();
                            kept.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(kept.load(Ordering::Relaxed), 1000);
        assert_eq!(l.left(), 0);
        assert!(l.take(1).is_none());
    }

    #[test]
    fn a_dropped_unit_goes_back_but_not_into_a_new_sale() {
        let l = Lease::new();
        l.add(0, 2);
        {
            let _u = l.take(1).expect("one unit");
            assert_eq!(l.left(), 1);
        }
        assert_eq!(l.left(), 2);
        let before_reset = l.take(1).expect("unit");
        l.reset();
        assert_eq!((l.left(), l.generation()), (0, 1));
        drop(before_reset);
        assert_eq!(l.left(), 0, "a unit of the old sale must not come back");
        l.add(0, 5);
        assert_eq!(l.left(), 0, "a grant of the old sale must not count");
        l.add(1, 3);
        assert_eq!(l.left(), 3);
    }

    #[test]
    fn several_units_are_taken_at_once_and_all_come_back() {
        let l = Lease::new();
        l.add(0, 5);
        let three = l.take(3).expect("three");
        assert_eq!((three.count(), l.left(), l.in_flight()), (3, 2, 3));
        // Fewer left than wanted: what is there.
        let two = l.take(4).expect("the last two");
        assert_eq!((two.count(), l.left(), l.in_flight()), (2, 0, 5));
        assert!(l.take(2).is_none());
        drop(three);
        assert_eq!((l.left(), l.in_flight()), (3, 2));
        two.keep();
        assert_eq!((l.left(), l.in_flight()), (3, 0));
    }

    #[test]
    fn clamp_only_lowers() {
        let l = Lease::new();
        l.add(0, 10);
        l.clamp(0, 4);
        assert_eq!(l.left(), 4);
        l.clamp(0, 9);
        assert_eq!(l.left(), 4);
        l.clamp(7, 0);
        assert_eq!(l.left(), 4, "another generation's figure is ignored");
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_units_come_back() {
        let l = Arc::new(Lease::new());
        l.add(0, 1);
        let u = l.take(1).expect("unit");
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move {
                let until = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
                l.changed(until, || l.left() > 0).await
            })
        };
        tokio::task::yield_now().await;
        drop(u);
        assert!(waiter.await.expect("waiter"));
        assert_eq!(l.left(), 1);
    }
}
