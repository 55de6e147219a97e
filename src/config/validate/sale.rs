//! `[sale]` or `[[sale]]`: what is on sale and under which rules.

use std::time::Duration;

use toml::Spanned;

use super::cx::{Cx, optional};
use crate::config::error::ConfigError;
use crate::config::file::{SaleFile, SaleSection};
use crate::config::sections::SaleConfig;

/// The shortest `lease_ttl`: a live node renews its lease at least every
/// 2 s, and must not lose it between two renewals.
const MIN_LEASE_TTL: Duration = Duration::from_secs(3);

/// The most tickets one purchase may ask for: an order's tickets are
/// listed in its answer, and a purchase takes its units in one script step.
const MAX_PER_PURCHASE: i64 = 100;

/// The shortest `pay_within`: expiry runs about every half second.
const MIN_PAY_WITHIN: Duration = Duration::from_secs(1);

/// Every sale of the file, in file order: none (a balancer alone needs
/// none), today's one `[sale]`, or the `[[sale]]` list, whose events must
/// differ (each is its own keys in the store). `nodes` is how many
/// `[[node]]`s share them (the default lease depends on it), `redis`
/// whether the file has a `[redis]`; `warnings` gets one line per key
/// that does nothing.
pub(super) fn validate(
    cx: &Cx,
    file: Option<&Spanned<SaleSection>>,
    nodes: usize,
    redis: bool,
    warnings: &mut Vec<String>,
) -> Result<Vec<SaleConfig>, ConfigError> {
    let Some(section) = file else {
        return Ok(Vec::new());
    };
    match section.get_ref() {
        SaleSection::One(s) => Ok(vec![one(cx, "sale", s, nodes, redis, warnings)?]),
        SaleSection::Many(list) => {
            if list.is_empty() {
                return Err(cx.err(
                    "sale",
                    section.span(),
                    "an empty list sells nothing: write one [[sale]] table per sale",
                ));
            }
            let mut sales: Vec<SaleConfig> = Vec::with_capacity(list.len());
            // Events seen, to their index: a file of 10,000 sales is checked
            // in one pass, not in pairs.
            let mut seen = std::collections::HashMap::with_capacity(list.len());
            for (i, s) in list.iter().enumerate() {
                let prefix = format!("sale[{i}]");
                let sale = one(cx, &prefix, s.get_ref(), nodes, redis, warnings)?;
                if let Some(j) = seen.insert(sale.event.clone(), i) {
                    return Err(cx.err(
                        format!("{prefix}.event"),
                        s.get_ref().event.span(),
                        format!(
                            "{:?} is the event of sale[{j}] too: each sale is its own keys in the store, so every event is named once",
                            sale.event
                        ),
                    ));
                }
                sales.push(sale);
            }
            Ok(sales)
        }
    }
}

/// One sale, its keys named `{prefix}.key` in errors (`sale.total`, or
/// `sale[2].total` in a list).
fn one(
    cx: &Cx,
    prefix: &str,
    s: &SaleFile,
    nodes: usize,
    redis: bool,
    warnings: &mut Vec<String>,
) -> Result<SaleConfig, ConfigError> {
    let k = |key: &str| format!("{prefix}.{key}");
    let event = cx.name(
        k("event"),
        &s.event,
        64,
        " (it becomes part of every Redis key)",
    )?;
    let total = cx.count(&k("total"), &s.total, 1)?;
    let d = SaleConfig::new(event, total, nodes);
    let per_user_limit = optional(&s.per_user_limit, d.per_user_limit, |v| {
        cx.count(&k("per_user_limit"), v, 0)
    })?;
    let max_per_purchase = optional(&s.max_per_purchase, d.max_per_purchase, |v| {
        let n = *v.get_ref();
        if !(1..=MAX_PER_PURCHASE).contains(&n) {
            return Err(cx.err(
                k("max_per_purchase"),
                v.span(),
                format!("must be a whole number from 1 to {MAX_PER_PURCHASE}, not {n}"),
            ));
        }
        if per_user_limit > 0 && n as u64 > per_user_limit {
            return Err(cx.err(
                k("max_per_purchase"),
                v.span(),
                format!(
                    "must be at most {prefix}.per_user_limit ({per_user_limit}), not {n}: no buyer could make such a purchase"
                ),
            ));
        }
        Ok(n as u64)
    })?;
    if let Some(b) = &s.buffer {
        warnings.push(cx.warning(
            &k("buffer"),
            b.span(),
            "no longer does anything: nodes lease stock from the store as they sell, and a dead node's lease comes back by itself (see [sale] lease and lease_ttl); remove it",
        ));
    }
    let stream = optional(&s.stream, d.stream, |v| Ok(*v.get_ref()))?;
    if let Some(v) = s.stream.as_ref().filter(|v| *v.get_ref())
        && !redis
    {
        // Not refused: the same file may run with and without [redis] (a
        // rehearsal under `spike up`), and nothing sold is at risk; but the
        // operator must not believe orders are handed off.
        warnings.push(cx.warning(
            &k("stream"),
            v.span(),
            "does nothing without [redis]: the embedded store has no event stream (read orders at GET /orders/ID)",
        ));
    }
    let opens_at_ms = optional(&s.opens_at, None, |v| {
        cx.instant(&k("opens_at"), v).map(Some)
    })?;
    let closes_at_ms = optional(&s.closes_at, None, |v| {
        cx.instant(&k("closes_at"), v).map(Some)
    })?;
    if let (Some(open), Some(close), Some(v)) = (opens_at_ms, closes_at_ms, &s.closes_at)
        && close <= open
    {
        return Err(cx.err(
            k("closes_at"),
            v.span(),
            format!("must be after {prefix}.opens_at: the sale would never be open"),
        ));
    }
    let lease_ttl = optional(&s.lease_ttl, d.lease_ttl, |v| {
        cx.duration_at_least(
            &k("lease_ttl"),
            v,
            MIN_LEASE_TTL,
            "a live node renews its lease at least every 2 s",
        )
    })?;
    let idle_after = optional(&s.idle_after, d.idle_after.max(2 * lease_ttl), |v| {
        cx.duration_at_least(
            &k("idle_after"),
            v,
            2 * lease_ttl,
            &format!(
                "two of {prefix}.lease_ttl: a node that drops an idle sale's state gives its lease back, and one it could not give back must have run out in the store"
            ),
        )
    })?;
    Ok(SaleConfig {
        per_user_limit,
        max_per_purchase,
        stream,
        opens_at_ms,
        closes_at_ms,
        lease: optional(&s.lease, d.lease, |v| cx.count(&k("lease"), v, 1))?,
        lease_ttl,
        idle_after,
        pay_within: optional(&s.pay_within, d.pay_within, |v| {
            cx.duration_at_least(
                &k("pay_within"),
                v,
                MIN_PAY_WITHIN,
                "expiry runs about every half second",
            )
            .map(Some)
        })?,
        events_max: optional(&s.events_max, d.events_max, |v| {
            cx.count(&k("events_max"), v, 1000)
        })?,
        ..d
    })
}
