//! The checks of every section, through [`Config::parse`] as a file would
//! go. (The listeners' clash check has its own, in `validate::listeners`.)

use std::path::Path;
use std::time::Duration;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("test.toml"), text)
}

const FOUR: &str = r#"
[sale]
event = "G1"
total = 1000

[[node]]
name = "n1"
listen = "127.0.0.1:3001"
weight = 1
[[node]]
name = "n2"
listen = "127.0.0.1:3002"
weight = 2
[[node]]
name = "n3"
listen = "127.0.0.1:3003"
weight = 3
[[node]]
name = "n4"
listen = "127.0.0.1:3004"
weight = 4
"#;

#[test]
fn leases_default_to_a_tenth_of_an_even_share_and_old_keys_only_warn() {
    let c = parse(FOUR).expect("valid");
    let sale = c.sale().expect("sale");
    // 1,000 tickets over 4 nodes: a tenth of 250; every other key at its default.
    assert_eq!(sale.lease, 25);
    assert_eq!(*sale, SaleConfig::new("G1".into(), 1000, 4));
    assert!(c.warnings.is_empty());
    assert_eq!(default_lease(10_000_000, 4), 100);
    assert_eq!(default_lease(3, 4), 1);

    let old = FOUR
        .replace("total = 1000\n", "total = 1000\nbuffer = 134\n")
        .replace("weight = 2\n", "weight = 2\nstock = 500\n");
    let c = parse(&old).expect("an old file still loads");
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("test.toml:") && c.warnings[0].contains("stock"));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("`sale.buffer` no longer does anything"))
    );

    let tuned = FOUR.replace(
        "total = 1000\n",
        "total = 1000\nlease = 7\nlease_ttl = \"3s\"\n",
    );
    let c = parse(&tuned).expect("valid");
    let sale = c.sale().expect("sale");
    assert_eq!((sale.lease, sale.lease_ttl), (7, Duration::from_secs(3)));
}

#[test]
fn max_per_purchase_defaults_to_one_and_a_bad_one_is_named() {
    let with = |extra: &str| FOUR.replace("total = 1000\n", &format!("total = 1000\n{extra}\n"));
    let c = parse(FOUR).expect("valid");
    assert_eq!(c.sale().expect("sale").max_per_purchase, 1);
    let c = parse(&with("per_user_limit = 4\nmax_per_purchase = 4")).expect("valid");
    assert_eq!(c.sale().expect("sale").max_per_purchase, 4);
    // Anonymous buyers (no limit): any size up to the bound.
    let c = parse(&with("per_user_limit = 0\nmax_per_purchase = 10")).expect("valid");
    assert_eq!(c.sale().expect("sale").max_per_purchase, 10);
    for (bad, why) in [
        ("max_per_purchase = 0", "from 1 to 100"),
        ("max_per_purchase = 101", "from 1 to 100"),
        (
            "per_user_limit = 2\nmax_per_purchase = 3",
            "at most sale.per_user_limit (2)",
        ),
        ("max_per_purchase = 2", "at most sale.per_user_limit (1)"),
    ] {
        let e = parse(&with(bad)).expect_err(bad);
        assert_eq!(e.key(), Some("sale.max_per_purchase"), "{bad}: {e}");
        // The key's own line: the last of the lines added after `total`.
        assert_eq!(e.line(), Some(4 + bad.lines().count()), "{bad}: {e}");
        assert!(e.to_string().starts_with("test.toml:"), "{e}");
        assert!(e.to_string().contains(why), "{bad}: {e}");
    }
}

#[test]
fn a_payment_window_is_read_and_a_bad_one_named() {
    let with = |extra: &str| FOUR.replace("total = 1000\n", &format!("total = 1000\n{extra}\n"));
    let c = parse(&with("pay_within = \"15m\"\nevents_max = 5000")).expect("valid");
    let sale = c.sale().expect("sale");
    assert_eq!(sale.pay_within, Some(Duration::from_secs(900)));
    assert_eq!(sale.events_max, 5000);
    let c = parse(FOUR).expect("valid");
    let sale = c.sale().expect("sale");
    let d = SaleConfig::new("G1".into(), 1000, 4);
    assert_eq!(
        (sale.pay_within, sale.events_max),
        (d.pay_within, d.events_max)
    );
    for bad in ["\"500ms\"", "\"0s\"", "\"soon\"", "15"] {
        let e = parse(&with(&format!("pay_within = {bad}"))).expect_err(bad);
        assert_eq!(e.key(), Some("sale.pay_within"), "{bad}: {e}");
        assert!(e.to_string().starts_with("test.toml:"), "{e}");
    }
    let e = parse(&with("events_max = 10")).expect_err("too small a stream");
    assert_eq!(e.key(), Some("sale.events_max"));
}

