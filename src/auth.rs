//! Who a buyer is, and who may say "paid". Without this a buyer is whatever
//! string the client puts in `?user=`: anyone can buy as anyone, learn
//! their order, cancel it, or mark it paid. With `[auth]`, a buyer is the
//! `sub` of a token signed with one of the sale's keys (a JWT, RFC 7519,
//! the form identity providers already issue), and a payment is a request
//! signed by the payment service with its own key (the signed-webhook
//! pattern). The balancer and the nodes verify the same way from the same
//! keys, so neither trusts what the other was told by the client.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use hyper::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The cookie a browser carries its buyer token in (the same token as
/// `Authorization: Bearer`).
pub const TOKEN_COOKIE: &str = "spike_token";

/// The header a payment service signs a payment with.
pub const PAYMENT_SIGNATURE_HEADER: &str = "spike-signature";

/// How far a payment's signed time may be from the node's clock: a
/// captured request replayed later is refused.
pub const PAYMENT_WINDOW: Duration = Duration::from_secs(5 * 60);

/// The shortest HS256 secret accepted: RFC 7518 asks for a key at least
/// as long as the hash (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// A signature algorithm a buyer key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    /// HMAC-SHA256 with a secret shared with the identity provider.
    Hs256,
    /// Ed25519 with the provider's public key (it keeps the private one).
    Ed25519,
}

impl KeyAlg {
    fn jwt(self) -> Algorithm {
        match self {
            KeyAlg::Hs256 => Algorithm::HS256,
            KeyAlg::Ed25519 => Algorithm::EdDSA,
        }
    }

    /// The name in `buyer_keys` (`kid:hs256:…`, `kid:ed25519:…`).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlg::Hs256 => "hs256",
            KeyAlg::Ed25519 => "ed25519",
        }
    }
}

/// One entry of `[auth] buyer_keys`: the key id a token's header names
/// (`kid`), its algorithm, and the key (an HS256 secret, or an Ed25519
/// public key).
#[derive(Clone, PartialEq, Eq)]
pub struct BuyerKey {
    /// The `kid` tokens signed with this key carry.
    pub kid: String,
    /// What the key verifies.
    pub alg: KeyAlg,
    material: Vec<u8>,
}

impl std::fmt::Debug for BuyerKey {
    // A secret never reaches a log or an error message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuyerKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// Why a key in `[auth]` was refused (the config names the key and line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not `kid:alg:BASE64`.
    #[error("a buyer key is \"kid:alg:BASE64\" with alg hs256 or ed25519")]
    Shape,
    /// The key id is empty or has characters a JWT header would not carry
    /// plainly.
    #[error("a key id is 1 to 64 characters of letters, digits, '_', '.' or '-'")]
    Kid,
    /// An algorithm spike does not verify.
    #[error("unknown algorithm {0:?}: hs256 or ed25519")]
    Alg(String),
    /// The key is not standard base64.
    #[error("the key is not base64")]
    Base64,
    /// An HS256 secret shorter than the hash.
    #[error("an hs256 secret is at least 32 bytes (44 base64 characters); this one is {0}")]
    ShortSecret(usize),
    /// An Ed25519 public key is exactly 32 bytes.
    #[error("an ed25519 public key is 32 bytes (44 base64 characters); this one is {0}")]
    Ed25519Length(usize),
    /// Two keys with one id: a token could not say which it means.
    #[error("the key id {0:?} is given twice")]
    DuplicateKid(String),
    /// The JWT library refused a key that passed the checks above.
    #[error("the JWT library refused the key")]
    Rejected,
    /// `spike token` needs a key it can sign with.
    #[error("no hs256 buyer key to sign with (an ed25519 entry is a public key)")]
    NoSigningKey,
}

