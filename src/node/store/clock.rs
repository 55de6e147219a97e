//! Redis's clock as seen from a node: what a purchase's deadline is in the
//! time the script reads (`TIME`), whatever this host's wall clock says.
//!
//! A deadline computed from the node's own wall clock is only as good as
//! the agreement between the two clocks: a node 3 s ahead of Redis gave
//! deadlines 3 s too late, so a purchase delayed past its buyer's 503 still
//! sold. Instead the node samples `TIME`, pins each sample to its own
//! monotonic clock (which no NTP step or `date` moves), and maps the
//! moment it will give up onto Redis's clock from the sample with the
//! shortest round trip (the tightest bound). The mapping takes the earliest
//! Redis time the moment can be, so a deadline errs towards refusing.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Samples kept: with one a second, the best of the last ten seconds.
const WINDOW: usize = 10;

/// Allowance for the two clocks' rates differing between samples (at most
/// 1 ms, plus 200 parts per million of the sample's age).
fn drift_margin(age: Duration) -> Duration {
    Duration::from_millis(1) + age / 5_000
}

/// One reading of Redis's `TIME`.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Local monotonic time when the answer was in.
    received: Instant,
    /// Redis's time, in microseconds since the Unix epoch.
    redis_us: u64,
    /// From sending `TIME` to its answer.
    rtt: Duration,
    /// Redis's time minus this host's wall clock, in milliseconds.
    wall_offset_ms: i64,
}

/// Recent `TIME` samples of one Redis.
#[derive(Debug)]
pub struct StoreClock {
    samples: Mutex<VecDeque<Sample>>,
    /// [`StoreClock::offset_ms`] as of the last sample ([`NO_OFFSET`]
    /// before any): read by every purchase while a sale is not open, so
    /// kept where a read takes no lock.
    offset: std::sync::atomic::AtomicI64,
}

/// No sample yet.
const NO_OFFSET: i64 = i64::MIN;

impl Default for StoreClock {
    fn default() -> Self {
        StoreClock {
            samples: Mutex::default(),
            offset: std::sync::atomic::AtomicI64::new(NO_OFFSET),
        }
    }
}

impl StoreClock {
    /// An empty clock: no deadline can be given until the first sample.
    pub fn new() -> StoreClock {
        StoreClock::default()
    }

    /// Records Redis's answer `redis_us` to a `TIME` sent at `sent` and
    /// answered at `received`.
    pub fn record(&self, sent: Instant, redis_us: u64, received: Instant) {
        let rtt = received.saturating_duration_since(sent);
        let wall_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        // Redis read its clock somewhere within the round trip; its middle
        // is the best guess for a figure shown to people.
        let mid = redis_us as i64 + (rtt.as_micros() / 2) as i64;
        let sample = Sample {
            received,
            redis_us,
            rtt,
            wall_offset_ms: (mid - wall_us) / 1000,
        };
        let mut s = self.lock();
        if s.len() == WINDOW {
            s.pop_front();
        }
        s.push_back(sample);
        if let Some(best) = s.iter().min_by_key(|s| s.rtt) {
            self.offset
                .store(best.wall_offset_ms, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn best(&self) -> Option<Sample> {
        self.lock().iter().min_by_key(|s| s.rtt).copied()
    }

    /// The earliest Redis time (Unix milliseconds) that local moment `when`
    /// can be, or None before the first sample.
    pub fn redis_ms_at(&self, when: Instant) -> Option<u64> {
        Some(self.reading()?.redis_ms_at(when))
    }

    /// The sample in use, to map many moments with one look (a batch).
    pub fn reading(&self) -> Option<Reading> {
        self.best().map(Reading)
    }

    /// Redis's clock minus this host's wall clock, in milliseconds, from the
    /// most precise recent sample.
    pub fn offset_ms(&self) -> Option<i64> {
        match self.offset.load(std::sync::atomic::Ordering::Relaxed) {
            NO_OFFSET => None,
            ms => Some(ms),
        }
    }

    /// The round trip of the sample in use.
    pub fn rtt(&self) -> Option<Duration> {
        self.best().map(|s| s.rtt)
    }
}

/// One `TIME` sample, as used to map local moments onto Redis's clock.
#[derive(Debug, Clone, Copy)]
pub struct Reading(Sample);

impl Reading {
    /// The earliest Redis time (Unix milliseconds) that local moment `when`
    /// can be.
    pub fn redis_ms_at(&self, when: Instant) -> u64 {
        // Redis read `redis_us` before the answer came in, so at `received`
        // its clock showed at least that.
        let margin =
            drift_margin(when.saturating_duration_since(self.0.received)).as_micros() as u64;
        let us = if when >= self.0.received {
            self.0.redis_us + (when - self.0.received).as_micros() as u64
        } else {
            self.0
                .redis_us
                .saturating_sub((self.0.received - when).as_micros() as u64)
        };
        us.saturating_sub(margin) / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_sample_no_deadline() {
        let c = StoreClock::new();
        assert_eq!(c.redis_ms_at(Instant::now()), None);
        assert_eq!(c.offset_ms(), None);
    }

    /// The mapping follows the local monotonic clock from the tightest
    /// sample, never from a wider one, and errs early.
    #[test]
    fn deadlines_come_from_the_shortest_round_trip_and_err_early() {
        let c = StoreClock::new();
        let base = Instant::now();
        // A slow sample that would put Redis 5 s later.
        c.record(base, 5_000_000_000, base + Duration::from_millis(40));
        // A fast one: Redis at 1,000 s when the answer came in at base+50ms.
        c.record(
            base + Duration::from_millis(49),
            1_000_000_000,
            base + Duration::from_millis(50),
        );
        let at = base + Duration::from_millis(1050);
        let ms = c.redis_ms_at(at).expect("sampled");
        assert!(ms <= 1_001_000, "{ms}");
        assert!(ms >= 1_000_998, "{ms}");
        assert_eq!(c.rtt(), Some(Duration::from_millis(1)));
    }

    #[test]
    fn old_samples_leave_the_window() {
        let c = StoreClock::new();
        let base = Instant::now();
        c.record(base, 7_000_000, base);
        for i in 1..=WINDOW as u64 {
            let t = base + Duration::from_secs(i);
            c.record(t, 9_000_000_000, t + Duration::from_millis(2));
        }
        let ms = c
            .redis_ms_at(base + Duration::from_secs(20))
            .expect("sampled");
        assert!(ms > 8_000_000, "{ms}");
    }
}
