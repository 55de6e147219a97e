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
//!
//! The offset shown to people (and `/healthz`'s `max_clock_offset`) is the
//! same mapping read against this host's wall clock *now*, not a difference
//! taken when a sample came in: a wall clock stepped by NTP or `date` shows
//! at once, instead of after every older sample has left the window.

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
}

/// Recent `TIME` samples of one Redis.
#[derive(Debug)]
pub struct StoreClock {
    samples: Mutex<VecDeque<Sample>>,
    /// The local monotonic moment [`StoreClock::origin_us`] is pinned to.
    epoch: Instant,
    /// Redis's time at `epoch`, in microseconds, from the tightest sample
    /// (its middle; [`NO_SAMPLE`] before any): read by every purchase
    /// while a sale is not open, so kept where a read takes no lock.
    origin_us: std::sync::atomic::AtomicI64,
}

/// No sample yet.
const NO_SAMPLE: i64 = i64::MIN;

impl Default for StoreClock {
    fn default() -> Self {
        StoreClock {
            samples: Mutex::default(),
            epoch: Instant::now(),
            origin_us: std::sync::atomic::AtomicI64::new(NO_SAMPLE),
        }
    }
}

/// `later - earlier` in microseconds, negative when `later` is earlier.
fn signed_micros(later: Instant, earlier: Instant) -> i64 {
    if later >= earlier {
        (later - earlier).as_micros() as i64
    } else {
        -((earlier - later).as_micros() as i64)
    }
}

/// This host's wall clock, in microseconds since the Unix epoch.
fn wall_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
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
        let sample = Sample {
            received,
            redis_us,
            rtt,
        };
        let mut s = self.lock();
        if s.len() == WINDOW {
            s.pop_front();
        }
        s.push_back(sample);
        if let Some(best) = s.iter().min_by_key(|s| s.rtt) {
            // Redis read its clock somewhere within the round trip; its
            // middle is the best guess for a figure shown to people.
            let at_received = best.redis_us as i64 + (best.rtt.as_micros() / 2) as i64;
            let origin = at_received - signed_micros(best.received, self.epoch);
            self.origin_us
                .store(origin, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Redis's time at local moment `when`, in microseconds since the Unix
    /// epoch: the best guess (not the earliest it can be), or None before
    /// the first sample.
    fn redis_micros_at(&self, when: Instant) -> Option<i64> {
        match self.origin_us.load(std::sync::atomic::Ordering::Relaxed) {
            NO_SAMPLE => None,
            origin => Some(origin + signed_micros(when, self.epoch)),
        }
    }

    /// Redis's time now, in Unix milliseconds (the best guess, for the
    /// moments a sale opens and closes), or None before the first sample.
    /// This host's wall clock plays no part.
    pub fn now_ms(&self) -> Option<u64> {
        let us = self.redis_micros_at(Instant::now())?;
        Some(us.max(0) as u64 / 1000)
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

    /// Redis's clock minus this host's wall clock, in milliseconds: Redis's
    /// time now from the most precise recent sample, against the wall
    /// clock as it reads now.
    pub fn offset_ms(&self) -> Option<i64> {
        self.offset_ms_against(Instant::now(), wall_micros())
    }

    /// [`StoreClock::offset_ms`] at local moment `when`, when the wall clock
    /// reads `wall_us`.
    fn offset_ms_against(&self, when: Instant, wall_us: i64) -> Option<i64> {
        Some((self.redis_micros_at(when)? - wall_us) / 1000)
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

    /// A wall clock stepped after the last sample shows in the offset at
    /// once; Redis's time, read through the monotonic clock, does not move.
    #[test]
    fn a_wall_clock_step_shows_at_once_and_moves_nothing_else() {
        let c = StoreClock::new();
        let base = Instant::now();
        c.record(base, 1_000_000_000, base + Duration::from_millis(2));
        let at = base + Duration::from_millis(502);
        // Redis at 1,000.5 s (1 ms into the round trip, 500 ms later).
        let wall_then = 1_000_501_000;
        assert_eq!(c.offset_ms_against(at, wall_then), Some(0));
        // The host's clock jumps 5 s ahead: Redis is now 5 s behind it.
        assert_eq!(c.offset_ms_against(at, wall_then + 5_000_000), Some(-5000));
        assert_eq!(c.redis_micros_at(at), Some(1_000_501_000));
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