impl BuyerKey {
    /// Parses `kid:alg:BASE64`.
    pub fn parse(spec: &str) -> Result<BuyerKey, KeyError> {
        let mut parts = spec.splitn(3, ':');
        let (Some(kid), Some(alg), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(KeyError::Shape);
        };
        let kid_ok = !kid.is_empty()
            && kid.len() <= 64
            && kid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !kid_ok {
            return Err(KeyError::Kid);
        }
        let alg = match alg {
            "hs256" => KeyAlg::Hs256,
            "ed25519" => KeyAlg::Ed25519,
            other => return Err(KeyError::Alg(other.to_string())),
        };
        let material = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|_| KeyError::Base64)?;
        match alg {
            KeyAlg::Hs256 if material.len() < MIN_SECRET_BYTES => {
                return Err(KeyError::ShortSecret(material.len()));
            }
            KeyAlg::Ed25519 if material.len() != 32 => {
                return Err(KeyError::Ed25519Length(material.len()));
            }
            _ => {}
        }
        Ok(BuyerKey {
            kid: kid.to_string(),
            alg,
            material,
        })
    }
}

/// `[auth] payment_key`: the secret the payment service signs payments
/// with.
#[derive(Clone, PartialEq, Eq)]
pub struct PaymentKey(Vec<u8>);

impl std::fmt::Debug for PaymentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PaymentKey(..)")
    }
}

impl PaymentKey {
    /// Parses a base64 secret of at least 32 bytes.
    pub fn parse(text: &str) -> Result<PaymentKey, KeyError> {
        let material = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| KeyError::Base64)?;
        if material.len() < MIN_SECRET_BYTES {
            return Err(KeyError::ShortSecret(material.len()));
        }
        Ok(PaymentKey(material))
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length; this cannot fail.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }
}

/// The validated `[auth]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Keys a buyer token may be signed with, by `kid` (several for
    /// rotation).
    pub buyer_keys: Vec<BuyerKey>,
    /// The payment service's key; absent: nobody can pay.
    pub payment_key: Option<PaymentKey>,
    /// Leeway on `exp` and `nbf`, for clocks that disagree a little.
    pub clock_skew: Duration,
}

impl AuthConfig {
    /// Checks what no single key can: two keys with one id.
    pub fn check(&self) -> Result<(), KeyError> {
        let mut seen = std::collections::HashSet::new();
        for k in &self.buyer_keys {
            if !seen.insert(k.kid.as_str()) {
                return Err(KeyError::DuplicateKid(k.kid.clone()));
            }
        }
        Ok(())
    }
}

/// A buyer whose token verified: the only buyer id spike trusts when
/// `[auth]` is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBuyer {
    /// The token's `sub`.
    pub id: String,
}

/// Why a request was not taken as its buyer's, or a payment as the
/// payment service's. Every one is a 401 with `WWW-Authenticate: Bearer`
/// (nothing is sold or changed, and nothing is counted against anyone).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` and no `spike_token` cookie.
    #[error("a buyer token is required: Authorization: Bearer TOKEN or the spike_token cookie")]
    Missing,
    /// Not a JWT, or its header or claims cannot be read.
    #[error("the buyer token is malformed")]
    Malformed,
    /// The header names no `kid`, or one this sale does not know (maybe
    /// removed by a reload).
    #[error("the buyer token's key (kid) is not one of this sale's")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the buyer token's signature does not verify")]
    BadSignature,
    /// Past `exp` (beyond the clock skew), or without one.
    #[error("the buyer token has expired")]
    Expired,
    /// Before `nbf` (beyond the clock skew).
    #[error("the buyer token is not valid yet")]
    NotYetValid,
    /// `aud` does not name this sale's event.
    #[error("the buyer token is for another sale (aud)")]
    WrongAudience,
    /// `sub` is not a buyer id spike can store.
    #[error(
        "the buyer token's subject (sub) is not a buyer id of 1 to 64 characters of [A-Za-z0-9_.:@-]"
    )]
    BadSubject,
    /// No `Spike-Signature`, or one that does not verify, or outside the
    /// five minutes around the node's clock.
    #[error("{0}")]
    Payment(&'static str),
}

