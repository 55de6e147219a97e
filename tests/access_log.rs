//! The access log (issue 25, point 5), from a real `spike balancer`: one
//! line per request, Nginx's `combined` or JSON, with the client's address
//! (the PROXY protocol's), the verified buyer, the upstream, the status
//! and the times, on the fast path, on hyper's, and for the balancer's own
//! answers; reopened on SIGUSR1 as logrotate expects.

mod balancer_support;
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use balancer_support::raw;
use common::auth::TestAuth;
use common::backend::Backend;
use common::spike::{SpikeProcess, remove_config, wait_listening, write_config};

/// The lines of `path` once there are at least `n` (the writer writes
/// every 50 ms).
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let mut last = Vec::new();
    for _ in 0..100 {
        last = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        if last.len() >= n {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{} has {} lines, not {n}: {last:?}",
        path.display(),
        last.len()
    );
}

/// A balancer process with `lines` added to its `[balancer]` and the access
/// log in a directory of its own.
fn start(
    extra_sections: &str,
    lines: &str,
    upstream: SocketAddr,
) -> (SpikeProcess, SocketAddr, PathBuf, PathBuf) {
    let listen = common::free_addr();
    let admin = common::free_addr();
    let dir = write_config("").parent().expect("dir").to_path_buf();
    let log = dir.join("access.log");
    let text = format!(
        "{extra_sections}[balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\naccess_log = \"{}\"\n{lines}\n\
         [[balancer.upstream]]\naddr = \"{upstream}\"\n",
        log.display()
    );
    let path = write_config(&text);
    let lb = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("path")]);
    wait_listening(&listen.to_string(), Duration::from_secs(15));
    (lb, listen, log, path)
}

/// `combined`, behind the PROXY protocol: a request on the fast path, one
/// on hyper's (HTTP/1.0 without `Host`), and one the balancer answers itself (TRACE's
/// 405) each make one line with the header's client address; the
/// forwarded ones name the upstream and its time. Then logrotate's way:
/// the file is renamed, SIGUSR1 sent, and the next lines go to a new file
/// at the path while the renamed one keeps the old lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_lines_on_both_paths_and_sigusr1_reopens() {
    let backend = Backend::start("b").await;
    let (mut lb, listen, log, path) = start(
        "",
        "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\ndrain_delay = \"0s\"",
        backend.addr,
    );
    let send = async |client: &str, request: &str| {
        let header = format!("PROXY TCP4 {client} 127.0.0.1 4000 80\r\n");
        raw(None, listen, format!("{header}{request}").as_bytes()).await
    };
    let r = send(
        "203.0.113.1",
        "GET /fast?q=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: ua/1\r\nReferer: http://r/\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Without `Host`, HTTP/1.0 is hyper's to take.
    let r = send("203.0.113.2", "GET /old HTTP/1.0\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"),
        "{r}"
    );
    let r = send(
        "203.0.113.3",
        "TRACE /t HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");

    let got = lines(&log, 3).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let upstream = backend.addr.to_string();
    // Each worker thread's lines are in order; lines of connections on
    // different workers may not be (each has its buffer): found by client.
    let by_client = |ip: &str| {
        got.iter()
            .find(|l| l.starts_with(&format!("{ip} ")))
            .unwrap_or_else(|| panic!("no line for {ip}: {got:?}"))
    };
    let fast = by_client("203.0.113.1");
    assert!(
        fast.starts_with("203.0.113.1 - - [")
            && fast.contains("] \"GET /fast?q=1 HTTP/1.1\" 200 1 \"http://r/\" \"ua/1\" \"")
            && fast.contains(&format!("\"{upstream}\" ")),
        "{fast}"
    );
    let old = by_client("203.0.113.2");
    assert!(
        old.starts_with("203.0.113.2 - - [")
            && old.contains("\"GET /old HTTP/1.0\" 200 1 \"-\" \"-\"")
            && old.contains(&upstream),
        "{old}"
    );
    let own = by_client("203.0.113.3");
    assert!(
        own.starts_with("203.0.113.3 - - [")
            && own.contains("\"TRACE /t HTTP/1.1\" 405 ")
            && own.contains(" \"-\" - "),
        "{own}"
    );
    // The times: seconds with milliseconds, upstream's then the request's.
    let fields: Vec<&str> = fast.rsplitn(3, ' ').collect();
    for t in &fields[..2] {
        assert!(t.parse::<f64>().is_ok() && t.contains('.'), "{t} in {fast}");
    }

    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).expect("rename");
    lb.signal("USR1");
    common::wait_for(
        "the log reopened at its path",
        Duration::from_secs(5),
        async || log.exists(),
    )
    .await;
    let r = send(
        "203.0.113.4",
        "GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let new = lines(&log, 1).await;
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(new[0].starts_with("203.0.113.4 - - ["), "{new:?}");
    assert_eq!(
        lines(&rotated, 3).await.len(),
        3,
        "the rotated file keeps the old lines only"
    );
    lb.signal("TERM");
    lb.expect_clean_exit(Duration::from_secs(15));
    remove_config(&path);
}