#[test]
fn a_stream_of_final_sales_is_read_and_said_useless_without_redis() {
    let with = |extra: &str| FOUR.replace("total = 1000\n", &format!("total = 1000\n{extra}\n"));
    let c = parse(FOUR).expect("valid");
    assert!(!c.sale().expect("sale").stream);
    let c = parse(&with("stream = true")).expect("valid");
    assert!(c.sale().expect("sale").stream);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.starts_with("test.toml:") && w.contains("`sale.stream` does nothing")),
        "{:?}",
        c.warnings
    );
    let redis = format!(
        "{}\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n",
        with("stream = true")
    );
    let c = parse(&redis).expect("valid");
    assert!(c.sale().expect("sale").stream && c.warnings.is_empty());
    let e = parse(&with("stream = 1")).expect_err("not a boolean");
    assert_eq!(e.key(), Some("sale.stream"), "{e}");
}

#[test]
fn redis_urls_of_every_deployment_are_read_and_bad_ones_named() {
    let with = |url: &str| format!("{FOUR}[redis]\nurl = \"{url}\"\nreplicas = 1\n");
    for url in [
        "redis://127.0.0.1:6379",
        "redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001&node=127.0.0.1:7002",
        "redis-sentinel://127.0.0.1:26379/0?sentinelServiceName=sale&node=127.0.0.1:26380",
        "rediss://127.0.0.1:6380",
        "rediss-cluster://127.0.0.1:7000?node=127.0.0.1:7001",
        "rediss-sentinel://127.0.0.1:26379/0?sentinelServiceName=sale",
    ] {
        let c = parse(&with(url)).unwrap_or_else(|e| panic!("{url}: {e}"));
        let r = c.redis.as_ref().expect("redis");
        assert_eq!(r.replicas, 1);
        assert_eq!(r.origin, "test.toml:23");
        // TLS by the URL alone: fred's defaults, no files of spike's.
        assert!(r.tls.is_none());
    }
    let e = parse(&with("redis://u:hunter2@127.0.0.1:6379/x")).expect_err("bad db");
    assert!(!e.to_string().contains("hunter2"), "the password: {e}");
    let e = parse(&with("http://127.0.0.1:6379")).expect_err("not redis");
    assert_eq!(e.key(), Some("redis.url"));
    let e = parse(&with("redis-sentinel://127.0.0.1:26379/0")).expect_err("no service name");
    assert_eq!(e.key(), Some("redis.url"));
    assert!(e.to_string().contains(":23:"), "the line: {e}");
}

#[test]
fn a_too_short_store_timeout_or_lease_is_refused() {
    let with = |extra: &str| format!("{FOUR}[redis]\nurl = \"redis://127.0.0.1:6379\"\n{extra}");
    let e = parse(&with("timeout = \"500us\"\n")).expect_err("refused");
    assert_eq!(e.key(), Some("redis.timeout"));
    assert!(e.to_string().contains("at least 10ms"), "{e}");
    parse(&with("timeout = \"5ms\"\n")).expect_err("5ms is too short");
    parse(&with("timeout = \"10ms\"\n")).expect("10ms is enough");
    let e = parse(&FOUR.replace("total = 1000\n", "total = 1000\nlease_ttl = \"2s\"\n"))
        .expect_err("refused");
    assert_eq!(e.key(), Some("sale.lease_ttl"));
    let e =
        parse(&FOUR.replace("total = 1000\n", "total = 1000\nlease = 0\n")).expect_err("refused");
    assert_eq!(e.key(), Some("sale.lease"));
}

#[test]
fn redis_and_node_threads_defaults_and_overrides() {
    let with_redis = format!("{FOUR}[redis]\nurl = \"redis://127.0.0.1:6379\"\n");
    let c = parse(&with_redis).expect("valid");
    let r = c.redis.as_ref().expect("redis");
    assert_eq!(
        *r,
        RedisConfig::new("redis://127.0.0.1:6379".into(), "test.toml:23".into())
    );
    assert!(c.nodes.iter().all(|n| n.threads.is_none()));
    let tuned = with_redis
        .replace("weight = 1\n", "weight = 1\nthreads = 1\n")
        .replace("6379\"\n", "6379\"\npool_size = 5\n");
    let c = parse(&tuned).expect("valid");
    assert_eq!(c.redis.as_ref().expect("redis").pool_size, 5);
    assert_eq!(c.nodes[0].threads, Some(1));
    assert_eq!(c.nodes[1].threads, None);
}

