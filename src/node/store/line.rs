//! The waiting room's line kept in process memory, for the embedded store
//! (`spike up` without Redis): the rules of `line.lua`, in Rust. The two
//! are tested against the same expectations (`tests/waiting_room.rs` runs
//! on both stores).

use std::collections::{HashMap, VecDeque};

use super::model::{LineAdmit, LineState};

/// The sale's numbers a line move reads.
#[derive(Debug, Clone, Copy)]
pub struct SaleNumbers {
    pub epoch: u64,
    pub total: u64,
    pub sold: u64,
    pub released: u64,
    pub reserved: u64,
    pub opens_at_ms: u64,
    /// 0 selling, 1 paused, 2 closed.
    pub shut: u8,
}

/// One sale's line (see `line.lua` for the rules).
#[derive(Default)]
pub struct MemLine {
    epoch: u64,
    /// The opening has passed: the pre-queue is closed for good.
    opened: bool,
    secret: String,
    /// Buyer → lottery number, before the opening.
    pre: HashMap<String, u64>,
    /// The pre-queue ranked, once the opening has passed.
    ranked: Option<HashMap<String, u64>>,
    seq: u64,
    serving: u64,
    carry: f64,
    advanced_at: u64,
    who: HashMap<String, u64>,
    /// (at, serving, sales) for `follow_stock`.
    log: VecDeque<(u64, u64, u64)>,
    /// (seq, at): when positions were handed out.
    marks: VecDeque<(u64, u64)>,
    /// (at, serving): the mark's moves under a rate in the last second,
    /// the first the mark a second ago (see `line.lua`).
    window: VecDeque<(u64, u64)>,
}

impl MemLine {
    /// Before the opening, unless the line has opened already (a clock
    /// that steps back does not reopen the pre-queue).
    fn before_opening(&mut self, sale: &SaleNumbers, now: u64) -> bool {
        let before = sale.opens_at_ms > 0 && now < sale.opens_at_ms && !self.opened;
        if sale.opens_at_ms > 0 && !before {
            self.opened = true;
        }
        before
    }

    fn start(&mut self, sale: &SaleNumbers, secret: &str) {
        if self.epoch != sale.epoch || self.secret.is_empty() {
            *self = MemLine {
                epoch: sale.epoch,
                secret: secret.to_string(),
                ..MemLine::default()
            };
        }
    }

    fn answer(&self, sale: &SaleNumbers, now: u64, last: u64) -> LineState {
        LineState {
            epoch: self.epoch,
            secret: self.secret.clone(),
            pre: self.pre.len() as u64,
            seq: self.seq,
            serving: self.serving,
            now_ms: now,
            opens_at_ms: sale.opens_at_ms,
            free: sale.total.saturating_sub(sale.sold),
            reserved: sale.reserved,
            shut: sale.shut,
            oldest_wait_ms: last,
            position: last,
            // One process: one balancer.
            balancers: 1,
        }
    }

    /// See `line.lua`'s join.
    pub fn join(
        &mut self,
        sale: &SaleNumbers,
        now: u64,
        buyer: &str,
        lottery: u64,
        secret: &str,
    ) -> LineState {
        self.start(sale, secret);
        if self.before_opening(sale, now) {
            self.pre.entry(buyer.to_string()).or_insert(lottery);
            return self.answer(sale, now, 0);
        }
        if let Some(&pos) = self.who.get(buyer) {
            return self.answer(sale, now, pos);
        }
        let pos = match self.rank().get(buyer) {
            Some(&rank) => rank,
            None => {
                self.seq += 1;
                if self
                    .marks
                    .back()
                    .is_none_or(|&(_, at)| now.saturating_sub(at) >= 100)
                {
                    self.marks.push_back((self.seq, now));
                }
                self.pre.len() as u64 + self.seq
            }
        };
        self.who.insert(buyer.to_string(), pos);
        self.answer(sale, now, pos)
    }

    /// The pre-queue's positions, ranked by lottery number once (ties by
    /// buyer, as Redis's sorted set breaks them).
    fn rank(&mut self) -> &HashMap<String, u64> {
        self.ranked.get_or_insert_with(|| {
            let mut all: Vec<(&u64, &String)> = self.pre.iter().map(|(b, n)| (n, b)).collect();
            all.sort();
            all.into_iter()
                .enumerate()
                .map(|(i, (_, b))| (b.clone(), i as u64 + 1))
                .collect()
        })
    }

