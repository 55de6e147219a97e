//! The holders a sold-out node answers from (and hands to the balancer's
//! edge), in a compact form: a buyer is a keyed 64-bit hash and their last
//! order its sequence number; an `Idempotency-Key` that bought is only its
//! hash, so a request whose key is not among them is answered from memory
//! (the key never bought) and one whose key is goes to the store, which
//! replays it exactly (a retry is rare; a fresh key on every request is
//! not). Strings kept per holder per node cost about 2 KB each once read
//! (measured at 50,000 holders under `spike up`,
//! `scripts/holders_churn.sh`); this form costs a few tens of bytes.
//!
//! A hash can collide. Two buyers at the limit whose hashes collide are seen
//! when they are stored (a second order for one hash): that hash is then
//! marked [`Lookup::AskStore`], and the store answers for it. A buyer who
//! holds nothing and whose hash equals a holder's cannot be seen; the hash
//! is SipHash keyed with random keys chosen per process ([`HolderSeed`]),
//! so nobody can aim at one, and the chance that a given request meets one
//! is about holders ÷ 2^64 (3·10^-15 at 50,000 holders). A key's hash that
//! collides costs a store call, never a wrong answer.
//!
//! The holders change while a sale with a payment window is sold out
//! (reservations expire or are cancelled, and resell): [`Holders::apply`]
//! takes what a [`HolderChanges`] says changed, read from the store by the
//! events since the last read, instead of a full read per release.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock, RwLockReadGuard, Weak};

use arc_swap::ArcSwapOption;

use super::model::SaleState;

/// The keys of the holders' hash. Random per process; handed out with
/// `/holders` so that a balancer in another process looks buyers up with
/// the node's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HolderSeed(pub u64, pub u64);

impl HolderSeed {
    /// Fresh random keys.
    pub fn random() -> HolderSeed {
        HolderSeed(
            crate::node::state::random_u64(),
            crate::node::state::random_u64().rotate_left(17),
        )
    }

    /// The hash of a buyer id or a key under these keys.
    // SipHash-2-4 with chosen keys: the only keyed hash in std whose keys
    // can be given (its deprecation points to crates, not to a flaw).
    #[allow(deprecated)]
    pub fn hash(&self, s: &str) -> u64 {
        let mut h = std::hash::SipHasher::new_with_keys(self.0, self.1);
        h.write(s.as_bytes());
        h.finish()
    }
}

/// A hasher for keys that are already hashes: the map does not hash twice.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64`s are hashed with it; anything else still spreads.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by a hash.
pub type HashKeyed<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// What memory says of a buyer or a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<T> {
    /// Known: the answer.
    Found(T),
    /// Not a holder.
    Absent,
    /// Two of them share the hash (or an id did not read as this sale's):
    /// the store answers.
    AskStore,
}

/// The buyers at the limit and the keys that bought, of one epoch, and how
/// far they are current.
#[derive(Debug, Clone)]
pub struct Holders {
    /// The sale's epoch they belong to (the first part of every order id).
    pub epoch: u64,
    /// The limit they were read with: a buyer holding that many is one.
    pub per_user_limit: u64,
    /// The keys of the hashes.
    pub seed: HolderSeed,
    /// Buyer hash → their last order's sequence number.
    buyers: HashKeyed<u64>,
    /// Hashes of the keys that bought.
    keys: HashSet<u64, BuildHasherDefault<IdHasher>>,
    /// Buyer hashes the store answers for.
    ask_buyers: HashSet<u64, BuildHasherDefault<IdHasher>>,
    /// Tickets that had come back when they were current.
    pub released: u64,
    /// Orders created (sold + released) when they were current.
    pub created: u64,
    /// The last event of the sale's stream taken in (`0-0`: none yet);
    /// empty where the store has no stream (the embedded store).
    pub cursor: String,
}

impl Holders {
    /// None yet, for `epoch`.
    pub fn new(epoch: u64, per_user_limit: u64, seed: HolderSeed) -> Holders {
        Holders {
            epoch,
            per_user_limit,
            seed,
            buyers: HashKeyed::default(),
            keys: HashSet::default(),
            ask_buyers: HashSet::default(),
            released: 0,
            created: 0,
            cursor: String::new(),
        }
    }

    /// Buyers at the limit.
    pub fn buyer_count(&self) -> usize {
        self.buyers.len()
    }

    /// Keys that bought.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Marks them current as of `sale` (what the store said when they were
    /// last read or changed).
    pub fn current_as_of(&mut self, sale: &SaleState) {
        self.released = sale.released;
        self.created = sale.sold + sale.released;
    }

    /// Whether they are current for a sale last heard at `released`
    /// returned tickets and `created` orders.
    pub fn current_for(&self, released: u64, created: u64) -> bool {
        self.released == released && self.created >= created
    }

    /// The order sequence of `order` when it is this sale's `epoch-seq`.
    fn seq_of(&self, order: &str) -> Option<u64> {
        let (epoch, seq) = order.rsplit_once('-')?;
        (epoch.parse::<u64>().ok()? == self.epoch)
            .then(|| seq.parse().ok())
            .flatten()
    }

