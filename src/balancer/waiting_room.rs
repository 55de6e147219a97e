//! The waiting room (`[waiting_room]`): one fair line in front of
//! `/buy/ticket`, shared by every balancer of a sale.
//!
//! Why it is built this way:
//! - **The line lives in the sale's store** (`line.lua`: positions, the
//!   pre-queue, the serving mark, in the sale's hash slot), so it is one
//!   line whichever balancer a buyer reaches, and a restarted or killed
//!   balancer loses nobody's place.
//! - **A waiting buyer costs no store call.** A buyer's place is in a
//!   signed cookie (`spike_queue`); each balancer moves and reads the
//!   serving mark a few times a second ([`run`], the edge's long poll is
//!   the model) and answers every waiting request from memory. A buyer
//!   costs one store call to join (and one more at the opening, to learn
//!   where the shuffle put them).
//! - **Early or fast gains nothing.** Before the opening (from
//!   `prequeue_from`) every arrival gets the same standing: a random
//!   lottery number, ranked at the opening; later arrivals queue in
//!   arrival order. A place never changes once given, so polling faster
//!   does not move anyone forward; `Retry-After` says when to ask again.
//! - **Only a pass reaches a node.** A buyer whose position the serving
//!   mark has passed gets `spike_pass`, signed and bound to that buyer (the
//!   verified token's subject with `[auth]`, the client's address without)
//!   for `pass_ttl`; a purchase without a valid pass never reaches a node.
//! - **The secret** that signs places and passes is the first balancer's
//!   random one, kept with the line: every balancer of the sale signs
//!   alike, with nothing to configure, and a sale started anew starts a
//!   new line with a new secret.

use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use hmac::{KeyInit, Mac};
use hyper::{Method, StatusCode};
use tokio::time::Instant;

use super::forward::{Reply, ReplyBody};
use super::state::{Active, Shared};
use crate::config::{Admit, WaitingRoomConfig};
use crate::node::store::{LineAdmit, LineState, Store};

/// How often each balancer moves and reads the serving mark: the lag of a
/// newly admitted buyer, and a few store calls a second per balancer
/// whatever the crowd. A little over a fifth of a second: a rate admits at
/// most N within any second (`line.lua`), so a move that falls less than
/// a second after the one five before it is held back; at exactly 200 ms,
/// ticks a few ms late and then on time did that about every other move,
/// and the line kept to 91% of the rate (the 100,000-buyer crowd); five
/// ticks of 205 ms span a second with 25 ms to spare.
pub const TICK: Duration = Duration::from_millis(205);

/// The cookie that holds a buyer's place.
pub const QUEUE_COOKIE: &str = "spike_queue";
/// The cookie that lets a buyer's purchase through to the nodes.
pub const PASS_COOKIE: &str = "spike_pass";

/// The longest `Retry-After` a waiting buyer is given, in seconds: the
/// line's speed may change (tickets come back, the rate is reloaded), so
/// a buyer far back is told again within a minute.
const MAX_WAIT_RETRY_S: u64 = 60;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The line as this balancer last heard it from the store.
pub struct LineView {
    /// The store's answer.
    pub state: LineState,
    /// When it came, to read the store's clock in between.
    pub at: Instant,
    /// The serving mark's speed, positions a second (a moving average).
    pub speed: f64,
    /// The key places and passes are signed with (from the line's secret).
    mac: HmacSha256,
}

impl LineView {
    /// The store's clock now, Unix ms.
    pub fn now_ms(&self) -> u64 {
        self.state.now_ms + self.at.elapsed().as_millis() as u64
    }

    /// Buyers in line and not admitted yet.
    pub fn waiting(&self) -> u64 {
        self.state.joined().saturating_sub(self.state.serving)
    }

    fn sign(&self, what: &[u8]) -> [u8; 16] {
        let mut mac = self.mac.clone();
        mac.update(what);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }
}

/// One sale's line in a balancer: the store it is kept in, the line as
/// last heard, and the passes this balancer hands out.
#[derive(Default)]
pub struct Line {
    /// The sale's store: set at start for the only sale, on the first
    /// request for one of several.
    store: OnceLock<Store>,
    /// The line, once the store has answered.
    pub view: ArcSwapOption<LineView>,
    /// Passes this balancer may still hand out now (see [`PassBucket`]),
    /// and the buyers it handed one to lately.
    passes: std::sync::Mutex<PassBucket>,
    /// The sale's event in front of several sales (its cookies' names and
    /// its signatures carry it: a place or a pass is good for its sale
    /// only); empty for the only sale.
    event: Box<str>,
    /// `spike_queue` and `spike_pass`, with `_EVENT` in front of several.
    queue_cookie: Box<str>,
    pass_cookie: Box<str>,
    /// When a purchase last asked about it (several sales: the line's
    /// loop ends once idle).
    asked_ms: AtomicU64,
    /// Its loop was started (several sales).
    watched: std::sync::atomic::AtomicBool,
}

impl Line {
    fn of(event: &str) -> Line {
        Line {
            event: event.into(),
            queue_cookie: format!("{QUEUE_COOKIE}_{event}").into(),
            pass_cookie: format!("{PASS_COOKIE}_{event}").into(),
            asked_ms: AtomicU64::new(super::clock::now_ms()),
            ..Line::default()
        }
    }

    fn queue_name(&self) -> &str {
        if self.event.is_empty() {
            QUEUE_COOKIE
        } else {
            &self.queue_cookie
        }
    }

    fn pass_name(&self) -> &str {
        if self.event.is_empty() {
            PASS_COOKIE
        } else {
            &self.pass_cookie
        }
    }

    /// A purchase asked about the line now (written at most once a second).
    fn asked(&self) {
        let now = super::clock::now_ms();
        if now.saturating_sub(self.asked_ms.load(Ordering::Relaxed)) >= 1000 {
            self.asked_ms.store(now, Ordering::Relaxed);
        }
    }
}