#[test]
fn nodes_become_upstreams_when_the_balancer_lists_none() {
    let c = parse(FOUR).expect("valid");
    let b = c.balancer.expect("balancer");
    assert_eq!(b.upstreams.len(), 4);
    assert_eq!(b.upstreams[3].weight, 4);
    assert_eq!(b.strategy, BalancerConfig::default().strategy);
}

fn expect_err(text: &str, key: &str, line: usize) -> String {
    let e = parse(text).expect_err("must be refused");
    let msg = e.to_string();
    assert_eq!(e.key(), Some(key), "{msg}");
    assert_eq!(e.line(), Some(line), "{msg}");
    assert!(msg.starts_with(&format!("test.toml:{line}:")), "{msg}");
    msg
}

#[test]
fn unknown_key_names_key_and_line() {
    let m = expect_err(
        "[sale]\nevent = \"e\"\ntotal = 5\ncolour = 1\n",
        "sale.colour",
        4,
    );
    assert!(m.contains("unknown field"), "{m}");
}

#[test]
fn zero_weight_is_refused() {
    expect_err(
        "[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nweight = 0\n",
        "node[0].weight",
        4,
    );
}

#[test]
fn duplicate_name_is_refused() {
    let m = expect_err(
        "[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:2\"\n",
        "node[1].name",
        5,
    );
    assert!(m.contains("duplicate"), "{m}");
}

#[test]
fn bad_address_is_refused() {
    expect_err(
        "[[node]]\nname = \"a\"\nlisten = \"nowhere\"\n",
        "node[0].listen",
        3,
    );
}

#[test]
fn total_below_one_is_refused() {
    expect_err("[sale]\nevent = \"e\"\ntotal = 0\n", "sale.total", 3);
}

#[test]
fn ip_hash_with_backup_is_refused() {
    let m = expect_err(
        "[balancer]\nstrategy = \"ip_hash\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:1\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:2\"\nbackup = true\n",
        "balancer.upstream[1].backup",
        5,
    );
    assert!(m.contains("ip_hash"), "{m}");
}

#[test]
fn balancer_alone_is_a_valid_file() {
    let c = parse(
        "[balancer]\nlisten = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\nadmin = \"127.0.0.1:0\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\nfail_timeout = \"3s\"\n",
    )
    .expect("valid");
    assert!(c.sale().is_none());
    let b = c.balancer.expect("balancer");
    let up = UpstreamConfig::new(b.upstreams[0].addr);
    assert_eq!(
        b.upstreams[0],
        UpstreamConfig {
            fail_timeout: Duration::from_secs(3),
            ..up
        }
    );
}

#[test]
fn bad_duration_is_refused() {
    expect_err(
        "[balancer]\n[[balancer.upstream]]\naddr = \"127.0.0.1:1\"\nfail_timeout = \"soon\"\n",
        "balancer.upstream[0].fail_timeout",
        4,
    );
}

