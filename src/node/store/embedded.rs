//! The sale kept in process memory, for a whole sale on one machine with no
//! Redis. It follows `deduct.lua` and `orders.lua` rule for rule (leases,
//! idempotency keys, epochs, the stored limit, reservations and their
//! expiry), so every correctness test runs against both stores. It has no
//! event stream: that is the hand-off to other services, which need Redis.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use tokio::time::Instant;

use super::holders::{HolderCell, HolderSeed, Holders};
use super::model::{
    ANY_BUYER, LineAdmit, LineState, OrderAnswer, OrderOp, OrderRecord, OrderState, Outcome,
    Purchase, Reply, SaleState, Shut, StoreError, Swept, ticket_number,
};
use super::snapshot::{BuyerTally, Snapshot};
use crate::config::SaleConfig;

#[derive(Default)]
struct Sale {
    initialised: bool,
    total: u64,
    sold: u64,
    seq: u64,
    epoch: u64,
    limit: u64,
    held: u64,
    most: u64,
    pay_within: u64,
    reserved: u64,
    paid: u64,
    released: u64,
    /// Tickets beyond the first of each order created, paid, released
    /// (see `deduct.lua`).
    extra: u64,
    extra_paid: u64,
    extra_released: u64,
    buyers: HashMap<String, u64>,
    buyer_order: HashMap<String, String>,
    orders: HashMap<String, OrderRecord>,
    /// holder → (units, expires at, Unix ms).
    leases: HashMap<String, (u64, u64)>,
    keys: HashMap<String, String>,
    /// (pay_by, order id) of every reservation.
    due: BTreeSet<(u64, String)>,
    /// When the sale opens and closes, Unix ms (0: no such moment). (No
    /// `spike stock` reaches this store, so it is never paused or closed
    /// by hand.)
    opens_at: u64,
    closes_at: u64,
    /// The waiting room's line, which starts anew with the sale.
    line: super::line::MemLine,
}

impl Sale {
    fn numbers(&self) -> super::line::SaleNumbers {
        super::line::SaleNumbers {
            epoch: self.epoch,
            total: self.total,
            sold: self.sold,
            released: self.released,
            reserved: self.reserved,
            opens_at_ms: self.opens_at,
            shut: match self.shut(now_millis()) {
                Some(Shut::Closed { .. }) => 2,
                Some(Shut::Paused) => 1,
                _ => 0,
            },
        }
    }

    fn state(&self) -> SaleState {
        SaleState {
            epoch: self.epoch,
            limit: self.limit,
            sold: self.sold,
            total: self.total,
            released: self.released,
            pay_within_ms: self.pay_within,
            moments: self.moments(),
        }
    }

    /// See `release` in `orders.lua`.
    fn release(&mut self, id: &str, state: OrderState, now: u64) {
        let Some(o) = self.orders.get_mut(id) else {
            return;
        };
        o.state = Some(state);
        match state {
            OrderState::Cancelled => o.cancelled_at = Some(now),
            _ => o.expired_at = Some(now),
        }
        let (buyer, pay_by, n) = (o.buyer.clone(), o.pay_by.unwrap_or(0), o.quantity());
        self.due.remove(&(pay_by, id.to_string()));
        self.sold -= n;
        self.reserved -= n;
        self.released += n;
        self.extra_released += n - 1;
        if !buyer.is_empty() {
            if let Some(h) = self.buyers.get_mut(&buyer) {
                *h = h.saturating_sub(n);
                if *h == 0 {
                    self.buyers.remove(&buyer);
                }
            }
            self.held -= n;
        }
    }

    /// See `expire_if_due` in `orders.lua`.
    fn expire_if_due(&mut self, id: &str, now: u64) {
        let due = self.orders.get(id).is_some_and(|o| {
            o.state == Some(OrderState::Reserved) && o.pay_by.is_some_and(|p| now >= p)
        });
        if due {
            self.release(id, OrderState::Expired, now);
        }
    }

    fn moments(&self) -> crate::protocol::Moments {
        crate::protocol::Moments {
            opens_at_ms: self.opens_at,
            closes_at_ms: self.closes_at,
            paused: false,
            closed: false,
        }
    }

