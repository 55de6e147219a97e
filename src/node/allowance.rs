//! The node's local pre-deduction counter: the cheap first gate of a sale.
//!
//! A lock-free counter, never below zero, so a million buyers contend on one
//! atomic instead of a lock (the reference design serialised them through a
//! channel held across its Redis call).

use std::sync::atomic::{AtomicU64, Ordering};

/// How many more tickets this node may try to sell.
#[derive(Debug)]
pub struct Allowance {
    initial: u64,
    left: AtomicU64,
    spent: AtomicU64,
}

/// Why no unit could be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoUnit {
    /// Every unit is spent on a sale: this node has nothing more to sell.
    Spent,
    /// The remaining units are held by purchases still in flight; some may
    /// come back, so "sold out" would be a lie. The buyer should retry.
    InFlight,
}

impl Allowance {
    /// An allowance of `units`.
    pub fn new(units: u64) -> Allowance {
        Allowance {
            initial: units,
            left: AtomicU64::new(units),
            spent: AtomicU64::new(0),
        }
    }

    /// Takes one unit; `None` when none is left. The unit goes back when the
    /// returned [`Unit`] is dropped without [`Unit::keep`], so a failed or
    /// abandoned purchase (Redis down, client gone) never leaks stock.
    pub fn take(&self) -> Result<Unit<'_>, NoUnit> {
        match self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        {
            Ok(_) => Ok(Unit {
                allowance: self,
                kept: false,
            }),
            // Units that are neither left nor spent are out with purchases in
            // flight. Counting spent units (not in-flight ones) keeps two
            // failed takes from mistaking each other for a purchase.
            Err(_) if self.spent.load(Ordering::Acquire) >= self.initial => Err(NoUnit::Spent),
            Err(_) => Err(NoUnit::InFlight),
        }
    }

    /// Units left.
    pub fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }
}

/// One unit taken from an [`Allowance`], returned on drop unless kept.
#[must_use = "a unit is returned as soon as it is dropped"]
#[derive(Debug)]
pub struct Unit<'a> {
    allowance: &'a Allowance,
    kept: bool,
}

impl Unit<'_> {
    /// The ticket was sold: the unit stays spent.
    pub fn keep(mut self) {
        self.kept = true;
        self.allowance.spent.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Unit<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.allowance.left.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn never_goes_below_zero_under_contention() {
        let a = Arc::new(Allowance::new(1000));
        let kept = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (a, kept) = (a.clone(), kept.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        if let Ok(u) = a.take() {
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
        assert_eq!(a.left(), 0);
        assert_eq!(a.take().err(), Some(NoUnit::Spent));
        assert_eq!(a.take().err(), Some(NoUnit::Spent));
    }

    /// Many failed takes at once on a spent allowance all say "spent":
    /// none mistakes another's attempt for a purchase in flight.
    #[test]
    fn concurrent_failed_takes_on_a_spent_allowance_all_say_spent() {
        let a = Arc::new(Allowance::new(3));
        for _ in 0..3 {
            a.take().expect("unit").keep();
        }
        let busy = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (a, busy) = (a.clone(), busy.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if a.take().err() == Some(NoUnit::InFlight) {
                            busy.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(busy.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_dropped_unit_goes_back() {
        let a = Allowance::new(1);
        {
            let _u = a.take().expect("one unit");
            assert_eq!(a.left(), 0);
            assert_eq!(a.take().err(), Some(NoUnit::InFlight));
        }
        assert_eq!(a.left(), 1);
        a.take().expect("unit").keep();
        assert_eq!(a.left(), 0);
    }
}