#[test]
fn balancer_request_limits_parse_and_are_checked() {
    const UP: &str = "[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\n";
    let b = parse(&format!("[balancer]\n{UP}"))
        .expect("valid")
        .balancer
        .expect("balancer");
    let d = BalancerConfig::default();
    assert!(!b.underscores_in_headers);
    assert_eq!(
        (b.read_timeout, b.send_timeout, b.body_timeout, b.max_body),
        (d.read_timeout, d.send_timeout, d.body_timeout, d.max_body)
    );
    let b = parse(&format!(
        "[balancer]\nmax_body = 0\nbody_timeout = \"5s\"\n{UP}"
    ))
    .expect("valid")
    .balancer
    .expect("balancer");
    assert_eq!(b.max_body, 0);
    assert_eq!(b.body_timeout, Duration::from_secs(5));
    expect_err(
        &format!("[balancer]\nmax_body = -1\n{UP}"),
        "balancer.max_body",
        2,
    );
    let b = parse(&format!(
        "[balancer]\nread_timeout = \"2s\"\nsend_timeout = \"300ms\"\n{UP}"
    ))
    .expect("valid")
    .balancer
    .expect("balancer");
    assert_eq!(b.read_timeout, Duration::from_secs(2));
    assert_eq!(b.send_timeout, Duration::from_millis(300));
    expect_err(
        &format!("[balancer]\nlisten = \"127.0.0.1:0\"\nsend_timeout = \"never\"\n{UP}"),
        "balancer.send_timeout",
        3,
    );
    let b = parse(&format!("[balancer]\ndrain_delay = \"0s\"\n{UP}"))
        .expect("valid")
        .balancer
        .expect("balancer");
    assert_eq!(b.drain_delay, Duration::ZERO);
    let b = parse(&format!("[balancer]\n{UP}"))
        .expect("valid")
        .balancer
        .expect("balancer");
    assert_eq!(b.drain_delay, Duration::from_secs(5));
    expect_err(
        &format!("[balancer]\nlisten = \"127.0.0.1:0\"\ndrain_delay = \"soon\"\n{UP}"),
        "balancer.drain_delay",
        3,
    );
    let b = parse(&format!("[balancer]\nunderscores_in_headers = true\n{UP}"))
        .expect("valid")
        .balancer
        .expect("balancer");
    assert!(b.underscores_in_headers);
    expect_err(
        &format!("[balancer]\nunderscores_in_headers = \"yes\"\n{UP}"),
        "balancer.underscores_in_headers",
        2,
    );
}

/// A file that sets only what it must gets every other key at the default
/// `defaults` names, section by section.
#[test]
fn unset_keys_take_the_named_defaults() {
    let c = parse(
        "[sale]\nevent = \"e\"\ntotal = 50\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n[[node]]\nname = \"n\"\nlisten = \"127.0.0.1:3001\"\n[server]\n[balancer]\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\n",
    )
    .expect("valid");
    let node = NodeConfig::new("n".into(), "127.0.0.1:3001".parse().expect("addr"));
    assert_eq!(c.sale(), Some(&SaleConfig::new("e".into(), 50, 1)));
    assert_eq!(
        c.redis,
        Some(RedisConfig::new(
            "redis://127.0.0.1:6379".into(),
            "test.toml:5".into()
        ))
    );
    assert_eq!(c.nodes, vec![node.clone()]);
    assert_eq!(c.server, ServerConfig::default());
    let upstream = UpstreamConfig::new("127.0.0.1:9".parse().expect("addr"));
    assert_eq!(
        c.balancer,
        Some(BalancerConfig {
            upstreams: vec![upstream],
            // A [sale]: the upstreams are nodes, and only their public API passes.
            public_only: true,
            ..BalancerConfig::default()
        })
    );
    // Without [balancer], the nodes are the upstreams.
    let c = parse("[[node]]\nname = \"n\"\nlisten = \"127.0.0.1:3001\"\n").expect("valid");
    assert_eq!(
        c.balancer,
        Some(BalancerConfig {
            upstreams: vec![UpstreamConfig::from_node(&node)],
            ..BalancerConfig::default()
        })
    );
    assert_eq!(c.server, ServerConfig::default());
}

/// Issue 22, point 10: toml's own errors name the entry of an array of
/// tables by its index, as the validation's errors do.
#[test]
fn a_toml_type_error_in_an_array_of_tables_names_its_index() {
    let entry =
        |i: usize, listen: &str| format!("[[node]]\nname = \"n{i}\"\nlisten = {listen}\n\n");
    let text = format!(
        "{}{}{}",
        entry(0, "\"127.0.0.1:9001\""),
        entry(1, "\"127.0.0.1:9002\""),
        entry(2, "5")
    );
    let m = expect_err(&text, "node[2].listen", 11);
    assert!(m.contains("expected a string"), "{m}");
    let upstreams = "[balancer]\nlisten = \"127.0.0.1:8000\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:1\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:2\"\nweight = \"x\"\n";
    expect_err(upstreams, "balancer.upstream[1].weight", 7);
}

/// `[node]` written for `[[node]]` says how to write it.
#[test]
fn a_single_bracket_node_table_says_to_use_two() {
    let m = expect_err(
        "[node]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n\n[node]\nname = \"b\"\nlisten = \"127.0.0.1:2\"\n",
        "node",
        5,
    );
    assert!(m.contains("duplicate key"), "{m}");
    assert!(m.contains("`[[node]]`"), "{m}");
}

