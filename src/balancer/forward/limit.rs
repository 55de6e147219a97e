//! The per-client limits' decision for one request, once for both
//! forwarding paths: `limit_rate` (Nginx's `limit_req`) when the request
//! has been read, then, for a request that goes to an upstream, its delay
//! and `limit_conns` (Nginx's `limit_conn`, which Nginx checks after
//! `limit_req`'s delay) at the start of [`super::run`]. The tables are in
//! [`crate::balancer::limit`].
//!
//! Both are keyed on the client's address, after `trusted_proxies` (the
//! address [`super::client`] finds, as Nginx's realip runs before both
//! modules), and with `[auth]` also on the buyer a verified token names,
//! checked after the address as Nginx checks a second zone (unlike Nginx,
//! a request the buyer's bucket refuses has already counted against its
//! address's). A token is verified for this only when a limit is set. A request the edge answers (sold out) is counted against the
//! rate like any other, but neither waits nor holds a slot: its answer is
//! made at once from memory and holds nothing.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::balancer::answer::{LocalAnswer, MAX_RETRY_AFTER};
use crate::balancer::limit::{Bucket, ConnSlot, LimitKey, RateVerdict};
use crate::balancer::state::{Active, Shared};
use crate::balancer::upstream::now_ms;

/// A request the rate let through: whose it is, and how long it must wait
/// before it goes to an upstream (0 with `limit_nodelay`, or within the
/// rate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    key: Option<LimitKey>,
    buyer: Option<LimitKey>,
    delay_ms: u64,
}

impl Admitted {
    /// A request no limit applies to (the policy's tests, and a balancer
    /// with no limit set).
    pub const FREE: Admitted = Admitted {
        key: None,
        buyer: None,
        delay_ms: 0,
    };

    /// Whether the request waits before it goes on.
    pub fn delays(&self) -> bool {
        self.delay_ms > 0
    }
}

/// What a request holds until its response is done: its place in
/// `limit_conns`'s count (nothing without that limit). A transport keeps
/// it as long as the upstream's response is being relayed, as Nginx
/// counts a request until it is finalized.
#[derive(Debug, Default)]
pub struct Held {
    _slot: Option<ConnSlot>,
    _buyer_slot: Option<ConnSlot>,
}

/// `limit_rate`'s verdict on a request from `client`: `Err` with the 429
/// (counted) when it is over the rate and the burst, for its address or
/// (with `[auth]`) for the buyer of its token; `token` reads the token,
/// asked only when a limit is set.
pub fn check<'a>(
    shared: &Shared,
    active: &Active,
    client: IpAddr,
    token: impl FnOnce() -> Option<&'a str>,
) -> Result<Admitted, LocalAnswer> {
    let limits = &active.config.limits;
    if limits.rate.is_none() && limits.conns == 0 {
        return Ok(Admitted::FREE);
    }
    let key = LimitKey::Addr(client);
    // A token that does not verify limits nobody by name: its request is
    // the address's, and the node answers it 401.
    let buyer = active.auth.as_deref().and_then(|auth| {
        let verified = auth.verify(token()?).ok()?;
        Some(LimitKey::Buyer(verified.id.into_boxed_str()))
    });
    let mut delay_ms = 0;
    if let Some(rate) = &limits.rate {
        let now = now_ms();
        for k in std::iter::once(&key).chain(buyer.as_ref()) {
            match shared.limits.rate.check(k, Bucket::of(rate), now) {
                RateVerdict::Pass => {}
                RateVerdict::Delay(ms) => delay_ms = delay_ms.max(ms),
                RateVerdict::Reject(ms) => {
                    shared.limits.rate_rejected.fetch_add(1, Ordering::Relaxed);
                    let secs = ms.div_ceil(1000).clamp(1, u64::from(MAX_RETRY_AFTER));
                    return Err(LocalAnswer::RateLimited {
                        retry_after: secs as u8,
                    });
                }
            }
        }
    }
    Ok(Admitted {
        key: Some(key),
        buyer,
        delay_ms,
    })
}

/// A request on its way to an upstream: waits out its delay, then takes
/// its place in `limit_conns` (`Err` with the 429, counted, when the
/// client has that many in flight). Holds no lock while it waits.
pub async fn enter(
    shared: &Shared,
    config: &crate::config::BalancerConfig,
    admitted: Admitted,
) -> Result<Held, LocalAnswer> {
    let Some(key) = admitted.key else {
        return Ok(Held::default());
    };
    if admitted.delay_ms > 0 {
        shared.limits.delayed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(admitted.delay_ms)).await;
    }
    let max = config.limits.conns;
    if max == 0 {
        return Ok(Held::default());
    }
    let refused = || {
        shared.limits.conns_rejected.fetch_add(1, Ordering::Relaxed);
        Err(LocalAnswer::ConnLimited)
    };
    let Some(slot) = shared.limits.conns.acquire(&key, max) else {
        return refused();
    };
    // The buyer's place too; refused, the address's goes back on drop.
    let buyer_slot = match &admitted.buyer {
        Some(buyer) => match shared.limits.conns.acquire(buyer, max) {
            Some(s) => Some(s),
            None => return refused(),
        },
        None => None,
    };
    Ok(Held {
        _slot: Some(slot),
        _buyer_slot: buyer_slot,
    })
}
