//! The order hand-off (issue 22, point 7): `spike orders tail` and the sale's
//! event stream, through the real binary (`spike stock init`, `spike node`,
//! `spike orders tail` as processes) against a real redis-server per test.
//! A tail that has nothing to follow says so; a reset says what became of
//! the open reservations; a final sale can stream too; and an order service
//! of several consumers loses nothing when one of them dies.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http::{Reply, TestClient, client, json, send};
use common::redis::RedisServer;
use common::spike::{SpikeProcess, bin, remove_config, run, wait_listening, write_config};
use hyper::{Method, StatusCode};

/// A file for one node over `redis`, with `extra` in `[sale]`.
fn file(event: &str, total: u64, extra: &str, redis: &str, at: SocketAddr) -> String {
    format!(
        "[sale]\nevent = \"{event}\"\ntotal = {total}\nper_user_limit = 1\n{extra}\n\n\
         [redis]\nurl = \"{redis}\"\ntimeout = \"1s\"\n\n\
         [[node]]\nname = \"n1\"\nlisten = \"{at}\"\n"
    )
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn stock_init(path: &Path, force: bool) {
    let mut args = vec![
        "stock",
        "init",
        "--trust-client-buyer-ids",
        "--config",
        p(path),
    ];
    if force {
        args.push("--force");
    }
    let out = run(&args);
    assert!(out.status.success(), "stock init: {out:?}");
}

fn start_node(path: &Path, at: SocketAddr) -> SpikeProcess {
    let node = SpikeProcess::start(&["node", "--config", p(path), "--name", "n1"]);
    wait_listening(&at.to_string(), Duration::from_secs(10));
    node
}

async fn buy(c: &TestClient, at: SocketAddr, user: &str) -> String {
    let r: Reply = send(c, Method::GET, at, &format!("/buy/ticket?user={user}"), &[])
        .await
        .unwrap_or_else(|e| panic!("buy for {user}: {e}"));
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    json(&r.body)["order"]
        .as_str()
        .unwrap_or_else(|| panic!("no order in {}", r.body))
        .to_string()
}

/// A running `spike orders tail`, its stdout read line by line.
struct Tail {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Tail {
    /// `spike orders tail --config PATH ARGS`. With `small_pipe`, a pipe of
    /// one page and a reader that takes a line only when asked: once the
    /// test stops asking, the tail blocks in the middle of printing a batch
    /// it has not acknowledged, as the tail of a stalled reader does.
    fn start(path: &Path, args: &[&str], small_pipe: bool) -> Tail {
        let mut child = Command::new(bin())
            .args(["orders", "tail", "--config", p(path)])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn orders tail");
        let out = child.stdout.take().expect("stdout");
        if small_pipe {
            use std::os::fd::AsRawFd;
            // SAFETY: F_SETPIPE_SZ on a pipe this process owns.
            unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        }
        let (tx, lines) = std::sync::mpsc::sync_channel(if small_pipe { 0 } else { 100_000 });
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Tail { child, lines }
    }

    /// Lines printed until `enough` holds of all of them, or `limit` passes.
    fn read_until(
        &self,
        got: &mut Vec<serde_json::Value>,
        limit: Duration,
        enough: impl Fn(&[serde_json::Value]) -> bool,
    ) {
        let start = Instant::now();
        while !enough(got) && start.elapsed() < limit {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                got.push(json(&line));
            }
        }
    }

    /// SIGKILL, then every line it had written before dying.
    fn kill_and_drain(mut self, got: &mut Vec<serde_json::Value>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            got.push(json(&line));
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `spike orders tail` run to its end within `limit` (it must not wait
/// forever): exit status and stderr.
fn tail_exits(path: &Path, limit: Duration) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(bin())
        .args(["orders", "tail", "--config", p(path)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn orders tail");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut err)
                .expect("read stderr");
            return (status, err);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`spike orders tail` still running after {limit:?}: it waits silently");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The whole stream, oldest first.
fn stream(redis: &RedisServer, event: &str) -> Vec<(String, HashMap<String, String>)> {
    let mut c = redis.connection().expect("redis");
    redis::cmd("XRANGE")
        .arg(format!("spike:{{{event}}}:events"))
        .arg("-")
        .arg("+")
        .query(&mut c)
        .expect("XRANGE")
}

/// Events not acknowledged by the group.
fn pending(redis: &RedisServer, event: &str) -> u64 {
    let mut c = redis.connection().expect("redis");
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(format!("spike:{{{event}}}:events"))
        .arg("spike-orders")
        .query(&mut c)
        .expect("XPENDING");
    match summary {
        redis::Value::Array(a) => match a.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            other => panic!("XPENDING {other:?}"),
        },
        other => panic!("XPENDING {other:?}"),
    }
}

/// A sale never initialised: the tail says so, names the sale and the
/// file, and exits non-zero instead of waiting forever.
#[test]
fn orders_tail_on_a_sale_never_initialised_says_so_and_exits_non_zero() {
    let redis = RedisServer::start();
    let path = write_config(&file(
        "never",
        5,
        "pay_within = \"30s\"",
        &redis.url(),
        common::free_addr(),
    ));
    let (status, err) = tail_exits(&path, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("not initialised") && err.contains("never") && err.contains(p(&path)),
        "{err}"
    );
    assert!(err.contains("spike stock init"), "{err}");
    remove_config(&path);
}

/// A sale of final purchases without `[sale] stream = true` writes no
/// stream: the tail says so, and says how to get one.
#[test]
fn orders_tail_on_a_final_sale_without_a_stream_says_so_and_exits_non_zero() {
    let redis = RedisServer::start();
    let path = write_config(&file("final", 5, "", &redis.url(), common::free_addr()));
    stock_init(&path, false);
    let (status, err) = tail_exits(&path, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("final") && err.contains("stream = true") && err.contains(p(&path)),
        "{err}"
    );
    // The file edited since: the stored sale is what counts, and the hint
    // is a new sale.
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(
        &path,
        text.replace(
            "per_user_limit = 1\n",
            "per_user_limit = 1\nstream = true\n",
        ),
    )
    .expect("rewrite");
    let (status, err) = tail_exits(&path, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("stock init --force"), "{err}");
    remove_config(&path);
}

/// Point 8: a Redis that cannot be reached is said in words (the URL
/// without its password, the file, the cause), not as a Rust struct.
#[test]
fn orders_tail_errors_say_what_happened_without_the_password() {
    let port = common::free_port();
    let url = format!("redis://app:hunter2@127.0.0.1:{port}");
    let path = write_config(&file(
        "away",
        5,
        "pay_within = \"30s\"",
        &url,
        common::free_addr(),
    ));
    let (status, err) = tail_exits(&path, Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("hunter2"), "the password leaked: {err}");
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains(p(&path)),
        "{err}"
    );
    assert!(err.to_lowercase().contains("refused"), "the cause: {err}");
    assert!(
        !err.contains("Os {") && !err.contains("kind:"),
        "a Rust struct: {err}"
    );
    remove_config(&path);
}

/// Point 10: the help names the events as the stream spells them.
#[test]
fn orders_tail_help_names_the_events_as_the_stream_does() {
    let out = run(&["orders", "tail", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).expect("utf-8");
    assert!(!help.contains("created"), "{help}");
    for word in ["reserved", "sold", "paid", "cancelled", "expired", "reset"] {
        assert!(help.contains(word), "{word}: {help}");
    }
    assert!(help.contains("--claim-after"), "{help}");
}

/// `stock init --force` over a sale with open reservations: the stream
/// survives the reset and gets a `reset` event carrying both epochs and the
/// reservations it voided; a tail running across it prints it and goes on
/// with the new sale's events; the audit of the new sale is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_writes_what_became_of_the_open_reservations_into_the_stream() {
    let redis = RedisServer::start();
    let at = common::free_addr();
    let path = write_config(&file("reset", 10, "pay_within = \"30s\"", &redis.url(), at));
    stock_init(&path, false);
    let node = start_node(&path, at);
    let tail = Tail::start(&path, &[], false);
    let c = client();
    let ids = [
        buy(&c, at, "u1").await,
        buy(&c, at, "u2").await,
        buy(&c, at, "u3").await,
    ];
    let paid = send(
        &c,
        Method::POST,
        at,
        &format!("/orders/{}/pay?user=u1", ids[0]),
        &[],
    )
    .await
    .expect("pay");
    assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
    let old_epoch: u64 = ids[0]
        .split('-')
        .next()
        .and_then(|e| e.parse().ok())
        .expect("epoch");
    let mut got = Vec::new();
    tail.read_until(&mut got, Duration::from_secs(10), |g| g.len() >= 4);
    assert_eq!(got.len(), 4, "{got:?}");

    stock_init(&path, true);
    tail.read_until(&mut got, Duration::from_secs(10), |g| g.len() >= 5);
    let reset = got
        .get(4)
        .unwrap_or_else(|| panic!("no reset event: {got:?}"));
    assert_eq!(reset["type"], "reset", "{reset}");
    assert_eq!(reset["old_epoch"], old_epoch, "{reset}");
    let epoch = reset["epoch"].as_u64().expect("a new epoch");
    assert!(epoch > old_epoch, "{reset}");
    assert_eq!(reset["voided"], 2, "two reservations were open: {reset}");
    let voided: HashSet<&str> = reset["voided_orders"]
        .as_array()
        .unwrap_or_else(|| panic!("the voided orders: {reset}"))
        .iter()
        .map(|v| v.as_str().expect("an order id"))
        .collect();
    assert_eq!(voided, HashSet::from([ids[1].as_str(), ids[2].as_str()]));

    // A voided reservation cannot be paid: its order went with the old sale.
    let late = send(
        &c,
        Method::POST,
        at,
        &format!("/orders/{}/pay?user=u2", ids[1]),
        &[],
    )
    .await
    .expect("pay");
    assert_eq!(late.status, StatusCode::NOT_FOUND, "{}", late.body);

    // The new sale goes on in the same stream, and the tail with it.
    let new = buy(&c, at, "u1").await;
    assert!(new.starts_with(&format!("{epoch}-")), "{new}");
    tail.read_until(&mut got, Duration::from_secs(10), |g| g.len() >= 6);
    assert_eq!(got.get(5).map(|e| &e["order"]), Some(&new.clone().into()));
    assert_eq!(stream(&redis, "reset").len(), 6, "nothing was wiped");
    let out = run(&["stock", "audit", "--config", p(&path)]);
    assert!(out.status.success(), "audit after a reset: {out:?}");
    drop(tail);
    drop(node);
    remove_config(&path);
}

/// A reset to a sale that writes no stream (final purchases, no `stream =
/// true`) ends a running tail as one started on it would end: nothing
/// more will come.
#[test]
fn a_reset_to_a_sale_without_a_stream_ends_the_tail() {
    let redis = RedisServer::start();
    let at = common::free_addr();
    let path = write_config(&file("ends", 5, "stream = true", &redis.url(), at));
    stock_init(&path, false);
    let mut tail = Tail::start(&path, &[], false);
    std::thread::sleep(Duration::from_millis(500));
    assert!(tail.child.try_wait().expect("wait").is_none(), "it follows");
    std::fs::write(&path, file("ends", 5, "", &redis.url(), at)).expect("rewrite");
    stock_init(&path, true);
    let mut got = Vec::new();
    tail.read_until(&mut got, Duration::from_secs(10), |g| !g.is_empty());
    assert_eq!(got.first().map(|e| &e["type"]), Some(&"reset".into()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = tail.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the tail goes on after a reset to a sale without a stream"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
    remove_config(&path);
}

/// Redis restarted without its data (no persistence): the group is gone,
/// and so is the sale; the running tail says so and exits 1 rather than
/// recreate a group and wait on a sale nobody will write.
#[test]
fn a_redis_that_lost_the_sale_ends_the_tail() {
    let mut redis = RedisServer::start_volatile();
    let path = write_config(&file(
        "lost",
        5,
        "pay_within = \"30s\"",
        &redis.url(),
        common::free_addr(),
    ));
    let out = run(&[
        "stock",
        "init",
        "--trust-client-buyer-ids",
        "--allow-volatile",
        "--config",
        p(&path),
    ]);
    assert!(out.status.success(), "{out:?}");
    let mut tail = Tail::start(&path, &[], false);
    std::thread::sleep(Duration::from_millis(500));
    assert!(tail.child.try_wait().expect("wait").is_none(), "it follows");
    redis.restart();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = tail.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the tail waits on a sale Redis lost"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
    remove_config(&path);
}

/// A reset of many open reservations says how many it voided without
/// listing them (one field must not grow with the sale).
#[test]
fn a_reset_of_many_reservations_counts_them_without_listing_them() {
    let redis = RedisServer::start();
    let path = write_config(&file(
        "manyreset",
        500,
        "pay_within = \"30s\"",
        &redis.url(),
        common::free_addr(),
    ));
    stock_init(&path, false);
    // 150 open reservations, as deduct.lua would leave them.
    let mut c = redis.connection().expect("redis");
    for i in 1..=150 {
        let _: () = redis::cmd("ZADD")
            .arg("spike:{manyreset}:due")
            .arg(u64::MAX / 4)
            .arg(format!("1-{i}"))
            .query(&mut c)
            .expect("ZADD");
    }
    let _: () = redis::cmd("HSET")
        .arg("spike:{manyreset}:stock")
        .arg("sold")
        .arg(150)
        .arg("reserved")
        .arg(150)
        .query(&mut c)
        .expect("HSET");
    stock_init(&path, true);
    let events = stream(&redis, "manyreset");
    let (_, reset) = events.last().expect("a reset event");
    assert_eq!(reset.get("type").map(String::as_str), Some("reset"));
    assert_eq!(reset.get("voided").map(String::as_str), Some("150"));
    assert!(!reset.contains_key("voided_orders"), "{reset:?}");
    remove_config(&path);
}

/// `[sale] stream = true`: a final sale appends a `sold` event per order
/// in the same script call, the tail prints them, and the audit checks them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_sale_with_stream_true_hands_every_order_off() {
    let redis = RedisServer::start();
    let at = common::free_addr();
    let path = write_config(&file("finals", 3, "stream = true", &redis.url(), at));
    stock_init(&path, false);
    let node = start_node(&path, at);
    let c = client();
    let mut sold = HashSet::new();
    for u in ["a", "b", "c"] {
        sold.insert(buy(&c, at, u).await);
    }
    let tail = Tail::start(&path, &[], false);
    let mut got = Vec::new();
    tail.read_until(&mut got, Duration::from_secs(10), |g| g.len() >= 3);
    let streamed: HashSet<String> = got
        .iter()
        .map(|e| {
            assert_eq!(e["type"], "sold", "{e}");
            assert!(e["buyer"].is_string() && e["node"] == "n1" && e["at"].is_u64());
            e["order"].as_str().expect("order").to_string()
        })
        .collect();
    assert_eq!(streamed, sold);
    let out = run(&["stock", "audit", "--config", p(&path)]);
    assert!(out.status.success(), "{out:?}");
    let audit = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(audit["events"]["created"], 3, "{audit}");
    // The stored sale is in force: a file edited since says how it differs.
    std::fs::write(&path, file("finals", 3, "", &redis.url(), at)).expect("rewrite");
    let out = run(&["check", "--config", p(&path)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stream = false (stored: true)"), "{err}");
    drop(tail);
    drop(node);
    remove_config(&path);
}

/// Two consumers of one group: the first reads a batch, is SIGKILLed while
/// printing it, and never comes back; the second claims what the first had
/// read but not acknowledged (`--claim-after`), so the order service that
/// reads both loses nothing, and nothing stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_consumers_events_are_claimed_by_another() {
    let redis = RedisServer::start();
    let at = common::free_addr();
    let path = write_config(&file(
        "claim",
        300,
        "pay_within = \"60s\"",
        &redis.url(),
        at,
    ));
    stock_init(&path, false);
    let _node = start_node(&path, at);
    let c = client();
    let answers = common::sale::storm(&c, &[at], 300, 300, 16, "b").await;
    assert_eq!(common::sale::count(&answers, StatusCode::OK), 300);
    let all: HashSet<String> = stream(&redis, "claim").into_iter().map(|e| e.0).collect();
    assert_eq!(all.len(), 300);

    let first = Tail::start(&path, &["--consumer", "c1"], true);
    let mut printed = Vec::new();
    first.read_until(&mut printed, Duration::from_secs(10), |g| g.len() >= 10);
    // The first is stuck printing a batch it read; it dies there.
    std::thread::sleep(Duration::from_millis(300));
    first.kill_and_drain(&mut printed);
    let left = pending(&redis, "claim");
    assert!(left > 0, "the first consumer acknowledged all it read");

    let second = Tail::start(&path, &["--consumer", "c2", "--claim-after", "1s"], false);
    let ids = |g: &[serde_json::Value]| -> HashSet<String> {
        g.iter()
            .map(|e| e["id"].as_str().expect("id").to_string())
            .collect()
    };
    let before = ids(&printed);
    let mut after = Vec::new();
    second.read_until(&mut after, Duration::from_secs(15), |g| {
        before.union(&ids(g)).count() >= all.len()
    });
    let seen: HashSet<String> = before.union(&ids(&after)).cloned().collect();
    let lost: Vec<&String> = all.difference(&seen).collect();
    assert!(
        lost.is_empty(),
        "{} events never printed ({} pending at the kill): {lost:?}",
        lost.len(),
        left
    );
    common::wait_for("nothing pending", Duration::from_secs(5), async || {
        pending(&redis, "claim") == 0
    })
    .await;
    eprintln!(
        "{} printed by the first before its death, {left} pending then, {} by the second",
        before.len(),
        after.len()
    );
    drop(second);
    remove_config(&path);
}

/// Redis's time per sale (`INFO commandstats`' `usec` of `EVALSHA` ÷
/// tickets sold) of a final sale by today's `deduct.lua` (git's
/// `$SPIKE_COST_BASE`, `main` by default), by this one without and with
/// `[sale] stream = true`, and of a reservation for reference: the script
/// called as a node calls it, with batches of 1 and of 10 purchases (about
/// what a busy node sends), 20,000 distinct buyers per run. Modes
/// alternate, five rounds each; the ratios are of medians measured in this
/// one run. Not a regression test (its numbers depend on the machine):
/// `cargo test --test order_stream stream_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn stream_cost() {
    const N: usize = 20_000;
    let base_ref = std::env::var("SPIKE_COST_BASE").unwrap_or_else(|_| "main".into());
    let out = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "show"])
        .arg(format!("{base_ref}:src/node/deduct.lua"))
        .output()
        .expect("git");
    assert!(out.status.success(), "git show {base_ref}: {out:?}");
    let today_code = String::from_utf8(out.stdout).expect("utf-8");
    let this_code = include_str!("../src/node/deduct.lua");
    let today = redis::Script::new(&today_code);
    let this = redis::Script::new(this_code);
    let init = redis::Script::new(include_str!("../src/node/init.lua"));
    let modes: [(&str, &redis::Script, &str, &str, &str); 4] = [
        ("final, today", &today, &today_code, "0", "0"),
        ("final", &this, this_code, "0", "0"),
        ("final + stream", &this, this_code, "0", "1"),
        ("reserved", &this, this_code, "3600000", "0"),
    ];
    let redis = RedisServer::start();
    let mut c = redis.connection().expect("redis");
    let mut results: HashMap<(&str, usize), Vec<f64>> = HashMap::new();
    for round in 0..5 {
        for (name, script, code, window, stream) in modes {
            for batch in [1usize, 10] {
                let keys = spike::node::store::SaleKeys::new(&format!("cost{round}-{batch}"));
                let keys = keys.all();
                let mut call = init.prepare_invoke();
                call.key(&keys[..]);
                call.arg(N)
                    .arg(1)
                    .arg("1")
                    .arg(window)
                    .arg(100_000)
                    .arg(stream);
                let _: redis::Value = call.invoke(&mut c).expect("init");
                let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut c).expect("TIME");
                let deadline = secs * 1000 + micros / 1000 + 600_000;
                // Loaded before the stats are reset: only the sales count.
                let _: () = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(code)
                    .query(&mut c)
                    .map(|_: String| ())
                    .expect("SCRIPT LOAD");
                let _: () = redis::cmd("CONFIG")
                    .arg("RESETSTAT")
                    .query(&mut c)
                    .expect("RESETSTAT");
                for first in (0..N).step_by(batch) {
                    let mut call = script.prepare_invoke();
                    call.key(&keys[..]).arg(10_000);
                    for i in first..(first + batch).min(N) {
                        call.arg("p")
                            .arg("cost")
                            .arg("n1")
                            .arg(format!("b{i}"))
                            .arg("")
                            .arg(deadline);
                    }
                    let answer: Vec<redis::Value> = call.invoke(&mut c).expect("deduct");
                    assert_eq!(answer.len(), 11 + 6 * (first + batch).min(N) - 6 * first);
                    assert_eq!(answer[11], redis::Value::Int(1), "sold: {answer:?}");
                }
                let info: String = redis::cmd("INFO")
                    .arg("commandstats")
                    .query(&mut c)
                    .expect("INFO");
                let line = info
                    .lines()
                    .find(|l| l.starts_with("cmdstat_evalsha:"))
                    .expect("evalsha stats");
                let usec: f64 = line
                    .split([':', ','])
                    .find_map(|kv| kv.strip_prefix("usec="))
                    .and_then(|v| v.parse().ok())
                    .expect("usec");
                let per_sale = usec / N as f64;
                eprintln!("round {round} {name:>15} batch {batch:>2}: {per_sale:.2} µs per sale");
                results.entry((name, batch)).or_default().push(per_sale);
            }
        }
    }
    let median = |xs: &Vec<f64>| {
        let mut xs = xs.clone();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    for batch in [1usize, 10] {
        let base = median(&results[&("final, today", batch)]);
        for (name, ..) in modes {
            let m = median(&results[&(name, batch)]);
            eprintln!(
                "batch {batch:>2} {name:>15}: median {m:.2} µs of Redis per sale, {:.2}× today's final",
                m / base
            );
        }
    }
}