    /// See `shut` in `deduct.lua`.
    fn shut(&self, now: u64) -> Option<Shut> {
        self.moments().shut_at(now)
    }

    fn drop_expired(&mut self, now: u64) {
        self.leases
            .retain(|_, &mut (units, expires)| units > 0 && expires > now);
    }

    fn leased(&self) -> u64 {
        self.leases.values().map(|l| l.0).sum()
    }

    fn units(&self, holder: &str) -> u64 {
        self.leases.get(holder).map_or(0, |l| l.0)
    }

    fn renew(&mut self, holder: &str, now: u64, ttl: u64) {
        let l = self.leases.entry(holder.to_string()).or_insert((0, 0));
        l.1 = now + ttl;
    }

    /// The largest lease other than `holder`'s, with its units.
    fn largest_other(&self, holder: &str) -> Option<(String, u64)> {
        self.leases
            .iter()
            .filter(|(h, l)| h.as_str() != holder && l.0 > 0)
            .max_by_key(|(_, l)| l.0)
            .map(|(h, l)| (h.clone(), l.0))
    }

    /// See `take_unit` and the purchase of several in `deduct.lua`.
    fn take_units(&mut self, holder: &str, n: u64, brought: u64, now: u64, ttl: u64) {
        let mut own = self.units(holder);
        let k = own.min(brought).min(n);
        let mut need = n - k;
        let free = self.total.saturating_sub(self.sold + self.leased());
        own -= k;
        need -= free.min(need);
        while need > 0 {
            let Some((victim, most)) = self.largest_other(holder) else {
                break;
            };
            let g = most.min(need);
            if let Some(l) = self.leases.get_mut(&victim) {
                l.0 -= g;
            }
            need -= g;
        }
        own -= own.min(need);
        self.renew(holder, now, ttl);
        if let Some(l) = self.leases.get_mut(holder) {
            l.0 = own;
        }
    }

    /// See `grant` in `deduct.lua`.
    fn grant(&mut self, holder: &str, want: u64, now: u64, ttl: u64) -> u64 {
        self.renew(holder, now, ttl);
        if want == 0 || self.sold >= self.total {
            return 0;
        }
        let free = self.total.saturating_sub(self.sold + self.leased());
        let g = if free > 0 {
            want.min((free / 2).max(1))
        } else if let Some((victim, most)) = self.largest_other(holder) {
            let g = want.min(most.div_ceil(2));
            if let Some(l) = self.leases.get_mut(&victim) {
                l.0 -= g;
            }
            g
        } else {
            0
        };
        if let Some(l) = self.leases.get_mut(holder) {
            l.0 += g;
        }
        g
    }
}

/// The in-process store. The lock is a plain mutex held for a few map
/// operations and never across an `.await`.
pub struct EmbeddedStore {
    event: String,
    configured_total: u64,
    configured_limit: u64,
    /// `[sale] pay_within` in ms (0: final sales).
    pay_within: u64,
    /// `[sale] opens_at` and `closes_at`, Unix ms (0: none).
    opens_at: u64,
    closes_at: u64,
    lease_ttl: u64,
    sale: Mutex<Sale>,
    /// The holders its nodes keep (one copy for the process).
    cell: std::sync::Arc<HolderCell>,
}

impl EmbeddedStore {
    /// An empty, uninitialised sale.
    pub fn new(sale: &SaleConfig) -> EmbeddedStore {
        EmbeddedStore {
            event: sale.event.clone(),
            configured_total: sale.total,
            configured_limit: sale.per_user_limit,
            pay_within: sale.pay_within.map_or(0, |d| d.as_millis() as u64),
            opens_at: sale.opens_at_ms.unwrap_or(0),
            closes_at: sale.closes_at_ms.unwrap_or(0),
            lease_ttl: sale.lease_ttl.as_millis() as u64,
            sale: Mutex::new(Sale::default()),
            cell: HolderCell::new(),
        }
    }

