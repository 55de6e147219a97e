//! Idle keep-alive connections that give their place up to a new client
//! when the connection cap is reached, oldest first: Nginx's "reusable
//! connections".
//!
//! The cap (`max_connections`) is a semaphore taken before the accept. Keep-
//! alive clients of a sale make one request and then sit idle for up to
//! `keepalive_timeout` (75 s); with the cap held by them, a new buyer waited
//! in the backlog until one of them timed out. Nginx, out of connections,
//! closes idle keep-alive connections (the least recently used first) and
//! serves the new one at once; so does [`Reusable`].
//!
//! Each open connection holds a [`Place`]: one slot of a fixed table, sized
//! to the cap, whose word says whether the connection is idle and since
//! when. A connection marks itself idle ([`Idle::idle`]) while it waits for
//! a next request and busy ([`Idle::busy`]) when one begins: one atomic
//! store each, on the connection's own slot (no lock, no shared counter on
//! the hot path). Only an accept loop that finds no permit looks at the
//! table: it picks the slot idle the longest, claims it (a compare-and-swap,
//! so a connection that began a request meanwhile is left alone) and wakes
//! its connection, which closes. A request that arrives on a connection in
//! the instant it is claimed is not served: the client sees its idle
//! keep-alive connection closed, which every HTTP client retries (the same
//! race as a server's own idle timeout).
//!
//! With several accept loops (the balancer's workers), a loop holding a
//! permit while it waits for a client is counted ([`Reusable::spare`]):
//! while one is, the others do not accept over the cap, since the next
//! client is that loop's and closing a connection for it would be for
//! nothing (two connections were closed for one client before). A loop
//! whose claimed connection's permit went to another waiting loop claims
//! the next one after a short wait.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::recycle::now_ms;

/// A slot's word: the connection is busy (serving, or before its first
/// request), or the slot is free.
const BUSY: u64 = 0;
/// A slot's word: an accept loop claimed the idle connection; it closes.
const CLAIMED: u64 = u64::MAX;

/// One connection's slot; any other word than [`BUSY`] and [`CLAIMED`] is
/// "idle since" ([`now_ms`] + 1). Aligned to a cache line: neighbouring
/// slots belong to connections on other worker threads.
#[repr(align(64))]
#[derive(Default)]
struct Slot {
    word: AtomicU64,
    /// Woken when the slot is claimed, when the server stops and when a
    /// crowd forms: one waiter in each idle connection for all three.
    claimed: Notify,
}

/// The idle keep-alive connections of one server (every accept loop on its
/// port): what an accept loop with no permit left closes to make room.
pub struct Reusable {
    slots: Box<[Slot]>,
    /// Slots no connection holds.
    free: Mutex<Vec<u32>>,
    /// Accept loops waiting for a connection to turn idle (see
    /// [`Reusable::idle_appeared`]).
    starved: AtomicUsize,
    /// Woken when a connection turns idle while a loop is starved, or
    /// when a loop that held a permit in hand took its client.
    appeared: Notify,
    /// Loops waiting for a client with a permit in hand: while one is, a
    /// new client is its, and no idle connection needs to be closed.
    spare: AtomicUsize,
    /// Whether idle connections were woken for the crowd now open (see
    /// [`Reusable::crowd`]).
    crowd_woken: AtomicBool,
    /// The server stopped: its connections close.
    stopped: AtomicBool,
}

impl Reusable {
    /// A table for a cap of `most` connections.
    pub fn new(most: usize) -> Arc<Reusable> {
        let most = most.min(u32::MAX as usize);
        Arc::new(Reusable {
            slots: (0..most).map(|_| Slot::default()).collect(),
            free: Mutex::new((0..most as u32).rev().collect()),
            starved: AtomicUsize::new(0),
            appeared: Notify::new(),
            spare: AtomicUsize::new(0),
            crowd_woken: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        })
    }