    /// See `line.lua`'s advance.
    pub fn advance(
        &mut self,
        sale: &SaleNumbers,
        now: u64,
        admit: LineAdmit,
        secret: &str,
    ) -> LineState {
        self.start(sale, secret);
        let before_opening = self.before_opening(sale, now);
        let free = sale.total.saturating_sub(sale.sold);
        let joined = self.pre.len() as u64 + self.seq;
        // Time accrues from the opening, not from the last move before it.
        let from = self.advanced_at.max(sale.opens_at_ms);
        let elapsed = now.saturating_sub(from).min(1000);
        if before_opening || sale.shut != 0 || free == 0 {
            self.advanced_at = now;
            self.carry = 0.0;
        } else {
            match admit {
                LineAdmit::Rate(per_second) => {
                    let rate = u64::from(per_second);
                    let add = self.carry + rate as f64 * elapsed as f64 / 1000.0;
                    let mut whole = add.floor() as u64;
                    // N over any second (see `line.lua`): at most N past
                    // where the mark stood a second ago.
                    if self.window.is_empty() {
                        self.window.push_back((0, self.serving));
                    }
                    while self.window.len() > 1 && self.window[1].0 + 1000 <= now {
                        self.window.pop_front();
                    }
                    let base = self.window.front().map_or(self.serving, |&(_, s)| s);
                    let room = (base + rate).saturating_sub(self.serving);
                    let mut carry = add - whole as f64;
                    if whole > room {
                        carry = (add - room as f64).min((rate as f64 / 5.0).max(1.0));
                        whole = room;
                    }
                    let next = (self.serving + whole).min(joined);
                    if next == joined {
                        carry = 0.0;
                    }
                    if next != self.serving {
                        self.window.push_back((now, next));
                    }
                    self.carry = carry;
                    self.serving = next;
                }
                LineAdmit::FollowStock { pass_ttl_ms } => {
                    // The rate's window starts afresh if the rule turns
                    // to a rate.
                    self.window.clear();
                    let sales = sale.sold + sale.released;
                    if self.log.is_empty() {
                        // The mark before any admission: the first ones
                        // count as in flight.
                        self.log.push_back((now, self.serving, sales));
                    }
                    while self.log.len() > 1 && self.log[1].0 <= now.saturating_sub(pass_ttl_ms) {
                        self.log.pop_front();
                    }
                    let (base_serving, base_sales) = self
                        .log
                        .front()
                        .map_or((self.serving, sales), |&(_, s, l)| (s, l));
                    let in_flight = (self.serving - base_serving)
                        .saturating_sub(sales.saturating_sub(base_sales));
                    let margin = ((free + sale.reserved).div_ceil(10)).max(5);
                    let add = (free + margin).saturating_sub(in_flight);
                    let next = (self.serving + add).min(joined);
                    if next != self.serving
                        || self
                            .log
                            .back()
                            .is_none_or(|&(at, _, _)| now.saturating_sub(at) >= 1000)
                    {
                        self.log.push_back((now, next, sales));
                    }
                    self.serving = next;
                }
            }
            self.advanced_at = now;
        }
        let pre = self.pre.len() as u64;
        let mut oldest = 0;
        if self.serving < joined && !before_opening {
            if self.serving < pre {
                oldest = now.saturating_sub(sale.opens_at_ms);
            } else {
                let waiting = self.serving - pre + 1;
                while self.marks.len() > 1 && self.marks[1].0 <= waiting {
                    self.marks.pop_front();
                }
                if let Some(&(_, at)) = self.marks.front() {
                    oldest = now.saturating_sub(at);
                }
            }
        }
        self.answer(sale, now, oldest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two balancers moving one line every 205 ms each (the balancer's
    /// tick), late by up to 60 ms now and then: the mark never moves more
    /// than the rate within any second (every window, to the millisecond),
    /// from the opening on, and keeps close to the rate over the run.
    #[test]
    fn a_rate_bounds_every_second_of_the_mark() {
        const RATE: u32 = 100;
        let sale = SaleNumbers {
            epoch: 1,
            total: 10_000,
            sold: 0,
            released: 0,
            reserved: 0,
            opens_at_ms: 10_000,
            shut: 0,
        };
        let mut line = MemLine::default();
        for i in 0..5_000u64 {
            line.join(
                &sale,
                5_000 + i / 10,
                &format!("b{i}"),
                i * 7_919 % 1_000_003,
                "s",
            );
        }
        let mut seed = 12_345u64;
        let mut jitter = || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let r = (seed >> 33) % 100;
            if r < 70 { r % 4 } else { r - 40 }
        };
        let mut ticks: Vec<u64> = Vec::new();
        for (phase, b) in [(9_003u64, 0), (9_071, 1)] {
            let _ = b;
            let mut t = phase;
            while t < 30_000 {
                ticks.push(t + jitter());
                t += 205;
            }
        }
        ticks.sort_unstable();
        let mut moves = vec![(0u64, 0u64)];
        for &t in &ticks {
            let s = line.advance(&sale, t, LineAdmit::Rate(RATE), "s").serving;
            if s != moves.last().map_or(0, |m| m.1) {
                moves.push((t, s));
            }
        }
        let mark = |at: u64| {
            moves
                .iter()
                .take_while(|m| m.0 <= at)
                .last()
                .map_or(0, |m| m.1)
        };
        for a in 9_000..29_000 {
            let moved = mark(a + 1_000) - mark(a);
            assert!(moved <= u64::from(RATE), "{moved} in ({a}, {}]", a + 1_000);
        }
        // 20 s after the opening: at least nine tenths of the rate's worth.
        let admitted = mark(30_000);
        assert!(admitted >= 20 * u64::from(RATE) * 9 / 10, "{admitted}");
        assert!(admitted <= 20 * u64::from(RATE) + 1, "{admitted}");
    }
}
