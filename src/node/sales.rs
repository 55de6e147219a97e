//! [`Sales`]: every sale one node sells, each sale's [`Node`] state made on
//! the first request for it and dropped once the sale is idle (see
//! docs/design/many-sales.md), so a node's memory and polls grow with the
//! sales it is asked about, not with the sales of the file.
//!
//! With one sale the node is made at start, as it always was: its watch
//! and sweep run from the start, every route means that sale, and it is
//! never dropped.
//!
//! With several, a reload ([`Sales::reload`]) adds and removes sales: an
//! added one is sold from its first request, one kept keeps its state, a
//! removed one is a 404 from then on and its state is dropped (its orders
//! stay in the store, readable with `spike stock` and `orders tail`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::task::AbortHandle;

use super::state::Node;
use super::store::Stores;
use crate::config::{Config, ConfigError};

/// Every sale one node sells, and the state of those it was asked about.
pub struct Sales {
    name: String,
    /// The file, for a node's settings and `[auth]` when a sale's state is
    /// made; replaced by a reload. (`None`: the one sale's node was made
    /// by the caller, see [`Sales::single`].)
    config: ArcSwapOption<Config>,
    /// Where a sale's store comes from (`None` as `config`).
    stores: Option<Arc<Stores>>,
    /// One slot per sale of the file, by event; swapped whole by a reload.
    slots: ArcSwap<HashMap<String, Arc<Slot>>>,
    /// The event of the one sale, when the file has one: what a request
    /// that names no sale means. Fixed at start: a reload that would make
    /// one sale several (or several one) is refused, since it changes
    /// what `/buy/ticket` and an order id mean.
    only: Option<String>,
    /// That one sale's state once made: the purchase that names no sale
    /// finds it without a lookup.
    only_node: std::sync::OnceLock<Arc<Node>>,
    /// One reload at a time.
    reloading: Mutex<()>,
}

/// One sale at one node: its state once made, and the tasks that keep it.
struct Slot {
    /// The state, `None` until the first request and after it is dropped.
    node: ArcSwapOption<Node>,
    /// Held while the state is made or dropped: one of each at a time.
    making: tokio::sync::Mutex<()>,
    /// The state's poll, sweep and idle check, stopped with it.
    tasks: Mutex<Vec<AbortHandle>>,
    /// Dropped after this long without a request (`None`: never, a
    /// single sale).
    idle_after: Option<Duration>,
}

impl Slot {
    fn new(idle_after: Option<Duration>) -> Arc<Slot> {
        Arc::new(Slot {
            node: ArcSwapOption::empty(),
            making: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            idle_after,
        })
    }

    fn stop_tasks(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

/// Why a request's sale could not be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// It named none and there are several: the events to choose from.
    Unnamed(String),
    /// No sale of that event here.
    Unknown,
    /// Its state could not be made (the file changed under it).
    Broken(String),
}

impl Sales {
    /// Node `name` of `config`, selling every sale of the file from
    /// `stores`. With one sale, its state is made now.
    pub async fn new(
        config: &Config,
        name: &str,
        stores: Arc<Stores>,
    ) -> Result<Arc<Sales>, ConfigError> {
        config.node(name)?;
        let several = config.sales.len() > 1;
        let sales = Arc::new(Sales {
            name: name.to_string(),
            config: ArcSwapOption::from_pointee(config.clone()),
            stores: Some(stores),
            slots: ArcSwap::from_pointee(
                config
                    .sales
                    .iter()
                    .map(|s| (s.event.clone(), Slot::new(several.then_some(s.idle_after))))
                    .collect(),
            ),
            only: config.sale().map(|s| s.event.clone()),
            only_node: std::sync::OnceLock::new(),
            reloading: Mutex::new(()),
        });
        if let Some(only) = sales.only.clone() {
            sales.get(&only).await.map_err(|m| ConfigError::Lacks {
                path: config.path.clone(),
                message: format!("the sale {only}: {m:?}"),
            })?;
        }
        Ok(sales)
    }

