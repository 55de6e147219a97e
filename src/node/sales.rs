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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

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

/// One sale at one node: its state once made.
struct Slot {
    /// The state, `None` until the first request and after it is dropped.
    node: ArcSwapOption<Node>,
    /// Held while the state is made or dropped: one of each at a time.
    making: tokio::sync::Mutex<()>,
    /// A reload removed the sale: a state being made is not kept.
    removed: AtomicBool,
    /// Dropped after this long without a request (`None`: never, a
    /// single sale).
    idle_after: Option<Duration>,
}

impl Slot {
    fn new(idle_after: Option<Duration>) -> Arc<Slot> {
        Arc::new(Slot {
            node: ArcSwapOption::empty(),
            making: tokio::sync::Mutex::new(()),
            removed: AtomicBool::new(false),
            idle_after,
        })
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
        if slot.removed.load(Ordering::SeqCst) {
            return Err(Missing::Unknown);
        }
        let Some(stores) = &self.stores else {
            return Err(Missing::Unknown);
        };
        let sale = stores.config(event).ok_or(Missing::Unknown)?;
        let store = stores.get(event).await.ok_or(Missing::Unknown)?;
        // The file as it is now, after the wait for the store.
        let config = self.config.load_full().ok_or(Missing::Unknown)?;
        let node = super::build_for(&config, &sale, &self.name, store)
            .map_err(|e| Missing::Broken(e.to_string()))?;
        pause::at("built", event).await;
        // A reload that removed the sale meanwhile (it takes `making` to
        // drop the state, so it cannot miss one stored after this).
        if slot.removed.load(Ordering::SeqCst) {
            return Err(Missing::Unknown);
        }
        node.touch();
        slot.node.store(Some(node.clone()));
        self.start(&slot, &node);
        // A reload that changed `[auth]` since the file was read put its
        // keys on the states it saw: this one may not have been among them.
        if let Some(now) = self.config.load_full()
            && !Arc::ptr_eq(&now, &config)
            && let Ok(auth) = super::authority_for(&now, event)
        {
            node.set_auth(auth);
        }
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
        node.keep_task(watch.abort_handle());
        node.keep_task(sweep.abort_handle());
        if let Some(idle_after) = slot.idle_after {
            let idle = tokio::spawn(drop_when_idle(
                Arc::downgrade(slot),
                Arc::downgrade(node),
                idle_after,
            ));
            node.keep_task(idle.abort_handle());
        }
    }

    /// Stops every made sale's background work (the node stops).
    pub fn stop(&self) {
        for slot in self.slots.load().values() {
            if let Some(node) = slot.node.load_full() {
                node.stop_tasks();
            }
        }
    }

