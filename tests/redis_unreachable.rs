//! A Redis that cannot be reached is reported as what happened: a refused
//! connection says so, with the URL (its password hidden) and the config
//! file that names it, from `spike stock`, `spike check` and in a node's
//! log; never as "did not answer in time". Real spike processes against a
//! port nobody listens on.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::spike::{bin, run, write_config};

/// A sale whose `[redis]` points at a free port on 127.0.0.1, with a
/// password in the URL that must never be printed.
fn refused_config() -> (String, u16) {
    let port = common::free_port();
    let node = common::free_addr();
    let text = format!(
        "[sale]\nevent = \"nobody\"\ntotal = 10\n\n[redis]\nurl = \"redis://spike:s3cret-pw@127.0.0.1:{port}\"\ntimeout = \"300ms\"\n\n[[node]]\nname = \"n1\"\nlisten = \"{node}\"\n"
    );
    (
        write_config(&text).to_str().expect("path").to_string(),
        port,
    )
}

/// What a report of the refused connection must say, and must not.
fn says_refused(said: &str, cfg: &str, port: u16) {
    assert!(
        said.to_lowercase().contains("refused"),
        "the cause, a refused connection: {said}"
    );
    assert!(
        said.contains(&format!("127.0.0.1:{port}")),
        "the URL: {said}"
    );
    assert!(said.contains(cfg), "the config file: {said}");
    assert!(
        !said.contains("s3cret-pw"),
        "the password is printed: {said}"
    );
    assert!(
        !said.contains("did not answer in time"),
        "a refused connection is not a timeout: {said}"
    );
}

#[test]
fn stock_commands_and_check_say_the_connection_was_refused_with_url_and_file() {
    let (cfg, port) = refused_config();
    for command in [
        &["stock", "init", "--trust-client-buyer-ids"][..],
        &["stock", "show"],
        &["stock", "audit"],
        &["check"],
    ] {
        let out = run(&[command, &["--config", &cfg]].concat());
        assert!(!out.status.success(), "{command:?} succeeded");
        let said = String::from_utf8_lossy(&out.stderr);
        says_refused(&said, &cfg, port);
    }
}

#[test]
fn a_node_logs_the_refused_connection_with_url_and_file() {
    let (cfg, port) = refused_config();
    let mut node = Command::new(bin())
        .args(["node", "--config", &cfg, "--name", "n1"])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spike node");
    let stderr = node.stderr.take().expect("stderr");
    let (lines, read) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    let mut log = String::new();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(line) = read.recv_timeout(Duration::from_millis(100)) {
            log.push_str(&line);
            log.push('\n');
            if line.to_lowercase().contains("refused") {
                break;
            }
        }
    }
    let _ = node.kill();
    let _ = node.wait();
    let refused = log
        .lines()
        .find(|l| l.to_lowercase().contains("refused"))
        .unwrap_or_else(|| panic!("no line of the log says refused:\n{log}"));
    says_refused(refused, &cfg, port);
    assert!(!log.contains("s3cret-pw"), "the password is logged:\n{log}");
    assert!(
        !log.contains("did not answer in time"),
        "a refused connection logged as a timeout:\n{log}"
    );
}

/// A refusal while Redis is still starting is no verdict: `stock init`
/// started just before its Redis waits out `[redis] timeout` and succeeds.
#[test]
fn a_redis_that_starts_a_moment_later_is_waited_for() {
    let port = common::free_port();
    let text = format!(
        "[sale]\nevent = \"late\"\ntotal = 10\n\n[redis]\nurl = \"redis://127.0.0.1:{port}\"\ntimeout = \"1s\"\n"
    );
    let cfg = write_config(&text).to_str().expect("path").to_string();
    let init = Command::new(bin())
        .args([
            "stock",
            "init",
            "--trust-client-buyer-ids",
            "--config",
            &cfg,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stock init");
    std::thread::sleep(Duration::from_millis(300));
    let dir = std::path::Path::new(&cfg)
        .parent()
        .expect("dir")
        .to_path_buf();
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "yes", "--dir", dir.to_str().expect("dir")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (run scripts/test.sh)");
    let out = init.wait_with_output().expect("stock init");
    let _ = redis.kill();
    let _ = redis.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
