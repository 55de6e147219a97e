//! Hot reload under load: the strategy switched and an upstream added while
//! 8 clients keep sending; zero failed requests and the new split in force
//! afterwards. Once by rewriting the file (in-process balancer, file watch),
//! once with SIGHUP to a real `spike balancer` process (the file's length and
//! modification time are kept, so only the signal can be what reloads it).
//! A file that does not validate is refused and the old config stays.

mod balancer_support;
mod common;

use common::wait_for;

use std::net::SocketAddr;
use std::time::Duration;

use balancer_support::*;
use common::backend::Backend;
use common::spike::{SpikeProcess, remove_config, wait_listening, write_config};

/// Sends `n` sequential requests; returns how many each backend got.
async fn split(url: &str, n: usize, backends: &[&Backend]) -> Vec<u64> {
    let before: Vec<u64> = backends.iter().map(|b| b.hits()).collect();
    let client = http();
    for _ in 0..n {
        get_ok(&client, url).await;
    }
    backends
        .iter()
        .zip(before)
        .map(|(b, n0)| b.hits() - n0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_the_file_reloads_under_load_without_errors() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let lb = Running::start(&config_text(
        "weighted_round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(a.addr, 1), up(b.addr, 3)],
    ))
    .await;
    assert_eq!(lb.reloader.version(), 1);
    assert_eq!(
        split(&lb.url("/"), 40, &[&a, &b, &c]).await,
        vec![10, 30, 0]
    );

    let load = Load::start(lb.url("/"), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(
        &lb.path,
        config_text(
            "round_robin",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &[up(a.addr, 1), up(b.addr, 3), up(c.addr, 1)],
        ),
    )
    .expect("rewrite config");
    let reloader = lb.reloader.clone();
    wait_for(
        "the file-watch reload",
        Duration::from_secs(5),
        async || reloader.version() == 2,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "failed requests during reload: {errors:?}");
    assert!(ok > 100, "{ok}");
    // round_robin ignores weights: an exact third each.
    assert_eq!(
        split(&lb.url("/"), 300, &[&a, &b, &c]).await,
        vec![100, 100, 100]
    );

    // A broken file is refused; the old config stays in force.
    std::fs::write(&lb.path, "[balancer]\nstrategy = \"fastest\"\n").expect("write");
    let r = lb.reloader.clone();
    let err = tokio::task::spawn_blocking(move || r.reload_now())
        .await
        .expect("join")
        .expect_err("invalid file refused");
    assert!(err.to_string().contains("balancer.strategy"), "{err}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(lb.reloader.version(), 2);
    assert_eq!(
        split(&lb.url("/"), 30, &[&a, &b, &c]).await,
        vec![10, 10, 10]
    );
    lb.shutdown().await;
}

/// Pads `text` with a trailing comment to exactly `len` bytes.
fn padded(mut text: String, len: usize) -> String {
    assert!(
        text.len() + 2 <= len,
        "the first config must be the longer one"
    );
    let fill = len - text.len() - 2;
    text.push('#');
    text.push_str(&"-".repeat(fill));
    text.push('\n');
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_real_process_under_load() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let listen = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let (l, ad) = (listen.to_string(), admin.to_string());
    let first = config_text(
        "weighted_round_robin",
        &l,
        &ad,
        &[up(a.addr, 1), up(b.addr, 1)],
    );
    let first = padded(first, 1024);
    let path = write_config(&first);
    let mut spike = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("utf-8")]);
    tokio::task::spawn_blocking(move || {
        wait_listening(&listen.to_string(), Duration::from_secs(20));
        wait_listening(&admin.to_string(), Duration::from_secs(20));
    })
    .await
    .expect("join");
    let url = format!("http://{listen}/");
    assert_eq!(split(&url, 20, &[&a, &b, &c]).await, vec![10, 10, 0]);

    let load = Load::start(url.clone(), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Same length, same modification time: the file watch cannot notice.
    let mtime = std::fs::metadata(&path)
        .expect("meta")
        .modified()
        .expect("mtime");
    let second = config_text(
        "weighted_round_robin",
        &l,
        &ad,
        &[up(a.addr, 1), up(b.addr, 2), up(c.addr, 3)],
    );
    let second = padded(second, 1024);
    {
        let f = std::fs::File::options()
            .write(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        use std::io::Write;
        (&f).write_all(second.as_bytes()).expect("write");
        f.set_modified(mtime).expect("keep mtime");
    }
    // Longer than the poll interval: prove the watcher did not reload.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let client = http();
    let status = format!("http://{admin}/status");
    let version = |body: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        v["version"].as_u64().expect("version")
    };
    assert_eq!(version(&get_ok(&client, &status).await), 1);
    spike.signal("HUP");
    wait_for("the SIGHUP reload", Duration::from_secs(5), async || {
        version(&get_ok(&client, &status).await) == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "failed requests during reload: {errors:?}");
    assert!(ok > 100, "{ok}");
    assert_eq!(split(&url, 600, &[&a, &b, &c]).await, vec![100, 200, 300]);
    let v: serde_json::Value = serde_json::from_str(&get_ok(&client, &status).await).expect("json");
    assert_eq!(v["upstreams"].as_array().expect("list").len(), 3);

    spike.stop("TERM", Duration::from_secs(15));
    remove_config(&path);
}

/// `/status` of a real `spike balancer` tells how the last reload went: a
/// file saved without changes is no new version, a broken one is refused
/// with the reason, and a changed one is the next version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_last_reload_and_an_unchanged_file_is_no_new_version() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let listen = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let (l, ad) = (listen.to_string(), admin.to_string());
    let text = config_text("round_robin", &l, &ad, &[up(a.addr, 1)]);
    let path = write_config(&text);
    let mut spike = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("utf-8")]);
    tokio::task::spawn_blocking(move || {
        wait_listening(&admin.to_string(), Duration::from_secs(20));
    })
    .await
    .expect("join");
    let client = http();
    let url = format!("http://{admin}/status");
    let status = async || -> serde_json::Value {
        serde_json::from_str(&get_ok(&client, &url).await).expect("json")
    };
    let v = status().await;
    assert_eq!(v["version"], 1);
    assert!(v["last_reload"].is_null(), "{v}");

    // The same bytes again, with a new modification time: the watcher
    // reloads, and finds nothing new.
    let touch = |text: &str, secs: u64| {
        std::fs::write(&path, text).expect("write");
        let f = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        f.set_modified(std::time::SystemTime::now() + Duration::from_secs(secs))
            .expect("mtime");
    };
    touch(&text, 10);
    let mut v = serde_json::Value::Null;
    wait_for("the unchanged reload", Duration::from_secs(5), async || {
        v = status().await;
        !v["last_reload"].is_null()
    })
    .await;
    assert_eq!(v["version"], 1, "{v}");
    assert_eq!(v["last_reload"]["ok"], true, "{v}");
    assert_eq!(v["last_reload"]["unchanged"], true, "{v}");
    assert!(v["last_reload"].get("error").is_none(), "{v}");
    let at = v["last_reload"]["at"].as_str().expect("at").to_string();
    assert!(at.ends_with('Z') && at.len() == 20, "RFC 3339: {at}");

    // A broken file is refused, and /status says why.
    touch("[balancer]\nstrategy = \"fastest\"\n", 20);
    wait_for("the refused reload", Duration::from_secs(5), async || {
        v = status().await;
        v["last_reload"]["ok"] == false
    })
    .await;
    assert_eq!(v["version"], 1, "{v}");
    let error = v["last_reload"]["error"].as_str().expect("error");
    assert!(
        error.contains("balancer.strategy") && error.contains("config.toml"),
        "{error}"
    );

    // A real change is the next version.
    touch(
        &config_text("round_robin", &l, &ad, &[up(a.addr, 1), up(b.addr, 1)]),
        30,
    );
    wait_for("the changed reload", Duration::from_secs(5), async || {
        v = status().await;
        v["version"] == 2
    })
    .await;
    assert_eq!(v["last_reload"]["ok"], true, "{v}");
    assert_eq!(v["last_reload"]["unchanged"], false, "{v}");
    assert_eq!(v["upstreams"].as_array().expect("list").len(), 2);

    spike.stop("TERM", Duration::from_secs(15));
    remove_config(&path);
}