/// A duration written as a bare number gets an example with a unit.
#[test]
fn an_integer_duration_gets_an_example() {
    let m = expect_err(
        "[sale]\nevent = \"e\"\ntotal = 5\npay_within = 900\n",
        "sale.pay_within",
        4,
    );
    assert!(m.contains("pay_within = \"900s\""), "{m}");
    // A count written as a string is not a duration: no such hint.
    let m = expect_err("[sale]\nevent = \"e\"\ntotal = \"5\"\n", "sale.total", 3);
    assert!(!m.contains("a duration"), "{m}");
}

/// 32 bytes of `b` in standard base64: a test key.
fn key_b64(b: u8) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([b; 32])
}

/// `[auth]` is read into keys by kid, with the default skew; each bad
/// value is named by key and line.
#[test]
fn auth_keys_are_read_and_bad_ones_named() {
    let sale = "[sale]\nevent = \"e\"\ntotal = 5\npay_within = \"15m\"\n";
    let good = format!(
        "{sale}[auth]\nbuyer_keys = [\"k1:hs256:{}\", \"k2:hs256:{}\"]\npayment_key = \"{}\"\n",
        key_b64(1),
        key_b64(2),
        key_b64(9)
    );
    let c = parse(&good).expect("valid");
    let auth = c.auth.expect("[auth]");
    assert_eq!(auth.buyer_keys.len(), 2);
    assert_eq!(auth.buyer_keys[1].kid, "k2");
    assert!(auth.payment_key.is_some());
    assert_eq!(auth.clock_skew, crate::config::defaults::DEFAULT_CLOCK_SKEW);

    let m = expect_err(
        &format!(
            "{sale}[auth]\nbuyer_keys = [\"k1:hs256:c2hvcnQ=\"]\npayment_key = \"{}\"\n",
            key_b64(9)
        ),
        "auth.buyer_keys[0]",
        6,
    );
    assert!(m.contains("at least 32 bytes"), "{m}");
    let m = expect_err(
        &format!(
            "{sale}[auth]\nbuyer_keys = [\"k1:hs256:{}\",\n  \"k1:hs256:{}\"]\npayment_key = \"{}\"\n",
            key_b64(1),
            key_b64(2),
            key_b64(9)
        ),
        "auth.buyer_keys[1]",
        7,
    );
    assert!(m.contains("twice"), "{m}");
    // A payment window with nobody able to pay is refused.
    let m = expect_err(
        &format!("{sale}[auth]\nbuyer_keys = [\"k1:hs256:{}\"]\n", key_b64(1)),
        "auth.payment_key",
        5,
    );
    assert!(m.contains("payment service"), "{m}");
    expect_err(
        &format!(
            "{sale}[auth]\nbuyer_keys = [\"k1:hs256:{}\"]\npayment_key = \"{}\"\nclock_skew = \"soon\"\n",
            key_b64(1),
            key_b64(9)
        ),
        "auth.clock_skew",
        8,
    );
    assert!(parse("[auth]\n").is_err(), "no buyer keys");
}

#[test]
fn per_client_limits_read_as_nginx_writes_them_and_a_bad_one_is_named() {
    const UP: &str = "[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\n";
    let b = parse(&format!("[balancer]\n{UP}"))
        .expect("valid")
        .balancer
        .expect("balancer");
    assert_eq!(b.limits, ClientLimits::default());
    assert_eq!((b.limits.rate, b.limits.conns), (None, 0));

    let b = parse(&format!(
        "[balancer]\nlimit_rate = \"20r/s\"\nlimit_burst = 40\nlimit_nodelay = true\nlimit_conns = 50\n{UP}"
    ))
    .expect("valid")
    .balancer
    .expect("balancer");
    let rate = b.limits.rate.expect("a rate");
    assert_eq!(
        rate,
        RateLimit {
            requests: 20,
            per_minute: false,
            burst: 40,
            nodelay: true
        }
    );
    assert_eq!(
        (rate.milli_per_second(), rate.as_nginx()),
        (20_000, "20r/s".into())
    );
    assert_eq!(b.limits.conns, 50);

    // Per minute, truncated as Nginx truncates it; burst and nodelay at
    // their defaults (Nginx's: none, and delayed).
    let b = parse(&format!("[balancer]\nlimit_rate = \"20r/m\"\n{UP}"))
        .expect("valid")
        .balancer
        .expect("balancer");
    let rate = b.limits.rate.expect("a rate");
    assert_eq!(rate.milli_per_second(), 333);
    assert_eq!(
        (rate.burst, rate.nodelay),
        (
            crate::config::defaults::DEFAULT_LIMIT_BURST,
            crate::config::defaults::DEFAULT_LIMIT_NODELAY
        )
    );

    for bad in [
        "20",
        "20r/h",
        "0r/s",
        "-1r/s",
        "r/s",
        "2.5r/s",
        "1000001r/s",
        "20 r/s",
    ] {
        let m = expect_err(
            &format!("[balancer]\nlimit_rate = \"{bad}\"\n{UP}"),
            "balancer.limit_rate",
            2,
        );
        assert!(m.contains("\"20r/s\""), "{m}");
    }
    expect_err(
        &format!("[balancer]\nlimit_rate = \"1r/s\"\nlimit_burst = -1\n{UP}"),
        "balancer.limit_burst",
        3,
    );
    expect_err(
        &format!("[balancer]\nlimit_conns = -5\n{UP}"),
        "balancer.limit_conns",
        2,
    );
    // A burst or nodelay without a rate would do nothing: refused.
    let m = expect_err(
        &format!("[balancer]\nlimit_conns = 5\nlimit_burst = 10\n{UP}"),
        "balancer.limit_burst",
        3,
    );
    assert!(m.contains("limit_rate"), "{m}");
    expect_err(
        &format!("[balancer]\n\nlimit_nodelay = true\n{UP}"),
        "balancer.limit_nodelay",
        3,
    );
}

