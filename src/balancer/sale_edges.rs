//! The edge per sale, in front of a fleet of several sales
//! (docs/design/many-sales.md): the sold-out answer of
//! [`super::edge`], kept for each sale apart, so that it never answers
//! `sold_out` for one sale because another sold out.
//!
//! A sale's edge exists only while that sale is sold out and asked about:
//! it is made when a node's `sold_out` answer for it passes through (the
//! node names the sale in `Spike-Event`), learns the holders from a node's
//! `/holders?event=`, keeps a long poll on `/sold_out?event=` while it
//! answers, and is dropped as soon as the sale may have stock again (the
//! same signs as the single sale's edge: a reset, tickets back, the nodes
//! selling) or once nobody has asked about it for [`IDLE`]. So the
//! balancer polls no open sale and no sale nobody asks about, and its
//! memory is the sales sold out and in demand lately, whatever the number
//! of sales in the file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::Notify;

use super::clock::now_ms;
use super::edge::SoldOut;
use super::state::Shared;
use crate::protocol::{self, HoldersView, SoldOutView};

/// How long a sold-out sale's edge stays without a purchase asking about
/// it (then its poll stops and its holders are let go); the next sold-out
/// answer of a node makes it again. The node's idle period for a sale's
/// state, for the same reason: what is not asked about costs nothing.
pub const IDLE: Duration = Duration::from_secs(60);

/// The pause between two long polls while the edge answers (each comes
/// back as soon as the node's view changes, or after its wait).
const RECHECK: Duration = Duration::from_millis(20);

/// The pause before asking again while a node is still reading the
/// holders of a sale that just sold out.
const LEARN_AGAIN: Duration = Duration::from_millis(100);

/// How long a sale's new edge waits for the node it asks to say sold out
/// too (a node hears the store's answer within its poll, a second).
const SETTLE: Duration = Duration::from_secs(2);

/// One sale's edge.
#[derive(Debug)]
pub struct SaleEdge {
    event: Box<str>,
    sold_out: ArcSwapOption<SoldOut>,
    /// When a purchase last asked about it ([`now_ms`]), to drop it idle.
    asked_ms: AtomicU64,
    /// Its watcher was started.
    watched: AtomicBool,
    /// When it was made ([`now_ms`]).
    made_ms: u64,
}

impl SaleEdge {
    fn new(event: &str) -> SaleEdge {
        SaleEdge {
            event: event.into(),
            sold_out: ArcSwapOption::empty(),
            asked_ms: AtomicU64::new(now_ms()),
            watched: AtomicBool::new(false),
            made_ms: now_ms(),
        }
    }

    /// A purchase asked about the sale now. Written at most once a second:
    /// under a flood every worker reads this line, and a write per request
    /// would bounce it between cores.
    fn asked(&self) {
        let now = now_ms();
        if now.saturating_sub(self.asked_ms.load(Ordering::Relaxed)) >= 1000 {
            self.asked_ms.store(now, Ordering::Relaxed);
        }
    }

    fn idle(&self) -> bool {
        now_ms().saturating_sub(self.asked_ms.load(Ordering::Relaxed)) >= IDLE.as_millis() as u64
    }
}

/// The edges of the sales sold out lately, by event, shared by every
/// worker: read without a lock (an `ArcSwap` of the map), changed only
/// when a sale sells out or its edge ends.
#[derive(Debug, Default)]
pub struct SaleEdges {
    by_event: ArcSwap<HashMap<Box<str>, Arc<SaleEdge>>>,
    /// Writers of `by_event`, one at a time.
    changing: Mutex<()>,
    /// A sale's edge was made: its watcher is to start.
    added: Notify,
}

impl SaleEdges {
    /// Whether no sale has an edge now (the flood path's first, cheapest
    /// question: then nothing of the request is read).
    pub fn is_empty(&self) -> bool {
        self.by_event.load().is_empty()
    }

    /// Whether the edge answers for some sale now.
    pub fn answering(&self) -> bool {
        self.by_event
            .load()
            .values()
            .any(|s| s.sold_out.load().is_some())
    }