/// The waiting room's state in a balancer: the line of the only sale, or
/// the lines of several (one per sale with buyers lately), and the
/// counters of them all.
#[derive(Default)]
pub struct WaitingRoom {
    /// The only sale's line.
    pub one: Line,
    /// In front of several sales, the line of each sale asked about lately,
    /// by event: read without a lock, written when a line is made or ends.
    lines: arc_swap::ArcSwap<std::collections::HashMap<Box<str>, Arc<Line>>>,
    /// In front of several sales, their stores (made on demand).
    stores: OnceLock<Arc<crate::node::store::Stores>>,
    /// Writers of `lines`, one at a time.
    changing: std::sync::Mutex<()>,
    /// A line was made: its loop is to start.
    added: tokio::sync::Notify,
    /// This process's candidate secret (kept only if it starts the line).
    candidate: OnceLock<String>,
    /// `202 waiting` answers.
    pub waiting_answers: AtomicU64,
    /// Passes handed out (`202 admitted`).
    pub passes_issued: AtomicU64,
    /// Purchases let through on a valid pass.
    pub passes_accepted: AtomicU64,
    /// Passes refused: forged, expired, another buyer's, another sale's.
    pub passes_refused: AtomicU64,
    /// Store calls made for requests (joins); the ticks are apart.
    pub join_calls: AtomicU64,
    /// Store calls of the ticks.
    pub tick_calls: AtomicU64,
    /// Store calls that failed (each a 503 for its buyer, or a missed tick).
    pub store_errors: AtomicU64,
    /// Admitted buyers told to ask again in a second: the balancer's share
    /// of the admit rate was spent.
    pub passes_deferred: AtomicU64,
}

/// `admit = "N/s"` as a bound on the passes handed out, not only on the
/// serving mark: buyers come back when they please, and a crowd of them
/// admitted a while ago and returning together would be handed passes in
/// a burst. Each balancer hands out passes at its share of the rate (the
/// rate ÷ the balancers moving the line), with a tick's worth of burst
/// (smooth), and never more than its share rounded up within any second
/// (strict: two balancers hand out at most N + 1 in any second).
#[derive(Debug, Default)]
struct PassBucket {
    tokens: f64,
    at: Option<Instant>,
    /// When the passes of the last second were handed out.
    handed: std::collections::VecDeque<Instant>,
    /// (a buyer's hash, when their pass expires in the store's clock), in
    /// a slot the hash picks: a buyer handed a pass who asks again (their
    /// pass lost, or not sent) is handed it again without spending the
    /// rate, so asking again and again cannot starve the others. Fixed
    /// size: a collision costs no more than a token.
    recent: Vec<(u64, u64)>,
}

/// Slots of [`PassBucket::recent`] (16 bytes each).
const RECENT_PASSES: usize = 1 << 14;

impl PassBucket {
    /// Whether `buyer` may be handed a pass now (`expires`: when a pass
    /// handed now would expire), spending the rate unless they were handed
    /// one that has not expired yet.
    fn admit(&mut self, buyer: u64, now_ms: u64, expires: u64, per_second: f64) -> bool {
        if self.recent.is_empty() {
            self.recent = vec![(0, 0); RECENT_PASSES];
        }
        let slot = (buyer % RECENT_PASSES as u64) as usize;
        let (who, until) = self.recent[slot];
        if who == buyer && now_ms < until {
            return true;
        }
        if !self.take(per_second) {
            return false;
        }
        self.recent[slot] = (buyer, expires);
        true
    }

    fn take(&mut self, per_second: f64) -> bool {
        let now = Instant::now();
        let burst = (per_second * TICK.as_secs_f64()).max(1.0);
        let elapsed = self.at.map_or(burst / per_second.max(1e-9), |at| {
            now.duration_since(at).as_secs_f64()
        });
        self.at = Some(now);
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        // The burst is over a second's share only if the second before it
        // was quiet: the passes of any one second stay within the share
        // (rounded up: a balancer with less than one a second hands one).
        while self
            .handed
            .front()
            .is_some_and(|&at| now.duration_since(at) >= Duration::from_secs(1))
        {
            self.handed.pop_front();
        }
        let most = per_second.ceil().max(1.0) as usize;
        if self.tokens >= 1.0 && self.handed.len() < most {
            self.tokens -= 1.0;
            self.handed.push_back(now);
            true
        } else {
            false
        }
    }
}

impl std::fmt::Debug for WaitingRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitingRoom")
            .field("attached", &self.attached())
            .field("view", &self.one.view.load().as_deref().map(|v| &v.state))
            .field("lines", &self.lines.load().len())
            .finish_non_exhaustive()
    }
}

impl WaitingRoom {
    /// Keeps the only sale's line in `store` (once; later calls do
    /// nothing).
    pub fn attach(&self, store: Store) {
        let _ = self.one.store.set(store);
    }

    /// Keeps each of several sales' lines in its store of `stores` (once).
    pub fn attach_sales(&self, stores: Arc<crate::node::store::Stores>) {
        let _ = self.stores.set(stores);
    }

    /// In front of several sales, puts a reload's list of sales in force
    /// for the lines (a sale added is lined from its first request).
    pub fn sales_in_force(&self, sales: &[crate::config::SaleConfig]) {
        if let Some(stores) = self.stores.get() {
            stores.set_sales(sales);
        }
    }

    /// Whether a store is attached.
    pub fn attached(&self) -> bool {
        self.one.store.get().is_some() || self.stores.get().is_some()
    }

    /// Whether purchases can be answered: the only sale's line was heard,
    /// or, in front of several, their stores are attached (each line is
    /// heard on its first request).
    pub fn ready(&self) -> bool {
        self.stores.get().is_some()
            || (self.one.store.get().is_some() && self.one.view.load().is_some())
    }

    /// The line of the sale `event` (several sales), made on its first
    /// request; `None` when the fleet does not sell it (a node answers).
    /// Whether a line may be kept for `event` here (one of the file's
    /// sales, with a store), without making one.
    fn keeps(&self, event: &str) -> bool {
        self.lines.load().contains_key(event)
            || self.stores.get().is_some_and(|s| s.config(event).is_some())
    }