#[test]
fn a_sale_forwards_only_the_public_api_and_pass_paths() {
    let c = parse(FOUR).expect("valid");
    let b = c.balancer.as_ref().expect("balancer");
    assert!(b.public_only && b.pass_paths.is_empty());
    let text = format!("{FOUR}\n[balancer]\npass_paths = [\"/api/\", \"/static\"]\n");
    let c = parse(&text).expect("valid");
    let b = c.balancer.as_ref().expect("balancer");
    assert!(b.public_only);
    assert_eq!(b.pass_paths, ["/api/", "/static"]);
    let alone = "[balancer]\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\n";
    assert!(
        !parse(alone)
            .expect("valid")
            .balancer
            .expect("b")
            .public_only
    );
    for bad in [
        "api", "/a?b", "/a/../b", "/a/./", "/%68", "/a b", "", "/a;b", "/a'",
    ] {
        let text = format!("{FOUR}\n[balancer]\npass_paths = [\"/ok\", \"{bad}\"]\n");
        let msg = expect_err(&text, "balancer.pass_paths[1]", 24);
        assert!(msg.contains("is not a path prefix"), "{msg}");
    }
    let text =
        "[balancer]\npass_paths = [\"/api/\"]\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\n";
    let msg = expect_err(text, "balancer.pass_paths", 2);
    assert!(msg.contains("without a [sale]"), "{msg}");
}

#[test]
fn internal_addresses_go_from_nodes_to_upstreams() {
    let text = FOUR.replacen(
        "listen = \"127.0.0.1:3001\"",
        "listen = \"127.0.0.1:3001\"\ninternal = \"127.0.0.1:4001\"",
        1,
    );
    let c = parse(&text).expect("valid");
    assert_eq!(
        c.nodes[0].internal,
        Some("127.0.0.1:4001".parse().expect("addr"))
    );
    assert_eq!(c.nodes[1].internal, None);
    let b = c.balancer.as_ref().expect("balancer");
    assert_eq!(
        b.upstreams[0].internal_addr(),
        "127.0.0.1:4001".parse().expect("addr")
    );
    assert_eq!(
        b.upstreams[1].internal_addr(),
        "127.0.0.1:3002".parse().expect("addr")
    );
    let ups =
        "[balancer]\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\ninternal = \"127.0.0.1:10\"\n";
    let c = parse(ups).expect("valid");
    assert_eq!(
        c.balancer.expect("b").upstreams[0].internal,
        Some("127.0.0.1:10".parse().expect("addr"))
    );
    let bad = FOUR.replacen("weight = 2", "weight = 2\ninternal = \"nowhere\"", 1);
    expect_err(&bad, "node[1].internal", 14);
    let bad = "[balancer]\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\ninternal = \"x\"\n";
    expect_err(bad, "balancer.upstream[0].internal", 4);
}

