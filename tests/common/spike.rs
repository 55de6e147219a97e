//! `spike` processes started from the real binary, killed on drop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spike")
}

/// `examples/crowd.rs` (the load client of the benchmarks and the crowd
/// tests) as `cargo build --example crowd` leaves it beside the `spike`
/// binary under test: `scripts/test.sh` builds it first (`cargo test
/// --all-targets` builds an example only as a test harness).
pub fn crowd_bin() -> PathBuf {
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

/// Writes `text` to a fresh config file in a fresh temp dir.
pub fn write_config(text: &str) -> PathBuf {
    // A counter, not only a free port: two tests that ask at once may be
    // given the same port, and would then share (and rewrite) one file.
    static WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITTEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "spike-test-{}-{}-{n}",
        std::process::id(),
        super::free_port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("config.toml");
    let mut f = std::fs::File::create(&path).expect("create config");
    f.write_all(text.as_bytes()).expect("write config");
    path
}

/// Starts one `spike node` process (embedded store) selling `total` tickets
/// of `event` on a free port, with `extra` TOML (a `[server]` section, say)
/// between the sale and the node; returns it once it listens.
pub fn start_node(
    event: &str,
    total: u64,
    extra: &str,
) -> (SpikeProcess, std::net::SocketAddr, PathBuf) {
    let port = super::free_port();
    let text = format!(
        "[sale]\nevent = \"{event}\"\ntotal = {total}\n{extra}\n[[node]]\nname = \"n1\"\nlisten = \"127.0.0.1:{port}\"\n"
    );
    let path = write_config(&text);
    let node = SpikeProcess::start(&[
        "node",
        "--config",
        path.to_str().expect("path"),
        "--name",
        "n1",
    ]);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(&addr.to_string(), Duration::from_secs(10));
    (node, addr, path)
}

/// Runs `spike ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run spike")
}

/// A long-running `spike` process.
pub struct SpikeProcess {
    /// The child process.
    pub child: Child,
}

impl SpikeProcess {
    /// Starts `spike ARGS`; logs go to the test's stderr.
    pub fn start(args: &[&str]) -> SpikeProcess {
        let child = Command::new(bin())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn spike");
        SpikeProcess { child }
    }

    /// Starts `spike ARGS` with its standard output and error written to
    /// files, for tests about what it prints ([`SpikeProcess::output`]).
    pub fn start_captured(args: &[&str]) -> (SpikeProcess, Captured) {
        SpikeProcess::start_captured_under(&[], args)
    }

    /// [`SpikeProcess::start_captured`], run by `wrapper` (a command and its
    /// arguments, such as `prlimit --nofile=256 --`) when not empty.
    pub fn start_captured_under(wrapper: &[&str], args: &[&str]) -> (SpikeProcess, Captured) {
        let dir = std::env::temp_dir().join(format!(
            "spike-out-{}-{}",
            std::process::id(),
            super::free_port()
        ));
        std::fs::create_dir_all(&dir).expect("output dir");
        let captured = Captured { dir };
        let out = std::fs::File::create(captured.dir.join("stdout")).expect("stdout file");
        let err = std::fs::File::create(captured.dir.join("stderr")).expect("stderr file");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let child = command
            .args(args)
            .stdout(out)
            .stderr(err)
            .env("RUST_LOG", "info")
            .spawn()
            .expect("spawn spike");
        (SpikeProcess { child }, captured)
    }

    /// Sends a signal by name (TERM, KILL, HUP, STOP, CONT).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Sends `sig` (TERM or INT) and fails the test unless the process
    /// exits 0 within `limit`: the graceful stop every command promises.
    pub fn stop(&mut self, sig: &str, limit: Duration) {
        self.signal(sig);
        self.expect_clean_exit(limit);
    }

    /// Fails the test unless the process exits 0 within `limit`.
    pub fn expect_clean_exit(&mut self, limit: Duration) {
        match self.wait_exit(limit) {
            Some(status) => assert!(status.success(), "exited with {status:?}"),
            None => panic!("still running after {limit:?}"),
        }
    }

    /// Waits for exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Where [`SpikeProcess::start_captured`] writes a process's output;
/// removed on drop.
pub struct Captured {
    dir: PathBuf,
}

impl Captured {
    /// Everything the process printed so far on standard output.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    /// Everything the process printed so far on standard error.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// Waits until standard output or error contains `text`; fails the
    /// test with both after `limit`.
    pub fn wait_for(&self, text: &str, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.stdout().contains(text) || self.stderr().contains(text) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{text:?} not printed within {limit:?}\nstdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for SpikeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: &str, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {addr} after {limit:?}");
}

/// `git show HEAD:PATH` in this checkout, or `None` without git or a commit.
pub fn committed(path: &str) -> Option<String> {
    let out = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "show",
            &format!("HEAD:{path}"),
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).expect("utf-8"))
}

/// The example `config.toml` as committed, never the working copy (which
/// the README invites the user to edit, and which must not fail the
/// tests): from git, or without git from the copy in `tests/data/`.
pub fn committed_config() -> String {
    committed("config.toml").unwrap_or_else(|| {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/config.toml"
        ))
        .expect("tests/data/config.toml")
    })
}

/// Removes a config's temp dir.
pub fn remove_config(path: &Path) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// libfaketime's multi-threaded library, from Debian's `faketime` package,
/// to preload into a `spike` process whose clock a test shifts.
pub fn faketime_library() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib")
        .expect("/usr/lib")
        .filter_map(Result::ok)
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime must be installed (run scripts/test.sh)")
}

/// `spike` with `args`, its wall clock shifted by what the file `shift`
/// says (libfaketime; written "+0" first, then whatever a test steps it
/// to), its monotonic clock the machine's. The file is read on every
/// reading of the wall clock, so a step is in force once written.
pub fn start_with_clock_file(args: &[&str], shift: &Path) -> SpikeProcess {
    std::fs::write(shift, "+0").expect("faketime file");
    let child = Command::new(bin())
        .args(args)
        .env("LD_PRELOAD", faketime_library())
        .env("FAKETIME_TIMESTAMP_FILE", shift)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn spike");
    SpikeProcess { child }
}

/// Writes `text` and runs `spike stock init --trust-client-buyer-ids` on it
/// (a sale whose buyers the client names), failing the test if that fails:
/// the file's path.
pub fn write_and_init(text: &str) -> PathBuf {
    let path = write_config(text);
    let init = run(&[
        "stock",
        "init",
        "--trust-client-buyer-ids",
        "--config",
        path.to_str().expect("path"),
    ]);
    assert!(init.status.success(), "{init:?}");
    path
}
