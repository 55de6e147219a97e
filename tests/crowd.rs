//! A crowd at a sale that opens on time (issue 27, point 3), played by the
//! load client the benchmarks use (`examples/crowd.rs --flow`, built by
//! `cargo test --all-targets`): 600 buyers, each with their own token,
//! arrive before the opening, wait as `Retry-After` says, buy once, and
//! half of the reservations are paid by the payment service, the rest
//! expire. One outcome per buyer; the store agrees with what the buyers
//! were told; the audit holds.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::auth::TestAuth;
use common::redis::RedisServer;
use common::spike::{bin, remove_config, run};
use common::up::{start_up, up_config};

/// `examples/crowd.rs` as `cargo build --example crowd` leaves it beside
/// the `spike` binary under test (`scripts/test.sh` builds it first: `cargo
/// test --all-targets` builds an example only as a test harness).
fn crowd_bin() -> PathBuf {
    let path = PathBuf::from(bin())
        .parent()
        .expect("target dir")
        .join("examples")
        .join("crowd");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --example crowd` first (scripts/test.sh does)",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_waits_for_the_opening_buys_once_and_pays_or_lets_go() {
    const BUYERS: usize = 600;
    const TOTAL: u64 = 60;
    let redis = RedisServer::start();
    let (text, ports) = up_config(TOTAL, 2, Some(&redis.url()));
    let auth = TestAuth::new("up");
    let opens = SystemTime::now() + Duration::from_secs(3);
    let text = text
        .replace(
            "per_user_limit = 1\n",
            &format!(
                "per_user_limit = 1\npay_within = \"2s\"\nopens_at = \"{}\"\n",
                humantime::format_rfc3339_millis(opens)
            ),
        )
        .replace("\n[balancer]", &format!("\n{}[balancer]", auth.section()));
    let (up, path) = start_up(&text, &ports);
    let cfg = path.to_str().expect("path");
    let tokens = run(&[
        "token",
        "--config",
        cfg,
        "--buyer",
        "c",
        "--count",
        &BUYERS.to_string(),
    ]);
    assert!(tokens.status.success(), "{tokens:?}");
    let buyers = path.with_file_name("buyers.txt");
    std::fs::write(&buyers, &tokens.stdout).expect("write buyers");

    let out = Command::new(crowd_bin())
        .args([
            "--flow",
            "--config",
            cfg,
            "--buyers",
            buyers.to_str().expect("path"),
            "--pay-share",
            "0.5",
            "-c",
            "50",
            "-z",
            "60s",
            "--patience",
            "30s",
        ])
        .arg(format!("http://{}/buy/ticket", ports.balancer))
        .output()
        .expect("run the crowd");
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the crowd's JSON report");
    let o = &report["outcomes"];
    let n = |k: &str| o[k].as_u64().unwrap_or(0);
    let outcomes: u64 = o
        .as_object()
        .expect("outcomes")
        .values()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    assert_eq!(outcomes, BUYERS as u64, "one outcome per buyer: {report}");
    assert!(
        report["waits"].as_u64() > Some(0),
        "nobody came early: {report}"
    );
    // Every buyer told a ticket holds a reservation (a ticket that came
    // back may sell again to a later buyer), everyone else heard sold_out.
    let told_a_ticket = n("paid") + n("reserved_unpaid");
    assert!(told_a_ticket >= TOTAL, "{report}");
    assert_eq!(n("sold_out") + told_a_ticket, BUYERS as u64, "{report}");
    assert!(n("paid") > 0 && n("reserved_unpaid") > 0, "{report}");

    // The unpaid reservations expire (2 s), and the store agrees with what
    // the buyers were told.
    common::wait_for(
        "the unpaid to expire",
        Duration::from_secs(10),
        async || {
            let show = run(&["stock", "show", "--config", cfg]);
            let s = common::http::json(&String::from_utf8_lossy(&show.stdout));
            s["reserved"] == 0
        },
    )
    .await;
    let show = run(&["stock", "show", "--config", cfg]);
    let s = common::http::json(&String::from_utf8_lossy(&show.stdout));
    assert_eq!(s["paid"].as_u64(), Some(n("paid")), "{s}");
    assert_eq!(s["released"].as_u64(), Some(n("reserved_unpaid")), "{s}");
    assert_eq!(s["sold"].as_u64(), Some(n("paid")), "{s}");
    assert!(n("paid") <= TOTAL, "{s}");
    let audit = run(&["stock", "audit", "--config", cfg]);
    assert!(audit.status.success(), "{audit:?}");
    drop(up);
    let _ = std::fs::remove_file(&buyers);
    remove_config(&path);
}