    fn line_for(&self, event: &str) -> Option<Arc<Line>> {
        if let Some(line) = self.lines.load().get(event) {
            line.asked();
            return Some(line.clone());
        }
        self.stores.get()?.config(event)?;
        let _one = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let lines = self.lines.load();
        if let Some(line) = lines.get(event) {
            return Some(line.clone());
        }
        let line = Arc::new(Line::of(event));
        let mut next = std::collections::HashMap::clone(&lines);
        next.insert(event.into(), line.clone());
        self.lines.store(Arc::new(next));
        self.added.notify_one();
        Some(line)
    }

    /// Drops `line` once idle (several sales).
    fn remove(&self, line: &Arc<Line>) {
        let _one = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let lines = self.lines.load();
        if lines.get(&line.event).is_some_and(|l| Arc::ptr_eq(l, line)) {
            let mut next = std::collections::HashMap::clone(&lines);
            next.remove(&line.event);
            self.lines.store(Arc::new(next));
        }
    }

    /// The store `line` is kept in, made on the first ask for one of
    /// several sales.
    async fn store_of(&self, line: &Line) -> Option<Store> {
        if let Some(store) = line.store.get() {
            return Some(store.clone());
        }
        let store = self.stores.get()?.get(&line.event).await?;
        Some(line.store.get_or_init(|| store).clone())
    }

    fn candidate(&self) -> &str {
        self.candidate.get_or_init(|| {
            let s = std::collections::hash_map::RandomState::new();
            let mut out = String::with_capacity(64);
            for i in 0..4u8 {
                let _ = write!(out, "{:016x}", s.hash_one((i, std::process::id())));
            }
            out
        })
    }
}

impl Line {
    fn learn(&self, state: LineState) {
        let old = self.view.load();
        let speed = match old.as_deref() {
            Some(v) if v.state.epoch == state.epoch => {
                let dt = v.at.elapsed().as_secs_f64();
                let moved = state.serving.saturating_sub(v.state.serving) as f64;
                let now = if dt > 0.0 { moved / dt } else { v.speed };
                v.speed * 0.8 + now * 0.2
            }
            _ => 0.0,
        };
        let mac = match old.as_deref() {
            Some(v) if v.state.secret == state.secret => v.mac.clone(),
            _ => match HmacSha256::new_from_slice(state.secret.as_bytes()) {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        self.view.store(Some(Arc::new(LineView {
            state,
            at: Instant::now(),
            speed,
            mac,
        })));
    }

    /// Takes in the line's counts a join came back with, when they are
    /// newer than the view's (so `/status` counts a buyer as soon as they
    /// join); the speed and the oldest wait stay the ticks' to measure.
    fn learn_join(&self, state: &LineState) {
        // Read, change and swap in one step: a tick's newer view swapped
        // in meanwhile is never rolled back.
        self.view.rcu(|current| {
            let Some(old) = current.as_deref() else {
                return current.clone();
            };
            if old.state.epoch != state.epoch || state.joined() <= old.state.joined() {
                return current.clone();
            }
            let mut fresh = old.state.clone();
            fresh.pre = state.pre;
            fresh.seq = state.seq;
            fresh.serving = fresh.serving.max(state.serving);
            fresh.now_ms = fresh.now_ms.max(state.now_ms);
            Some(Arc::new(LineView {
                state: fresh,
                at: Instant::now(),
                speed: old.speed,
                mac: old.mac.clone(),
            }))
        });
    }
}

/// How long a line of one of several sales keeps moving without a
/// purchase asking about it: longer than the longest `Retry-After` a
/// waiting buyer is given, so a line whose buyers come back keeps moving,
/// and one nobody asks about costs nothing (its next request makes it
/// again; the line itself is kept in the store).
pub const LINE_IDLE: Duration = Duration::from_secs(2 * MAX_WAIT_RETRY_S);

/// Moves and reads the line every [`TICK`] while the file has a
/// `[waiting_room]` and a store is attached: the only sale's, or, in
/// front of several, one loop per sale with buyers lately ([`watch_line`]).
pub async fn run(shared: Arc<Shared>) {
    if shared.waiting_room.stores.get().is_some() {
        let room = &shared.waiting_room;
        // The lines' loops are held in a set this task owns, so they end
        // with it when the balancer stops (`Balancer::run` aborts it)
        // instead of moving their lines for up to `LINE_IDLE` more.
        let mut watchers = tokio::task::JoinSet::new();
        loop {
            room.added.notified().await;
            // Those ended (their line idle) are dropped from the set here.
            while watchers.try_join_next().is_some() {}
            let lines: Vec<Arc<Line>> = room
                .lines
                .load()
                .values()
                .filter(|l| !l.watched.swap(true, Ordering::AcqRel))
                .cloned()
                .collect();
            for line in lines {
                watchers.spawn(watch_line(shared.clone(), line));
            }
        }
    }
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        tick(&shared, &shared.waiting_room.one).await;
    }
}

/// One sale's line, in front of several: moved and read every [`TICK`]
/// until nobody has asked about it for [`LINE_IDLE`].
async fn watch_line(shared: Arc<Shared>, line: Arc<Line>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let idle = super::clock::now_ms().saturating_sub(line.asked_ms.load(Ordering::Relaxed));
        if idle >= LINE_IDLE.as_millis() as u64 {
            break;
        }
        tick(&shared, &line).await;
    }
    shared.waiting_room.remove(&line);
}

/// Hears the line once before the balancer takes its first client, so a
/// balancer that starts (or restarts) in a running sale answers its
/// waiting buyers at once; bounded by `limit` (a store that does not
/// answer leaves it to [`run`], and `/ready` fails until then).
pub async fn first_read(shared: &Shared, limit: Duration) {
    if shared.waiting_room.one.store.get().is_some() {
        let _ = tokio::time::timeout(limit, tick(shared, &shared.waiting_room.one)).await;
    }
}

