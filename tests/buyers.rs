//! Buyers are people (issue 24): with `[auth]`, a buyer is who a signed
//! token says, not who `?user=` says; only the order's buyer acts on it,
//! and only the payment service pays. Through `spike up` (the balancer in
//! front of real nodes), with tokens from `spike token` and payment
//! signatures from `spike pay-sign`, as an operator would make them.

mod common;

use std::time::Duration;

use common::auth::test_key as key;
use common::http::{Reply, TestClient, client, json, send};
use common::spike::{SpikeProcess, remove_config, run, write_config};
use common::up::{Ports, up_config};
use hyper::{Method, StatusCode};

/// A `spike up` sale of `total` with a payment window and `[auth]`.
fn sale_with_auth(total: u64, limit: u64) -> (String, Ports) {
    let (text, ports) = up_config(total, 2, None);
    let text = text
        .replace(
            "per_user_limit = 1\n",
            &format!("per_user_limit = {limit}\npay_within = \"15m\"\n"),
        )
        .replace(
            "\n[balancer]",
            &format!(
                "\n[auth]\nbuyer_keys = [\"k1:hs256:{}\", \"k2:hs256:{}\"]\npayment_key = \"{}\"\nclock_skew = \"30s\"\n\n[balancer]",
                key(1),
                key(2),
                key(9)
            ),
        );
    (text, ports)
}

