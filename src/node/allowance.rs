//! The node's local pre-deduction counter: the cheap first gate of a sale.
//!
//! A lock-free counter, never below zero, so a million buyers contend on one
//! atomic instead of a lock (the reference design serialised them through a
//! channel held across its Redis call).

use std::sync::atomic::{AtomicU64, Ordering};

/// How many more tickets this node may try to sell.
#[derive(Debug)]
pub struct Allowance {
    left: AtomicU64,
    in_flight: AtomicU64,
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
            left: AtomicU64::new(units),
            in_flight: AtomicU64::new(0),
        }
    }

    /// Takes one unit; `None` when none is left. The unit goes back when the
    /// returned [`Unit`] is dropped without [`Unit::keep`], so a failed or
    /// abandoned purchase (Redis down, client gone) never leaks stock.
    pub fn take(&self) -> Result<Unit<'_>, NoUnit> {
        // Count the unit as in flight before it leaves `left`, so a failed
        // take never sees both counters at zero while a unit is out.
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        match self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        {
            Ok(_) => Ok(Unit {
                allowance: self,
                kept: false,
            }),
            Err(_) => {
                let others = self.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
                Err(if others > 0 {
                    NoUnit::InFlight
                } else {
                    NoUnit::Spent
                })
            }
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
    }
}

impl Drop for Unit<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.allowance.left.fetch_add(1, Ordering::AcqRel);
        }
        self.allowance.in_flight.fetch_sub(1, Ordering::AcqRel);
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