async fn tick(shared: &Shared, line: &Line) {
    let room = &shared.waiting_room;
    let Some(store) = room.store_of(line).await else {
        return;
    };
    let Some(config) = shared.current.load().config.waiting_room.clone() else {
        return;
    };
    room.tick_calls.fetch_add(1, Ordering::Relaxed);
    match store
        .line_advance(admit_of(&config), room.candidate())
        .await
    {
        Ok(Some(state)) => line.learn(state),
        Ok(None) => {
            // No sale yet: nobody is admitted to buy nothing.
            line.view.store(None);
        }
        Err(e) => {
            room.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "waiting room: the line could not be moved");
        }
    }
}

fn admit_of(config: &WaitingRoomConfig) -> LineAdmit {
    match config.admit {
        Admit::Rate { per_second } => LineAdmit::Rate(per_second),
        Admit::FollowStock => LineAdmit::FollowStock {
            pass_ttl_ms: config.pass_ttl.as_millis() as u64,
        },
    }
}

/// What the waiting room decides for a request.
#[derive(Debug)]
pub enum Gate {
    /// Not its business (not a purchase, no waiting room), or a purchase
    /// with a valid pass: on to the edge and the nodes.
    Pass,
    /// The waiting room answers.
    Answer(Reply),
    /// The sale does not sell now (sold out, paused, closed, or before the
    /// pre-queue): the edge answers if it can (a holder hears
    /// `already_bought`); if it cannot, `retry` (a purchase with its own
    /// `Idempotency-Key` and a pass this buyer was given, expired or not:
    /// it may be the retry of a purchase that got an order) goes on to a
    /// node, and anything else gets `reply`.
    Shut { reply: Reply, retry: bool },
    /// The buyer joins the line, or learns where the shuffle put them: one
    /// store call ([`join`]).
    Join(Joining),
}

/// A buyer about to join the line.
#[derive(Debug)]
pub struct Joining {
    buyer: String,
    /// The line of one of several sales; `None`: the only sale's.
    line: Option<Arc<Line>>,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Line")
            .field("event", &self.event)
            .field("view", &self.view.load().as_deref().map(|v| &v.state))
            .finish_non_exhaustive()
    }
}

/// Who a waiting-room buyer is: the verified token's subject with
/// `[auth]` (a request without a valid token is the node's 401, answered
/// here), the client's address without.
fn buyer_of(
    active: &Active,
    client: std::net::IpAddr,
    token: Option<&str>,
    event: &str,
) -> Result<String, Reply> {
    if active.config.auth.is_none() {
        let mut id = String::with_capacity(48);
        match client {
            // An IPv6 client usually holds a whole /64: one place for it,
            // not one per address.
            std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                let s = v6.segments();
                let _ = write!(id, "ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3]);
            }
            _ => {
                let _ = write!(id, "ip:{client}");
            }
        }
        return Ok(id);
    }
    let verified = match (active.auth.as_deref(), token) {
        // In front of several sales, a token for this line's sale.
        (Some(auth), Some(token)) if !event.is_empty() => auth.verify_for(token, event),
        (Some(auth), Some(token)) => auth.verify(token),
        (_, None) => Err(crate::auth::AuthError::Missing),
        (None, Some(_)) => Err(crate::auth::AuthError::UnknownKey),
    };
    verified.map(|b| b.id).map_err(|e| unauthorized(&e))
}

fn unauthorized(e: &crate::auth::AuthError) -> Reply {
    let body = serde_json::json!({"status": e.label(), "reason": e.to_string()}).to_string() + "\n";
    Reply {
        status: StatusCode::UNAUTHORIZED,
        body: ReplyBody::Owned(body),
        header: Some((
            "www-authenticate",
            match e {
                crate::auth::AuthError::Missing => "Bearer realm=\"spike\"",
                _ => "Bearer realm=\"spike\", error=\"invalid_token\"",
            },
        )),
        cookie: None,
    }
}

/// The waiting room's answer while the store has not answered yet (a
/// balancer just started, or Redis is down): nobody can be placed.
const UNREACHABLE_BODY: &[u8] = b"{\"status\":\"busy\",\"reason\":\"the waiting room cannot reach the sale's store; try again shortly\"}\n";

/// The answer while a reload has added a waiting room that this balancer
/// opened no store for (`spike balancer` opens the sale's Redis at start).
const UNATTACHED_BODY: &[u8] = b"{\"status\":\"busy\",\"reason\":\"a reload added [waiting_room]: this balancer opened no connection to the sale's store at start; restart it\"}\n";

/// A purchase that names a sale this balancer keeps no line for.
fn no_line() -> Reply {
    Reply {
        status: StatusCode::NOT_FOUND,
        body: ReplyBody::Static(b"{\"status\":\"no_such_sale\",\"reason\":\"this balancer's waiting room keeps no line for a sale of that event\"}\n"),
        header: None,
        cookie: None,
    }
}

/// A purchase that names no sale, in front of several: the node's 400,
/// answered at the gate so that no purchase passes the lines by naming
/// none (a node whose own file lists one sale would sell it).
fn unnamed() -> Reply {
    Reply {
        status: StatusCode::BAD_REQUEST,
        body: ReplyBody::Static(b"{\"status\":\"bad_request\",\"reason\":\"this fleet sells several sales: name one, /events/EVENT/buy or ?event=EVENT\"}\n"),
        header: None,
        cookie: None,
    }
}

/// A purchase that names more than one sale.
fn ambiguous(why: crate::protocol::AmbiguousSale) -> Reply {
    let body =
        serde_json::json!({"status": "bad_request", "reason": why.to_string()}).to_string() + "\n";
    Reply {
        status: StatusCode::BAD_REQUEST,
        body: ReplyBody::Owned(body),
        header: None,
        cookie: None,
    }
}

fn unattached() -> Reply {
    busy(UNATTACHED_BODY, 5)
}

fn unreachable() -> Reply {
    busy(UNREACHABLE_BODY, 2)
}

/// A `503 busy` of the waiting room: `body`, asked back in `retry_s`.
fn busy(body: &'static [u8], retry_s: u64) -> Reply {
    Reply {
        status: StatusCode::SERVICE_UNAVAILABLE,
        body: ReplyBody::Static(body),
        header: Some(super::answer::retry_after(retry_s)),
        cookie: None,
    }
}