/// `proxy_protocol = true` without `trusted_proxies` would close every
/// connection: refused, naming the key and its line; with them it loads.
#[test]
fn proxy_protocol_needs_trusted_proxies() {
    let m = expect_err(
        "[balancer]\nstrategy = \"ip_hash\"\nproxy_protocol = true\n[[balancer.upstream]]\naddr = \"127.0.0.1:1\"\n",
        "balancer.proxy_protocol",
        3,
    );
    assert!(m.contains("trusted_proxies"), "{m}");
    let c = parse(
        "[balancer]\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.1\"]\n[[balancer.upstream]]\naddr = \"127.0.0.1:1\"\n",
    )
    .expect("valid");
    let b = c.balancer.expect("balancer");
    assert!(b.proxy_protocol);
    assert!(b.ready_before_open, "ready before the opening unless asked");
}

/// Two sales and two nodes, each sale its own rules (issue 28).
const TWO_SALES: &str = r#"
[[sale]]
event = "IC-512"
total = 300
per_user_limit = 4
max_per_purchase = 4
pay_within = "10m"

[[sale]]
event = "ICE-77"
total = 4000
opens_at = "2026-02-10T10:00:00Z"

[[node]]
name = "n1"
listen = "127.0.0.1:3001"
[[node]]
name = "n2"
listen = "127.0.0.1:3002"
"#;

#[test]
fn a_list_of_sales_is_read_each_with_its_own_rules() {
    let c = parse(TWO_SALES).expect("valid");
    assert_eq!(c.sales.len(), 2);
    let (a, b) = (&c.sales[0], &c.sales[1]);
    assert_eq!(
        (a.event.as_str(), a.total, a.per_user_limit),
        ("IC-512", 300, 4)
    );
    assert_eq!(
        (a.max_per_purchase, a.pay_within),
        (4, Some(Duration::from_secs(600)))
    );
    assert_eq!(
        (b.event.as_str(), b.total, b.per_user_limit),
        ("ICE-77", 4000, 1)
    );
    assert!(b.opens_at_ms.is_some() && b.pay_within.is_none());
    // Each sale's default lease from its own total: a tenth of a node's share.
    assert_eq!((a.lease, b.lease), (15, 100));
    // No sale is *the* sale; a command names one, or is told the choice.
    assert!(c.sale().is_none());
    let e = c.require_sale().expect_err("several");
    assert!(e.to_string().contains("IC-512, ICE-77"), "{e}");
    assert_eq!(c.pick_sale(Some("ICE-77")).expect("named").total, 4000);
    let e = c.pick_sale(Some("nope")).expect_err("unknown");
    assert!(e.to_string().contains("IC-512, ICE-77"), "{e}");
    // The balancer's edge is per sale, on by default; purchases name
    // their sale.
    let bal = c.balancer.as_ref().expect("balancer");
    assert!(bal.sold_out_at_edge && bal.several_sales && bal.public_only);
    // A list of one is a fleet of one sale, as `[sale]` is.
    let one = TWO_SALES
        .split("[[sale]]\nevent = \"ICE-77\"")
        .next()
        .expect("first");
    let c = parse(&format!(
        "{one}[[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:3001\"\n"
    ))
    .expect("one");
    assert_eq!(c.sale().map(|s| s.event.as_str()), Some("IC-512"));
    assert!(!c.balancer.as_ref().expect("balancer").several_sales);
}

#[test]
fn a_sale_list_names_the_entry_key_and_line_of_a_mistake() {
    let e = parse(&TWO_SALES.replace("total = 4000", "total = 0")).expect_err("zero");
    assert_eq!(e.key(), Some("sale[1].total"), "{e}");
    assert!(e.to_string().starts_with("test.toml:11:"), "{e}");
    let e = parse(&TWO_SALES.replace("event = \"ICE-77\"", "event = \"IC-512\"")).expect_err("dup");
    assert_eq!(e.key(), Some("sale[1].event"), "{e}");
    assert!(e.to_string().starts_with("test.toml:10:"), "{e}");
    assert!(e.to_string().contains("sale[0]"), "{e}");
    let e = parse(&TWO_SALES.replace("total = 4000", "total = 4000\ntotl = 1")).expect_err("typo");
    assert_eq!(e.key(), Some("sale[1].totl"), "{e}");
    assert!(e.to_string().contains(":12:"), "{e}");
    let e = parse(&TWO_SALES.replace("max_per_purchase = 4", "max_per_purchase = 5"))
        .expect_err("over the limit");
    assert!(e.to_string().contains("sale[0].per_user_limit (4)"), "{e}");
}