    /// Told at every accept whether the server is
    /// [`super::recycle::crowded`]: when a crowd forms, every idle
    /// connection is woken once to give its buffers back (ten thousand
    /// keep-alive clients, the first thousand of them holding 16 KiB each
    /// since they went idle before the crowd, were most of the balancer's
    /// memory). Once per crowd, not per accept: the wake looks at every
    /// slot. A connection that goes idle later looks at the crowd itself.
    pub(super) fn crowd(&self, crowded: bool) {
        if !crowded {
            if self.crowd_woken.load(Ordering::Relaxed) {
                self.crowd_woken.store(false, Ordering::Relaxed);
            }
            return;
        }
        if self.crowd_woken.swap(true, Ordering::SeqCst) {
            return;
        }
        for slot in &self.slots {
            if is_idle(slot.word.load(Ordering::SeqCst)) {
                slot.claimed.notify_waiters();
            }
        }
    }

    /// The server stops: every connection waiting for a request closes.
    pub(super) fn stop_all(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        for slot in &self.slots {
            slot.claimed.notify_waiters();
        }
    }

    /// A slot for a connection that holds a permit of the cap (so there is
    /// one); `None` only if the table is smaller than the cap.
    pub(super) fn place(self: &Arc<Self>) -> Option<Place> {
        let index = self.free.lock().ok()?.pop()?;
        let slot = self.slots.get(index as usize)?;
        slot.word.store(BUSY, Ordering::SeqCst);
        Some(Place(Idle {
            reusable: self.clone(),
            index,
        }))
    }

    /// Whether some connection is idle now.
    pub(super) fn any_idle(&self) -> bool {
        self.slots
            .iter()
            .any(|s| is_idle(s.word.load(Ordering::SeqCst)))
    }

    /// Whether a loop with no permit should accept the next client and
    /// close an idle connection for it: some connection is idle, and no
    /// other loop waits for a client with a permit in hand (that one takes
    /// it, and closing a connection would be for nothing).
    pub(super) fn room_to_make(&self) -> bool {
        self.spare.load(Ordering::SeqCst) == 0 && self.any_idle()
    }

    /// Counts a loop as waiting for a client with a permit in hand until
    /// the returned guard is dropped.
    pub(super) fn spare(&self) -> Spare<'_> {
        self.spare.fetch_add(1, Ordering::SeqCst);
        Spare(self)
    }

    /// Claims the connection idle the longest and wakes it to close;
    /// whether there was one.
    pub(super) fn reclaim_oldest(&self) -> bool {
        loop {
            let oldest = self
                .slots
                .iter()
                .map(|s| s.word.load(Ordering::SeqCst))
                .enumerate()
                .filter(|&(_, w)| is_idle(w))
                .min_by_key(|&(_, w)| w);
            let Some((i, since)) = oldest else {
                return false;
            };
            let slot = &self.slots[i];
            if slot
                .word
                .compare_exchange(since, CLAIMED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                // A permit if the connection is not waiting yet: it looks
                // at its word before it waits.
                slot.claimed.notify_one();
                return true;
            }
            // It began a request meanwhile: look again.
        }
    }

    /// Resolves once [`Reusable::room_to_make`] may have become true (at
    /// once if it is).
    pub(super) async fn idle_appeared(&self) {
        self.starved.fetch_add(1, Ordering::SeqCst);
        let _starved = Starved(&self.starved);
        let appeared = self.appeared.notified();
        tokio::pin!(appeared);
        // Registered before the look: a connection that turns idle after it
        // sees `starved` and wakes us.
        appeared.as_mut().enable();
        if self.room_to_make() {
            return;
        }
        appeared.await;
    }
}

/// A loop waiting for a client with a permit in hand (see
/// [`Reusable::spare`]).
pub(super) struct Spare<'a>(&'a Reusable);

impl Drop for Spare<'_> {
    fn drop(&mut self) {
        self.0.spare.fetch_sub(1, Ordering::SeqCst);
        if self.0.starved.load(Ordering::SeqCst) > 0 {
            self.0.appeared.notify_waiters();
        }
    }
}

/// Counts a loop as starved until dropped.
struct Starved<'a>(&'a AtomicUsize);

impl Drop for Starved<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn is_idle(word: u64) -> bool {
    word != BUSY && word != CLAIMED
}