    /// See [`Store::holder_cell`](super::Store::holder_cell).
    pub fn holder_cell(&self) -> std::sync::Arc<HolderCell> {
        self.cell.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sale> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way the next purchase could not cope with, so keep selling.
        self.sale.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// See `deduct.lua`.
    pub fn deduct(&self, p: Purchase<'_>) -> Result<Reply<Outcome>, StoreError> {
        let now = now_millis();
        let mut s = self.lock();
        if !s.initialised {
            return Err(StoreError::NoSale);
        }
        if Instant::now() >= p.give_up {
            return Err(StoreError::TooLate);
        }
        s.drop_expired(now);
        let quantity = p.quantity.max(1);
        let held = |s: &Sale| s.buyers.get(p.buyer).copied().unwrap_or(0);
        // A balancer's key kept with its order alone, as `deduct.lua`
        // keeps it: found through its buyer's one order.
        let by_buyer =
            p.made_key && s.limit == 1 && s.pay_within == 0 && !p.buyer.is_empty() && quantity == 1;
        let seen = if p.key.is_empty() {
            None
        } else if by_buyer {
            s.buyer_order
                .get(p.buyer)
                .filter(|id| s.orders.get(*id).and_then(|o| o.key.as_deref()) == Some(p.key))
        } else {
            s.keys.get(p.key)
        };
        let answer = if p.buyer.is_empty() && s.limit > 0 {
            Outcome::BuyerRequired
        } else if let Some(order) = seen {
            match s.orders.get(order).filter(|o| o.buyer == p.buyer) {
                Some(o) if o.quantity() != quantity => Outcome::KeyOtherQuantity {
                    quantity: o.quantity(),
                },
                Some(o) => Outcome::Replayed {
                    order: order.clone(),
                    sold: ticket_number(order),
                    // Past its deadline a reservation is expired, swept
                    // or not (as `deduct.lua` answers).
                    state: match (o.state(), o.pay_by) {
                        (OrderState::Reserved, Some(p)) if now >= p => OrderState::Expired,
                        (state, _) => state,
                    },
                    pay_by: o.pay_by,
                },
                None => Outcome::KeyConflict,
            }
        } else if !p.buyer.is_empty() && s.limit > 0 && held(&s) >= s.limit {
            Outcome::AlreadyBought {
                order: s.buyer_order.get(p.buyer).cloned().unwrap_or_default(),
            }
        } else if let Some(shut) = s.shut(now) {
            return Err(StoreError::NotSelling(shut, s.state()));
        } else if s.sold + 1 > s.total {
            Outcome::SoldOut
        } else if !p.buyer.is_empty() && s.limit > 0 && held(&s) + quantity > s.limit {
            Outcome::OverLimit {
                may_buy: s.limit.saturating_sub(held(&s)),
            }
        } else if s.sold + quantity > s.total {
            Outcome::TooFewLeft {
                remaining: s.total - s.sold,
            }
        } else {
            // One ticket takes the holder's own unit first whatever it
            // brought (`take_unit` in `deduct.lua`).
            let brought = if quantity == 1 { 1 } else { p.units };
            s.take_units(p.holder, quantity, brought, now, self.lease_ttl);
            s.sold += quantity;
            s.seq += quantity;
            s.extra += quantity - 1;
            let seq = s.seq;
            let id = format!("{}-{}", s.epoch, seq);
            let pay_by = (s.pay_within > 0).then(|| now + s.pay_within);
            if let Some(pay_by) = pay_by {
                s.due.insert((pay_by, id.clone()));
                s.reserved += quantity;
            }
            if !p.buyer.is_empty() {
                let held = {
                    let h = s.buyers.entry(p.buyer.to_string()).or_insert(0);
                    *h += quantity;
                    *h
                };
                s.buyer_order.insert(p.buyer.to_string(), id.clone());
                s.held += quantity;
                s.most = s.most.max(held);
            }
            if !p.key.is_empty() && !by_buyer {
                s.keys.insert(p.key.to_string(), id.clone());
            }
            s.orders.insert(
                id.clone(),
                OrderRecord {
                    id: id.clone(),
                    buyer: p.buyer.to_string(),
                    node: p.node.to_string(),
                    time: now,
                    key: (!p.key.is_empty()).then(|| p.key.to_string()),
                    quantity: (quantity > 1).then_some(quantity),
                    state: pay_by.map(|_| OrderState::Reserved),
                    pay_by,
                    paid_at: None,
                    cancelled_at: None,
                    expired_at: None,
                    payment_ref: None,
                },
            );
            Outcome::Sold {
                order: id,
                sold: seq,
                pay_by,
            }
        };
        Ok(Reply {
            answer,
            sale: s.state(),
            lease: s.units(p.holder),
        })
    }

    /// See the lease requests of `deduct.lua`.
    pub fn lease(&self, holder: &str, want: u64) -> Result<Reply<u64>, StoreError> {
        let now = now_millis();
        let mut s = self.lock();
        if !s.initialised {
            return Err(StoreError::NoSale);
        }
        s.drop_expired(now);
        if let Some(shut) = s.shut(now) {
            return Err(StoreError::NotSelling(shut, s.state()));
        }
        let granted = s.grant(holder, want, now, self.lease_ttl);
        Ok(Reply {
            answer: granted,
            sale: s.state(),
            lease: s.units(holder),
        })
    }

    /// See the lease given back (`'r'`) of `deduct.lua`.
    pub fn give_back(&self, holder: &str) -> Result<(), StoreError> {
        let mut s = self.lock();
        if !s.initialised {
            return Err(StoreError::NoSale);
        }
        s.leases.remove(holder);
        Ok(())
    }

    /// See `orders.lua`.
    pub fn order(
        &self,
        op: OrderOp,
        id: &str,
        buyer: &str,
        payment_ref: &str,
    ) -> Result<Reply<OrderAnswer>, StoreError> {
        let now = now_millis();
        let mut s = self.lock();
        if !s.initialised {
            return Err(StoreError::NoSale);
        }
        let answer = match s.orders.get(id) {
            None => OrderAnswer::NotFound,
            Some(o) if !o.buyer.is_empty() && o.buyer != buyer && buyer != ANY_BUYER => {
                OrderAnswer::NotTheBuyer
            }
            Some(o) if o.state.is_none() => OrderAnswer::Final(o.clone()),
            Some(_) => {
                s.expire_if_due(id, now);
                let state = s.orders.get(id).map(OrderRecord::state);
                let done = match (op, state) {
                    (OrderOp::Pay, Some(OrderState::Reserved)) => {
                        let (pay_by, n) = s
                            .orders
                            .get(id)
                            .map_or((0, 1), |o| (o.pay_by.unwrap_or(0), o.quantity()));
                        s.due.remove(&(pay_by, id.to_string()));
                        s.reserved -= n;
                        s.paid += n;
                        s.extra_paid += n - 1;
                        if let Some(o) = s.orders.get_mut(id) {
                            o.state = Some(OrderState::Paid);
                            o.paid_at = Some(now);
                            if !payment_ref.is_empty() {
                                o.payment_ref = Some(payment_ref.to_string());
                            }
                        }
                        true
                    }
                    (OrderOp::Pay, Some(OrderState::Paid)) => true,
                    (OrderOp::Cancel, Some(OrderState::Reserved)) => {
                        s.release(id, OrderState::Cancelled, now);
                        true
                    }
                    (OrderOp::Cancel, Some(OrderState::Cancelled)) => true,
                    (OrderOp::Get, _) => true,
                    _ => false,
                };
                match s.orders.get(id).cloned() {
                    Some(o) if done => OrderAnswer::Done(o),
                    Some(o) => OrderAnswer::Conflict(o),
                    None => OrderAnswer::NotFound,
                }
            }
        };
        Ok(Reply {
            answer,
            sale: s.state(),
            lease: 0,
        })
    }

    /// See the sweep of `orders.lua`.
    pub fn sweep(&self, most: u64) -> Result<Reply<Swept>, StoreError> {
        let now = now_millis();
        let mut s = self.lock();
        if !s.initialised {
            return Err(StoreError::NoSale);
        }
        let due: Vec<String> = s
            .due
            .iter()
            .take_while(|(pay_by, _)| *pay_by <= now)
            .take(most as usize)
            .map(|(_, id)| id.clone())
            .collect();
        for id in &due {
            s.expire_if_due(id, now);
        }
        Ok(Reply {
            answer: Swept {
                expired: due.len() as u64,
                more: due.len() as u64 == most,
            },
            sale: s.state(),
            lease: 0,
        })
    }

    /// See `init.lua`.
    pub fn init(&self, force: bool) -> Option<u64> {
        let mut s = self.lock();
        if (s.sold > 0 || !s.orders.is_empty()) && !force {
            return None;
        }
        let epoch = now_millis().max(s.epoch + 1);
        *s = Sale {
            initialised: true,
            total: self.configured_total,
            limit: self.configured_limit,
            pay_within: self.pay_within,
            opens_at: self.opens_at,
            closes_at: self.closes_at,
            epoch,
            ..Sale::default()
        };
        Some(epoch)
    }

    /// See [`Store::holders`](super::Store::holders): read in one step,
    /// so current as of the sale's state then.
    pub fn holders(&self, epoch: u64, per_user_limit: u64, seed: HolderSeed) -> Holders {
        let s = self.lock();
        let mut holders = Holders::new(epoch, per_user_limit, seed);
        for key in s.keys.keys() {
            holders.put_key(key);
        }
        if per_user_limit > 0 {
            for (buyer, &held) in &s.buyers {
                if held >= per_user_limit
                    && let Some(order) = s.buyer_order.get(buyer)
                {
                    holders.put_buyer(buyer, order);
                }
            }
        }
        holders.current_as_of(&s.state());
        holders
    }

    /// See `line.lua`'s join; `None` before `stock init`.
    pub fn line_join(&self, buyer: &str, lottery: u64, secret: &str) -> Option<LineState> {
        let now = now_millis();
        let mut s = self.lock();
        if !s.initialised {
            return None;
        }
        let numbers = s.numbers();
        Some(s.line.join(&numbers, now, buyer, lottery, secret))
    }

    /// See `line.lua`'s advance; `None` before `stock init`.
    pub fn line_advance(&self, admit: LineAdmit, secret: &str) -> Option<LineState> {
        let now = now_millis();
        let mut s = self.lock();
        if !s.initialised {
            return None;
        }
        let numbers = s.numbers();
        Some(s.line.advance(&numbers, now, admit, secret))
    }

    /// See `show.lua`.
    pub fn snapshot(&self) -> Snapshot {
        let now = now_millis();
        let mut s = self.lock();
        s.drop_expired(now);
        Snapshot {
            event: self.event.clone(),
            initialised: s.initialised,
            total: s.total,
            sold: s.sold,
            remaining: s.total.saturating_sub(s.sold),
            orders: s.orders.len() as u64,
            buyers: s.buyers.len() as u64,
            tickets_held: s.held,
            most_by_one_buyer: s.most,
            epoch: if s.initialised { s.epoch } else { 0 },
            per_user_limit: s.limit,
            leased: s.leased(),
            keys: s.keys.len() as u64,
            seq: s.seq,
            pay_within_ms: s.pay_within,
            reserved: s.reserved,
            paid: s.paid,
            released: s.released,
            due: s.due.len() as u64,
            events: None,
            events_max: 0,
            // No stream here, whatever the file says (config warns).
            stream: false,
            opens_at_ms: s.opens_at,
            closes_at_ms: s.closes_at,
            paused: false,
            controls: 0,
            closed: false,
            finished: s.initialised && s.sold >= s.total && s.reserved == 0,
            extra: s.extra,
            extra_paid: s.extra_paid,
            extra_released: s.extra_released,
        }
    }

    /// Every buyer's tickets added up (the audit's full pass).
    pub fn tally_buyers(&self) -> BuyerTally {
        let s = self.lock();
        BuyerTally {
            tickets_held: s.buyers.values().sum(),
            most_by_one_buyer: s.buyers.values().copied().max().unwrap_or(0),
        }
    }

    /// The order with this id, for tests that check every 200 has its order.
    pub fn record(&self, id: &str) -> Option<OrderRecord> {
        self.lock().orders.get(id).cloned()
    }

    /// Units `holder`'s live lease holds (for tests that check no unit of a
    /// node's lease was lost).
    pub fn lease_units(&self, holder: &str) -> u64 {
        let mut s = self.lock();
        s.drop_expired(now_millis());
        s.units(holder)
    }
}

/// Milliseconds since the Unix epoch, for the embedded store's clock.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