/// The value of cookie `name` among the request's `Cookie` headers.
pub fn cookie<'a>(headers: impl Iterator<Item = &'a [u8]>, name: &str) -> Option<&'a [u8]> {
    for header in headers {
        for part in header.split(|&b| b == b';') {
            let part = part.trim_ascii();
            if let Some(rest) = part.strip_prefix(name.as_bytes())
                && let Some(value) = rest.strip_prefix(b"=")
            {
                return Some(value);
            }
        }
    }
    None
}

/// The line a request is about: the only sale's, or one of several's.
enum LineRef<'a> {
    One(&'a Line),
    Of(Arc<Line>),
}

impl std::ops::Deref for LineRef<'_> {
    type Target = Line;

    fn deref(&self) -> &Line {
        match self {
            LineRef::One(l) => l,
            LineRef::Of(l) => l,
        }
    }
}

/// The waiting room's decision for a request (see [`Gate`]), made from
/// memory: `cookies` are the request's `Cookie` header values, `token` its
/// buyer token, `client` its address; `event` the sale a purchase names
/// (read in front of several sales only: each has its own line, and a
/// purchase that names none, or no sale of the fleet, goes to a node,
/// which says so).
#[allow(clippy::too_many_arguments)]
pub fn gate<'a, I: Iterator<Item = &'a [u8]>>(
    shared: &Shared,
    active: &Active,
    is_buy: bool,
    method: &Method,
    client_key: bool,
    cookies: impl Fn() -> I,
    token: impl FnOnce() -> Option<&'a str>,
    client: std::net::IpAddr,
    event: impl FnOnce() -> Result<Option<&'a str>, crate::protocol::AmbiguousSale>,
) -> Gate {
    let Some(config) = active.config.waiting_room.as_ref() else {
        return Gate::Pass;
    };
    let room = &shared.waiting_room;
    if !is_buy || !(*method == Method::GET || *method == Method::POST) {
        return Gate::Pass;
    }
    if !room.attached() {
        // A reload added the waiting room to a balancer that opened no
        // store at start: closed rather than open to everyone.
        return Gate::Answer(unattached());
    }
    let token = token();
    // The buyer, once verified (in front of several sales with `[auth]`,
    // before the line: see below); the checks further on take it from here.
    let mut verified: Option<String> = None;
    let line = if active.config.several_sales {
        match event() {
            // No sale named: refused here as the node would (400), so that
            // no purchase passes the lines by naming none.
            Ok(None) => return Gate::Answer(unnamed()),
            Ok(Some(e)) if active.config.auth.is_some() => {
                // A token that does not buy in this sale makes no line (a
                // line is a Redis loop for two minutes) and hears nothing of
                // the sale's state: the node's 401. (A sale the file does
                // not list is the node's 404 first, as without `[auth]`.)
                if !room.keeps(e) {
                    return Gate::Answer(no_line());
                }
                match buyer_of(active, client, token, e) {
                    Ok(buyer) => verified = Some(buyer),
                    Err(reply) => return Gate::Answer(reply),
                }
                match room.line_for(e) {
                    Some(line) => LineRef::Of(line),
                    None => return Gate::Answer(no_line()),
                }
            }
            Ok(Some(e)) => match room.line_for(e) {
                Some(line) => LineRef::Of(line),
                // No line here for that sale: not one of the file's (the
                // node's 404), or one this balancer opened no store for.
                // Refused here either way, so no purchase passes a line.
                None => return Gate::Answer(no_line()),
            },
            // Two sales named: neither line may be picked for the node.
            Err(why) => return Gate::Answer(ambiguous(why)),
        }
    } else {
        LineRef::One(&room.one)
    };
    let Some(view) = line.view.load_full() else {
        return match line {
            // Heard on its first request: the join answers the line.
            LineRef::Of(line) => match verified
                .take()
                .map_or_else(|| buyer_of(active, client, token, &line.event), Ok)
            {
                Ok(buyer) => Gate::Join(Joining {
                    buyer,
                    line: Some(line),
                }),
                Err(reply) => Gate::Answer(reply),
            },
            LineRef::One(_) => Gate::Answer(unreachable()),
        };
    };
    let state = &view.state;
    let now = view.now_ms();
    let before_opening = state.opens_at_ms > 0 && now < state.opens_at_ms;
    let edge_answers = if line.event.is_empty() {
        shared.edge.one_active()
    } else {
        shared
            .edge
            .sales
            .with_sale(&line.event, |_| Some(()))
            .is_some()
    };
    if state.shut != 0 || (!before_opening && (state.free == 0 || edge_answers)) {
        // Only a buyer who was let through before may send a purchase
        // again to a node now, and only with its key: the retry of a
        // purchase whose answer was lost.
        let retry = client_key
            && verified
                .take()
                .map_or_else(|| buyer_of(active, client, token, &line.event), Ok)
                .is_ok_and(|buyer| {
                    cookie(cookies(), line.pass_name())
                        .is_some_and(|pass| checked(&line, &view, b'p', &buyer, pass).is_some())
                });
        return Gate::Shut {
            reply: shut_answer(state, now),
            retry,
        };
    }
    if before_opening && config.prequeue_from_ms > 0 && now < config.prequeue_from_ms {
        // The line is not open yet either: come back when it is.
        let (body, _) = crate::protocol::not_selling_answer(
            crate::protocol::Shut::NotOpen {
                opens_at_ms: state.opens_at_ms,
            },
            now,
        );
        let wait = config.prequeue_from_ms.saturating_sub(now).div_ceil(1000);
        return Gate::Shut {
            reply: Reply {
                status: StatusCode::CONFLICT,
                body: ReplyBody::Owned(body),
                header: Some(super::answer::retry_after(wait)),
                cookie: None,
            },
            retry: false,
        };
    }
    let buyer = match verified
        .take()
        .map_or_else(|| buyer_of(active, client, token, &line.event), Ok)
    {
        Ok(b) => b,
        Err(reply) => return Gate::Answer(reply),
    };
    if let Some(pass) = cookie(cookies(), line.pass_name()) {
        if pass_is_valid(&line, &view, &buyer, pass, now) {
            room.passes_accepted.fetch_add(1, Ordering::Relaxed);
            return Gate::Pass;
        }
        room.passes_refused.fetch_add(1, Ordering::Relaxed);
    }
    match cookie(cookies(), line.queue_name()).and_then(|c| place_of(&line, &view, &buyer, c)) {
        Some(0) if before_opening => {
            Gate::Answer(waiting(shared, config, &line, &view, &buyer, 0, false))
        }
        Some(position) if position > 0 => Gate::Answer(waiting(
            shared, config, &line, &view, &buyer, position, false,
        )),
        _ => Gate::Join(Joining {
            buyer,
            line: match line {
                LineRef::One(_) => None,
                LineRef::Of(l) => Some(l),
            },
        }),
    }
}

