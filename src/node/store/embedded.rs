//! The sale kept in process memory, for a whole sale on one machine with no
//! Redis. It follows `deduct.lua` rule for rule, so every correctness test
//! runs against both stores.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Outcome, Snapshot, now_millis};
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
}

#[derive(Default)]
struct Sale {
    initialised: bool,
    total: u64,
    sold: u64,
    epoch: String,
    buyers: HashMap<String, u64>,
    buyer_order: HashMap<String, String>,
    orders: HashMap<String, Order>,
}

/// The in-process store. The lock is a plain mutex held for a few map
/// operations and never across an `.await`.
pub struct EmbeddedStore {
    event: String,
    configured_total: u64,
    per_user_limit: u64,
    sale: Mutex<Sale>,
}

impl EmbeddedStore {
    /// An empty, uninitialised sale.
    pub fn new(sale: &SaleConfig) -> EmbeddedStore {
        EmbeddedStore {
            event: sale.event.clone(),
            configured_total: sale.total,
            per_user_limit: sale.per_user_limit,
            sale: Mutex::new(Sale::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sale> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way the next purchase could not cope with, so keep selling.
        self.sale.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// See `deduct.lua`.
    pub fn deduct(&self, buyer: &str, node: &str) -> Outcome {
        let mut s = self.lock();
        if !s.initialised {
            return Outcome::NoSale;
        }
        if !buyer.is_empty() && self.per_user_limit > 0 {
            let held = s.buyers.get(buyer).copied().unwrap_or(0);
            if held >= self.per_user_limit {
                return Outcome::AlreadyBought {
                    order: s.buyer_order.get(buyer).cloned().unwrap_or_default(),
                };
            }
        }
        if s.sold + 1 > s.total {
            return Outcome::SoldOut;
        }
        s.sold += 1;
        let sold = s.sold;
        let id = format!("{}-{}", s.epoch, sold);
        if !buyer.is_empty() {
            *s.buyers.entry(buyer.to_string()).or_insert(0) += 1;
            s.buyer_order.insert(buyer.to_string(), id.clone());
        }
        s.orders.insert(
            id.clone(),
            Order {
                id: id.clone(),
                buyer: buyer.to_string(),
                node: node.to_string(),
                time: now_millis(),
            },
        );
        Outcome::Sold { order: id, sold }
    }

    /// See `init.lua`.
    pub fn init(&self, force: bool) -> bool {
        let mut s = self.lock();
        if (s.sold > 0 || !s.orders.is_empty()) && !force {
            return false;
        }
        *s = Sale {
            initialised: true,
            total: self.configured_total,
            epoch: now_millis().to_string(),
            ..Sale::default()
        };
        true
    }

    /// See [`Store::holders`](super::Store::holders).
    pub fn holders(&self, per_user_limit: u64) -> super::Holders {
        let s = self.lock();
        s.buyers
            .iter()
            .filter(|&(_, &held)| per_user_limit > 0 && held >= per_user_limit)
            .filter_map(|(b, _)| Some((b.clone(), s.buyer_order.get(b)?.clone())))
            .collect()
    }

    /// See `audit.lua`.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot {
            event: self.event.clone(),
            initialised: s.initialised,
            total: s.total,
            sold: s.sold,
            remaining: s.total.saturating_sub(s.sold),
            orders: s.orders.len() as u64,
            buyers: s.buyers.len() as u64,
            tickets_held: s.buyers.values().sum(),
            most_by_one_buyer: s.buyers.values().copied().max().unwrap_or(0),
            epoch: s.epoch.clone(),
        }
    }

    /// The order with this id, for tests that check every 200 has its order.
    pub fn order(&self, id: &str) -> Option<Order> {
        self.lock().orders.get(id).cloned()
    }
}