    /// The order id of sequence `seq` in this sale.
    pub fn order_id(&self, seq: u64) -> String {
        let mut epoch = itoa::Buffer::new();
        let mut n = itoa::Buffer::new();
        let (e, s) = (epoch.format(self.epoch), n.format(seq));
        let mut id = String::with_capacity(e.len() + 1 + s.len());
        id.push_str(e);
        id.push('-');
        id.push_str(s);
        id
    }

    /// Records `buyer` as holding the limit, with `order` their last order.
    /// A hash that already stands for another order is the store's to
    /// answer from then on (two buyers, or a buyer whose order changed:
    /// either way memory cannot tell).
    pub fn put_buyer(&mut self, buyer: &str, order: &str) {
        let h = self.seed.hash(buyer);
        let Some(seq) = self.seq_of(order) else {
            self.ask_buyers.insert(h);
            return;
        };
        match self.buyers.insert(h, seq) {
            Some(old) if old != seq => {
                self.ask_buyers.insert(h);
            }
            _ => {}
        }
    }

    /// `buyer` no longer holds the limit.
    pub fn drop_buyer(&mut self, buyer: &str) {
        self.buyers.remove(&self.seed.hash(buyer));
    }

    /// Records that `key` bought.
    pub fn put_key(&mut self, key: &str) {
        self.keys.insert(self.seed.hash(key));
    }

    /// What memory says of `buyer`: their last order's sequence when at
    /// the limit.
    pub fn buyer(&self, buyer: &str) -> Lookup<u64> {
        let h = self.seed.hash(buyer);
        if self.ask_buyers.contains(&h) {
            return Lookup::AskStore;
        }
        match self.buyers.get(&h) {
            Some(&seq) => Lookup::Found(seq),
            None => Lookup::Absent,
        }
    }

    /// Whether `key` may have bought (then the store answers: a replay
    /// or, for another buyer, a refusal); false: it never did.
    pub fn key_bought(&self, key: &str) -> bool {
        self.keys.contains(&self.seed.hash(key))
    }

    /// Takes in what changed since they were current: each named buyer and
    /// key as the store holds them now. Once the changes reach the newest
    /// event (`!more`), they are current as of the changes' sale.
    pub fn apply(&mut self, changes: &HolderChanges) {
        for (buyer, order) in &changes.buyers {
            if self.per_user_limit > 0 && !order.is_empty() {
                self.put_buyer(buyer, order);
            } else {
                self.drop_buyer(buyer);
            }
        }
        for key in &changes.keys {
            self.put_key(key);
        }
        self.cursor.clone_from(&changes.cursor);
        if !changes.more {
            self.current_as_of(&changes.sale);
        }
    }

    /// Buyer hash → order sequence of every buyer at the limit, and the
    /// hashes the store answers for (for `/holders`).
    pub fn buyer_entries(&self) -> (Vec<[u64; 2]>, Vec<u64>) {
        (
            self.buyers.iter().map(|(&h, &s)| [h, s]).collect(),
            self.ask_buyers.iter().copied().collect(),
        )
    }
}

/// The holders of one epoch of the sale, as kept in memory.
pub struct KnownHolders {
    /// The epoch they were read for.
    pub epoch: u64,
    /// The buyers at the limit and the keys that bought; changed in place
    /// as tickets come back and resell (a write lock for the few changes
    /// of one store call, never held across an `.await`).
    holders: RwLock<Holders>,
}

impl KnownHolders {
    /// Holders read for `epoch`.
    pub fn new(epoch: u64, holders: Holders) -> KnownHolders {
        KnownHolders {
            epoch,
            holders: RwLock::new(holders),
        }
    }

    /// The holders, to look up (a read lock: drop it before awaiting).
    pub fn read(&self) -> RwLockReadGuard<'_, Holders> {
        self.holders.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes in what changed.
    pub fn apply(&self, changes: &HolderChanges) {
        self.holders
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .apply(changes);
    }
}

/// The holders of one sale's store, shared by every node of a process that
/// sells from it (`spike up`'s nodes): one copy in memory and one task
/// reading the store's changes per process, not one per node. A node's own
/// view of the sale (`SaleView`) says whether they are current for it.
pub struct HolderCell {
    /// The holders read, of whatever epoch (readers check it).
    pub holders: ArcSwapOption<KnownHolders>,
    /// The epoch whose holders a task keeps current (0: none).
    pub learning: AtomicU64,
    /// Grows when a reset drops the holders: a task started before stops.
    pub generation: AtomicU64,
    /// The keys of the holders' hashes.
    pub seed: HolderSeed,
}

