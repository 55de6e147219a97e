//! Fixtures shared by the integration tests: a real redis-server on a free
//! port, tiny HTTP backends that answer with their own name, and `spike`
//! processes. Every fixture cleans up on drop so tests can run in parallel.
#![allow(dead_code)]

/// Runs one correctness check twice, as `<check>::redis` against a real
/// redis-server and `<check>::embedded` against the embedded store, which
/// must keep the same promises (`#[macro_use] mod common;`; the test file
/// imports `RedisServer`).
#[allow(unused_macros)]
macro_rules! against_both_stores {
    ($check:ident) => {
        mod $check {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let redis = super::RedisServer::start();
                super::$check(Some(&redis)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$check(None).await;
            }
        }
    };
}

pub mod auth;
pub mod backend;
pub mod cut_proxy;
pub mod fleet;
pub mod haproxy;
pub mod http;
pub mod redis;
pub mod routes;
pub mod sale;
pub mod sentinel;
pub mod spike;
pub mod up;

/// Checks `check` every 50 ms until it holds; fails the test, naming
/// `what`, when it has not held within `limit`.
pub async fn wait_for(
    what: &str,
    limit: std::time::Duration,
    mut check: impl AsyncFnMut() -> bool,
) {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within {limit:?}");
}

/// `127.0.0.1` and a port nobody is listening on right now.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// An address that refuses connections for as long as the returned socket
/// lives: bound, never listening, so the kernel answers a connect with a
/// reset. A dead upstream for a test; unlike a port from [`free_port`],
/// no test running beside it can start listening there meanwhile.
pub fn refusing_addr() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind an ephemeral port");
    let addr = socket.local_addr().expect("local addr");
    (socket, addr)
}

/// A port nobody is listening on right now (the OS picks it), and never
/// one this test process was given before: the OS may hand a port that was
/// just let go to the next caller, and two nodes of one test (or two tests
/// running beside each other) would then be given the same port before
/// either listens.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Option<std::collections::HashSet<u16>>> =
        std::sync::Mutex::new(None);
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().expect("local addr").port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.get_or_insert_with(Default::default).insert(port) {
            return port;
        }
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS`), for the memory tests.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}
