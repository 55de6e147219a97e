//! `spike stock audit` over a sale big enough to take many pages (issue 26):
//! it stays conclusive on a quiet sale, it catches what is planted behind
//! the scripts' back (a buyer's count, a stream event), and on a sale that
//! keeps selling while it reads it still checks the stream exactly, up to
//! the moment of its snapshot. The orders are made by the store's own
//! `deduct.lua`, called as a node calls it, so the data has the real shape.

mod common;

use std::time::Duration;

use common::http::json;
use common::redis::RedisServer;
use common::sale::sale_config;
use common::spike::{remove_config, run};

const DEDUCT: &str = include_str!("../src/node/deduct.lua");

/// Many pages (2,000 events or buyers a call).
const ORDERS: u64 = 12_000;

fn keys(event: &str) -> Vec<String> {
    [
        "stock",
        "buyers",
        "orders",
        "buyer_order",
        "leases",
        "keys",
        "due",
        "events",
    ]
    .iter()
    .map(|k| format!("spike:{{{event}}}:{k}"))
    .collect()
}

/// Buyers `from..to` buy one ticket each with a key of their own, in
/// batches of 500 per `deduct.lua` call.
fn buy(conn: &mut redis::Connection, event: &str, from: u64, to: u64) {
    let script = redis::Script::new(DEDUCT);
    let deadline = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        + 3_600_000)
        .to_string();
    let mut i = from;
    while i < to {
        let end = (i + 500).min(to);
        let mut call = script.prepare_invoke();
        for k in keys(event) {
            call.key(k);
        }
        call.arg(30_000);
        for b in i..end {
            call.arg("p")
                .arg("filler")
                .arg("n1")
                .arg(format!("buyer{b}"))
                .arg(format!("key{b}"))
                .arg(&deadline);
        }
        let _: redis::Value = call.invoke(conn).expect("deduct.lua");
        i = end;
    }
}

fn audit(cfg: &str) -> (bool, serde_json::Value) {
    let out = run(&["stock", "audit", "--config", cfg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.trim().is_empty(),
        "stock audit printed nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), json(stdout.trim()))
}

fn sale(event: &str, redis: &RedisServer) -> std::path::PathBuf {
    let text = sale_config(
        event,
        ORDERS * 2,
        1,
        &[1],
        Some(&redis.url()),
        "pay_within = \"1h\"\nevents_max = 100000\n",
    );
    common::spike::write_and_init(&text)
}

#[test]
fn a_quiet_sale_of_many_pages_is_audited_conclusively_and_a_planted_fault_is_caught() {
    let redis = RedisServer::start();
    let event = "audit-quiet";
    let path = sale(event, &redis);
    let cfg = path.to_str().expect("path");
    let mut conn = redis.connection().expect("redis");
    buy(&mut conn, event, 0, ORDERS);

    let (ok, report) = audit(cfg);
    assert!(ok, "{report}");
    assert_eq!(report["buyers_checked"], true, "{report}");
    assert_eq!(report["events_checked"], true, "{report}");
    assert_eq!(report["tickets_held"], ORDERS, "{report}");
    assert_eq!(report["events"]["created"], ORDERS, "{report}");
    assert_eq!(report["events"]["length"], ORDERS, "{report}");
    assert_eq!(report["events"]["added"], ORDERS, "{report}");

    // A buyer's count raised behind the scripts' back: the counters do
    // not see it, the pass over the buyers does.
    let _: i64 = redis::cmd("HINCRBY")
        .arg(format!("spike:{{{event}}}:buyers"))
        .arg("buyer7777")
        .arg(1)
        .query(&mut conn)
        .expect("HINCRBY");
    let (ok, report) = audit(cfg);
    assert!(!ok, "{report}");
    let problems = report["problems"].to_string();
    assert!(
        problems.contains(&format!(
            "the buyers hold {} tickets but the sale counted {ORDERS}",
            ORDERS + 1
        )),
        "{problems}"
    );
    assert!(problems.contains("over the limit of 1"), "{problems}");
    let _: i64 = redis::cmd("HINCRBY")
        .arg(format!("spike:{{{event}}}:buyers"))
        .arg("buyer7777")
        .arg(-1)
        .query(&mut conn)
        .expect("HINCRBY");
    assert!(audit(cfg).0, "mended");

    // An event no script wrote: a payment that no order had.
    let _: String = redis::cmd("XADD")
        .arg(format!("spike:{{{event}}}:events"))
        .arg("*")
        .arg("type")
        .arg("paid")
        .arg("order")
        .arg("1-1")
        .query(&mut conn)
        .expect("XADD");
    let (ok, report) = audit(cfg);
    assert!(!ok, "{report}");
    let problems = report["problems"].to_string();
    assert!(
        problems.contains(&format!(
            "the event stream had {} events appended for {ORDERS} order changes",
            ORDERS + 1
        )),
        "{problems}"
    );
    assert!(
        problems.contains("the event stream holds 1 payments but the sale counted 0"),
        "{problems}"
    );
    remove_config(&path);
}

/// While the sale keeps selling, the stream is still checked, exactly, up
/// to the snapshot the audit reports: every creation counted once.
#[test]
fn a_moving_sale_is_audited_up_to_its_snapshot() {
    let redis = RedisServer::start();
    let event = "audit-moving";
    let path = sale(event, &redis);
    let cfg = path.to_str().expect("path");
    let mut conn = redis.connection().expect("redis");
    buy(&mut conn, event, 0, ORDERS / 2);
    let url = redis.url();
    let seller = std::thread::spawn(move || {
        let client = redis::Client::open(url).expect("client");
        let mut conn = client.get_connection().expect("redis");
        // Small batches with pauses: the sale moves all through the audit.
        for b in 0..(ORDERS / 2 / 50) {
            let from = ORDERS / 2 + b * 50;
            buy(&mut conn, event, from, from + 50);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let mut audited = 0;
    while !seller.is_finished() {
        let (ok, report) = audit(cfg);
        assert!(ok, "{report}");
        assert_eq!(report["events_checked"], true, "{report}");
        let sold = report["sold"].as_u64().expect("sold");
        assert_eq!(report["events"]["created"], sold, "{report}");
        assert_eq!(report["events"]["added"], sold, "{report}");
        audited += 1;
    }
    seller.join().expect("seller");
    assert!(audited > 0, "the audit ran while the sale moved");
    let (ok, report) = audit(cfg);
    assert!(ok, "{report}");
    assert_eq!(report["buyers_checked"], true, "{report}");
    assert_eq!(report["sold"], ORDERS, "{report}");
    remove_config(&path);
}
