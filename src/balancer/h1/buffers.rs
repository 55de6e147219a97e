//! One client connection's buffers, reused from request to request, and
//! from connection to connection on the same thread.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

use bytes::BytesMut;

use crate::http1::request::RequestHead;
use crate::http1::response::ResponseHead;

/// One client connection's reusable buffers.
#[derive(Default)]
pub(super) struct Buffers {
    /// Bytes from the client not yet used.
    pub(super) input: BytesMut,
    /// What is written next, to the upstream or the client.
    pub(super) out: Vec<u8>,
    /// Bytes from the upstream.
    pub(super) resp: BytesMut,
    pub(super) head: RequestHead,
    pub(super) rhead: ResponseHead,
}

/// Buffers a connection holds while it has a request, taken from its
/// thread's spares and given back to them when it lets go (its end, or an
/// idle connection in a crowd).
///
/// Why: a client that opens a connection per request (HTTP/1.0, `ab`) made
/// six allocations for its buffers, and freed them, every request; with the
/// spares they are made once per thread. The spares are few and small
/// (see [`SPARES`], [`KEPT_CAPACITY`]), so a crowd's idle connections still
/// hold no buffer: at most [`SPARES`] sets stay per thread.
pub(super) struct Lent(Option<Box<Buffers>>);

/// Spare sets kept per thread: more than the connections a thread serves at
/// once in a burst of short ones, few enough not to matter beside 10,000
/// idle clients.
const SPARES: usize = 32;

/// A set whose buffers grew beyond this (a large head or answer) is freed,
/// not kept: the spares stay a few KiB each.
const KEPT_CAPACITY: usize = 16 * 1024;

thread_local! {
    // Boxed: a set moves between a connection (which holds a pointer, see
    // `Kept`) and the spares without copying it.
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<Buffers>>> = const { RefCell::new(Vec::new()) };
}

impl Lent {
    /// A set of buffers: a spare of this thread's, else new.
    pub(super) fn take() -> Lent {
        let spare = SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten();
        Lent(Some(spare.unwrap_or_default()))
    }
}

impl Deref for Lent {
    type Target = Buffers;
    fn deref(&self) -> &Buffers {
        // Some until the drop.
        self.0.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl DerefMut for Lent {
    fn deref_mut(&mut self) -> &mut Buffers {
        self.0.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let Some(mut b) = self.0.take() else {
            return;
        };
        let small = b.input.capacity() <= KEPT_CAPACITY
            && b.resp.capacity() <= KEPT_CAPACITY
            && b.out.capacity() <= KEPT_CAPACITY;
        if !small {
            return;
        }
        // What a request leaves is cleared; the heads are cleared by their
        // parsers before each use.
        b.input.clear();
        b.resp.clear();
        b.out.clear();
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARES {
                s.push(b);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A set given back is the next one taken on that thread, emptied, its
    /// room kept; a large one is not kept; at most `SPARES` are.
    #[test]
    fn spares_are_reused_emptied_and_bounded() {
        std::thread::spawn(|| {
            let mut a = Lent::take();
            a.input.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
            a.out.extend_from_slice(b"answer");
            let at = &*a as *const Buffers;
            drop(a);
            let b = Lent::take();
            assert_eq!(&*b as *const Buffers, at, "the spare is reused");
            assert!(b.input.is_empty() && b.out.is_empty() && b.resp.is_empty());
            assert!(b.input.capacity() >= 18 && b.out.capacity() >= 6);
            drop(b);

            let mut big = Lent::take();
            big.resp.reserve(KEPT_CAPACITY + 1);
            drop(big);
            assert_eq!(SPARE.with(|s| s.borrow().len()), 0, "a large set is freed");

            let many: Vec<Lent> = (0..SPARES + 5).map(|_| Lent::take()).collect();
            drop(many);
            assert_eq!(SPARE.with(|s| s.borrow().len()), SPARES);
        })
        .join()
        .expect("thread");
    }
}
