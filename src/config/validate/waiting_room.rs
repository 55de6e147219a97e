//! `[waiting_room]`: the line in front of `/buy/ticket`.

use std::time::Duration;

use toml::Spanned;

use super::cx::Cx;
use crate::config::error::ConfigError;
use crate::config::file::WaitingRoomFile;
use crate::config::sections::{Admit, SaleConfig, WaitingRoomConfig};

/// `pass_ttl` when the file sets none: long enough for a buyer who was
/// told to come back in a few seconds to do so, and short enough that a
/// pass handed to the nodes cannot be hoarded for the sale's whole length.
const DEFAULT_PASS_TTL: Duration = Duration::from_secs(60);

/// The fastest `admit` rate: beyond this the line admits faster than one
/// node answers anyway, and the count stays far from overflowing.
const MAX_ADMIT_RATE: i64 = 1_000_000;

/// `[waiting_room]`, or `None` without one. It needs a `[sale]` (the line
/// is the sale's, kept in its store); in front of several sales each has
/// its own line, by these settings.
pub(super) fn validate(
    cx: &Cx,
    file: Option<&Spanned<WaitingRoomFile>>,
    sales: &[SaleConfig],
) -> Result<Option<WaitingRoomConfig>, ConfigError> {
    let Some(w) = file else {
        return Ok(None);
    };
    let span = w.span();
    let w = w.get_ref();
    if sales.is_empty() {
        return Err(cx.err(
            "waiting_room",
            span,
            "a waiting room is the line in front of a sale: the file needs a [sale] as well",
        ));
    };
    let admit = admit(cx, &w.admit)?;
    let pass_ttl = match &w.pass_ttl {
        Some(v) => cx.duration_at_least(
            "waiting_room.pass_ttl",
            v,
            Duration::from_secs(1),
            "an admitted buyer needs time to send their purchase",
        )?,
        None => DEFAULT_PASS_TTL,
    };
    let prequeue_from_ms = match &w.prequeue_from {
        Some(v) => {
            let at = cx.instant("waiting_room.prequeue_from", v)?;
            // Before every sale's opening (each sale's line has it).
            for sale in sales {
                match sale.opens_at_ms {
                    None => {
                        return Err(cx.err(
                            "waiting_room.prequeue_from",
                            v.span(),
                            format!(
                                "a pre-queue comes before the opening: set `[sale] opens_at` too{}",
                                of_sale(sales, sale)
                            ),
                        ));
                    }
                    Some(opens) if at >= opens => {
                        return Err(cx.err(
                            "waiting_room.prequeue_from",
                            v.span(),
                            format!("must be before `[sale] opens_at`{}", of_sale(sales, sale)),
                        ));
                    }
                    Some(_) => {}
                }
            }
            at
        }
        None => 0,
    };
    Ok(Some(WaitingRoomConfig {
        admit,
        pass_ttl,
        prequeue_from_ms,
    }))
}

/// ` (sale EVENT)` in front of several sales, naming the one at fault.
fn of_sale(sales: &[SaleConfig], sale: &SaleConfig) -> String {
    if sales.len() > 1 {
        format!(" (sale {})", sale.event)
    } else {
        String::new()
    }
}

/// `admit`: `"N/s"` or `"follow_stock"`.
fn admit(cx: &Cx, v: &Spanned<String>) -> Result<Admit, ConfigError> {
    let s = v.get_ref().trim();
    if s == "follow_stock" {
        return Ok(Admit::FollowStock);
    }
    let bad = || {
        cx.err(
            "waiting_room.admit",
            v.span(),
            format!(
                "{s:?} is neither a rate like \"500/s\" (buyers a second, 1 to {MAX_ADMIT_RATE}) nor \"follow_stock\""
            ),
        )
    };
    let n = s.strip_suffix("/s").ok_or_else(bad)?;
    if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    match n.parse::<i64>() {
        Ok(n) if (1..=MAX_ADMIT_RATE).contains(&n) => Ok(Admit::Rate {
            per_second: n as u32,
        }),
        _ => Err(bad()),
    }
}
