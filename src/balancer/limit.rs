//! Per-client limits, as Nginx's `limit_req` and `limit_conn` keep them:
//! a leaky bucket per key for the request rate ([`RateTable`]) and a count
//! per key of the requests in flight ([`ConnTable`]). At the bottom of the
//! balancer's layers (it imports nothing of the balancer's); the decision
//! for a request, and its answer, are in `forward::limit`.
//!
//! The bucket is Nginx's, exactly (ngx_http_limit_req_module.c): a key's
//! `excess` is in thousandths of a request, drained at the rate (itself in
//! thousandths per second, truncated as Nginx truncates it) over the whole
//! milliseconds since the key's `last` request. A request adds 1000 to what
//! is left; over `burst` × 1000 it is refused and changes nothing, else it
//! is stored (and `last` moves only when a millisecond passed). A key seen
//! for the first time starts at 0: its first request is free. Without
//! `nodelay` a request that leaves any excess waits `excess × 1000 / rate`
//! ms; with it, it goes at once.
//!
//! Memory is bounded: the table is split in [`SHARDS`] shards of at most
//! [`SHARD_CAPACITY`] keys, each behind its own lock (held for a lookup,
//! never across an `.await`). A key idle for a minute whose bucket has
//! drained is dropped, as Nginx expires it (then the key's next request is
//! a first one again, as in Nginx); each shard is swept so at most every
//! [`SWEEP_EVERY_MS`], by the requests that use it and by
//! [`RateTable::sweep`] for the rest. A full shard that such a sweep cannot
//! free drops its least recently used quarter, as Nginx drops its oldest
//! node when its zone is full: a flood of new addresses (an IPv6 client
//! has 2^64 of them) costs only those keys their history, never memory
//! without bound. The in-flight counts drop a key when its count is back
//! to 0, so they hold at most one key per request in flight.
//!
//! Keys are [`LimitKey`]s, so a limit on another key than the client's
//! address (the verified buyer, with `[auth]`) is another variant in
//! another table, checked after this one as Nginx checks a second zone.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Shards of each table: enough that workers rarely meet on one lock.
pub const SHARDS: usize = 64;

/// Keys one shard of a [`RateTable`] holds at most: 4,096 × 64 shards =
/// 262,144 clients tracked at once (about 60 bytes each: ~16 MB at most),
/// as an Nginx zone of 16m holds about as many.
pub const SHARD_CAPACITY: usize = 4096;

/// How often a shard is swept of drained keys, at most.
pub const SWEEP_EVERY_MS: u64 = 10_000;

/// How long a key stays after its bucket drains (Nginx's 60 s).
pub const IDLE_MS: u64 = 60_000;

/// What a limit counts by: the client's address, and with `[auth]` also
/// the verified buyer (the two share the tables; a key of one kind never
/// equals a key of the other).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// The client's address, after `trusted_proxies` (Nginx's
    /// `$binary_remote_addr` behind realip).
    Addr(IpAddr),
    /// The buyer a verified token names: one buyer spread over many
    /// addresses (a botnet, a carrier's NAT pool the other way round) is
    /// still one bucket.
    Buyer(Box<str>),
}

/// A rate limit's parameters, in the bucket's units (thousandths of a
/// request): what `limit_rate`, `limit_burst` and `limit_nodelay` become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// The drain, in thousandths of a request per second (at least 1).
    pub rate: u64,
    /// The excess allowed, in thousandths of a request.
    pub burst: u64,
    /// The excess that goes on without a delay: `burst` with `nodelay`,
    /// 0 without.
    pub delay: u64,
}

impl Bucket {
    /// The bucket of `limit_rate` (see `RateLimit`).
    pub fn of(rate: &crate::config::RateLimit) -> Bucket {
        let burst = u64::from(rate.burst) * 1000;
        Bucket {
            rate: rate.milli_per_second().max(1),
            burst,
            delay: if rate.nodelay { burst } else { 0 },
        }
    }
}

/// A rate limit's verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateVerdict {
    /// Within the rate, or the burst with `nodelay`: go on.
    Pass,
    /// Within the burst, without `nodelay`: go on after this many ms.
    Delay(u64),
    /// Over the burst: refused; it would pass in this many ms.
    Reject(u64),
}

/// One key's bucket: Nginx's `excess` and `last`.
#[derive(Debug, Clone, Copy)]
struct Entry {
    excess: u64,
    last: u64,
}