/// The answer to a buyer in line while the sale does not sell.
fn shut_answer(line: &LineState, now: u64) -> Reply {
    let shut = match line.shut {
        2 => crate::protocol::Shut::Closed { closed_at_ms: now },
        1 => crate::protocol::Shut::Paused,
        _ => {
            return Reply {
                status: StatusCode::CONFLICT,
                body: ReplyBody::Static(crate::protocol::SOLD_OUT_BODY),
                header: Some((crate::protocol::SOLD_OUT_HEADER_NAME, "1")),
                cookie: None,
            };
        }
    };
    let (body, retry) = crate::protocol::not_selling_answer(shut, now);
    Reply {
        status: StatusCode::CONFLICT,
        body: ReplyBody::Owned(body),
        header: retry.map(super::answer::retry_after),
        cookie: None,
    }
}

/// One store call: `j`'s buyer joins the line (or is told their place),
/// and is answered as a buyer with that place.
pub async fn join(shared: &Shared, active: &Active, j: Joining) -> Reply {
    let room = &shared.waiting_room;
    let line = match &j.line {
        Some(l) => l,
        None => &room.one,
    };
    let (Some(store), Some(config)) = (
        room.store_of(line).await,
        active.config.waiting_room.as_ref(),
    ) else {
        return unreachable();
    };
    room.join_calls.fetch_add(1, Ordering::Relaxed);
    let lottery = match line.view.load().as_deref() {
        Some(v) => lottery_of(line, v, &j.buyer),
        None => lottery(),
    };
    match store.line_join(&j.buyer, lottery, room.candidate()).await {
        Ok(Some(state)) => {
            let position = state.position;
            line.learn_join(&state);
            let view = match line.view.load_full() {
                Some(v) if v.state.epoch == state.epoch => v,
                _ => {
                    line.learn(state);
                    match line.view.load_full() {
                        Some(v) => v,
                        None => return unreachable(),
                    }
                }
            };
            // A line of one of several sales may be heard first by this
            // join (the gate had no view of it): what the gate checks
            // before a join, checked on the join's answer.
            let now = view.now_ms();
            let before_opening = view.state.opens_at_ms > 0 && now < view.state.opens_at_ms;
            if j.line.is_some()
                && (view.state.shut != 0 || (!before_opening && view.state.free == 0))
            {
                return shut_answer(&view.state, now);
            }
            waiting(shared, config, line, &view, &j.buyer, position, true)
        }
        Ok(None) => unreachable(),
        Err(e) => {
            room.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "waiting room: a buyer could not join");
            unreachable()
        }
    }
}

/// A buyer's id hashed with this process's random keys.
fn buyer_hash(buyer: &str) -> u64 {
    static SEED: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    SEED.get_or_init(Default::default).hash_one(buyer)
}

/// A buyer's lottery number in the pre-queue (52 bits): the line's secret
/// over the buyer, so every balancer gives a buyer the same number and no
/// buyer can know or choose theirs.
fn lottery_of(line: &Line, view: &LineView, buyer: &str) -> u64 {
    let mac = view.sign(&signed(line, b'l', view.state.epoch, buyer, 0));
    let mut first = [0u8; 8];
    first.copy_from_slice(&mac[..8]);
    u64::from_be_bytes(first) >> 12
}

/// A random lottery number, for a join before this balancer has heard
/// the line (unpredictable: the process's random hash keys over a
/// counter).
fn lottery() -> u64 {
    static SEED: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    SEED.get_or_init(Default::default).hash_one(n)
}

