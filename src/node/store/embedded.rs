//! The sale kept in process memory, for a whole sale on one machine with no
//! Redis. It follows `deduct.lua` rule for rule (leases, idempotency keys,
//! epochs, the stored limit), so every correctness test runs against both
//! stores.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

use super::{
    BuyerTally, Holders, Outcome, Purchase, Reply, SaleState, Snapshot, StoreError, now_millis,
};
use crate::config::SaleConfig;

/// One order, as `deduct.lua` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The order id.
    pub id: String,
    /// Who bought ('' when anonymous).
    pub buyer: String,
    /// The node that sold it.
    pub node: String,
    /// Unix milliseconds.
    pub time: u64,
    /// The purchase's Idempotency-Key ('' when none).
    pub key: String,
}

#[derive(Default)]
struct Sale {
    initialised: bool,
    total: u64,
    sold: u64,
    epoch: u64,
    limit: u64,
    held: u64,
    most: u64,
    buyers: HashMap<String, u64>,
    buyer_order: HashMap<String, String>,
    orders: HashMap<String, Order>,
    /// holder → (units, expires at, Unix ms).
    leases: HashMap<String, (u64, u64)>,
    keys: HashMap<String, String>,
}

impl Sale {
    fn state(&self) -> SaleState {
        SaleState {
            epoch: self.epoch,
            limit: self.limit,
            sold: self.sold,
            total: self.total,
        }
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

    /// See `take_unit` in `deduct.lua`.
    fn take_unit(&mut self, holder: &str, now: u64, ttl: u64) {
        let own = self.units(holder);
        if own > 0 {
            if let Some(l) = self.leases.get_mut(holder) {
                l.0 -= 1;
            }
        } else if self.total.saturating_sub(self.sold + self.leased()) == 0
            && let Some((victim, _)) = self.largest_other(holder)
            && let Some(l) = self.leases.get_mut(&victim)
        {
            l.0 -= 1;
        }
        self.renew(holder, now, ttl);
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
    lease_ttl: u64,
    sale: Mutex<Sale>,
}

impl EmbeddedStore {
    /// An empty, uninitialised sale.
    pub fn new(sale: &SaleConfig) -> EmbeddedStore {
        EmbeddedStore {
            event: sale.event.clone(),
            configured_total: sale.total,
            configured_limit: sale.per_user_limit,
            lease_ttl: sale.lease_ttl.as_millis() as u64,
            sale: Mutex::new(Sale::default()),
        }
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
        let answer = if p.buyer.is_empty() && s.limit > 0 {
            Outcome::BuyerRequired
        } else if let Some(order) = (!p.key.is_empty()).then(|| s.keys.get(p.key)).flatten() {
            let same_buyer = s.orders.get(order).is_some_and(|o| o.buyer == p.buyer);
            if same_buyer {
                Outcome::Replayed {
                    order: order.clone(),
                    sold: ticket_number(order),
                }
            } else {
                Outcome::KeyConflict
            }
        } else if !p.buyer.is_empty()
            && s.limit > 0
            && s.buyers.get(p.buyer).copied().unwrap_or(0) >= s.limit
        {
            Outcome::AlreadyBought {
                order: s.buyer_order.get(p.buyer).cloned().unwrap_or_default(),
            }
        } else if s.sold + 1 > s.total {
            Outcome::SoldOut
        } else {
            s.take_unit(p.holder, now, self.lease_ttl);
            s.sold += 1;
            let sold = s.sold;
            let id = format!("{}-{}", s.epoch, sold);
            if !p.buyer.is_empty() {
                let held = {
                    let h = s.buyers.entry(p.buyer.to_string()).or_insert(0);
                    *h += 1;
                    *h
                };
                s.buyer_order.insert(p.buyer.to_string(), id.clone());
                s.held += 1;
                s.most = s.most.max(held);
            }
            if !p.key.is_empty() {
                s.keys.insert(p.key.to_string(), id.clone());
            }
            s.orders.insert(
                id.clone(),
                Order {
                    id: id.clone(),
                    buyer: p.buyer.to_string(),
                    node: p.node.to_string(),
                    time: now,
                    key: p.key.to_string(),
                },
            );
            Outcome::Sold { order: id, sold }
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
        let granted = s.grant(holder, want, now, self.lease_ttl);
        Ok(Reply {
            answer: granted,
            sale: s.state(),
            lease: s.units(holder),
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
            epoch,
            ..Sale::default()
        };
        Some(epoch)
    }

    /// See [`Store::holders`](super::Store::holders).
    pub fn holders(&self, per_user_limit: u64) -> Holders {
        let s = self.lock();
        Holders {
            buyers: s
                .buyers
                .iter()
                .filter(|&(_, &held)| per_user_limit > 0 && held >= per_user_limit)
                .filter_map(|(b, _)| Some((b.clone(), s.buyer_order.get(b)?.clone())))
                .collect(),
            keys: s
                .keys
                .iter()
                .filter_map(|(k, id)| {
                    Some((k.clone(), (id.clone(), s.orders.get(id)?.buyer.clone())))
                })
                .collect(),
        }
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
            epoch: if s.initialised {
                s.epoch.to_string()
            } else {
                String::new()
            },
            per_user_limit: s.limit,
            leased: s.leased(),
            keys: s.keys.len() as u64,
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
    pub fn order(&self, id: &str) -> Option<Order> {
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

/// The ticket's number: the part of an order id after the epoch.
pub fn ticket_number(order: &str) -> u64 {
    order
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