/// The cells of this process, by store (Redis URL and event).
static CELLS: LazyLock<Mutex<HashMap<String, Weak<HolderCell>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl HolderCell {
    /// A cell of its own (the embedded store's, shared through the store).
    pub fn new() -> Arc<HolderCell> {
        Arc::new(HolderCell {
            holders: ArcSwapOption::empty(),
            learning: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            seed: HolderSeed::random(),
        })
    }

    /// The cell of the store named `key` in this process: the same one for
    /// every node that connects to the same Redis for the same sale.
    pub fn shared(key: &str) -> Arc<HolderCell> {
        let mut cells = CELLS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cell) = cells.get(key).and_then(Weak::upgrade) {
            return cell;
        }
        cells.retain(|_, c| c.strong_count() > 0);
        let cell = HolderCell::new();
        cells.insert(key.to_string(), Arc::downgrade(&cell));
        cell
    }

    /// Marks the holders of `epoch` as kept current by a task; `None` when
    /// a task already does, else the generation it must stay in.
    pub fn start_learning(&self, epoch: u64) -> Option<u64> {
        let learning = self.learning.load(Ordering::Acquire);
        if learning == epoch
            || self
                .learning
                .compare_exchange(learning, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return None;
        }
        Some(self.generation.load(Ordering::Acquire))
    }

    /// The task for `epoch` ended (whichever way).
    pub fn done_learning(&self, epoch: u64) {
        let _ = self
            .learning
            .compare_exchange(epoch, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether a task for `epoch` started in `generation` is still wanted.
    pub fn learning(&self, epoch: u64, generation: u64) -> bool {
        self.learning.load(Ordering::Acquire) == epoch
            && self.generation.load(Ordering::Acquire) == generation
    }

    /// The sale is at `epoch` now: holders of an earlier one go, and a task
    /// for an earlier one stops (at its next page). Each node of the
    /// process says so when it hears of the reset; only the first changes
    /// anything.
    pub fn forget_before(&self, epoch: u64) {
        let learning = self.learning.load(Ordering::Acquire);
        if learning != 0 && learning < epoch {
            self.generation.fetch_add(1, Ordering::AcqRel);
            let _ =
                self.learning
                    .compare_exchange(learning, 0, Ordering::AcqRel, Ordering::Acquire);
        }
        let old = self.holders.load();
        if old.as_deref().is_some_and(|k| k.epoch < epoch) {
            self.holders.store(None);
        }
    }
}

/// What changed among the holders since a cursor in the sale's stream (see
/// `holders.lua`), read in the same step as the sale's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HolderChanges {
    /// The sale when read.
    pub sale: SaleState,
    /// Each buyer the events name, with the order that puts them at the
    /// limit (`""`: they are not at it).
    pub buyers: Vec<(String, String)>,
    /// The keys of the orders created.
    pub keys: Vec<String>,
    /// The last event read.
    pub cursor: String,
    /// More events wait after it.
    pub more: bool,
}

/// Why [`HolderChanges`] could not be given: the holders must be read in
/// full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoChanges {
    /// Events after the cursor were trimmed from the stream (or the store
    /// keeps no stream).
    Gone,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders() -> Holders {
        Holders::new(7, 1, HolderSeed(1, 2))
    }

    #[test]
    fn a_buyer_at_the_limit_is_found_with_their_order() {
        let mut h = holders();
        h.put_buyer("alice", "7-12");
        assert_eq!(h.buyer("alice"), Lookup::Found(12));
        assert_eq!(h.order_id(12), "7-12");
        assert_eq!(h.buyer("bob"), Lookup::Absent);
        h.drop_buyer("alice");
        assert_eq!(h.buyer("alice"), Lookup::Absent);
    }

    #[test]
    fn a_hash_with_two_orders_or_another_epochs_order_asks_the_store() {
        let mut h = holders();
        h.put_buyer("alice", "7-1");
        h.put_buyer("alice", "7-1");
        assert_eq!(h.buyer("alice"), Lookup::Found(1), "the same read twice");
        h.put_buyer("alice", "7-2");
        assert_eq!(h.buyer("alice"), Lookup::AskStore);
        h.put_buyer("carol", "6-3");
        assert_eq!(h.buyer("carol"), Lookup::AskStore);
    }

    #[test]
    fn a_key_that_bought_is_known_one_that_did_not_is_not() {
        let mut h = holders();
        h.put_key("k1");
        assert!(h.key_bought("k1"));
        assert!(!h.key_bought("k2"));
        assert_eq!(h.key_count(), 1);
    }

    #[test]
    fn changes_drop_released_buyers_add_new_ones_and_say_how_current() {
        let mut h = holders();
        h.put_buyer("alice", "7-1");
        let sale = SaleState {
            epoch: 7,
            limit: 1,
            sold: 1,
            total: 1,
            released: 1,
            pay_within_ms: 1000,
            moments: crate::protocol::Moments::default(),
        };
        let mut changes = HolderChanges {
            sale,
            buyers: vec![
                ("alice".into(), String::new()),
                ("bob".into(), "7-2".into()),
            ],
            keys: vec!["kb".into()],
            cursor: "5-0".into(),
            more: true,
        };
        h.apply(&changes);
        assert_eq!(h.buyer("alice"), Lookup::Absent);
        assert_eq!(h.buyer("bob"), Lookup::Found(2));
        assert!(h.key_bought("kb"));
        assert_eq!(h.cursor, "5-0");
        assert!(!h.current_for(1, 2), "more events wait");
        changes.more = false;
        changes.buyers.clear();
        h.apply(&changes);
        assert!(h.current_for(1, 2));
        assert!(!h.current_for(2, 2));
    }
}