impl Entry {
    /// The excess once drained at `rate` for `ms`, not below 0.
    fn drained(&self, rate: u64, ms: u64) -> u64 {
        self.excess.saturating_sub(rate.saturating_mul(ms) / 1000)
    }
}

/// A lock with the rest of its cache line to itself, so that two shards'
/// locks never share a line between cores.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// Every per-client limit's state and counters, kept across reloads (as
/// Nginx keeps a zone whose size and key stay): the tables, and what they
/// refused or delayed, for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct Limits {
    /// `limit_rate`'s buckets, by client address.
    pub rate: RateTable,
    /// `limit_conns`'s counts, by client address.
    pub conns: ConnTable,
    /// 429s for being over `limit_rate` and `limit_burst`.
    pub rate_rejected: AtomicU64,
    /// 429s for having `limit_conns` requests in flight.
    pub conns_rejected: AtomicU64,
    /// Requests delayed to the rate (without `limit_nodelay`).
    pub delayed: AtomicU64,
}

/// One shard of a [`RateTable`].
#[derive(Debug, Default)]
struct RateShard {
    map: HashMap<LimitKey, Entry>,
    /// When this shard was last swept, in `now_ms`.
    swept: u64,
}

impl RateShard {
    /// Drops the keys idle for [`IDLE_MS`] whose bucket has drained at
    /// `rate` (Nginx's expiry rule).
    fn expire(&mut self, now: u64, rate: u64) {
        self.swept = now;
        self.map.retain(|_, e| {
            let ms = now.saturating_sub(e.last);
            ms < IDLE_MS || e.drained(rate, ms) > 0
        });
        if self.map.capacity() > 4 * self.map.len().max(64) {
            self.map.shrink_to_fit();
        }
    }

    /// Room for one more key: expire, and when that frees too little,
    /// drop the least recently used quarter.
    fn make_room(&mut self, now: u64, rate: u64) {
        self.expire(now, rate);
        if self.map.len() + SHARD_CAPACITY / 8 <= SHARD_CAPACITY {
            return;
        }
        let mut lasts: Vec<u64> = self.map.values().map(|e| e.last).collect();
        let cut = lasts.len() / 4;
        let (_, &mut oldest_kept, _) = lasts.select_nth_unstable(cut);
        let below = lasts.iter().filter(|&&l| l < oldest_kept).count();
        let mut room = cut - below;
        // Ties at the cut go too until the quarter is made, no more.
        self.map.retain(|_, e| {
            if e.last < oldest_kept {
                return false;
            }
            if e.last == oldest_kept && room > 0 {
                room -= 1;
                return false;
            }
            true
        });
    }
}

/// The request rate of every key seen lately, as one Nginx
/// `limit_req_zone` keeps it.
#[derive(Debug)]
pub struct RateTable {
    shards: Box<[Padded<Mutex<RateShard>>]>,
    hasher: RandomState,
    /// Keys dropped to make room (not expired): a sign the table is too
    /// small for the clients it sees.
    pub evicted: AtomicU64,
}

impl Default for RateTable {
    fn default() -> Self {
        RateTable {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
            hasher: RandomState::new(),
            evicted: AtomicU64::new(0),
        }
    }
}

