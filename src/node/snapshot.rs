//! The sale's snapshot as `/sale` serves it, cached: a flood of `/sale`
//! costs the store a few calls a second, not one per request.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::store::{Snapshot, Store};

/// How long a cached `/sale` answer is served: a flood of it costs the store
/// a few calls a second, not one per request.
const SALE_CACHE: Duration = Duration::from_millis(500);

/// A `/sale` answer and when it was read.
struct CachedSale {
    at: Instant,
    body: Bytes,
}

/// Why no snapshot could be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotError {
    /// The store did not answer (in time).
    Unavailable,
    /// The snapshot could not be written as JSON.
    Encode,
}

/// The last snapshot read, as JSON, and the one read under way: one store
/// call at a time refreshes it, whatever the number of callers.
#[derive(Default)]
pub struct SnapshotCache {
    cached: Mutex<Option<CachedSale>>,
    refreshing: AtomicBool,
    /// Wakes the callers waiting for the first snapshot.
    ready: tokio::sync::Notify,
}

impl SnapshotCache {
    /// An empty cache: the first caller reads.
    pub fn new() -> SnapshotCache {
        SnapshotCache::default()
    }

    /// Forgets the cached snapshot (the sale was reset).
    pub fn clear(&self) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn cached(&self) -> Option<(Instant, Bytes)> {
        self.cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| (c.at, c.body.clone()))
    }

    /// The sale's snapshot as JSON, at most `SALE_CACHE` (half a second) old; a caller
    /// that finds another reading it takes the last one, or, with none yet,
    /// waits up to `timeout` for the one being read.
    pub async fn get(&self, store: &Store, timeout: Duration) -> Result<Bytes, SnapshotError> {
        let now = Instant::now();
        let stale = match self.cached() {
            Some((at, body)) if now.duration_since(at) < SALE_CACHE => {
                return Ok(body);
            }
            other => other,
        };
        if self.refreshing.swap(true, Ordering::AcqRel) {
            // Another request is reading it: the last answer will do, or,
            // with none yet, the one being read.
            if let Some((_, body)) = stale {
                return Ok(body);
            }
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some((_, body)) = self.cached() {
                return Ok(body);
            }
            let _ = tokio::time::timeout(timeout, ready).await;
            return match self.cached() {
                Some((_, body)) => Ok(body),
                None => Err(SnapshotError::Unavailable),
            };
        }
        let refresh = Refresh(self);
        let result = store.snapshot().await;
        match result.map(|snap: Snapshot| serde_json::to_vec(&snap)) {
            Ok(Ok(body)) => {
                // Newline-terminated once here, as every JSON body is, so
                // that the cached bytes go out without a copy.
                let body: Bytes = crate::server::JsonBody::into_line(body);
                *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(CachedSale {
                    at: now,
                    body: body.clone(),
                });
                drop(refresh);
                Ok(body)
            }
            Ok(Err(_)) => Err(SnapshotError::Encode),
            Err(_) => Err(SnapshotError::Unavailable),
        }
    }
}

/// Clears the refresh flag however the refresh ends (a caller that hangs up
/// mid-read drops it), and wakes the callers waiting for it.
struct Refresh<'a>(&'a SnapshotCache);

impl Drop for Refresh<'_> {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::Release);
        self.0.ready.notify_waiters();
    }
}
