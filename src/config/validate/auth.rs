//! `[auth]`: who may buy as whom, and who may say "paid".

use toml::Spanned;

use super::cx::{Cx, optional};
use crate::auth::{AuthConfig, BuyerKey, PaymentKey, Verifier};
use crate::config::defaults::DEFAULT_CLOCK_SKEW;
use crate::config::error::ConfigError;
use crate::config::file::AuthFile;
use crate::config::sections::SaleConfig;

/// `[auth]`, or `None` when the file has none (then buyers are who the
/// client says: see `stock init --trust-client-buyer-ids`). With a sale,
/// each key is tried on its event once here, so that a key the JWT
/// library refuses stops the file, not the first buyer; and a sale with a
/// payment window needs a `payment_key`, or nobody could pay.
pub(super) fn validate(
    cx: &Cx,
    file: Option<&Spanned<AuthFile>>,
    sales: &[SaleConfig],
) -> Result<Option<AuthConfig>, ConfigError> {
    let Some(a) = file else {
        return Ok(None);
    };
    let section = a.span();
    let a = a.get_ref();
    if a.buyer_keys.is_empty() {
        return Err(cx.err(
            "auth.buyer_keys",
            section,
            "needs at least one key, \"kid:hs256:BASE64_SECRET\" or \"kid:ed25519:BASE64_PUBLIC_KEY\"",
        ));
    }
    let mut buyer_keys = Vec::with_capacity(a.buyer_keys.len());
    let mut seen = std::collections::HashSet::new();
    for (i, spec) in a.buyer_keys.iter().enumerate() {
        let key = format!("auth.buyer_keys[{i}]");
        let parsed = BuyerKey::parse(spec.get_ref().trim())
            .map_err(|e| cx.err(key.clone(), spec.span(), e.to_string()))?;
        if !seen.insert(parsed.kid.clone()) {
            return Err(cx.err(
                key,
                spec.span(),
                format!(
                    "the key id {:?} is given twice: a token could not say which it means",
                    parsed.kid
                ),
            ));
        }
        buyer_keys.push(parsed);
    }
    let payment_key = match &a.payment_key {
        Some(v) => Some(
            PaymentKey::parse(v.get_ref().trim())
                .map_err(|e| cx.err("auth.payment_key", v.span(), e.to_string()))?,
        ),
        None => None,
    };
    let clock_skew = optional(&a.clock_skew, DEFAULT_CLOCK_SKEW, |v| {
        cx.duration("auth.clock_skew", v)
    })?;
    let auth = AuthConfig {
        buyer_keys,
        payment_key,
        clock_skew,
    };
    // Each sale's tokens name it (`aud`); the keys are tried once, on
    // the first, since they are the same for every sale.
    if let Some(sale) = sales.first() {
        Verifier::new(&auth, &sale.event)
            .map_err(|e| cx.err("auth.buyer_keys", section.clone(), e.to_string()))?;
    }
    if let Some(sale) = sales.iter().find(|s| s.pay_within.is_some())
        && auth.payment_key.is_none()
    {
        return Err(cx.err(
            "auth.payment_key",
            section,
            format!(
                "the sale {:?} has a payment window (pay_within) and only the payment service may pay: give its key, payment_key = \"BASE64_SECRET\" (32 bytes or more)",
                sale.event
            ),
        ));
    }
    Ok(Some(auth))
}