/// Locks `m`; a panic elsewhere while it was held leaves counts that are
/// still counts, so a poisoned lock is used as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RateTable {
    fn shard(&self, key: &LimitKey) -> &Mutex<RateShard> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        &self.shards[i].0
    }

    /// One request of `key` at `now` (ms on a monotonic clock), under
    /// `bucket`: Nginx's lookup and account for one zone.
    pub fn check(&self, key: &LimitKey, bucket: Bucket, now: u64) -> RateVerdict {
        let excess = {
            let mut shard = lock(self.shard(key));
            if now.saturating_sub(shard.swept) >= SWEEP_EVERY_MS {
                shard.expire(now, bucket.rate);
            }
            match shard.map.get_mut(key) {
                Some(e) => {
                    let ms = now.saturating_sub(e.last);
                    // Nginx adds the request before it clamps at 0: a
                    // bucket drained for longer than one request's worth
                    // starts again from 0, not 1000.
                    let drain = bucket.rate.saturating_mul(ms) / 1000;
                    let excess = (e.excess + 1000).saturating_sub(drain);
                    if excess > bucket.burst {
                        let wait = (excess - bucket.burst) * 1000;
                        return RateVerdict::Reject(wait.div_ceil(bucket.rate));
                    }
                    e.excess = excess;
                    if ms > 0 {
                        e.last = now;
                    }
                    excess
                }
                None => {
                    if shard.map.len() >= SHARD_CAPACITY {
                        let before = shard.map.len();
                        shard.make_room(now, bucket.rate);
                        let dropped = before - shard.map.len();
                        self.evicted.fetch_add(dropped as u64, Ordering::Relaxed);
                    }
                    shard.map.insert(
                        key.clone(),
                        Entry {
                            excess: 0,
                            last: now,
                        },
                    );
                    0
                }
            }
        };
        if excess <= bucket.delay {
            RateVerdict::Pass
        } else {
            RateVerdict::Delay((excess - bucket.delay) * 1000 / bucket.rate)
        }
    }

    /// Sweeps every shard not swept for [`SWEEP_EVERY_MS`] (one lock at a
    /// time): the keys of clients that left go even when nobody else
    /// comes to their shard.
    pub fn sweep(&self, bucket: Option<Bucket>, now: u64) {
        for s in self.shards.iter() {
            let mut shard = lock(&s.0);
            if now.saturating_sub(shard.swept) < SWEEP_EVERY_MS {
                continue;
            }
            match bucket {
                Some(b) => shard.expire(now, b.rate),
                // No rate in force any more: nothing to keep.
                None => {
                    shard.map = HashMap::new();
                    shard.swept = now;
                }
            }
        }
    }

    /// Keys held now (for `/status` and `/metrics`).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.0).map.len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One shard of a [`ConnTable`]; an [`Arc`] so that a [`ConnSlot`] can
/// outlive the request's borrow of the table (hyper's response body does).
type ConnShard = Arc<Padded<Mutex<HashMap<LimitKey, u32>>>>;

/// The requests in flight per key, as one Nginx `limit_conn_zone` counts
/// them: a key is there only while it has one.
#[derive(Debug)]
pub struct ConnTable {
    shards: Box<[ConnShard]>,
    hasher: RandomState,
}