#[test]
fn one_sale_and_a_list_of_sales_in_one_file_is_refused_with_its_line() {
    let text = format!("[sale]\nevent = \"a\"\ntotal = 5\n{TWO_SALES}");
    let e = parse(&text).expect_err("both");
    let s = e.to_string();
    assert!(s.starts_with("test.toml:"), "{s}");
    assert!(s.contains("[sale]") && s.contains("[[sale]]"), "{s}");
    // The other way round too.
    let text = format!("{TWO_SALES}\n[sale]\nevent = \"a\"\ntotal = 5\n");
    let e = parse(&text).expect_err("both");
    assert!(e.to_string().contains("[[sale]]"), "{e}");
}

#[test]
fn the_edge_and_the_waiting_room_are_per_sale_in_front_of_several_sales() {
    let c = parse(&format!("{TWO_SALES}[balancer]\nsold_out_at_edge = true\n")).expect("edge");
    assert!(c.balancer.expect("b").sold_out_at_edge);
    let c = parse(&format!(
        "{TWO_SALES}[balancer]\nsold_out_at_edge = false\n"
    ))
    .expect("off");
    assert!(!c.balancer.expect("b").sold_out_at_edge);
    let c = parse(&format!("{TWO_SALES}[waiting_room]\nadmit = \"100/s\"\n")).expect("room");
    assert!(c.balancer.expect("b").waiting_room.is_some());
    // A pre-queue comes before every sale's opening: the sale without one
    // is named.
    let e = parse(&format!(
        "{TWO_SALES}[waiting_room]\nadmit = \"100/s\"\nprequeue_from = \"2026-02-10T09:00:00Z\"\n"
    ))
    .expect_err("IC-512 has no opens_at");
    assert_eq!(e.key(), Some("waiting_room.prequeue_from"), "{e}");
    assert!(e.to_string().contains("(sale IC-512)"), "{e}");
}

/// `idle_after`: 60 s by default (two `lease_ttl`s when that is more), at
/// least two `lease_ttl`s when set, a duration.
#[test]
fn idle_after_is_at_least_two_lease_ttls() {
    let c = parse(FOUR).expect("default");
    assert_eq!(c.sales[0].idle_after, Duration::from_secs(60));
    let c = parse(&FOUR.replace("total = 1000\n", "total = 1000\nlease_ttl = \"40s\"\n"))
        .expect("a long lease");
    assert_eq!(c.sales[0].idle_after, Duration::from_secs(80));
    let c = parse(&FOUR.replace(
        "total = 1000\n",
        "total = 1000\nlease_ttl = \"3s\"\nidle_after = \"6s\"\n",
    ))
    .expect("two lease_ttls");
    assert_eq!(c.sales[0].idle_after, Duration::from_secs(6));
    let e = parse(&FOUR.replace("total = 1000\n", "total = 1000\nidle_after = \"15s\"\n"))
        .expect_err("less than two of the default lease_ttl");
    assert_eq!(e.key(), Some("sale.idle_after"));
    assert!(e.to_string().contains("lease_ttl"), "{e}");
    let e = parse(&FOUR.replace("total = 1000\n", "total = 1000\nidle_after = 30\n"))
        .expect_err("a bare number");
    assert_eq!(e.key(), Some("sale.idle_after"));
}

/// Purchases go in batches to spike nodes only: a `[[node]]`, or an
/// upstream at a node's address, is one; another backend is not.
#[test]
fn upstreams_know_which_are_nodes() {
    let c = parse(
        "[[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:7001\"\n\n\
         [[node]]\nname = \"n2\"\nlisten = \"127.0.0.1:7002\"\n",
    )
    .expect("nodes");
    let b = c.balancer.expect("balancer");
    assert!(b.upstreams.iter().all(|u| u.node), "{:?}", b.upstreams);
    assert!(b.batch_purchases);
    let c = parse(
        "[[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:7001\"\n\n\
         [balancer]\nbatch_purchases = false\n\
         [[balancer.upstream]]\naddr = \"127.0.0.1:7001\"\n\
         [[balancer.upstream]]\naddr = \"127.0.0.1:7009\"\n",
    )
    .expect("upstreams");
    let b = c.balancer.expect("balancer");
    let nodes: Vec<bool> = b.upstreams.iter().map(|u| u.node).collect();
    assert_eq!(nodes, [true, false]);
    assert!(!b.batch_purchases);
}