/// The answer to a buyer at `position` (0: in the unshuffled pre-queue):
/// `202 admitted` with a pass once the serving mark has reached them,
/// `202 waiting` otherwise; `new_place`: the place was just given, so the
/// answer carries its cookie.
fn waiting(
    shared: &Shared,
    config: &WaitingRoomConfig,
    line_of: &Line,
    view: &LineView,
    buyer: &str,
    position: u64,
    new_place: bool,
) -> Reply {
    let room = &shared.waiting_room;
    let line = &view.state;
    let now = view.now_ms();
    let mut deferred = false;
    if position > 0
        && position <= line.serving
        && let Admit::Rate { per_second } = config.admit
    {
        let share = f64::from(per_second) / line.balancers.max(1) as f64;
        let expires = now + config.pass_ttl.as_millis() as u64;
        let who = buyer_hash(buyer);
        deferred = !line_of
            .passes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(who, now, expires, share);
    }
    if deferred {
        // Admitted, but this balancer's share of the rate is spent for
        // now: ask again in a second (the place is kept).
        room.passes_deferred.fetch_add(1, Ordering::Relaxed);
        room.waiting_answers.fetch_add(1, Ordering::Relaxed);
        let mut body = String::with_capacity(96);
        let _ = writeln!(
            body,
            "{{\"status\":\"waiting\",\"position\":{position},\"ahead\":0,\"eta_s\":1}}"
        );
        let cookie = new_place.then(|| place_cookie(line_of, view, buyer, position));
        return accepted(body, super::answer::retry_after(1), cookie);
    }
    if position > 0 && position <= line.serving {
        room.passes_issued.fetch_add(1, Ordering::Relaxed);
        let ttl = config.pass_ttl.as_secs().max(1);
        let expires = now + config.pass_ttl.as_millis() as u64;
        let mut cookie = pass_cookie(line_of, view, buyer, expires);
        let _ = write!(cookie, "; Max-Age={ttl}{COOKIE_ATTRIBUTES}");
        let mut body = String::with_capacity(96);
        let _ = writeln!(
            body,
            "{{\"status\":\"admitted\",\"position\":{position},\"pass_ttl_s\":{ttl}}}"
        );
        return accepted(body, ("retry-after", "0"), Some(cookie));
    }
    room.waiting_answers.fetch_add(1, Ordering::Relaxed);
    let mut body = String::with_capacity(160);
    let retry = if position == 0 {
        // The pre-queue: nobody has a rank before the opening. Asked back
        // around the opening, spread over two seconds so that the crowd's
        // first requests after it do not all land at once.
        let until = line.opens_at_ms.saturating_sub(now).div_ceil(1000);
        let _ = writeln!(
            body,
            "{{\"status\":\"waiting\",\"position\":null,\"ahead\":null,\"eta_s\":{until},\"opens_at\":\"{}\",\"queued\":{}}}",
            crate::protocol::rfc3339_ms(line.opens_at_ms),
            line.pre
        );
        // Asked back about when the mark should reach them: the lottery
        // number, known to every balancer and not to the buyer, is their
        // place's quantile in the shuffle to come. The crowd's first
        // requests after the opening (each a store call to learn the
        // place) spread over the line's first minute instead of landing
        // at once, and each buyer comes back about when admitted.
        let quantile = lottery_of(line_of, view, buyer) as f64 / (1u64 << 52) as f64;
        let spread = match config.admit {
            Admit::Rate { per_second } => {
                (quantile * line.pre as f64 / f64::from(per_second)) as u64
            }
            Admit::FollowStock => (quantile * 2.0) as u64,
        };
        (until + spread).max(1)
    } else {
        let ahead = position - line.serving - 1;
        let speed = match config.admit {
            Admit::Rate { per_second } => f64::from(per_second),
            Admit::FollowStock => view.speed,
        };
        let eta = if speed > 0.0 {
            ((ahead + 1) as f64 / speed).ceil() as u64
        } else {
            0
        };
        if speed > 0.0 {
            let _ = writeln!(
                body,
                "{{\"status\":\"waiting\",\"position\":{position},\"ahead\":{ahead},\"eta_s\":{eta}}}"
            );
        } else {
            let _ = writeln!(
                body,
                "{{\"status\":\"waiting\",\"position\":{position},\"ahead\":{ahead},\"eta_s\":null}}"
            );
        }
        // Asked back when the mark should reach them (at most a minute
        // ahead, then told again): each buyer comes back about when
        // admitted, so the purchases reach the nodes at about the admit
        // rate rather than in the clumps that buyers told to wait a
        // fixed while would make.
        if speed > 0.0 {
            eta.clamp(1, MAX_WAIT_RETRY_S)
        } else {
            5
        }
    };
    let cookie = new_place.then(|| place_cookie(line_of, view, buyer, position));
    accepted(body, super::answer::retry_after(retry), cookie)
}

/// The attributes of both cookies: sent on every path (the purchase's
/// and the order routes'), never to scripts, not on cross-site posts.
const COOKIE_ATTRIBUTES: &str = "; Path=/; HttpOnly; SameSite=Lax";

/// A `202` of the waiting room: `body`, `Retry-After` and maybe a cookie.
fn accepted(body: String, retry: (&'static str, &'static str), cookie: Option<String>) -> Reply {
    Reply {
        status: StatusCode::ACCEPTED,
        body: ReplyBody::Owned(body),
        header: Some(retry),
        cookie,
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `spike_queue=EPOCH.POSITION.MAC` with its attributes, the MAC over the
/// buyer too, so a place copied to another buyer is no place.
fn place_cookie(line: &Line, view: &LineView, buyer: &str, position: u64) -> String {
    let mac = view.sign(&signed(line, b'q', view.state.epoch, buyer, position));
    format!(
        "{}={}.{position}.{}{COOKIE_ATTRIBUTES}",
        line.queue_name(),
        view.state.epoch,
        b64(&mac)
    )
}

/// `spike_pass=EPOCH.EXPIRES.MAC`.
fn pass_cookie(line: &Line, view: &LineView, buyer: &str, expires_ms: u64) -> String {
    let mac = view.sign(&signed(line, b'p', view.state.epoch, buyer, expires_ms));
    format!(
        "{}={}.{expires_ms}.{}",
        line.pass_name(),
        view.state.epoch,
        b64(&mac)
    )
}

/// What a place, a pass or a lottery number signs: its kind, the line's
/// epoch, its number, the buyer, and in front of several sales the sale
/// (two sales' lines may share a secret and an epoch: a pass is its
/// sale's only).
fn signed(line: &Line, kind: u8, epoch: u64, buyer: &str, n: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(buyer.len() + line.event.len() + 25);
    v.push(kind);
    v.extend_from_slice(&epoch.to_be_bytes());
    v.extend_from_slice(&n.to_be_bytes());
    v.extend_from_slice(buyer.as_bytes());
    if !line.event.is_empty() {
        v.push(0);
        v.extend_from_slice(line.event.as_bytes());
    }
    v
}

/// `EPOCH.N.MAC` split and checked against this line's epoch and `buyer`:
/// N, or `None` when it is not this buyer's for this sale.
fn checked(line: &Line, view: &LineView, kind: u8, buyer: &str, value: &[u8]) -> Option<u64> {
    let value = std::str::from_utf8(value).ok()?;
    let mut parts = value.splitn(3, '.');
    let epoch: u64 = parts.next()?.parse().ok()?;
    let n: u64 = parts.next()?.parse().ok()?;
    let mac = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts.next()?)
        .ok()?;
    if epoch != view.state.epoch || mac.len() != 16 {
        return None;
    }
    let mut check = view.mac.clone();
    check.update(&signed(line, kind, epoch, buyer, n));
    check.verify_truncated_left(&mac).ok()?;
    Some(n)
}

fn pass_is_valid(line: &Line, view: &LineView, buyer: &str, value: &[u8], now: u64) -> bool {
    checked(line, view, b'p', buyer, value).is_some_and(|expires| now < expires)
}

fn place_of(line: &Line, view: &LineView, buyer: &str, value: &[u8]) -> Option<u64> {
    checked(line, view, b'q', buyer, value)
}

/// The waiting room's figures, for `/status` and `/metrics`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RoomStatus {
    /// A `[waiting_room]` is in force and has heard the line.
    pub on: bool,
    /// `"N/s"` or `"follow_stock"`.
    pub admit: String,
    /// Buyers in line and not admitted.
    pub waiting: u64,
    /// Everyone who joined (pre-queue included).
    pub joined: u64,
    /// Joined before the opening.
    pub prequeue: u64,
    /// The serving mark.
    pub serving: u64,
    /// Positions admitted a second, lately.
    pub admit_rate: f64,
    /// How long the first buyer not admitted has waited, seconds.
    pub oldest_wait_s: f64,
    pub waiting_answers: u64,
    pub passes_issued: u64,
    pub passes_accepted: u64,
    pub passes_refused: u64,
    pub passes_deferred: u64,
    /// Balancers moving the line (each hands out its share of the rate).
    pub balancers: u64,
    pub join_calls: u64,
    pub tick_calls: u64,
    pub store_errors: u64,
}