impl AuthError {
    /// The `status` field of the JSON answer.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Payment(_) => "payment_signature_invalid",
            AuthError::Missing => "token_required",
            _ => "token_invalid",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<serde_json::Value>,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

/// Verifies buyer tokens for one sale: built once per config (and per
/// reload), then shared by every request.
pub struct Verifier {
    keys: HashMap<String, (DecodingKey, Validation)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Verifier {
    /// Verifies tokens for `event` (their `aud`) with `auth`'s keys.
    pub fn new(auth: &AuthConfig, event: &str) -> Result<Verifier, KeyError> {
        Verifier::build(auth, Some(event))
    }

    /// Verifies tokens for any sale, whose `aud` each request checks
    /// against its own sale ([`Verifier::verify_for`]): the balancer in
    /// front of several sales, which reads the sale from each request.
    pub fn any_sale(auth: &AuthConfig) -> Result<Verifier, KeyError> {
        Verifier::build(auth, None)
    }

    fn build(auth: &AuthConfig, event: Option<&str>) -> Result<Verifier, KeyError> {
        let keys = auth
            .buyer_keys
            .iter()
            .map(|k| {
                let decoding = match k.alg {
                    KeyAlg::Hs256 => {
                        DecodingKey::from_secret(&k.material).map_err(|_| KeyError::Rejected)?
                    }
                    // Raw 32 bytes, checked at parse: what the Ed25519
                    // verifier reads.
                    KeyAlg::Ed25519 => DecodingKey::from_ed_der(&k.material),
                };
                let mut v = Validation::new(k.alg.jwt());
                v.leeway = auth.clock_skew.as_secs();
                v.validate_nbf = true;
                match event {
                    Some(event) => v.set_audience(&[event]),
                    // Checked per request, against its sale.
                    None => v.validate_aud = false,
                }
                v.set_required_spec_claims(&["exp", "sub", "aud"]);
                Ok((k.kid.clone(), (decoding, v)))
            })
            .collect::<Result<_, KeyError>>()?;
        Ok(Verifier { keys })
    }

    /// The buyer `token` says, if its key, signature, times and sale
    /// check out.
    pub fn verify(&self, token: &str) -> Result<VerifiedBuyer, AuthError> {
        self.claims(token).map(|(buyer, _)| buyer)
    }

    /// [`Verifier::verify`] for a request in the sale `event`: its `aud`,
    /// one event or a list, must name it (what a verifier built for one
    /// sale checks by itself).
    pub fn verify_for(&self, token: &str, event: &str) -> Result<VerifiedBuyer, AuthError> {
        let (buyer, aud) = self.claims(token)?;
        if audience_names(aud.as_ref(), event) {
            Ok(buyer)
        } else {
            Err(AuthError::WrongAudience)
        }
    }

    fn claims(&self, token: &str) -> Result<(VerifiedBuyer, Option<serde_json::Value>), AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
        let (key, validation) = self.keys.get(kid).ok_or(AuthError::UnknownKey)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature | K::InvalidAlgorithm => AuthError::BadSignature,
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidAudience => AuthError::WrongAudience,
                K::MissingRequiredClaim(c) if c == "exp" => AuthError::Expired,
                K::MissingRequiredClaim(c) if c == "aud" => AuthError::WrongAudience,
                _ => AuthError::Malformed,
            }
        })?;
        let sub = data.claims.sub;
        // A buyer id by the same rule as everywhere (it becomes a Redis
        // hash field and goes into JSON unescaped).
        if crate::protocol::check_buyer(&sub).is_err() {
            return Err(AuthError::BadSubject);
        }
        Ok((VerifiedBuyer { id: sub }, data.claims.aud))
    }
}

/// Whether a token's `aud` (RFC 7519: one string, or a list of them)
/// names `event`.
fn audience_names(aud: Option<&serde_json::Value>, event: &str) -> bool {
    match aud {
        Some(serde_json::Value::String(one)) => one == event,
        Some(serde_json::Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(event)),
        _ => false,
    }
}

/// What a node (or the balancer's edge) needs of `[auth]` for one sale:
/// the buyer tokens' verifier and the payment service's key, built once
/// from the file and swapped whole when the keys change.
#[derive(Debug)]
pub struct Authority {
    verifier: Verifier,
    payment_key: Option<PaymentKey>,
}

/// Who is asking about an order: a buyer (by their verified id) or the
/// payment service (by its signature).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asker {
    /// A buyer whose token verified.
    Buyer(String),
    /// The payment service: its `Spike-Signature` verified.
    PaymentService,
}

