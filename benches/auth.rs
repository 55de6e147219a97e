//! What `[auth]` costs a purchase: one buyer token verified (HS256, and
//! Ed25519 for a provider that keeps its private key), and one payment
//! signature verified. The node verifies every purchase once; the
//! balancer's edge, answering a sold-out flood, only reads the subject a
//! token claims (to look it up among the holders) and verifies a token
//! only when it names a holder.

use std::hint::black_box;
use std::time::Duration;

use base64::Engine as _;
use criterion::{Criterion, criterion_group, criterion_main};
use spike::auth::{
    AuthConfig, BuyerKey, PaymentKey, Verifier, mint, sign_payment, unix_now, verify_payment,
};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn verification(c: &mut Criterion) {
    let auth = AuthConfig {
        buyer_keys: vec![BuyerKey::parse(&format!("k1:hs256:{}", b64(&[7; 32]))).expect("key")],
        payment_key: Some(PaymentKey::parse(&b64(&[9; 32])).expect("key")),
        clock_skew: Duration::from_secs(30),
    };
    let verifier = Verifier::new(&auth, "bench-sale").expect("verifier");
    let token = mint(
        &auth,
        "buyer-000123",
        "bench-sale",
        Duration::from_secs(3600),
    )
    .expect("mint");
    c.bench_function("verify a buyer token (HS256)", |b| {
        b.iter(|| verifier.verify(black_box(&token)).expect("valid"))
    });
    c.bench_function(
        "read the subject a token claims (the edge's sold-out lookup)",
        |b| {
            b.iter(|| {
                spike::auth::unverified_subject(black_box(&token))
                    .map(|sub| sub.len())
                    .expect("a subject")
            })
        },
    );

    // RFC 8032's first key pair: the public half in the config, the
    // private half (PKCS#8) signs.
    let public = [
        0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64, 0x07,
        0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68, 0xf7, 0x07,
        0x51, 0x1a,
    ];
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&[
        0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c,
        0xc4, 0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae,
        0x7f, 0x60,
    ]);
    let ed = AuthConfig {
        buyer_keys: vec![BuyerKey::parse(&format!("e1:ed25519:{}", b64(&public))).expect("key")],
        payment_key: None,
        clock_skew: Duration::from_secs(30),
    };
    let ed_verifier = Verifier::new(&ed, "bench-sale").expect("verifier");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("e1".into());
    let claims = serde_json::json!({
        "sub": "buyer-000123", "aud": "bench-sale", "exp": unix_now() + 3600
    });
    let ed_token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ed_der(&pkcs8),
    )
    .expect("sign");
    c.bench_function("verify a buyer token (Ed25519)", |b| {
        b.iter(|| ed_verifier.verify(black_box(&ed_token)).expect("valid"))
    });

    let key = PaymentKey::parse(&b64(&[9; 32])).expect("key");
    let target = "POST /orders/1796563096827-42/pay?ref=tx-991";
    let now = unix_now();
    let sig = sign_payment(&key, now, target);
    c.bench_function("verify a payment signature (HMAC-SHA256)", |b| {
        b.iter(|| verify_payment(&key, Some(black_box(&sig)), target, now).expect("valid"))
    });
}

criterion_group!(benches, verification);
criterion_main!(benches);
