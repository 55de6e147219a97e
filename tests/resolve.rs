//! Upstream names re-resolved (issue 25, point 6), through a real `spike
//! balancer`: an upstream given by host name with `resolve = "1s"` follows
//! its name to a new address without a reload, and a name that stops
//! resolving keeps its last address and says so in `/status`.
//!
//! The name is the test's own: `[balancer] hosts_file` points at a file in
//! `/etc/hosts`'s format that only this test writes (the real `/etc/hosts`
//! is the whole machine's), looked up before the system's resolver. The
//! two addresses are two loopback addresses with one port.

mod balancer_support;
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use balancer_support::{get, http};
use common::backend::Backend;
use common::spike::{SpikeProcess, remove_config, wait_listening, write_config};

async fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = get(&http(), &format!("http://{admin}/status"))
        .await
        .expect("/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_moves_is_followed_and_one_that_vanishes_is_kept() {
    let first = Backend::start("first").await;
    let port = first.addr.port();
    // The same port on another loopback address: where the node "comes
    // back" after its restart.
    let second = Backend::start_on(SocketAddr::from(([127, 0, 0, 2], port)), "second").await;
    let listen = common::free_addr();
    let admin = common::free_addr();
    let path = write_config("");
    let hosts = path.with_file_name("hosts");
    let name = "node-1.spike-test.invalid";
    std::fs::write(&hosts, format!("127.0.0.1 {name}\n")).expect("hosts");
    std::fs::write(
        &path,
        format!(
            "[balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\ndrain_delay = \"0s\"\nhosts_file = \"{}\"\n\n\
             [[balancer.upstream]]\naddr = \"{name}:{port}\"\nresolve = \"1s\"\n",
            hosts.display()
        ),
    )
    .expect("config");
    let mut lb = SpikeProcess::start(&["balancer", "--config", path.to_str().expect("path")]);
    wait_listening(&listen.to_string(), Duration::from_secs(15));
    let client = http();
    let url = format!("http://{listen}/x");
    assert_eq!(get(&client, &url).await, Ok((200, "first".to_string())));
    let version = status(admin).await["version"].clone();

    // The node moves: the next lookup finds it, no reload.
    std::fs::write(&hosts, format!("# moved\n127.0.0.2 {name}\n")).expect("hosts");
    common::wait_for(
        "the new address in use",
        Duration::from_secs(6),
        async || matches!(get(&http(), &url).await, Ok((200, body)) if body == "second"),
    )
    .await;
    let s = status(admin).await;
    let up = &s["upstreams"][0];
    assert_eq!(up["address"], format!("127.0.0.2:{port}"), "{s}");
    assert_eq!(up["resolve"]["host"], format!("{name}:{port}"), "{s}");
    assert!(up["resolve"]["error"].is_null(), "{s}");
    assert!(s["last_reload"].is_null(), "no reload was asked for: {s}");
    assert_ne!(
        s["version"], version,
        "a new version for the new address: {s}"
    );

    // The name vanishes (and the system's resolver has never heard of an
    // .invalid name): the last address stays, and /status says why.
    std::fs::write(&hosts, "# nothing here\n").expect("hosts");
    common::wait_for("the lookup to fail", Duration::from_secs(6), async || {
        !status(admin).await["upstreams"][0]["resolve"]["error"].is_null()
    })
    .await;
    let s = status(admin).await;
    let up = &s["upstreams"][0];
    assert_eq!(up["address"], format!("127.0.0.2:{port}"), "{s}");
    assert!(up["resolve"]["failing_since"].is_string(), "{s}");
    for _ in 0..5 {
        assert_eq!(get(&client, &url).await, Ok((200, "second".to_string())));
    }
    // And back: the error clears.
    std::fs::write(&hosts, format!("127.0.0.2 {name}\n")).expect("hosts");
    common::wait_for(
        "the name to resolve again",
        Duration::from_secs(6),
        async || status(admin).await["upstreams"][0]["resolve"]["error"].is_null(),
    )
    .await;
    assert!(second.hits() >= 6, "{}", second.hits());
    lb.signal("TERM");
    lb.expect_clean_exit(Duration::from_secs(15));
    let _ = std::fs::remove_file(&hosts);
    remove_config(&path);
}

/// `resolve` on an upstream given by address is refused, naming the key
/// and line (there is no name to look up).
#[test]
fn resolve_needs_a_host_name() {
    let path = write_config(
        "[balancer]\n[[balancer.upstream]]\naddr = \"127.0.0.1:3001\"\nresolve = \"30s\"\n",
    );
    let out = common::spike::run(&["check", "--config", path.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(":4:") && err.contains("balancer.upstream[0].resolve"),
        "{err}"
    );
    remove_config(&path);
}
