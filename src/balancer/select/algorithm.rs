//! What the selector asks of a strategy for one tier: the one small
//! interface each strategy's state sits behind (see [`super::selector`],
//! which holds the state of the strategy in force and dispatches to it
//! statically).

use super::attempt::Attempt;
use super::peers::Peers;

/// A strategy's picking state for one tier of `peers`, behind the tier's
/// lock: nothing here awaits.
pub(super) trait Algorithm {
    /// The next peer for `attempt` (never one it tried), counting the
    /// request if the strategy counts requests; `None`: nothing usable.
    fn pick(&mut self, peers: &Peers, attempt: &mut Attempt, now: u64) -> Option<usize>;

    /// Makes peer `i`'s numbers plain (out of any recorded cycle or sorted
    /// structure), before something the fast paths do not follow changes
    /// them: a failure, or a probe that shuts the peer's window again.
    fn detach(&mut self, peers: &Peers, i: usize);

    /// Peer `i` failed: [`Algorithm::detach`], then its effective weight
    /// drops by `penalty` (Nginx's `weight / max_fails`), never below 0.
    fn fail(&mut self, peers: &Peers, i: usize, penalty: i64);

    /// A request this strategy counted for peer `i` has finished.
    fn finish(&mut self, _i: usize) {}
}
