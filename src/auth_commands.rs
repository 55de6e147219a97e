//! `spike token` and `spike pay-sign`: the two halves of `[auth]` an
//! operator needs by hand: a buyer token for a test, a demo or a load
//! test, and the payment service's signature for a payment made by hand.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::auth;
use crate::config::Config;

/// The `[auth]` section of `config`, or an error that says how to add one.
fn auth_of(config: &Config) -> anyhow::Result<&auth::AuthConfig> {
    config.auth.as_ref().with_context(|| {
        format!(
            "{}: the file has no [auth] section (buyer_keys, payment_key): see docs/configuration.md",
            config.path.display()
        )
    })
}

/// Prints a buyer token for `buyer` in the file's sale (or in each of
/// `events`, an `aud` list when they are several), valid for `ttl`
/// (from `not_before` on, when given), signed with the first HS256 key;
/// with `count`, one `BUYER-i TOKEN` line for each of `count` buyers (the
/// crowd of a load test, where every request is another buyer).
pub fn token(
    path: &Path,
    events: &[String],
    buyer: &str,
    ttl: Duration,
    not_before: Option<Duration>,
    count: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    // Each a sale of the file (the only one when none is named).
    let aud: Vec<&str> = if events.is_empty() {
        vec![config.pick_sale(None)?.event.as_str()]
    } else {
        events
            .iter()
            .map(|e| config.pick_sale(Some(e)).map(|s| s.event.as_str()))
            .collect::<Result<_, _>>()?
    };
    let auth = auth_of(&config)?;
    crate::protocol::check_buyer(buyer).with_context(|| format!("--buyer {buyer:?}"))?;
    let key = auth
        .buyer_keys
        .iter()
        .find(|k| k.alg == auth::KeyAlg::Hs256)
        .ok_or(auth::KeyError::NoSigningKey)
        .with_context(|| format!("{}: [auth] buyer_keys", config.path.display()))?;
    let now = auth::unix_now();
    let nbf = not_before.map(|d| now + d.as_secs());
    let exp = nbf.unwrap_or(now) + ttl.as_secs();
    let Some(count) = count else {
        let token = auth::mint_for(key, buyer, &aud, exp, nbf)?;
        println!("{token}");
        return Ok(ExitCode::SUCCESS);
    };
    // A million lines: write through one buffer, not a lock per line.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut name = String::with_capacity(buyer.len() + 12);
    for i in 1..=count {
        name.clear();
        name.push_str(buyer);
        name.push('-');
        name.push_str(itoa::Buffer::new().format(i));
        crate::protocol::check_buyer(&name).with_context(|| format!("--buyer {name:?}"))?;
        let token = auth::mint_for(key, &name, &aud, exp, nbf)?;
        writeln!(out, "{name} {token}")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the `Spike-Signature` header that pays `order` (with payment
/// reference `reference`), signed now with the file's `payment_key`, and
/// a `curl` line that sends it to the balancer.
pub fn pay_sign(path: &Path, order: &str, reference: Option<&str>) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let auth = auth_of(&config)?;
    let key = auth.payment_key.as_ref().with_context(|| {
        format!(
            "{}: [auth] has no payment_key: nobody can pay",
            config.path.display()
        )
    })?;
    if order.is_empty() || !order.bytes().all(crate::protocol::is_id_byte) {
        anyhow::bail!(
            "--order {order:?}: an order id is letters, digits, '_', '.', ':', '@' or '-'"
        );
    }
    if let Some(r) = reference
        && !r.bytes().all(crate::protocol::is_id_byte)
    {
        anyhow::bail!(
            "--ref {r:?}: a payment reference is letters, digits, '_', '.', ':', '@' or '-'"
        );
    }
    let path_and_query = match reference {
        Some(r) => format!("/orders/{order}/pay?ref={r}"),
        None => format!("/orders/{order}/pay"),
    };
    let signature = auth::sign_payment(key, auth::unix_now(), &format!("POST {path_and_query}"));
    println!("Spike-Signature: {signature}");
    if let Some(b) = &config.balancer {
        println!(
            "# valid for {} s: curl -X POST -H 'Spike-Signature: {signature}' 'http://{}{path_and_query}'",
            auth::PAYMENT_WINDOW.as_secs(),
            b.listen
        );
    }
    Ok(ExitCode::SUCCESS)
}