    /// Runs `f` on `event`'s sold-out sale while the edge answers for it
    /// (`None` otherwise: a node answers), counting the purchase as asked.
    pub fn with_sale<R>(&self, event: &str, f: impl FnOnce(&SoldOut) -> Option<R>) -> Option<R> {
        let map = self.by_event.load();
        let sale = map.get(event)?;
        sale.asked();
        let guard = sale.sold_out.load();
        f(guard.as_deref()?)
    }

    /// A node answered `sold_out` for `event`: makes its edge, unless it
    /// has one (whose watcher is already asking).
    pub fn poke(&self, event: &str) {
        if !protocol::is_event(event) || self.by_event.load().contains_key(event) {
            return;
        }
        let _one = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let map = self.by_event.load();
        if map.contains_key(event) {
            return;
        }
        let mut next = HashMap::clone(&map);
        next.insert(event.into(), Arc::new(SaleEdge::new(event)));
        self.by_event.store(Arc::new(next));
        self.added.notify_one();
    }

    /// Drops `sale`'s edge: purchases of it go to the nodes again.
    fn remove(&self, sale: &Arc<SaleEdge>, why: &str) {
        sale.sold_out.store(None);
        let _one = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let map = self.by_event.load();
        if map.get(&sale.event).is_some_and(|s| Arc::ptr_eq(s, sale)) {
            let mut next = HashMap::clone(&map);
            next.remove(&sale.event);
            self.by_event.store(Arc::new(next));
            tracing::info!(event = %sale.event, why, "the edge lets go of a sale: its buyers go to the nodes");
        }
    }

    /// The edges whose watcher is not started yet (and marks them started).
    fn unwatched(&self) -> Vec<Arc<SaleEdge>> {
        self.by_event
            .load()
            .values()
            .filter(|s| !s.watched.swap(true, Ordering::AcqRel))
            .cloned()
            .collect()
    }
}

/// Starts a watcher ([`watch_sale`]) for each sale's edge as it is made;
/// runs for the balancer's life, on its main runtime (the workers' are
/// for clients). The watchers are held in a set that this task owns, so
/// they end with it when the balancer stops (`Balancer::run` aborts it)
/// instead of polling nodes for up to a long poll more.
pub async fn run(shared: Arc<Shared>) {
    let mut watchers = tokio::task::JoinSet::new();
    loop {
        shared.edge.sales.added.notified().await;
        // Those ended (their sale let go) are dropped from the set here.
        while watchers.try_join_next().is_some() {}
        for sale in shared.edge.sales.unwatched() {
            watchers.spawn(watch_sale(shared.clone(), sale));
        }
    }
}

/// Keeps one sale's edge: learns its holders, then long-polls a node's
/// `/sold_out?event=` and drops the edge at the first sign of stock, when
/// no node answers, when the edge is turned off, or once idle.
async fn watch_sale(shared: Arc<Shared>, sale: Arc<SaleEdge>) {
    let why = loop {
        if !shared.current.load().config.sold_out_at_edge {
            break "sold_out_at_edge is off";
        }
        if sale.idle() {
            break "nobody asked about the sale lately";
        }
        let known = sale.sold_out.load_full();
        let Some(now) = read_sold_out(&shared, &sale.event, known.as_deref()).await else {
            break "no node answered /sold_out";
        };
        match known {
            Some(known) => {
                if !now.sold_out {
                    break "the nodes sell again";
                } else if now.epoch != known.epoch {
                    break "the sale was reset";
                } else if now.released != known.released {
                    break "tickets came back";
                }
                tokio::time::sleep(RECHECK).await;
            }
            None if now.sold_out => match learn(&shared, &sale.event).await {
                Some(sold_out) => {
                    tracing::info!(event = %sale.event, epoch = sold_out.epoch, holders = sold_out.buyers.len(), "sold out: the balancer answers the sale's late buyers itself");
                    sale.sold_out.store(Some(Arc::new(sold_out)));
                }
                None => tokio::time::sleep(LEARN_AGAIN).await,
            },
            // The node asked may not have heard yet what the one that
            // answered `sold_out` heard (each polls the store): asked
            // again for a little while.
            None if now_ms().saturating_sub(sale.made_ms) < SETTLE.as_millis() as u64 => {
                tokio::time::sleep(LEARN_AGAIN).await;
            }
            None => break "the nodes sell",
        }
    };
    shared.edge.sales.remove(&sale, why);
}

