//! What a user sees of the real `spike` binary around the work itself: error
//! lines, log colour and `--help`.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::spike::{bin, remove_config, run, wait_listening, write_config};

/// `spike ARGS`'s exit code and stderr.
fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8(out.stderr).expect("utf-8")
}

#[test]
fn a_node_name_from_the_command_line_is_not_blamed_on_a_line_of_the_file() {
    let path = write_config(
        "[sale]\nevent = \"e\"\ntotal = 10\n[[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:0\"\n",
    );
    let p = path.to_str().expect("utf-8");
    let err = fails(&["node", "--config", p, "--name", "n9"]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--name n9") && err.contains("the file has: n1"),
        "{err}"
    );
    assert!(
        !err.contains(&format!("{p}:1:")),
        "not the file's line 1: {err}"
    );
    remove_config(&path);
}

#[test]
fn a_missing_config_file_is_said_once() {
    let path = write_config("");
    let missing = path.with_file_name("missing.toml");
    let err = fails(&["balancer", "--config", missing.to_str().expect("utf-8")]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    remove_config(&path);
}

#[test]
fn an_address_in_use_is_said_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let path = write_config(&format!(
        "[balancer]\nlisten = \"{addr}\"\nadmin = \"127.0.0.1:0\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\n"
    ));
    let err = fails(&["balancer", "--config", path.to_str().expect("utf-8")]);
    assert!(
        err.contains(&format!("cannot listen for clients on {addr}")),
        "{err}"
    );
    assert_eq!(err.matches("in use").count(), 1, "{err}");
    remove_config(&path);
}

#[test]
fn an_address_clash_names_both_keys() {
    let path = write_config(
        "[balancer]\nlisten = \"127.0.0.1:9000\"\nadmin = \"127.0.0.1:0\"\n[[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:9000\"\n",
    );
    let p = path.to_str().expect("utf-8");
    let err = fails(&["balancer", "--config", p]);
    assert!(err.contains(&format!("{p}:6: `node[0].listen`")), "{err}");
    assert!(err.contains("`balancer.listen` (line 2)"), "{err}");
    remove_config(&path);
}

/// A balancer config on free ports; returns it and the admin address.
fn balancer_config() -> (std::path::PathBuf, SocketAddr) {
    let admin = common::free_addr();
    let path = write_config(&format!(
        "[balancer]\nlisten = \"127.0.0.1:0\"\nadmin = \"{admin}\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\n"
    ));
    (path, admin)
}

#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let (path, admin) = balancer_config();
    let mut child = Command::new(bin())
        .args(["balancer", "--config", path.to_str().expect("utf-8")])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_listening(&admin.to_string(), Duration::from_secs(20));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("read");
    assert!(child.wait().expect("wait").success());
    assert!(logs.contains("balancer listening"), "{logs}");
    assert!(!logs.contains('\x1b'), "colour codes in a pipe: {logs:?}");
    remove_config(&path);
}

/// Runs `spike balancer` for a second on a terminal (util-linux's
/// `script` gives it a pty) and returns what it printed there.
fn on_a_terminal(no_color: Option<&str>) -> String {
    let (path, _) = balancer_config();
    let cmd = format!(
        "timeout -s TERM 2 {} balancer --config {}",
        bin(),
        path.display()
    );
    let mut script = Command::new("script");
    script
        .args(["-qec", &cmd, "/dev/null"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR");
    if let Some(v) = no_color {
        script.env("NO_COLOR", v);
    }
    let out = script.output().expect("script(1) from util-linux");
    remove_config(&path);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("balancer listening"), "{text}");
    text
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    assert!(on_a_terminal(None).contains('\x1b'));
    assert!(
        on_a_terminal(Some("")).contains('\x1b'),
        "an empty NO_COLOR is unset"
    );
    assert!(!on_a_terminal(Some("1")).contains('\x1b'));
}

/// `spike ARGS --help`, which must exit 0.
fn help(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.push("--help");
    let out = run(&all);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

fn mentions(text: &str, words: &[&str]) {
    for w in words {
        assert!(text.contains(w), "help lacks {w:?}:\n{text}");
    }
}

#[test]
fn help_says_signals_endpoints_exit_codes_and_logging() {
    mentions(
        &help(&[]),
        &[
            "SIGHUP",
            "SIGTERM",
            "SIGINT",
            "grace_period",
            "reload",
            "/healthz",
            "/status",
            "/metrics",
            "Exit codes: 0 success; 1",
            "stock audit",
            "RUST_LOG",
            "NO_COLOR",
        ],
    );
    mentions(
        &help(&["balancer"]),
        &[
            "SIGHUP",
            "saving the file",
            "SIGTERM",
            "grace_period",
            "/healthz",
            "/status",
            "/metrics",
            "last_reload",
            "Exit code 1",
        ],
    );
    mentions(
        &help(&["node"]),
        &[
            "SIGTERM",
            "grace_period",
            "/buy/ticket",
            "/healthz",
            "/stats",
            "Exit code 1",
        ],
    );
    mentions(
        &help(&["up"]),
        &[
            "SIGHUP",
            "SIGTERM",
            "grace_period",
            "/status",
            "/metrics",
            "Exit code 1",
        ],
    );
    mentions(&help(&["stock", "audit"]), &["Exit codes: 0", "1 when"]);
}
