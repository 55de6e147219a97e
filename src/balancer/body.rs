//! A client's request body on its way to an upstream, and what the proxy
//! learns about it: whether the client's side failed (so that the failure is
//! the client's 400, never a mark against the upstream), and when it ended
//! (so that `response_timeout` counts from there). At the bottom of the
//! balancer's layers, beside the pool whose connections carry it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use super::clock::now_ms;

/// A deadline between reads of a stream: armed when a read first has to
/// wait, disarmed by progress. The timer is made the first time a read
/// waits and reset after, so a stream that never waits costs nothing.
#[derive(Default)]
pub struct StallTimer {
    sleep: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl StallTimer {
    /// Something arrived: the next wait starts a new deadline.
    pub fn progress(&mut self) {
        self.waiting = false;
    }

    /// Called when a read is pending: true once `limit` has passed since
    /// the read began to wait (and then the task is woken at the deadline).
    pub fn expired(&mut self, limit: Duration, cx: &mut Context<'_>) -> bool {
        if !self.waiting {
            self.waiting = true;
            let deadline = tokio::time::Instant::now() + limit;
            match &mut self.sleep {
                Some(s) => s.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        self.sleep
            .as_mut()
            .is_some_and(|s| s.as_mut().poll(cx).is_ready())
    }
}

/// A client's request body streamed to an upstream, which records whether
/// the client's side of it failed (cut off, malformed chunk, silent for
/// `body_timeout`, more than `max_body`): the attempt then fails too, and
/// that failure is the client's, not the upstream's.
pub struct ClientBody {
    pub(super) inner: Incoming,
    pub(super) state: Arc<BodyState>,
    /// Bytes passed on so far, against `max_body` (0: no limit).
    pub(super) read: u64,
    pub(super) max_body: u64,
    pub(super) body_timeout: Duration,
    /// `body_timeout` between reads.
    pub(super) stall: StallTimer,
}

/// What the request handler learns about a streamed client body from the
/// upstream connection's task, which is the one reading it.
#[derive(Debug, Default)]
pub struct BodyState {
    /// 0, or how the client's side failed: [`BODY_BROKEN`], [`BODY_TOO_LARGE`].
    pub failed: AtomicU8,
    /// When the body was read to its end, in [`now_ms`] plus one; 0 while
    /// it is still coming.
    pub ended_at: AtomicU64,
}

impl BodyState {
    /// Marks the body read to its end (once).
    pub fn end(&self) {
        if self.ended_at.load(Ordering::Relaxed) == 0 {
            self.ended_at.store(now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// How much longer to wait for the response head: `response_timeout`
    /// counts from the end of the client's body, not from its start, so a
    /// long (or slow but steady) upload is not an upstream timeout. `None`:
    /// time is up, or the body failed.
    pub fn more_time(&self, response_timeout: Duration) -> Option<Duration> {
        if self.failed.load(Ordering::Relaxed) != 0 {
            return None;
        }
        let limit = response_timeout.as_millis() as u64;
        match self.ended_at.load(Ordering::Relaxed) {
            0 => Some(response_timeout),
            ended => {
                let deadline = (ended - 1).saturating_add(limit);
                let now = now_ms();
                (now < deadline).then(|| Duration::from_millis(deadline - now))
            }
        }
    }
}

/// [`BodyState::failed`]: the client's body broke (a 400).
pub const BODY_BROKEN: u8 = 1;
/// [`BodyState::failed`]: the client's body is over `max_body` (a 413).
pub const BODY_TOO_LARGE: u8 = 2;

/// Why the balancer gave up on a client's streamed body.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// More than `max_body` bytes.
    #[error("the request body is larger than max_body ({0} bytes)")]
    TooLarge(u64),
    /// Nothing for `body_timeout`.
    #[error("the client sent nothing of its body for {0:?}")]
    Timeout(Duration),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.stall.progress();
                if let Some(data) = frame.data_ref() {
                    this.read = this.read.saturating_add(data.len() as u64);
                    if this.max_body != 0 && this.read > this.max_body {
                        this.state.failed.store(BODY_TOO_LARGE, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(ClientBodyError::TooLarge(
                            this.max_body,
                        )))));
                    }
                }
                if this.inner.is_end_stream() {
                    this.state.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.failed.store(BODY_BROKEN, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.state.end();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.stall.expired(this.body_timeout, cx) {
                    this.state.failed.store(BODY_BROKEN, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(Box::new(ClientBodyError::Timeout(
                        this.body_timeout,
                    )))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