impl Authority {
    /// The authority of `auth` over the sale `event`.
    pub fn new(auth: &AuthConfig, event: &str) -> Result<Authority, KeyError> {
        Ok(Authority {
            verifier: Verifier::new(auth, event)?,
            payment_key: auth.payment_key.clone(),
        })
    }

    /// The buyer a request's token names, or why there is none.
    pub fn buyer(&self, headers: &HeaderMap) -> Result<VerifiedBuyer, AuthError> {
        let token = token_of(headers).ok_or(AuthError::Missing)?;
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        self.verifier.verify(token)
    }

    /// The authority of `auth` over any of several sales: each request's
    /// token is checked against its own sale ([`Authority::verify_for`]).
    pub fn any_sale(auth: &AuthConfig) -> Result<Authority, KeyError> {
        Ok(Authority {
            verifier: Verifier::any_sale(auth)?,
            payment_key: auth.payment_key.clone(),
        })
    }

    /// [`Authority::buyer`] from a token already taken out of a request.
    pub fn verify(&self, token: &str) -> Result<VerifiedBuyer, AuthError> {
        self.verifier.verify(token)
    }

    /// [`Authority::verify`] for a request in the sale `event` (see
    /// [`Verifier::verify_for`]).
    pub fn verify_for(&self, token: &str, event: &str) -> Result<VerifiedBuyer, AuthError> {
        self.verifier.verify_for(token, event)
    }

    /// Whether a request to `target` (`METHOD PATH[?QUERY]`) carries the
    /// payment service's valid signature.
    pub fn payment(&self, headers: &HeaderMap, target: &str) -> Result<(), AuthError> {
        let Some(key) = &self.payment_key else {
            return Err(AuthError::Payment(
                "this sale has no payment_key: nobody can pay",
            ));
        };
        let header = headers
            .get(PAYMENT_SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok());
        verify_payment(key, header, target, unix_now())
    }

    /// Who asks about an order: the payment service when the request is
    /// signed, else the buyer of its token. `pay` is whether the request
    /// pays, which only the payment service may do.
    pub fn asker(&self, headers: &HeaderMap, target: &str, pay: bool) -> Result<Asker, AuthError> {
        if pay || headers.contains_key(PAYMENT_SIGNATURE_HEADER) {
            return self
                .payment(headers, target)
                .map(|()| Asker::PaymentService);
        }
        self.buyer(headers).map(|b| Asker::Buyer(b.id))
    }
}

/// The `sub` a token claims, read without checking anything: only to
/// look it up cheaply (the edge checks whether a sold-out buyer holds a
/// ticket) before [`Verifier::verify`] decides whether to believe it.
pub fn unverified_subject(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    #[derive(Deserialize)]
    struct Sub {
        sub: String,
    }
    serde_json::from_slice::<Sub>(&bytes).ok().map(|s| s.sub)
}

/// Who a sale's buyers are, as `/healthz`, `/stats` and `/status` say it:
/// `anonymous` (no per-user limit), `verified` (a limit, and `[auth]`
/// checks tokens), `unverified` (a limit on ids the client states, which
/// holds only for honest clients). One rule for the node and the balancer.
pub fn buyers_kind(per_user_limit: u64, auth: bool) -> &'static str {
    match (per_user_limit, auth) {
        (0, _) => "anonymous",
        (_, true) => "verified",
        _ => "unverified",
    }
}

/// The buyer token a request carries: `Authorization: Bearer TOKEN`, else
/// the `spike_token` cookie; `None` when it carries neither.
pub fn token_of(headers: &HeaderMap) -> Option<&str> {
    token_in(
        headers
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
        headers
            .get_all(hyper::header::COOKIE)
            .iter()
            .map(|v| v.as_bytes()),
    )
}

/// [`token_of`] from header values as they came (the balancer's own
/// HTTP/1 path reads them without building hyper's types): the
/// `Authorization` value, and every `Cookie` value.
pub fn token_in<'a>(
    authorization: Option<&'a [u8]>,
    cookies: impl Iterator<Item = &'a [u8]>,
) -> Option<&'a str> {
    if let Some(v) = authorization.and_then(|v| std::str::from_utf8(v).ok())
        && let Some((scheme, token)) = v.split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
    {
        return Some(token.trim());
    }
    cookies
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == TOKEN_COOKIE).then_some(value)
        })
}