    /// One sale's node, made already (`spike::node::build`): how the tests
    /// and a single-sale `spike up` serve a node they hold.
    pub fn single(node: Arc<Node>) -> Arc<Sales> {
        let event = node.event().to_string();
        let slot = Slot::new(None);
        slot.node.store(Some(node.clone()));
        let sales = Arc::new(Sales {
            name: node.name().to_string(),
            config: ArcSwapOption::empty(),
            stores: None,
            slots: ArcSwap::from_pointee(std::iter::once((event.clone(), slot.clone())).collect()),
            only: Some(event),
            only_node: std::sync::OnceLock::new(),
            reloading: Mutex::new(()),
        });
        sales.start(&slot, &node);
        sales
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many sales the node sells.
    pub fn len(&self) -> usize {
        self.slots.load().len()
    }

    /// Whether it sells none.
    pub fn is_empty(&self) -> bool {
        self.slots.load().is_empty()
    }

    /// The one sale's state, when the node sells one sale.
    pub fn only(&self) -> Option<Arc<Node>> {
        self.only_node.get().cloned()
    }

    /// The stores the node sells from (`None` for [`Sales::single`]).
    pub fn stores(&self) -> Option<&Arc<Stores>> {
        self.stores.as_ref()
    }

    /// The state of the sale of `event` (`None`: the request named no
    /// sale, which means the only one), made on this first request.
    pub async fn find(&self, event: Option<&str>) -> Result<Arc<Node>, Missing> {
        if event.is_none()
            && let Some(node) = self.only_node.get()
        {
            return Ok(node.clone());
        }
        match event.or(self.only.as_deref()) {
            Some(e) => self.get(e).await,
            None => Err(Missing::Unnamed(
                self.config
                    .load()
                    .as_ref()
                    .map(|c| c.events_listed())
                    .unwrap_or_default(),
            )),
        }
    }

    /// The state of the sale of `event`, made if this is the first ask
    /// (or the first since it was dropped): one lookup and two atomic
    /// loads once made.
    pub async fn get(&self, event: &str) -> Result<Arc<Node>, Missing> {
        let slot = {
            let slots = self.slots.load();
            let slot = slots.get(event).ok_or(Missing::Unknown)?;
            if let Some(node) = &*slot.node.load() {
                node.touch();
                return Ok(node.clone());
            }
            slot.clone()
        };
        let _making = slot.making.lock().await;
        if let Some(node) = slot.node.load_full() {
            node.touch();
            return Ok(node);
        }
        // A reload may have removed the sale while this waited.
        if !self
            .slots
            .load()
            .get(event)
            .is_some_and(|s| Arc::ptr_eq(s, &slot))
        {
            return Err(Missing::Unknown);
        }
        let (Some(stores), Some(config)) = (&self.stores, self.config.load_full()) else {
            return Err(Missing::Unknown);
        };
        let sale = stores.config(event).ok_or(Missing::Unknown)?;
        let store = stores.get(event).await.ok_or(Missing::Unknown)?;
        let node = super::build_for(&config, &sale, &self.name, store)
            .map_err(|e| Missing::Broken(e.to_string()))?;
        node.touch();
        slot.node.store(Some(node.clone()));
        self.start(&slot, &node);
        tracing::debug!(node = %self.name, event, "a sale's state made on its request");
        Ok(node)
    }

    /// The sales' states made so far, in no order.
    pub fn made(&self) -> Vec<Arc<Node>> {
        self.slots
            .load()
            .values()
            .filter_map(|s| s.node.load_full())
            .collect()
    }

    /// Starts `node`'s poll of its sale, its expiry sweep and (with
    /// several sales) the check that drops it once idle.
    fn start(&self, slot: &Arc<Slot>, node: &Arc<Node>) {
        if self.only.as_deref() == Some(node.event()) {
            let _ = self.only_node.set(node.clone());
        }
        let watch = tokio::spawn(node.clone().watch());
        let sweep = tokio::spawn(super::sweep::sweep(Arc::downgrade(node)));
        let mut tasks = slot.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.push(watch.abort_handle());
        tasks.push(sweep.abort_handle());
        if let Some(idle_after) = slot.idle_after {
            let idle = tokio::spawn(drop_when_idle(
                Arc::downgrade(slot),
                Arc::downgrade(node),
                idle_after,
            ));
            tasks.push(idle.abort_handle());
        }
    }

    /// Stops every made sale's background work (the node stops).
    pub fn stop(&self) {
        for slot in self.slots.load().values() {
            slot.stop_tasks();
        }
    }

    /// Puts `config`'s `[auth]` keys in force on every sale, made or not
    /// (a reload of the file); an error leaves the keys in force.
    pub fn set_auth(&self, config: &Config) -> Result<(), ConfigError> {
        let mut fresh = Vec::new();
        for node in self.made() {
            let auth = super::authority_for(config, node.event())?;
            fresh.push((node, auth));
        }
        for (node, auth) in fresh {
            node.set_auth(auth);
        }
        if let Some(old) = self.config.load_full() {
            let mut kept = Config::clone(&old);
            kept.auth.clone_from(&config.auth);
            self.config.store(Some(Arc::new(kept)));
        }
        Ok(())
    }

    /// Puts a reloaded file in force: its `[auth]` keys (see
    /// [`Sales::set_auth`]) and, with several sales, its list of sales:
    /// an added sale is sold from its first request (its store must be
    /// started: `spike stock init --event`, which `spike up` runs), a kept
    /// one keeps its state, a removed one answers 404 from now on and its
    /// state is dropped (its lease given back). A file that makes one sale
    /// several, or several one, is refused: that changes what a purchase
    /// that names no sale and an order id mean, so it needs a restart of
    /// the fleet. Returns the events added; an error changes nothing.
    pub fn reload(&self, config: &Config) -> Result<Vec<String>, ConfigError> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        refuse_one_to_several(self.only.is_some(), config)?;
        if self.only.is_some() || self.stores.is_none() {
            // One sale: its state was made at start, from the file then.
            self.set_auth(config)?;
            return Ok(Vec::new());
        }
        config.node(&self.name)?;
        for e in config.sales.iter().map(|s| s.event.as_str()) {
            super::authority_for(config, e)?;
        }
        self.set_auth(config)?;
        let old = self.slots.load_full();
        let mut added = Vec::new();
        let next: HashMap<String, Arc<Slot>> = config
            .sales
            .iter()
            .map(|s| {
                let slot = match old.get(&s.event) {
                    Some(kept) => kept.clone(),
                    None => {
                        added.push(s.event.clone());
                        Slot::new(Some(s.idle_after))
                    }
                };
                (s.event.clone(), slot)
            })
            .collect();
        let removed: Vec<Arc<Slot>> = old
            .iter()
            .filter(|(e, _)| !next.contains_key(*e))
            .map(|(_, s)| s.clone())
            .collect();
        if let Some(stores) = &self.stores {
            stores.set_sales(&config.sales);
        }
        self.config.store(Some(Arc::new(config.clone())));
        self.slots.store(Arc::new(next));
        for slot in removed {
            slot.stop_tasks();
            if let Some(node) = slot.node.swap(None) {
                tracing::info!(node = %self.name, event = %node.event(), "sale removed by the reload: no longer sold here");
                tokio::spawn(async move { node.retire().await });
            }
        }
        if !added.is_empty() {
            tracing::info!(node = %self.name, added = added.len(), "sales added by the reload are on sale from their first request");
        }
        Ok(added)
    }
}

/// The refusal of a reload that would make a fleet of one sale a fleet of
/// several, or the other way: what `/buy/ticket` without `event` and an
/// order id mean changes with it, so it takes a restart of the fleet.
pub fn refuse_one_to_several(one_now: bool, config: &Config) -> Result<(), ConfigError> {
    let one_next = config.sales.len() == 1;
    if one_now == one_next || config.sales.is_empty() {
        return Ok(());
    }
    Err(ConfigError::Lacks {
        path: config.path.clone(),
        message: if one_now {
            "the file now has several sales ([[sale]]) where the running fleet sells one: that changes what /buy/ticket without `event` and an order id mean (EPOCH-SEQ becomes EVENT:EPOCH-SEQ), so it takes a restart of the fleet; a file that has several already adds sales by reload".into()
        } else {
            "the file now has one sale where the running fleet sells several: that changes what /buy/ticket without `event` and an order id mean, so it takes a restart of the fleet (or keep a second [[sale]])".into()
        },
    })
}

/// Drops a sale's state at a node once nobody asked about the sale for
/// `idle_after` (and, when it has a payment window, for that window more:
/// reservations this node made have expired and been swept by then), and
/// no purchase or lease request is under way: the slot forgets the state
/// (the next request makes a new one), its poll and sweep stop, and its
/// lease goes back to the store.
async fn drop_when_idle(slot: Weak<Slot>, node: Weak<Node>, idle_after: Duration) {
    let every = (idle_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::time::sleep(every).await;
        let (Some(slot), Some(node)) = (slot.upgrade(), node.upgrade()) else {
            return;
        };
        let quiet = idle_after + node.pay_within().unwrap_or_default();
        if node.idle_for() < quiet || node.busy() {
            continue;
        }
        {
            let _making = slot.making.lock().await;
            let current = slot.node.load();
            if !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &node)) {
                return;
            }
            // A request that came in since the check keeps it.
            if node.idle_for() < quiet {
                continue;
            }
            slot.node.store(None);
        }
        // Every task of this state but this one, which ends here.
        let tasks: Vec<AbortHandle> = slot
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        let me = tokio::task::try_id();
        for t in tasks {
            if Some(t.id()) != me {
                t.abort();
            }
        }
        node.retire().await;
        tracing::debug!(node = %node.name(), event = %node.event(), idle = ?node.idle_for(), "an idle sale's state dropped");
        return;
    }
}