    /// Puts `config`'s `[auth]` keys in force on every sale, made or not
    /// (a reload of the file); an error leaves the keys in force.
    pub fn set_auth(&self, config: &Config) -> Result<(), ConfigError> {
        for node in self.made() {
            super::authority_for(config, node.event())?;
        }
        // The keys go in the file first, then on the states made: a state
        // made meanwhile either is among those or reads the file after it
        // was stored (see [`Sales::get`]).
        if let Some(old) = self.config.load_full() {
            let mut kept = Config::clone(&old);
            kept.auth.clone_from(&config.auth);
            self.config.store(Some(Arc::new(kept)));
        }
        for node in self.made() {
            if let Ok(auth) = super::authority_for(config, node.event()) {
                node.set_auth(auth);
            }
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
        let (next, added) =
            super::sale_map::keep_or_make(&old, &config.sales, |s| Slot::new(Some(s.idle_after)));
        let removed: Vec<Arc<Slot>> = old
            .iter()
            .filter(|(e, _)| !next.contains_key(*e))
            .map(|(_, s)| s.clone())
            .collect();
        for slot in &removed {
            slot.removed.store(true, Ordering::SeqCst);
        }
        if let Some(stores) = &self.stores {
            stores.set_sales(&config.sales);
        }
        self.config.store(Some(Arc::new(config.clone())));
        self.slots.store(Arc::new(next));
        let name = self.name.clone();
        for slot in removed {
            // Under `making`: a state a request is making now is stored
            // before this looks, or not made at all (`removed` is set).
            let name = name.clone();
            tokio::spawn(async move {
                let _making = slot.making.lock().await;
                if let Some(node) = slot.node.swap(None) {
                    tracing::info!(node = %name, event = %node.event(), "sale removed by the reload: no longer sold here");
                    node.stop_tasks();
                    node.retire().await;
                }
            });
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
        pause::at("dropped", node.event()).await;
        // Every task of this state but this one, which ends here; a state
        // made since keeps its own.
        node.stop_tasks();
        node.retire().await;
        tracing::debug!(node = %node.name(), event = %node.event(), idle = ?node.idle_for(), "an idle sale's state dropped");
        return;
    }
}

/// Test-only pauses at the points where a request meets an idle drop or a
/// reload, so that a test runs the one inside the other's window; nothing
/// outside the lib tests.
#[cfg(not(test))]
pub(super) mod pause {
    #[inline(always)]
    pub async fn at(_point: &'static str, _event: &str) {}
}

#[cfg(test)]
pub(super) mod pause {
    use std::sync::{Arc, Mutex};
    use tokio::sync::Semaphore;

    /// One pause: `reached` gets a permit when the code is there, and it
    /// goes on once `go` has one.
    pub struct Gate {
        pub reached: Semaphore,
        pub go: Semaphore,
    }

    type Gates = Vec<(&'static str, String, Arc<Gate>)>;
    static GATES: Mutex<Gates> = Mutex::new(Vec::new());

    /// Pauses the next pass at `point` for the sale of `event` (once).
    pub fn set(point: &'static str, event: &str) -> Arc<Gate> {
        let gate = Arc::new(Gate {
            reached: Semaphore::new(0),
            go: Semaphore::new(0),
        });
        GATES.lock().unwrap_or_else(|p| p.into_inner()).push((
            point,
            event.to_string(),
            gate.clone(),
        ));
        gate
    }

    pub async fn at(point: &'static str, event: &str) {
        let gate = {
            let mut gates = GATES.lock().unwrap_or_else(|p| p.into_inner());
            let i = gates.iter().position(|(p, e, _)| *p == point && e == event);
            i.map(|i| gates.remove(i).2)
        };
        if let Some(g) = gate {
            g.reached.add_permits(1);
            if let Ok(p) = g.go.acquire().await {
                p.forget();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A node `n1` of the sales `events` on the embedded store, idle after
    /// 300 ms; `tail` ends the file (an `[auth]`).
    fn file(events: &[&str], tail: &str) -> Config {
        let mut text = String::new();
        for e in events {
            text.push_str(&format!("[[sale]]\nevent = \"{e}\"\ntotal = 10\n\n"));
        }
        text.push_str("[[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:1\"\n\n");
        text.push_str(tail);
        let mut config = Config::parse(Path::new("test.toml"), &text).expect("valid file");
        // Below what a file may say (two `lease_ttl`s), so that the test
        // sees drops in a second, not in a minute.
        for s in &mut config.sales {
            s.idle_after = Duration::from_millis(300);
        }
        config
    }

    async fn sales_of(config: &Config) -> Arc<Sales> {
        let stores = Stores::open(&config.sales, None).await.expect("stores");
        Sales::new(config, "n1", stores).await.expect("sales")
    }

    async fn reached(gate: &pause::Gate) {
        tokio::time::timeout(Duration::from_secs(10), gate.reached.acquire())
            .await
            .expect("the pause is reached")
            .expect("open")
            .forget();
    }

    /// B1: a request that makes a sale's state again while the idle drop
    /// of the one before is under way (the slot emptied, the old state's
    /// tasks not yet stopped) keeps its own tasks: its idle check still
    /// runs, and drops it in its turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_made_during_an_idle_drop_keeps_its_tasks() {
        let config = file(&["b1-a", "b1-b"], "");
        let sales = sales_of(&config).await;
        let gate = pause::set("dropped", "b1-a");
        let first = sales.get("b1-a").await.expect("made");
        reached(&gate).await;
        let second = sales.get("b1-a").await.expect("made again");
        assert!(!Arc::ptr_eq(&first, &second), "a new state");
        drop(first);
        gate.go.add_permits(1);
        let (second, made) = (Arc::downgrade(&second), second);
        drop(made);
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while !sales.made().is_empty() {
            assert!(
                tokio::time::Instant::now() < until,
                "the new state's idle check was stopped with the old state's tasks"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Dropped, its tasks gone: nothing holds it.
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while second.upgrade().is_some() {
            assert!(
                tokio::time::Instant::now() < until,
                "the dropped state leaked"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// B2: a reload that removes a sale while a request is making its
    /// state: the request finds no sale, and no state is left behind with
    /// its tasks (polling, renewing a lease nobody gives back).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sale_removed_while_its_state_is_made_is_not_sold_or_kept() {
        let config = file(&["b2-a", "b2-b"], "");
        let sales = sales_of(&config).await;
        let gate = pause::set("built", "b2-b");
        let asking = sales.clone();
        let asked =
            tokio::spawn(async move { asking.get("b2-b").await.map(|n| Arc::downgrade(&n)) });
        reached(&gate).await;
        sales.reload(&file(&["b2-a", "b2-c"], "")).expect("reload");
        gate.go.add_permits(1);
        let answer = asked.await.expect("get");
        let kept = answer.as_ref().ok().and_then(|w| w.upgrade()).is_some();
        assert!(
            matches!(answer, Err(Missing::Unknown)),
            "a removed sale's state was made (and kept: {kept})"
        );
    }

    /// B4: a reload that changes `[auth]` while a request is making a
    /// sale's state: the state made checks buyers with the new keys.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_made_during_a_reload_has_the_reloaded_keys() {
        use base64::Engine as _;
        let config = file(&["b4-a", "b4-b"], "");
        let sales = sales_of(&config).await;
        let gate = pause::set("built", "b4-a");
        let asking = sales.clone();
        let asked = tokio::spawn(async move { asking.get("b4-a").await });
        reached(&gate).await;
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let keyed = file(
            &["b4-a", "b4-b"],
            &format!("[auth]\nbuyer_keys = [\"k1:hs256:{key}\"]\n"),
        );
        sales.reload(&keyed).expect("reload");
        gate.go.add_permits(1);
        let node = asked.await.expect("get").expect("made");
        assert!(
            node.auth().is_some(),
            "a state made during the reload checks buyers with the old keys (none)"
        );
    }
}
