//! Buyer tokens and payment signatures for tests that run a sale with
//! `[auth]` on, as production does: the promises (exactness, "already
//! bought", reservations, faults) are about verified buyers, so the tests
//! that hold them up buy with tokens, minted here with the sale's own key as
//! an identity provider would, far faster than a `spike token` process per
//! buyer.

use base64::Engine as _;
use spike::auth::{BuyerKey, PaymentKey};

/// 32 bytes of `byte`, in base64: a test secret.
pub fn test_key(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

/// One sale's `[auth]`: an HS256 buyer key (kid `k1`) and a payment key.
pub struct TestAuth {
    event: String,
    buyer_key: BuyerKey,
    buyer_secret: String,
    payment_secret: String,
    payment_key: PaymentKey,
}

impl TestAuth {
    /// Keys for the sale `event` (the tokens' `aud`).
    pub fn new(event: &str) -> TestAuth {
        let buyer_secret = test_key(1);
        let payment_secret = test_key(9);
        TestAuth {
            event: event.to_string(),
            buyer_key: BuyerKey::parse(&format!("k1:hs256:{buyer_secret}")).expect("buyer key"),
            buyer_secret,
            payment_key: PaymentKey::parse(&payment_secret).expect("payment key"),
            payment_secret,
        }
    }

    /// The `[auth]` section for the config file, ending with a blank line.
    pub fn section(&self) -> String {
        format!(
            "[auth]\nbuyer_keys = [\"k1:hs256:{}\"]\npayment_key = \"{}\"\n\n",
            self.buyer_secret, self.payment_secret
        )
    }

    /// `Bearer <token>` for `buyer`, valid for an hour.
    pub fn bearer(&self, buyer: &str) -> String {
        let exp = spike::auth::unix_now() + 3600;
        let token = spike::auth::mint_with(&self.buyer_key, buyer, &self.event, exp, None)
            .expect("mint a token");
        format!("Bearer {token}")
    }

    /// `buyer`'s purchase at `at` with their own token (and an
    /// `Idempotency-Key` when given): the one way the tests with `[auth]`
    /// buy.
    pub async fn buy(
        &self,
        c: &super::http::TestClient,
        method: hyper::Method,
        at: std::net::SocketAddr,
        buyer: &str,
        key: Option<&str>,
    ) -> Result<super::http::Reply, String> {
        let bearer = self.bearer(buyer);
        let mut headers = vec![("Authorization", bearer.as_str())];
        if let Some(k) = key {
            headers.push(("Idempotency-Key", k));
        }
        super::http::send(c, method, at, "/buy/ticket", &headers).await
    }

    /// The `Spike-Signature` value that pays with `POST path_and_query`,
    /// signed now.
    pub fn pay_signature(&self, path_and_query: &str) -> String {
        spike::auth::sign_payment(
            &self.payment_key,
            spike::auth::unix_now(),
            &format!("POST {path_and_query}"),
        )
    }
}