/// A node's `/sold_out?event=` (with `known`, the long poll).
async fn read_sold_out(
    shared: &Shared,
    event: &str,
    known: Option<&SoldOut>,
) -> Option<SoldOutView> {
    let path = match known {
        Some(k) => format!(
            "{}&event={event}",
            protocol::sold_out_poll(k.epoch, k.released)
        ),
        None => format!("{}?event={event}", protocol::SOLD_OUT_PATH),
    };
    let body = super::sale::ask_any(shared, &path).await.ok()?;
    super::sale::heard(shared, &body)
}

/// The sale's holders from a node that answers from memory; `None` while
/// no node has them.
async fn learn(shared: &Shared, event: &str) -> Option<SoldOut> {
    let path = format!("{}?event={event}", protocol::HOLDERS_PATH);
    let body = super::sale::ask_any(shared, &path).await.ok()?;
    let v = HoldersView::decode(&body).ok()?;
    let mut sold_out = SoldOut::from_view(v);
    // Order ids name their sale in a fleet of several (`EVENT:ID`).
    sold_out.order_prefix = format!("{event}:");
    Some(sold_out)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::node::Sales;
    use crate::node::store::Stores;

    /// A purchase of `event` straight at the node at `addr`: its status
    /// line.
    async fn buy(addr: std::net::SocketAddr, event: &str) -> String {
        let request = format!(
            "POST /events/{event}/buy HTTP/1.1\r\nHost: n1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            c.write_all(request.as_bytes()).expect("send");
            let mut answer = String::new();
            c.read_to_string(&mut answer).expect("answer");
            answer.lines().next().unwrap_or_default().to_string()
        })
        .await
        .expect("join")
    }

    /// A sold-out sale's edge watcher (long-polling a real node) ends with
    /// the balancer: once `Balancer::run` has returned, nothing of the
    /// balancer runs on (its state is dropped), where the watcher used to
    /// poll until nobody had asked about the sale for `IDLE` (a minute).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sales_edge_watcher_ends_with_the_balancer() {
        let node = crate::server::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let node_addr = node.local_addr().expect("addr");
        let text = format!(
            "[[sale]]\nevent = \"ew-a\"\ntotal = 1\nper_user_limit = 0\n\n\
             [[sale]]\nevent = \"ew-b\"\ntotal = 1\n\n\
             [balancer]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
             [[node]]\nname = \"n1\"\nlisten = \"{node_addr}\"\n"
        );
        let config = Config::parse(Path::new("test.toml"), &text).expect("valid");
        let stores = Stores::open(&config.sales, None).await.expect("stores");
        let store = stores.get("ew-a").await.expect("ew-a's store");
        store.init(false).await.expect("stock init");
        let sales = Sales::new(&config, "n1", stores).await.expect("sales");
        let server = tokio::spawn({
            let limits = config.server.clone();
            async move { crate::node::run(node, sales, &limits, std::future::pending()).await }
        });
        // The sale's one ticket sold: the next purchase is sold out.
        let first = buy(node_addr, "ew-a").await;
        assert!(first.contains(" 200 "), "{first}");
        let second = buy(node_addr, "ew-a").await;
        assert!(second.contains(" 409 "), "{second}");

        let balancer = super::super::Balancer::new(config).expect("balancer");
        let running = super::super::in_process::Running::start(balancer).await;
        let shared = running.shared.clone();
        // A node's sold-out answer passed through: the edge is made, and
        // its watcher learns the holders, then long-polls the node.
        shared.edge.sales.poke("ew-a");
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        while shared.edge.sales.with_sale("ew-a", |_| Some(())).is_none()
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            shared.edge.sales.with_sale("ew-a", |_| Some(())).is_some(),
            "the edge learned the sold-out sale"
        );
        drop(shared);
        // A bound far below `IDLE`.
        running.stop_and_forget(IDLE / 2).await;
        server.abort();
    }
}
