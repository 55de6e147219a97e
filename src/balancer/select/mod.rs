//! Picking an upstream the way Nginx's upstream modules do, so that spike can
//! stand where Nginx stood and produce the same traffic split.
//!
//! - smooth weighted round-robin (`ngx_http_upstream_get_peer`): every
//!   eligible peer gains its effective weight, the largest current weight
//!   wins and loses the total; a failed peer's effective weight drops by
//!   `weight / max_fails` and climbs back by one per pick it takes part in;
//! - round-robin: the same with every weight taken as 1;
//! - ip_hash (`ngx_http_upstream_ip_hash_module`): hash 89, then
//!   `hash = (hash * 113 + byte) % 6271` over the first three octets of IPv4
//!   (all 16 of IPv6), then a walk over the weights; an unusable peer
//!   rehashes, and after 20 tries it falls back to weighted round-robin;
//! - least_conn (`ngx_http_upstream_least_conn_module`): fewest active
//!   requests relative to weight, ties broken by smooth weighted round-robin.
//!
//! All strategies honour `down`, `max_fails`/`fail_timeout` and `backup`
//! (backups are a second tier used only when no primary can be picked).
//!
//! The pick state is one small `std::sync::Mutex` per tier, global across the
//! runtime's threads (so the sequence is Nginx's one-worker sequence). It is
//! only ever held inside [`Selector::pick`], [`Selector::release`] and the
//! drop of a least_conn [`Pick`], none of which awaits.
//!
//! least_conn counts, per tier, the requests that this selector picked and
//! that are not finished (a request finishes when its [`Pick`] is dropped,
//! after the response body). After a reload the new selector starts from
//! zero, as a new Nginx worker does (each worker counts its own
//! connections), while the failure marks carry over. The old selector's
//! picks keep their tier alive and finish there, even after the selector
//! itself is gone. `/status` and the metrics show every request to an
//! address, old selector and new.
//!
//! Nginx walks every peer on every pick, so its cost grows with the number of
//! upstreams. Spike gives the same answers without the walk where it can:
//! - smooth WRR and round-robin: while every peer is healthy at full weight,
//!   only the current weights decide, and the walk returns to the state it
//!   started from after at most about `total_weight` picks. Those calm picks
//!   are recorded once, and from then on a pick replays the next one. A
//!   failure, or a retry that must skip tried peers, writes the current
//!   weights out and hands back to the walk, which records again once calm.
//!   A test drives both side by side with a transcription of Nginx's C;
//! - ip_hash: the walk over the weights is a binary search over their
//!   running sums (the same peer for every hash);
//! - least_conn: its tie-break advances only the tied peers, whose set
//!   changes with every pick and release, so there is no fixed order to
//!   replay. Instead the peers that are healthy at full weight are kept
//!   sorted, per weight, into levels by their count, each level a heap on
//!   the current weight. The lowest level of each weight holds its lowest
//!   `count / weight`, so the minimum and the peers tied at it are found
//!   across the weights, and a tie-break round is counted once per level
//!   instead of added to each peer. Peers that may be failed, are warming
//!   up after a failure, or were tried by the attempt stay out ("loose")
//!   and are looked at one by one, as the walk does. A pick or a finished
//!   request costs O(distinct weights + log n + loose peers); tiers of a few
//!   peers just walk. A test drives it side by side with a transcription of
//!   Nginx's C through failures, retries and requests that finish in any
//!   order.

//!
//! The modules are layered, each importing only from those above it here:
//! - `peers` (a tier's peers and weights, and which ones a request tried)
//!   and `attempt` (the per-request state);
//! - `algorithm`: the one interface a strategy's state sits behind;
//! - `smooth`, then `least_conn` (whose tie-breaks are smooth WRR's) and
//!   `ip_hash` (which falls back to smooth WRR): each owns its state;
//! - `selector`: the tiers, the gate, the picks, and the dispatch to the
//!   strategy in force.

mod algorithm;
mod attempt;
mod ip_hash;
mod least_conn;
mod peers;
mod selector;
mod smooth;

pub use attempt::Attempt;
pub use ip_hash::ip_hash_step;
pub use selector::{Gate, Pick, Selector};

/// The strategies' tests, above them all, and what they build from.
#[cfg(test)]
mod tests;