/// A connection's handle on its slot, to say when it is idle and to hear
/// when it is claimed; cloned to where the connection goes (the fast path,
/// hyper's side), while its [`Place`] frees the slot.
#[derive(Clone)]
pub struct Idle {
    reusable: Arc<Reusable>,
    index: u32,
}

impl Idle {
    fn slot(&self) -> &Slot {
        &self.reusable.slots[self.index as usize]
    }

    /// The connection waits for a next request from now: it may be closed
    /// for a new client. A connection already idle keeps its older time.
    pub fn idle(&self) {
        let since = now_ms().saturating_add(1).min(CLAIMED - 1);
        let _ = self
            .slot()
            .word
            .compare_exchange(BUSY, since, Ordering::SeqCst, Ordering::SeqCst);
        if self.reusable.starved.load(Ordering::SeqCst) > 0 {
            self.reusable.appeared.notify_waiters();
        }
    }

    /// A request began: the connection is no longer idle. `false` when an
    /// accept loop claimed it first: it must close without serving.
    pub fn busy(&self) -> bool {
        self.slot().word.swap(BUSY, Ordering::SeqCst) != CLAIMED
    }

    /// Resolves once an accept loop claims the connection.
    pub async fn claimed(&self) {
        let slot = self.slot();
        loop {
            let woken = slot.claimed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if slot.word.load(Ordering::SeqCst) == CLAIMED {
                return;
            }
            // A wake left over from an earlier owner of the slot, or from a
            // claim this connection already answered, comes here too.
            woken.await;
        }
    }
}

impl Idle {
    /// Whether the connection is to close: claimed for a new client, or
    /// its server stopped.
    pub fn ends(&self) -> bool {
        self.slot().word.load(Ordering::SeqCst) == CLAIMED
            || self.reusable.stopped.load(Ordering::SeqCst)
    }

    /// Resolves once the connection [`Idle::ends`] or `also` says true,
    /// looked at after the wait is registered (so no wake between the
    /// look and the wait is missed); it may also resolve for nothing (a
    /// crowd's wake, a claim of the slot's earlier owner). One waiter for
    /// every reason an idle connection wakes: each is a hundred bytes in
    /// every idle connection.
    pub async fn nudged(&self, also: impl Fn() -> bool) {
        let woken = self.slot().claimed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if self.ends() || also() {
            return;
        }
        woken.await;
    }
}

/// Resolves once the connection of `idle` is claimed; never without a slot.
pub async fn claimed(idle: Option<&Idle>) {
    match idle {
        Some(idle) => idle.claimed().await,
        None => std::future::pending().await,
    }
}

/// A connection's slot, freed when dropped (with the connection).
pub(super) struct Place(Idle);

impl Place {
    /// The handle the connection's code uses.
    pub(super) fn idle(&self) -> Idle {
        self.0.clone()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.slot().word.store(BUSY, Ordering::SeqCst);
        if let Ok(mut free) = self.0.reusable.free.lock() {
            free.push(self.0.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_idle_connection_is_claimed_and_a_busy_one_never() {
        let table = Reusable::new(3);
        let a = table.place().expect("a");
        let b = table.place().expect("b");
        let c = table.place().expect("c");
        assert!(table.place().is_none(), "more places than the cap");
        assert!(!table.any_idle());
        assert!(!table.reclaim_oldest());
        a.idle().idle();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        b.idle().idle();
        // `a` began a request: `b` is the oldest idle one now.
        assert!(a.idle().busy());
        assert!(table.reclaim_oldest());
        tokio::time::timeout(std::time::Duration::from_secs(1), b.idle().claimed())
            .await
            .expect("b is told");
        assert!(!b.idle().busy(), "a claimed connection must close");
        assert!(!table.reclaim_oldest(), "c is busy, a is busy");
        // A freed slot comes back clean.
        drop(b);
        let d = table.place().expect("d");
        assert!(d.idle().busy());
        drop(c);
    }

    #[tokio::test]
    async fn a_starved_loop_hears_of_a_connection_turning_idle() {
        let table = Reusable::new(1);
        let a = table.place().expect("a");
        let waiting = {
            let table = table.clone();
            tokio::spawn(async move { table.idle_appeared().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        a.idle().idle();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("woken")
            .expect("task");
    }
}
