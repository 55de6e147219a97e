//! [`Sales`]: every sale one node sells, each sale's [`Node`] state made on
//! the first request for it (see docs/design/many-sales.md), so a node's
//! memory and polls grow with the sales it is asked about, not with the
//! sales of the file.
//!
//! With one sale the node is made at start, as it always was: its watch
//! and sweep run from the start and every route means that sale.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;
use tokio::task::AbortHandle;

use super::state::Node;
use super::store::Stores;
use crate::config::{Config, ConfigError};

/// Every sale one node sells, and the state of those it was asked about.
pub struct Sales {
    name: String,
    /// The file, for a sale's settings and `[auth]` when its state is made;
    /// the keys of `[auth]` are replaced on a reload. (`None`: the one
    /// sale's node was made by the caller, see [`Sales::single`].)
    config: arc_swap::ArcSwapOption<Config>,
    /// Where a sale's store comes from (`None` as `config`).
    stores: Option<Arc<Stores>>,
    /// One cell per sale of the file, filled on the first request.
    nodes: HashMap<String, OnceCell<Arc<Node>>>,
    /// The event of the one sale, when the file has one: what a request
    /// that names no sale means.
    only: Option<String>,
    /// That one sale's state once made: the purchase that names no sale
    /// finds it without a lookup.
    only_node: std::sync::OnceLock<Arc<Node>>,
    /// The made nodes' watch and sweep tasks, stopped with the node.
    tasks: Mutex<Vec<AbortHandle>>,
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
        let sales = Arc::new(Sales {
            name: name.to_string(),
            config: arc_swap::ArcSwapOption::from_pointee(config.clone()),
            stores: Some(stores),
            nodes: config
                .sales
                .iter()
                .map(|s| (s.event.clone(), OnceCell::new()))
                .collect(),
            only: config.sale().map(|s| s.event.clone()),
            only_node: std::sync::OnceLock::new(),
            tasks: Mutex::new(Vec::new()),
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
        let sales = Arc::new(Sales {
            name: node.name().to_string(),
            config: arc_swap::ArcSwapOption::empty(),
            stores: None,
            nodes: std::iter::once((event.clone(), OnceCell::new_with(Some(node.clone()))))
                .collect(),
            only: Some(event),
            only_node: std::sync::OnceLock::new(),
            tasks: Mutex::new(Vec::new()),
        });
        sales.start(&node);
        sales
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many sales the node sells.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it sells none.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
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

    /// The state of the sale of `event`, made if this is the first ask:
    /// one lookup and an atomic load once made.
    pub async fn get(&self, event: &str) -> Result<Arc<Node>, Missing> {
        let cell = self.nodes.get(event).ok_or(Missing::Unknown)?;
        if let Some(node) = cell.get() {
            return Ok(node.clone());
        }
        let node = cell
            .get_or_try_init(|| async {
                let (Some(stores), Some(config)) = (&self.stores, self.config.load_full()) else {
                    return Err(Missing::Unknown);
                };
                let store = stores.get(event).await.ok_or(Missing::Unknown)?;
                let sale = config
                    .pick_sale(Some(event))
                    .map_err(|e| Missing::Broken(e.to_string()))?;
                let node = super::build_for(&config, sale, &self.name, store)
                    .map_err(|e| Missing::Broken(e.to_string()))?;
                self.start(&node);
                tracing::debug!(node = %self.name, event, "a sale's state made on its first request");
                Ok(node)
            })
            .await?;
        Ok(node.clone())
    }

    /// The sales' states made so far, in no order.
    pub fn made(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.values().filter_map(|c| c.get())
    }

    /// Starts `node`'s poll of its sale and its expiry sweep.
    fn start(&self, node: &Arc<Node>) {
        if self.only.as_deref() == Some(node.event()) {
            let _ = self.only_node.set(node.clone());
        }
        let watch = tokio::spawn(node.clone().watch());
        let sweep = tokio::spawn(super::sweep::sweep(Arc::downgrade(node)));
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.push(watch.abort_handle());
        tasks.push(sweep.abort_handle());
    }

    /// Stops every made sale's background work (the node stops).
    pub fn stop(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    /// Puts `config`'s `[auth]` keys in force on every sale, made or not
    /// (a reload of the file); an error leaves the keys in force.
    pub fn set_auth(&self, config: &Config) -> Result<(), ConfigError> {
        let mut fresh = Vec::new();
        for node in self.made() {
            fresh.push((node, super::authority_for(config, node.event())?));
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
}