/// A token for `buyer` in `event`, valid for `ttl`, signed with the first
/// HS256 key of `auth` (`spike token`: tests, demos and load tests).
pub fn mint(
    auth: &AuthConfig,
    buyer: &str,
    event: &str,
    ttl: Duration,
) -> Result<String, KeyError> {
    let key = auth
        .buyer_keys
        .iter()
        .find(|k| k.alg == KeyAlg::Hs256)
        .ok_or(KeyError::NoSigningKey)?;
    mint_with(key, buyer, event, unix_now() + ttl.as_secs(), None)
}

/// A token signed with `key` (HS256), expiring at `exp` (Unix seconds):
/// the building block of [`mint`], open to tests that need an expired or
/// not-yet-valid token.
pub fn mint_with(
    key: &BuyerKey,
    buyer: &str,
    event: &str,
    exp: u64,
    nbf: Option<u64>,
) -> Result<String, KeyError> {
    mint_for(key, buyer, &[event], exp, nbf)
}

/// [`mint_with`] for the sales `events`: its `aud` is the one event, or
/// the list of them (RFC 7519 allows both), so one token buys in each of
/// the sales it names and in no other.
pub fn mint_for(
    key: &BuyerKey,
    buyer: &str,
    events: &[&str],
    exp: u64,
    nbf: Option<u64>,
) -> Result<String, KeyError> {
    if key.alg != KeyAlg::Hs256 {
        return Err(KeyError::NoSigningKey);
    }
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.kid.clone());
    let claims = Claims {
        sub: buyer.to_string(),
        aud: Some(match events {
            [one] => serde_json::Value::from(*one),
            many => serde_json::Value::from(many.to_vec()),
        }),
        exp,
        nbf,
    };
    let signing = EncodingKey::from_secret(&key.material).map_err(|_| KeyError::Rejected)?;
    jsonwebtoken::encode(&header, &claims, &signing).map_err(|_| KeyError::Rejected)
}

