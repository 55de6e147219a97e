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
        let from = if self.advanced_at > 0 {
            self.advanced_at
        } else {
            sale.opens_at_ms
        };
        let elapsed = now.saturating_sub(from).min(1000);
        if before_opening || sale.shut != 0 || free == 0 {
            self.advanced_at = now;
        } else {
            match admit {
                LineAdmit::Rate(per_second) => {
                    let add = self.carry + f64::from(per_second) * elapsed as f64 / 1000.0;
                    let whole = add.floor();
                    let next = (self.serving + whole as u64).min(joined);
                    self.carry = if next == joined { 0.0 } else { add - whole };
                    self.serving = next;
                }
                LineAdmit::FollowStock { pass_ttl_ms } => {
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