/// JSON: one valid object a line, with the buyer whose token verified (and
/// none for a token that does not), the upstream and the times; the
/// balancer's own answers (a closed path) have no upstream. Lines queued
/// when SIGTERM comes are written before the process ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_name_the_verified_buyer() {
    let backend = Backend::start("b").await;
    let auth = TestAuth::new("logged");
    let (mut lb, listen, log, path) = start(
        &format!(
            "[sale]\nevent = \"logged\"\ntotal = 10\n\n{}",
            auth.section()
        ),
        "access_log_format = \"json\"\ndrain_delay = \"0s\"",
        backend.addr,
    );
    let buy = |authorization: String| {
        format!(
            "POST /buy/ticket HTTP/1.1\r\nHost: a\r\nAuthorization: {authorization}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    let r = raw(None, listen, buy(auth.bearer("alice")).as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let forged = TestAuth::new("other-sale").bearer("mallory");
    let _ = raw(None, listen, buy(forged).as_bytes()).await;
    let r = raw(
        None,
        listen,
        b"GET /internal/holders HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    lb.signal("TERM");
    lb.expect_clean_exit(Duration::from_secs(15));

    let got = lines(&log, 3).await;
    let v: Vec<serde_json::Value> = got
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(v.len(), 3, "{got:?}");
    // In order per worker thread only (see `combined_lines_...`): found
    // by what they say.
    let alice = v
        .iter()
        .find(|l| l["buyer"] == "alice")
        .unwrap_or_else(|| panic!("no line names alice: {got:?}"));
    assert_eq!(alice["client"], "127.0.0.1");
    assert_eq!(alice["method"], "POST");
    assert_eq!(alice["target"], "/buy/ticket");
    assert_eq!(alice["status"], 200);
    assert_eq!(alice["upstream"], backend.addr.to_string());
    assert!(alice["upstream_time"].as_f64().is_some(), "{alice}");
    assert!(alice["request_time"].as_f64().is_some(), "{alice}");
    assert!(
        alice["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{alice}"
    );
    let posts = v.iter().filter(|l| l["method"] == "POST").count();
    let nobody = v
        .iter()
        .filter(|l| l["method"] == "POST" && l["buyer"].is_null())
        .count();
    assert_eq!(
        (posts, nobody),
        (2, 1),
        "a token that does not verify names nobody: {got:?}"
    );
    let own = v
        .iter()
        .find(|l| l["target"] == "/internal/holders")
        .unwrap_or_else(|| panic!("no line for the closed path: {got:?}"));
    assert_eq!(own["status"], 404);
    assert!(
        own["upstream"].is_null() && own["upstream_time"].is_null(),
        "{own}"
    );
    remove_config(&path);
}