/// The figures now.
pub fn status(shared: &Shared) -> RoomStatus {
    let room = &shared.waiting_room;
    let config = shared.current.load().config.waiting_room.clone();
    let view = room.one.view.load_full();
    let several = room.stores.get().is_some();
    let mut s = RoomStatus {
        on: config.is_some() && (view.is_some() || several),
        admit: match config.as_ref().map(|c| c.admit) {
            Some(Admit::Rate { per_second }) => format!("{per_second}/s"),
            Some(Admit::FollowStock) => "follow_stock".into(),
            None => String::new(),
        },
        waiting_answers: room.waiting_answers.load(Ordering::Relaxed),
        passes_issued: room.passes_issued.load(Ordering::Relaxed),
        passes_accepted: room.passes_accepted.load(Ordering::Relaxed),
        passes_refused: room.passes_refused.load(Ordering::Relaxed),
        passes_deferred: room.passes_deferred.load(Ordering::Relaxed),
        join_calls: room.join_calls.load(Ordering::Relaxed),
        tick_calls: room.tick_calls.load(Ordering::Relaxed),
        store_errors: room.store_errors.load(Ordering::Relaxed),
        ..RoomStatus::default()
    };
    if let Some(v) = view {
        s.waiting = v.waiting();
        s.joined = v.state.joined();
        s.prequeue = v.state.pre;
        s.serving = v.state.serving;
        s.admit_rate = (v.speed * 10.0).round() / 10.0;
        s.oldest_wait_s = v.state.oldest_wait_ms as f64 / 1000.0;
        s.balancers = v.state.balancers;
    }
    if several {
        // In front of several sales, the lines heard lately, together.
        for line in room.lines.load().values() {
            if let Some(v) = line.view.load().as_deref() {
                s.waiting += v.waiting();
                s.joined += v.state.joined();
                s.prequeue += v.state.pre;
                s.balancers = s.balancers.max(v.state.balancers);
            }
        }
    }
    s
}

/// Answers a `Gate::Shut` when the edge did not: `None` (on to a node)
/// for a buyer's keyed retry, `reply` for anyone else.
pub fn after_edge(retry: bool, reply: Reply) -> Option<Reply> {
    (!retry).then_some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A balancer's passes: never more than its share (rounded up) within
    /// any second, however hard it is asked, and about its share over
    /// two seconds. (Its tick's worth of burst on top of a second's
    /// refill handed out 20% more.)
    #[test]
    fn a_balancer_hands_out_its_share_in_any_second() {
        let share = 50.0;
        let mut bucket = PassBucket::default();
        let start = Instant::now();
        let mut handed = Vec::new();
        let mut buyer = 1u64;
        while start.elapsed() < Duration::from_millis(2_200) {
            buyer += 1;
            if bucket.admit(buyer, 0, u64::MAX, share) {
                // The time the bucket counted it at.
                handed.push(*bucket.handed.back().expect("a pass"));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        for (i, &at) in handed.iter().enumerate() {
            let within = handed[i..]
                .iter()
                .take_while(|&&t| t.duration_since(at) < Duration::from_secs(1))
                .count();
            assert!(within <= 50, "{within} passes within a second");
        }
        assert!(handed.len() >= 60, "{} passes in 2.2 s", handed.len());
    }

    /// In front of several sales, a line's loop ends with the balancer:
    /// once `Balancer::run` has returned, nothing of the balancer runs on
    /// (its state is dropped), where the loop used to move its line until
    /// nobody had asked about it for `LINE_IDLE` (two minutes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lines_loop_ends_with_the_balancer() {
        let path = std::env::temp_dir().join(format!(
            "spike-line-loop-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(
            &path,
            "[[sale]]\nevent = \"a\"\ntotal = 5\n\n[[sale]]\nevent = \"b\"\ntotal = 5\n\n\
             [balancer]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
             [waiting_room]\nadmit = \"10/s\"\n\n\
             [[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:1\"\n",
        )
        .expect("config file");
        let config = crate::config::Config::load(&path).expect("config");
        let _ = std::fs::remove_file(&path);
        let stores = crate::node::store::Stores::open(&config.sales, None)
            .await
            .expect("stores");
        let balancer = super::super::Balancer::new(config).expect("balancer");
        balancer.attach_line_stores(stores);
        let running = super::super::in_process::Running::start(balancer).await;
        let shared = running.shared.clone();
        // A purchase of `a` makes its line; the balancer starts its loop.
        let line = shared.waiting_room.line_for("a").expect("a's line");
        line.asked_ms
            .store(super::super::clock::now_ms(), Ordering::Relaxed);
        for _ in 0..1000 {
            if line.watched.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            line.watched.load(Ordering::Acquire),
            "the line's loop started"
        );
        drop((line, shared));
        // A bound far below `LINE_IDLE`.
        running.stop_and_forget(LINE_IDLE / 4).await;
    }
}