impl Default for ConnTable {
    fn default() -> Self {
        ConnTable {
            shards: (0..SHARDS).map(|_| Arc::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

/// One request in flight for its key: the count goes down when it drops.
#[derive(Debug)]
pub struct ConnSlot {
    shard: ConnShard,
    key: LimitKey,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut map = lock(&self.shard.0);
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl ConnTable {
    /// A slot for one more request of `key`, or `None` when it has `max`
    /// in flight already.
    pub fn acquire(&self, key: &LimitKey, max: u32) -> Option<ConnSlot> {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        {
            let mut map = lock(&shard.0);
            let n = map.entry(key.clone()).or_insert(0);
            if *n >= max {
                if *n == 0 {
                    map.remove(key);
                }
                return None;
            }
            *n += 1;
        }
        Some(ConnSlot {
            shard: shard.clone(),
            key: key.clone(),
        })
    }

    /// Keys with a request in flight now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.0).len()).sum()
    }

    /// Whether no request is counted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The requests in flight of `key` (for tests and `/status`).
    pub fn count(&self, key: &LimitKey) -> u32 {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        lock(&shard.0).get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last: u8) -> LimitKey {
        LimitKey::Addr(IpAddr::from([10, 0, 0, last]))
    }

    fn bucket(rate: u32, burst: u32, nodelay: bool) -> Bucket {
        Bucket::of(&crate::config::RateLimit {
            requests: rate,
            per_minute: false,
            burst,
            nodelay,
        })
    }

    /// A transcription of Nginx's lookup and account for one zone, as
    /// arithmetic only, to hold the table to: (excess, last, new) → the
    /// verdict and the entry after.
    fn nginx_step(
        entry: Option<(i64, i64)>,
        now: i64,
        rate: i64,
        burst: i64,
        delay: i64,
    ) -> (Option<(i64, i64)>, &'static str, i64) {
        let (excess, stored) = match entry {
            None => (0, Some((0, now))),
            Some((ex, last)) => {
                let ms = (now - last).max(0);
                let excess = (ex - rate * ms / 1000 + 1000).max(0);
                if excess > burst {
                    return (entry, "busy", 0);
                }
                (excess, Some((excess, if ms != 0 { now } else { last })))
            }
        };
        if excess <= delay {
            (stored, "pass", 0)
        } else {
            (stored, "delay", (excess - delay) * 1000 / rate)
        }
    }

    #[test]
    fn the_bucket_follows_nginx_step_by_step() {
        // Arrival times (ms) with bursts, gaps and ties, under three
        // settings; the table and the transcription must agree at each.
        let mut times = Vec::new();
        let mut t = 5;
        for i in 0..400u64 {
            t += match i % 7 {
                0 => 0,
                1 => 1,
                2 => 13,
                3 => 0,
                4 => 49,
                5 => 250,
                _ => 3,
            };
            times.push(t);
        }
        for (rate, burst, nodelay) in [(20, 40, true), (10, 5, false), (3, 0, false)] {
            let b = bucket(rate, burst, nodelay);
            let table = RateTable::default();
            let mut entry = None;
            for &now in &times {
                let got = table.check(&key(1), b, now);
                let (next, what, ms) = nginx_step(
                    entry,
                    now as i64,
                    b.rate as i64,
                    b.burst as i64,
                    b.delay as i64,
                );
                entry = next;
                match (got, what) {
                    (RateVerdict::Pass, "pass") | (RateVerdict::Reject(_), "busy") => {}
                    (RateVerdict::Delay(d), "delay") => assert_eq!(d as i64, ms, "at {now}"),
                    other => panic!("at {now} ms under {rate}r/s burst {burst}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_hundred_at_once_then_twenty_a_second_later() {
        // 20r/s, burst 40, nodelay: the first is free, 40 more fill the
        // burst; a second later 20 have drained.
        let b = bucket(20, 40, true);
        let table = RateTable::default();
        let passed = |t: u64| {
            (0..100)
                .filter(|_| table.check(&key(1), b, t) == RateVerdict::Pass)
                .count()
        };
        assert_eq!(passed(1000), 41);
        assert_eq!(
            (0..20)
                .filter(|_| table.check(&key(1), b, 2000) == RateVerdict::Pass)
                .count(),
            20
        );
        // Another client is not limited by the first.
        assert_eq!(table.check(&key(2), b, 2000), RateVerdict::Pass);
        // Over the burst: refused, passing again after one request's drain.
        assert_eq!(table.check(&key(1), b, 2000), RateVerdict::Reject(50));
    }

    #[test]
    fn without_nodelay_requests_are_spaced_at_the_rate() {
        let b = bucket(10, 3, false);
        let table = RateTable::default();
        let verdicts: Vec<_> = (0..5).map(|_| table.check(&key(1), b, 100)).collect();
        assert_eq!(
            verdicts,
            [
                RateVerdict::Pass,
                RateVerdict::Delay(100),
                RateVerdict::Delay(200),
                RateVerdict::Delay(300),
                RateVerdict::Reject(100),
            ]
        );
    }

    #[test]
    fn memory_is_bounded_whatever_the_number_of_clients() {
        let b = bucket(1, 5, true);
        let table = RateTable::default();
        // A million clients in ten seconds: none has drained, so none
        // expires; the table still holds no more than its capacity.
        for i in 0..1_000_000u32 {
            let ip = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i) + 1));
            table.check(&LimitKey::Addr(ip), b, u64::from(i / 100_000));
        }
        assert!(table.len() <= SHARDS * SHARD_CAPACITY, "{}", table.len());
        assert!(table.evicted.load(Ordering::Relaxed) > 0);
        // A minute after they drained, a sweep drops them all.
        table.sweep(Some(b), 10 + 5_000 + IDLE_MS + SWEEP_EVERY_MS);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn a_recent_key_survives_expiry_and_eviction_takes_the_oldest() {
        let b = bucket(1, 100, true);
        let mut shard = RateShard::default();
        for i in 0..SHARD_CAPACITY as u64 {
            let ip = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i)));
            shard.map.insert(
                LimitKey::Addr(ip),
                Entry {
                    excess: 50_000,
                    last: i,
                },
            );
        }
        shard.make_room(SHARD_CAPACITY as u64, b.rate);
        assert_eq!(shard.map.len(), SHARD_CAPACITY - SHARD_CAPACITY / 4);
        assert!(
            shard
                .map
                .values()
                .all(|e| e.last >= (SHARD_CAPACITY / 4) as u64)
        );
    }

    #[test]
    fn in_flight_counts_go_down_and_leave_no_key() {
        let t = ConnTable::default();
        let a: Vec<_> = (0..3).filter_map(|_| t.acquire(&key(1), 3)).collect();
        assert_eq!(a.len(), 3);
        assert!(t.acquire(&key(1), 3).is_none());
        assert!(t.acquire(&key(2), 3).is_some());
        assert_eq!(t.count(&key(1)), 3);
        drop(a);
        assert_eq!(t.count(&key(1)), 0);
        assert!(t.is_empty());
        assert!(t.acquire(&key(1), 0).is_none());
        assert!(t.is_empty());
    }
}