/// Seconds since the Unix epoch, by this host's clock.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `Spike-Signature` value for a request to `target` (`METHOD
/// PATH[?QUERY]`, as sent) at Unix time `t`: `t=T,v1=HEX`, HEX being
/// HMAC-SHA256(payment_key, "T.TARGET").
pub fn sign_payment(key: &PaymentKey, t: u64, target: &str) -> String {
    let mut mac = key.mac();
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(target.as_bytes());
    let tag = mac.finalize().into_bytes();
    let mut out = format!("t={t},v1=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Checks a `Spike-Signature` for `target` (`METHOD PATH[?QUERY]`, as
/// received) at Unix time `now`: the tag must verify (compared in constant
/// time) and `t` be within [`PAYMENT_WINDOW`] of `now`.
pub fn verify_payment(
    key: &PaymentKey,
    header: Option<&str>,
    target: &str,
    now: u64,
) -> Result<(), AuthError> {
    let header = header.ok_or(AuthError::Payment(
        "a payment needs the payment service's Spike-Signature: t=UNIX_SECONDS,v1=HEX",
    ))?;
    let (mut t, mut v1) = (None, None);
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1 = decode_hex(v),
            _ => {}
        }
    }
    let (Some(t), Some(tag)) = (t, v1) else {
        return Err(AuthError::Payment(
            "the Spike-Signature is not t=UNIX_SECONDS,v1=HEX",
        ));
    };
    if t.abs_diff(now) > PAYMENT_WINDOW.as_secs() {
        return Err(AuthError::Payment(
            "the Spike-Signature's time is more than 5 minutes from the node's clock",
        ));
    }
    let mut mac = key.mac();
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(target.as_bytes());
    mac.verify_slice(&tag)
        .map_err(|_| AuthError::Payment("the Spike-Signature does not verify"))
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    fn auth(keys: &[&str]) -> AuthConfig {
        AuthConfig {
            buyer_keys: keys
                .iter()
                .map(|k| BuyerKey::parse(k).expect("key"))
                .collect(),
            payment_key: Some(PaymentKey::parse(&secret(9)).expect("payment key")),
            clock_skew: Duration::from_secs(30),
        }
    }

    #[test]
    fn keys_are_parsed_and_bad_ones_say_why() {
        let k = BuyerKey::parse(&format!("k1:hs256:{}", secret(1))).expect("hs256");
        assert_eq!((k.kid.as_str(), k.alg), ("k1", KeyAlg::Hs256));
        assert!(!format!("{k:?}").contains(&secret(1)), "no secret in Debug");
        assert_eq!(BuyerKey::parse("k1:hs256"), Err(KeyError::Shape));
        assert_eq!(
            BuyerKey::parse(&format!("k 1:hs256:{}", secret(1))),
            Err(KeyError::Kid)
        );
        assert_eq!(
            BuyerKey::parse(&format!("k1:rs256:{}", secret(1))),
            Err(KeyError::Alg("rs256".into()))
        );
        assert_eq!(BuyerKey::parse("k1:hs256:%%%"), Err(KeyError::Base64));
        assert_eq!(
            BuyerKey::parse("k1:hs256:c2hvcnQ="),
            Err(KeyError::ShortSecret(5))
        );
        assert_eq!(
            BuyerKey::parse("k1:ed25519:c2hvcnQ="),
            Err(KeyError::Ed25519Length(5))
        );
        let twice = auth(&[
            &format!("k1:hs256:{}", secret(1)),
            &format!("k1:hs256:{}", secret(2)),
        ]);
        assert_eq!(twice.check(), Err(KeyError::DuplicateKid("k1".into())));
    }

    #[test]
    fn a_minted_token_verifies_and_every_bad_one_says_why() {
        let a = auth(&[
            &format!("k1:hs256:{}", secret(1)),
            &format!("k2:hs256:{}", secret(2)),
        ]);
        let v = Verifier::new(&a, "sale-1").expect("verifier");
        let token = mint(&a, "alice", "sale-1", Duration::from_secs(60)).expect("mint");
        assert_eq!(v.verify(&token), Ok(VerifiedBuyer { id: "alice".into() }));
        // Another sale's token.
        let other = mint(&a, "alice", "sale-2", Duration::from_secs(60)).expect("mint");
        assert_eq!(v.verify(&other), Err(AuthError::WrongAudience));
        // Expired beyond the skew, and not yet valid beyond it.
        let k2 = &a.buyer_keys[1];
        let now = unix_now();
        let old = mint_with(k2, "bob", "sale-1", now - 120, None).expect("mint");
        assert_eq!(v.verify(&old), Err(AuthError::Expired));
        let within_skew = mint_with(k2, "bob", "sale-1", now - 10, None).expect("mint");
        assert!(v.verify(&within_skew).is_ok(), "within clock_skew");
        let later = mint_with(k2, "bob", "sale-1", now + 600, Some(now + 300)).expect("mint");
        assert_eq!(v.verify(&later), Err(AuthError::NotYetValid));
        // Forged: signed with a key the sale does not have, under its kid.
        let forger = BuyerKey::parse(&format!("k1:hs256:{}", secret(7))).expect("key");
        let forged = mint_with(&forger, "mallory", "sale-1", now + 60, None).expect("mint");
        assert_eq!(v.verify(&forged), Err(AuthError::BadSignature));
        // A kid the sale does not know (removed by a reload, say).
        let gone = BuyerKey::parse(&format!("k9:hs256:{}", secret(1))).expect("key");
        let unknown = mint_with(&gone, "alice", "sale-1", now + 60, None).expect("mint");
        assert_eq!(v.verify(&unknown), Err(AuthError::UnknownKey));
        assert_eq!(v.verify("not a token"), Err(AuthError::Malformed));
        let bad_sub = mint_with(k2, "has space", "sale-1", now + 60, None).expect("mint");
        assert_eq!(v.verify(&bad_sub), Err(AuthError::BadSubject));
    }

    #[test]
    fn a_token_of_several_sales_buys_in_each_it_names_and_no_other() {
        let a = auth(&[&format!("k1:hs256:{}", secret(1))]);
        let k = &a.buyer_keys[0];
        let exp = unix_now() + 60;
        let both = mint_for(k, "dora", &["a", "b"], exp, None).expect("mint");
        for sale in ["a", "b"] {
            let v = Verifier::new(&a, sale).expect("verifier");
            assert_eq!(v.verify(&both), Ok(VerifiedBuyer { id: "dora".into() }));
        }
        let c = Verifier::new(&a, "c").expect("verifier");
        assert_eq!(c.verify(&both), Err(AuthError::WrongAudience));
        // One verifier for every sale, each request checked against its own.
        let any = Verifier::any_sale(&a).expect("verifier");
        assert!(any.verify_for(&both, "a").is_ok() && any.verify_for(&both, "b").is_ok());
        assert_eq!(any.verify_for(&both, "c"), Err(AuthError::WrongAudience));
        let one = mint_with(k, "dora", "c", exp, None).expect("mint");
        assert!(any.verify_for(&one, "c").is_ok());
        assert_eq!(any.verify_for(&one, "a"), Err(AuthError::WrongAudience));
    }

    #[test]
    fn an_ed25519_public_key_verifies_its_providers_tokens() {
        // RFC 8032's first test key: the public half in the config, the
        // private half (PKCS#8 DER) with the "provider".
        let public = [
            0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64,
            0x07, 0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68,
            0xf7, 0x07, 0x51, 0x1a,
        ];
        let seed = [
            0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec,
            0x2c, 0xc4, 0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03,
            0x1c, 0xae, 0x7f, 0x60,
        ];
        let mut pkcs8 = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        pkcs8.extend_from_slice(&seed);
        let spec = format!(
            "e1:ed25519:{}",
            base64::engine::general_purpose::STANDARD.encode(public)
        );
        let a = auth(&[&spec]);
        let v = Verifier::new(&a, "sale-1").expect("verifier");
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("e1".into());
        let claims = Claims {
            sub: "carol".into(),
            aud: Some("sale-1".into()),
            exp: unix_now() + 60,
            nbf: None,
        };
        let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&pkcs8))
            .expect("sign");
        assert_eq!(v.verify(&token), Ok(VerifiedBuyer { id: "carol".into() }));
        // An HS256 token under the Ed25519 key's kid is refused, whatever
        // its secret: a key verifies only its own algorithm.
        let hs = BuyerKey::parse(&format!("e1:hs256:{}", secret(3))).expect("key");
        let confused = mint_with(&hs, "carol", "sale-1", unix_now() + 60, None).expect("mint");
        assert_eq!(v.verify(&confused), Err(AuthError::BadSignature));
    }

    #[test]
    fn the_token_comes_from_the_bearer_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of(&h), None);
        h.insert(
            "cookie",
            "a=1; spike_token=tok2; b=2".parse().expect("value"),
        );
        assert_eq!(token_of(&h), Some("tok2"));
        h.insert("authorization", "Bearer tok1".parse().expect("value"));
        assert_eq!(token_of(&h), Some("tok1"));
        h.insert("authorization", "Basic xyz".parse().expect("value"));
        assert_eq!(token_of(&h), Some("tok2"));
    }

    #[test]
    fn payments_verify_only_with_the_key_the_target_and_a_recent_time() {
        let key = PaymentKey::parse(&secret(9)).expect("key");
        let target = "POST /orders/1-2/pay?ref=tx-1";
        let now = unix_now();
        let sig = sign_payment(&key, now, target);
        assert_eq!(verify_payment(&key, Some(&sig), target, now), Ok(()));
        assert!(verify_payment(&key, Some(&sig), target, now + 299).is_ok());
        assert!(verify_payment(&key, Some(&sig), target, now + 301).is_err());
        assert!(
            verify_payment(&key, Some(&sig), "POST /orders/1-3/pay?ref=tx-1", now).is_err(),
            "another order"
        );
        let other = PaymentKey::parse(&secret(8)).expect("key");
        assert!(verify_payment(&other, Some(&sig), target, now).is_err());
        assert!(verify_payment(&key, None, target, now).is_err());
        assert!(verify_payment(&key, Some("t=1,v1=zz"), target, now).is_err());
    }
}