fn token(cfg: &str, buyer: &str) -> String {
    let out = run(&["token", "--config", cfg, "--buyer", buyer, "--ttl", "1h"]);
    assert!(
        out.status.success(),
        "spike token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `spike pay-sign`'s header line, `Spike-Signature: …`, as (name, value),
/// and the path it signed.
fn pay_sign(cfg: &str, order: &str, reference: &str) -> (String, String) {
    let out = run(&[
        "pay-sign", "--config", cfg, "--order", order, "--ref", reference,
    ]);
    assert!(
        out.status.success(),
        "spike pay-sign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let header = text
        .lines()
        .find_map(|l| l.strip_prefix("Spike-Signature: "))
        .unwrap_or_else(|| panic!("no header in {text}"))
        .to_string();
    let path = format!("/orders/{order}/pay?ref={reference}");
    (header, path)
}

async fn call(
    c: &TestClient,
    ports: &Ports,
    method: Method,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> Reply {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(b) = &bearer {
        headers.push(("Authorization", b.as_str()));
    }
    send(c, method, ports.balancer, path, &headers)
        .await
        .expect("request")
}

/// The sale's `sold`, read past the node's half-second `/sale` cache so
/// that what the test just did is in it.
async fn sold(c: &TestClient, ports: &Ports) -> u64 {
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reply = send(c, Method::GET, ports.nodes[0], "/sale", &[])
        .await
        .expect("sale");
    json(&reply.body)["sold"].as_u64().expect("sold")
}

fn assert_unauthorized(reply: &Reply, what: &str) {
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "{what}: {}",
        reply.body
    );
    let challenge = reply
        .headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
    assert!(
        json(&reply.body)["reason"].is_string(),
        "{what}: {}",
        reply.body
    );
}

/// The four commands, which all succeeded before: a purchase
/// without a token, `already_bought` naming someone else's order, a
/// payment made by a buyer with a made-up reference, another buyer's
/// cancel. Each is refused now, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_buyer_acts_on_their_order_and_only_the_payment_service_pays() {
    let (text, ports) = sale_with_auth(10, 1);
    let (mut up, path) = common::up::start_up(&text, &ports);
    let cfg = path.to_str().expect("path");
    let c = client();
    let (alice, bob) = (token(cfg, "alice"), token(cfg, "bob"));

    let anonymous = call(&c, &ports, Method::GET, "/buy/ticket?user=alice", None, &[]).await;
    assert_unauthorized(&anonymous, "a purchase without a token");
    assert_eq!(sold(&c, &ports).await, 0, "a 401 sold nothing");

    let bought = call(&c, &ports, Method::POST, "/buy/ticket", Some(&alice), &[]).await;
    assert_eq!(bought.status, StatusCode::OK, "{}", bought.body);
    let v = json(&bought.body);
    assert_eq!(v["buyer"], "alice", "{v}");
    let order = v["order"].as_str().expect("order").to_string();
    let mine = call(&c, &ports, Method::POST, "/buy/ticket", Some(&bob), &[]).await;
    assert_eq!(mine.status, StatusCode::OK, "{}", mine.body);
    let bobs = json(&mine.body)["order"]
        .as_str()
        .expect("order")
        .to_string();

    // Naming alice without her token learns nothing.
    let again = call(&c, &ports, Method::GET, "/buy/ticket?user=alice", None, &[]).await;
    assert_unauthorized(&again, "already_bought without a token");
    assert!(!again.body.contains(&order), "{}", again.body);
    let hers = call(&c, &ports, Method::GET, "/buy/ticket", Some(&alice), &[]).await;
    assert_eq!(hers.status, StatusCode::CONFLICT, "{}", hers.body);
    assert_eq!(json(&hers.body)["order"], order.as_str());

    // A buyer cannot pay, with or without a reference.
    let paid_by_buyer = call(
        &c,
        &ports,
        Method::POST,
        &format!("/orders/{order}/pay?user=alice&ref=fake"),
        Some(&alice),
        &[],
    )
    .await;
    assert_unauthorized(&paid_by_buyer, "a payment without a signature");
    // Another buyer cannot cancel, nor read.
    let cancelled = call(
        &c,
        &ports,
        Method::POST,
        &format!("/orders/{bobs}/cancel?user=bob"),
        Some(&alice),
        &[],
    )
    .await;
    assert_eq!(
        cancelled.status,
        StatusCode::FORBIDDEN,
        "{}",
        cancelled.body
    );
    let read = call(
        &c,
        &ports,
        Method::GET,
        &format!("/orders/{order}"),
        Some(&bob),
        &[],
    )
    .await;
    assert_eq!(read.status, StatusCode::FORBIDDEN, "{}", read.body);
    // Both orders are as they were.
    for (o, t) in [(&order, &alice), (&bobs, &bob)] {
        let r = call(
            &c,
            &ports,
            Method::GET,
            &format!("/orders/{o}"),
            Some(t),
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(json(&r.body)["status"], "reserved", "{}", r.body);
    }

    // The payment service pays, once, with its signature.
    let (sig, pay_path) = pay_sign(cfg, &order, "tx-991");
    for _ in 0..2 {
        let r = call(
            &c,
            &ports,
            Method::POST,
            &pay_path,
            None,
            &[("Spike-Signature", &sig)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(json(&r.body)["status"], "paid", "{}", r.body);
        assert_eq!(json(&r.body)["payment_ref"], "tx-991", "{}", r.body);
    }
    // A signature for one order pays no other.
    let other_path = pay_path.replace(&order, &bobs);
    let r = call(
        &c,
        &ports,
        Method::POST,
        &other_path,
        None,
        &[("Spike-Signature", &sig)],
    )
    .await;
    assert_unauthorized(&r, "a signature replayed on another order");
    // The buyer cancels their own reservation.
    let own = call(
        &c,
        &ports,
        Method::POST,
        &format!("/orders/{bobs}/cancel"),
        Some(&bob),
        &[],
    )
    .await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);
    assert_eq!(json(&own.body)["status"], "cancelled", "{}", own.body);

    // `/sale` is cached for half a second: poll until it shows the two.
    common::wait_for(
        "one paid, one released",
        Duration::from_secs(5),
        async || {
            let audit = send(&c, Method::GET, ports.nodes[0], "/sale", &[])
                .await
                .expect("sale");
            let v = json(&audit.body);
            (v["paid"].as_u64(), v["released"].as_u64()) == (Some(1), Some(1))
        },
    )
    .await;
    up.stop("TERM", Duration::from_secs(15));
    remove_config(&path);
}

/// One token is one buyer, whatever `?user=` or `X-User-Id` say: 200
/// purchases with 200 different names buy at most the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_with_two_hundred_names_buys_at_most_the_limit() {
    let (text, ports) = sale_with_auth(1000, 2);
    let (mut up, path) = common::up::start_up(&text, &ports);
    let cfg = path.to_str().expect("path");
    let c = client();
    let t = token(cfg, "scalper");
    let mut ok = 0;
    for i in 0..200 {
        let r = call(
            &c,
            &ports,
            Method::GET,
            &format!("/buy/ticket?user=name{i}"),
            Some(&t),
            &[("X-User-Id", &format!("other{i}"))],
        )
        .await;
        match r.status {
            StatusCode::OK => {
                ok += 1;
                assert_eq!(json(&r.body)["buyer"], "scalper", "{}", r.body);
            }
            StatusCode::CONFLICT => {
                assert_eq!(json(&r.body)["status"], "already_bought", "{}", r.body)
            }
            other => panic!("{other}: {}", r.body),
        }
    }
    assert_eq!(ok, 2, "the limit is 2");
    assert_eq!(sold(&c, &ports).await, 2);
    up.stop("TERM", Duration::from_secs(15));
    remove_config(&path);
}

/// Every bad token is a 401 with its reason, and sells nothing: forged
/// (another secret under the sale's key id), another sale's, expired,
/// not yet valid, malformed, empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_early_foreign_and_malformed_tokens_are_refused() {
    let (text, ports) = sale_with_auth(10, 1);
    let text = text.replace("clock_skew = \"30s\"", "clock_skew = \"1s\"");
    let (mut up, path) = common::up::start_up(&text, &ports);
    let cfg = path.to_str().expect("path");
    let c = client();
    let forger = write_config(&text.replace(&key(1), &key(7)).replace(&key(2), &key(8)));
    let forged = token(forger.to_str().expect("path"), "mallory");
    let foreign_file = write_config(&text.replace("event = \"up\"", "event = \"other\""));
    let foreign = token(foreign_file.to_str().expect("path"), "mallory");
    let early = {
        let out = run(&[
            "token",
            "--config",
            cfg,
            "--buyer",
            "early",
            "--not-before",
            "10m",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let short = {
        let out = run(&["token", "--config", cfg, "--buyer", "late", "--ttl", "1s"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // Past its expiry and the 1 s of skew.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let cases: Vec<(&str, String)> = vec![
        ("forged", forged),
        ("another sale's", foreign),
        ("not yet valid", early),
        ("expired", short),
        ("malformed", "abc.def".to_string()),
    ];
    for (what, t) in &cases {
        let r = call(&c, &ports, Method::GET, "/buy/ticket", Some(t), &[]).await;
        assert_unauthorized(&r, what);
    }
    let empty = call(
        &c,
        &ports,
        Method::GET,
        "/buy/ticket",
        None,
        &[("Authorization", "Bearer")],
    )
    .await;
    assert_unauthorized(&empty, "an empty bearer");
    assert_eq!(sold(&c, &ports).await, 0);
    up.stop("TERM", Duration::from_secs(15));
    remove_config(&path);
    remove_config(&forger);
    remove_config(&foreign_file);
}

/// Without `[auth]`, a sale with a per-buyer limit can only trust the
/// client's word: `stock init` refuses it unless the operator says so.
/// An anonymous sale (the article's `ab` command) is unaffected.
#[test]
fn stock_init_refuses_unverified_buyers_unless_trusted() {
    let redis = common::redis::RedisServer::start();
    let (text, _) = up_config(10, 1, Some(&redis.url()));
    let path = write_config(&text);
    let cfg = path.to_str().expect("path");
    let out = run(&["stock", "init", "--config", cfg]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--trust-client-buyer-ids"), "{err}");
    assert!(
        run(&["stock", "init", "--config", cfg, "--trust-client-buyer-ids"])
            .status
            .success()
    );
    let anonymous = write_config(
        &text
            .replace("per_user_limit = 1", "per_user_limit = 0")
            .replace("event = \"up\"", "event = \"anon\""),
    );
    assert!(
        run(&[
            "stock",
            "init",
            "--config",
            anonymous.to_str().expect("path")
        ])
        .status
        .success()
    );
    remove_config(&path);
    remove_config(&anonymous);
}

/// The committed `config.toml`'s first command still ends in a purchase:
/// `spike up` prints a `curl` line with a token that buys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_prints_a_curl_line_with_a_token_that_buys() {
    let (text, ports) = sale_with_auth(10, 1);
    let path = write_config(&text);
    let (mut up, out) =
        SpikeProcess::start_captured(&["up", "--config", path.to_str().expect("path")]);
    out.wait_for("Ctrl-C stops everything", Duration::from_secs(15));
    let banner = out.stdout();
    let line = banner
        .lines()
        .find(|l| l.contains("curl") && l.contains("Authorization: Bearer"))
        .unwrap_or_else(|| panic!("no curl line with a token: {banner}"));
    let token = line
        .split("Authorization: Bearer ")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("token");
    let c = client();
    let r = call(&c, &ports, Method::GET, "/buy/ticket", Some(token), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    up.stop("TERM", Duration::from_secs(15));
    remove_config(&path);
}

/// The balancer's edge with `[auth]`, on both forwarding paths: once sold
/// out, a holder's token gets `already_bought` with their order from the
/// edge; naming the holder without their token learns nothing (`sold_out`,
/// no order); a token of someone holding nothing, or none, is `sold_out`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_tells_only_a_verified_holder_their_order() {
    for fast in [true, false] {
        let (text, ports) = sale_with_auth(2, 1);
        let text = text.replace(
            "\n[balancer]\n",
            &format!("\n[balancer]\nfast_path = {fast}\n"),
        );
        let (mut up, path) = common::up::start_up(&text, &ports);
        let cfg = path.to_str().expect("path");
        let c = client();
        let (alice, bob, carol) = (token(cfg, "alice"), token(cfg, "bob"), token(cfg, "carol"));
        let mut orders = Vec::new();
        for t in [&alice, &bob] {
            let r = call(&c, &ports, Method::POST, "/buy/ticket", Some(t), &[]).await;
            assert_eq!(r.status, StatusCode::OK, "fast_path = {fast}: {}", r.body);
            orders.push(json(&r.body)["order"].as_str().expect("order").to_string());
        }
        let edge = async || {
            let r = send(&c, Method::GET, ports.admin, "/status", &[])
                .await
                .expect("status");
            json(&r.body)["edge"].clone()
        };
        // Sold out: the edge answers once a node has said so.
        common::wait_for("the edge answers", Duration::from_secs(10), async || {
            let _ = call(&c, &ports, Method::POST, "/buy/ticket", Some(&carol), &[]).await;
            edge().await["answering"] == true
        })
        .await;
        let before = edge().await;

        let hers = call(&c, &ports, Method::POST, "/buy/ticket", Some(&alice), &[]).await;
        assert_eq!(
            hers.status,
            StatusCode::CONFLICT,
            "fast_path = {fast}: {}",
            hers.body
        );
        assert_eq!(json(&hers.body)["status"], "already_bought");
        assert_eq!(json(&hers.body)["order"], orders[0].as_str());
        for (what, token, extra) in [
            (
                "alice named without a token",
                None,
                vec![("X-User-Id", "alice")],
            ),
            ("carol, who holds nothing", Some(carol.as_str()), vec![]),
            (
                "a forged token claiming alice",
                Some(
                    "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSIsImF1ZCI6InVwIiwiZXhwIjo5OTk5OTk5OTk5fQ.AAAA",
                ),
                vec![],
            ),
        ] {
            let r = call(
                &c,
                &ports,
                Method::POST,
                "/buy/ticket?user=alice",
                token,
                &extra,
            )
            .await;
            assert_eq!(
                r.status,
                StatusCode::CONFLICT,
                "fast_path = {fast}, {what}: {}",
                r.body
            );
            assert_eq!(
                json(&r.body)["status"],
                "sold_out",
                "fast_path = {fast}, {what}: {}",
                r.body
            );
            assert!(
                !r.body.contains(&orders[0]),
                "fast_path = {fast}, {what}: {}",
                r.body
            );
        }
        let after = edge().await;
        assert_eq!(
            after["already_bought_answers"].as_u64().unwrap_or(0)
                - before["already_bought_answers"].as_u64().unwrap_or(0),
            1,
            "fast_path = {fast}: the holder was answered at the edge: {after}"
        );
        assert_eq!(
            after["sold_out_answers"].as_u64().unwrap_or(0)
                - before["sold_out_answers"].as_u64().unwrap_or(0),
            3,
            "fast_path = {fast}: the rest were answered at the edge: {after}"
        );
        up.stop("TERM", Duration::from_secs(15));
        remove_config(&path);
    }
}

/// Keys rotate without a restart: after the file drops key `k1` and
/// `spike up` reloads (SIGHUP), a `k1` token is refused, a `k2` token buys;
/// buyers with `k2` tokens sending throughout are all served (no request
/// dropped by the reload); `/healthz` and `/status` say the buyers are
/// verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_key_is_refused_after_a_reload() {
    let (text, ports) = sale_with_auth(5000, 1);
    let (up, path) = common::up::start_up(&text, &ports);
    let cfg = path.to_str().expect("path");
    let c = client();
    let old = token(cfg, "alice");
    let r = call(&c, &ports, Method::POST, "/buy/ticket", Some(&old), &[]).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a k1 token buys before the reload: {}",
        r.body
    );
    let health = send(&c, Method::GET, ports.nodes[0], "/healthz", &[])
        .await
        .expect("healthz");
    assert_eq!(json(&health.body)["buyers"], "verified", "{}", health.body);
    let status = send(&c, Method::GET, ports.admin, "/status", &[])
        .await
        .expect("status");
    assert_eq!(
        json(&status.body)["sale"]["buyers"],
        "verified",
        "{}",
        status.body
    );

    // Buyers with k2 tokens (a key in both files) keep buying through the
    // reload: none of them is dropped or refused.
    let k2 = spike::auth::BuyerKey::parse(&format!("k2:hs256:{}", key(2))).expect("k2");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steady = {
        let (c, stop, lb) = (c.clone(), stop.clone(), ports.balancer);
        tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let exp = spike::auth::unix_now() + 600;
                let t = spike::auth::mint_with(&k2, &format!("steady{i}"), "up", exp, None)
                    .expect("mint");
                let bearer = format!("Bearer {t}");
                let r = send(
                    &c,
                    Method::POST,
                    lb,
                    "/buy/ticket",
                    &[("Authorization", &bearer)],
                )
                .await
                .map(|r| (r.status, r.body));
                answers.push(r);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // k2 first: `spike token` signs with the first hs256 key.
    let rotated = text.replace(
        &format!(
            "buyer_keys = [\"k1:hs256:{}\", \"k2:hs256:{}\"]",
            key(1),
            key(2)
        ),
        &format!("buyer_keys = [\"k2:hs256:{}\"]", key(2)),
    );
    assert_ne!(rotated, text, "the key line was found");
    std::fs::write(&path, &rotated).expect("write");
    up.signal("HUP");
    let new = token(cfg, "bob");
    common::wait_for("k1 refused", Duration::from_secs(10), async || {
        call(&c, &ports, Method::POST, "/buy/ticket", Some(&old), &[])
            .await
            .status
            == StatusCode::UNAUTHORIZED
    })
    .await;
    let r = call(&c, &ports, Method::POST, "/buy/ticket", Some(&new), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(json(&r.body)["buyer"], "bob");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = steady.await.expect("steady buyers");
    assert!(answers.len() > 20, "{} answers", answers.len());
    for a in &answers {
        match a {
            Ok((status, _)) if *status == StatusCode::OK => {}
            other => panic!("a k2 buyer was not served through the reload: {other:?}"),
        }
    }
    let mut up = up;
    up.stop("TERM", Duration::from_secs(15));
    remove_config(&path);
}

/// Exactness with `[auth]` under every strategy, on Redis, with many more
/// buyers than tickets: 300 buyers with their own tokens (minted with the
/// sale's key, as an identity provider would) each send two purchases at
/// once, each with its own `Idempotency-Key`, for 60 tickets with a limit
/// of 1. Exactly 60 are sold, to 60 different buyers, with 60 different
/// orders; the audit holds; and an `Idempotency-Key` is its buyer's: the
/// same key under another buyer's token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_sells_exactly_the_total_to_verified_buyers() {
    const TOTAL: u64 = 60;
    const BUYERS: usize = 300;
    for strategy in [
        "round_robin",
        "weighted_round_robin",
        "ip_hash",
        "least_conn",
    ] {
        let redis = common::redis::RedisServer::start();
        let (text, ports) = common::up::up_config(TOTAL, 3, Some(&redis.url()));
        let text = text
            .replace(
                "strategy = \"weighted_round_robin\"",
                &format!("strategy = \"{strategy}\""),
            )
            .replace(
                "\n[balancer]",
                &format!(
                    "\n[auth]\nbuyer_keys = [\"k1:hs256:{}\"]\npayment_key = \"{}\"\n\n[balancer]",
                    key(1),
                    key(9)
                ),
            );
        let (mut up, path) = common::up::start_up(&text, &ports);
        let cfg = path.to_str().expect("path").to_string();
        let config = spike::config::Config::load(&path).expect("config");
        let auth = config.auth.clone().expect("[auth]");
        let exp = spike::auth::unix_now() + 3600;
        let tokens: Vec<(String, String)> = (0..BUYERS)
            .map(|i| {
                let buyer = format!("b{i}");
                let t = spike::auth::mint_with(&auth.buyer_keys[0], &buyer, "up", exp, None)
                    .expect("mint");
                (buyer, t)
            })
            .collect();
        let c = client();
        // An Idempotency-Key is its buyer's: b0's key under b1's token is
        // refused, and buys nothing.
        let bearer = |t: &str| format!("Bearer {t}");
        let (b0, b1) = (bearer(&tokens[0].1), bearer(&tokens[1].1));
        let first = send(
            &c,
            Method::POST,
            ports.balancer,
            "/buy/ticket",
            &[
                ("Authorization", b0.as_str()),
                ("Idempotency-Key", "shared-key"),
            ],
        )
        .await
        .expect("answer");
        assert_eq!(first.status, StatusCode::OK, "{strategy}: {}", first.body);
        let reused = send(
            &c,
            Method::POST,
            ports.balancer,
            "/buy/ticket",
            &[
                ("Authorization", b1.as_str()),
                ("Idempotency-Key", "shared-key"),
            ],
        )
        .await
        .expect("answer");
        assert_eq!(
            reused.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{strategy}: {}",
            reused.body
        );
        let mut sold = std::collections::HashMap::new();
        let mut orders = std::collections::HashSet::new();
        sold.insert(tokens[0].0.clone(), ());
        orders.insert(
            json(&first.body)["order"]
                .as_str()
                .expect("order")
                .to_string(),
        );
        let mut tasks = Vec::new();
        for (i, (buyer, t)) in tokens.iter().enumerate() {
            for attempt in 0..2 {
                let (c, t, buyer, lb) = (c.clone(), t.clone(), buyer.clone(), ports.balancer);
                let key = format!("k-{i}-{attempt}");
                tasks.push(tokio::spawn(async move {
                    let bearer = format!("Bearer {t}");
                    // A 503 is not a sale: on a busy machine the store may
                    // not answer in time, and the buyer sends the same
                    // purchase again (same key), as a real client does.
                    let mut r;
                    let mut tries = 0;
                    loop {
                        r = send(
                            &c,
                            Method::POST,
                            lb,
                            // A name in the query changes nothing.
                            &format!("/buy/ticket?user=someone{attempt}"),
                            &[
                                ("Authorization", bearer.as_str()),
                                ("Idempotency-Key", key.as_str()),
                            ],
                        )
                        .await
                        .expect("answer");
                        tries += 1;
                        if r.status != StatusCode::SERVICE_UNAVAILABLE || tries == 40 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    (buyer, r.status, r.body)
                }));
            }
        }
        for task in tasks {
            let (buyer, status, body) = task.await.expect("task");
            match status {
                StatusCode::OK => {
                    let v = json(&body);
                    assert_eq!(v["buyer"], buyer.as_str(), "{strategy}: {body}");
                    let order = v["order"].as_str().expect("order").to_string();
                    assert!(orders.insert(order), "{strategy}: an order twice: {body}");
                    assert!(
                        sold.insert(buyer, ()).is_none(),
                        "{strategy}: a buyer over the limit: {body}"
                    );
                }
                StatusCode::CONFLICT => {
                    let s = json(&body)["status"].as_str().unwrap_or("").to_string();
                    assert!(
                        s == "sold_out" || s == "already_bought",
                        "{strategy}: {body}"
                    );
                }
                other => panic!("{strategy}: {other}: {body}"),
            }
        }
        assert_eq!(sold.len() as u64, TOTAL, "{strategy}");
        let show = json(&String::from_utf8_lossy(
            &run(&["stock", "show", "--config", &cfg]).stdout,
        ));
        assert_eq!(show["sold"], TOTAL, "{strategy}: {show}");
        let audit = run(&["stock", "audit", "--config", &cfg]);
        assert!(audit.status.success(), "{strategy}: {audit:?}");

        up.stop("TERM", Duration::from_secs(15));
        remove_config(&path);
    }
}

/// `spike node` on its own (with Redis) puts new `[auth]` keys in force on
/// SIGHUP, without a restart: a token of the removed `kid` is refused from
/// then on, and the node keeps serving (SIGHUP used to end the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reloads_its_keys_on_sighup() {
    let redis = common::redis::RedisServer::start();
    let (text, ports) = common::up::up_config(10, 1, Some(&redis.url()));
    let text = text.replace(
        "\n[balancer]",
        &format!(
            "\n[auth]\nbuyer_keys = [\"k1:hs256:{}\", \"k2:hs256:{}\"]\n\n[balancer]",
            key(1),
            key(2)
        ),
    );
    let path = write_config(&text);
    let cfg = path.to_str().expect("path").to_string();
    let init = run(&["stock", "init", "--config", &cfg]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let node = SpikeProcess::start(&["node", "--config", &cfg, "--name", "n1"]);
    common::spike::wait_listening(&ports.nodes[0].to_string(), Duration::from_secs(10));
    let c = client();
    let buy = async |t: &str| {
        let bearer = format!("Bearer {t}");
        send(
            &c,
            Method::POST,
            ports.nodes[0],
            "/buy/ticket",
            &[("Authorization", bearer.as_str())],
        )
        .await
        .expect("answer")
    };
    let old = token(&cfg, "alice");
    assert_eq!(buy(&old).await.status, StatusCode::OK);

    std::fs::write(
        &path,
        text.replace(
            &format!("[\"k1:hs256:{}\", \"k2:hs256:{}\"]", key(1), key(2)),
            &format!("[\"k2:hs256:{}\"]", key(2)),
        ),
    )
    .expect("write");
    node.signal("HUP");
    let new = token(&cfg, "bob");
    common::wait_for("k1 refused", Duration::from_secs(10), async || {
        buy(&old).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(buy(&new).await.status, StatusCode::OK);
    let mut node = node;
    node.stop("TERM", Duration::from_secs(15));
    remove_config(&path);
}

/// `spike token --count N`: a crowd for a load test, one `BUYER-i TOKEN`
/// line per buyer, each token the sale's and naming its own buyer.
#[test]
fn token_count_mints_one_token_per_buyer() {
    let (text, _ports) = sale_with_auth(10, 1);
    let path = write_config(&text);
    let cfg = path.to_str().expect("path");
    let out = run(&["token", "--config", cfg, "--buyer", "crowd", "--count", "5"]);
    assert!(out.status.success(), "{out:?}");
    let config = spike::config::Config::load(&path).expect("config");
    let verifier =
        spike::auth::Verifier::new(config.auth.as_ref().expect("[auth]"), "up").expect("verifier");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 5, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        let (buyer, token) = line.split_once(' ').expect("BUYER TOKEN");
        assert_eq!(buyer, format!("crowd-{}", i + 1));
        assert_eq!(verifier.verify(token).expect("valid").id, buyer);
    }
    remove_config(&path);
}
