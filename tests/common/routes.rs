//! Issue 29's lists: the nodes' internal routes, odd spellings of them that
//! a proxy in front of a sale must not pass either, and what must pass.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The nodes' routes that are not for buyers.
pub const INTERNAL: [&str; 6] = [
    "/holders",
    "/stats",
    "/metrics",
    "/sale",
    "/sold_out",
    "/healthz",
];

/// Request lines that spell an internal route some other way: a query,
/// doubled or dotted segments, case, percent-encoding, the absolute form,
/// HTTP/1.0 (hyper's path in spike even with the fast path on), other
/// methods.
pub const TRICKY: [&str; 20] = [
    "GET /holders?x HTTP/1.1",
    "GET /holders?user=a HTTP/1.1",
    "GET /sold_out?epoch=1&released=0 HTTP/1.1",
    "GET //holders HTTP/1.1",
    "GET /HOLDERS HTTP/1.1",
    "GET /holders/ HTTP/1.1",
    "GET /./holders HTTP/1.1",
    "GET /buy/ticket/../holders HTTP/1.1",
    "GET /buy/ticket/..%2Fholders HTTP/1.1",
    "GET /buy/ticket%2F..%2Fholders HTTP/1.1",
    "GET /%68olders HTTP/1.1",
    "GET /orders/../holders HTTP/1.1",
    "GET /orders/.. HTTP/1.1",
    "GET /orders/1-1/../../holders HTTP/1.1",
    "GET /orders/%2E%2E%2Fholders HTTP/1.1",
    "GET http://spike/holders HTTP/1.1",
    "GET /holders HTTP/1.0",
    "HEAD /stats HTTP/1.1",
    "POST /sale HTTP/1.1",
    "DELETE /healthz HTTP/1.1",
];

/// Request lines of the public API, which pass.
pub const PUBLIC: [&str; 5] = [
    "GET /buy/ticket?user=a HTTP/1.1",
    "POST /buy/ticket HTTP/1.1",
    "GET /orders/17-3?user=a HTTP/1.1",
    "POST /orders/17-3/pay?user=a HTTP/1.1",
    "POST /orders/17-3/cancel HTTP/1.1",
];

/// One request on a new connection, as written, with an empty body; the
/// status code and the body.
pub async fn raw(to: SocketAddr, line: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(to).await.expect("connect");
    let req = format!("{line}\r\nHost: spike\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).unwrap_or(&text).to_string();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
