//! The findings of probing the balancer beside Nginx (issue 13), each with
//! the bytes that showed it: a client's broken body is the client's fault,
//! retries on the same upstream only after a stale keep-alive connection,
//! and the rest of the list. Every probe runs twice: over plain TCP
//! (`plain::`) and again over TLS (`over_tls::`, the balancer with
//! `tls_cert`), where the same own HTTP/1 path serves it after the handshake.

mod balancer_support;
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use balancer_support::recorder::{Recorder, Then};
use balancer_support::tls::Transport;
use balancer_support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A backend that reads each request body to the end before it answers
/// (as the node does), and counts the bodies it got whole.
async fn reading_backend() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let whole = Arc::new(AtomicU64::new(0));
    let count = whole.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let count = count.clone();
                    async move {
                        let body = req.into_body().collect().await;
                        let status = if body.is_ok() {
                            count.fetch_add(1, Ordering::Relaxed);
                            200
                        } else {
                            400
                        };
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"read")));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, whole)
}

/// The balancer's view of upstream `i` in `/status`.
async fn upstream_state(lb: &Running, i: usize) -> String {
    let (_, status) = get(&http(), &format!("http://{}/status", lb.admin))
        .await
        .expect("status");
    let v: serde_json::Value = serde_json::from_str(&status).expect("json");
    v["upstreams"][i]["state"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

fn two_upstreams(a: SocketAddr, b: SocketAddr) -> String {
    // A long fail_timeout: a wrong mark stays visible for the whole test.
    config_text(
        "round_robin",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[up(a, 1), up(b, 1)],
    )
    .replace("fail_timeout = \"1s\"", "fail_timeout = \"60s\"")
}

/// Finding 1: a chunked POST cut off mid-body marked the upstream failed;
/// two of them took every upstream out and the next honest GET got 502.
async fn a_client_s_broken_body_never_marks_an_upstream_failed(via: Transport) {
    let (a, _) = reading_backend().await;
    let (b, _) = reading_backend().await;
    let lb = via.start(&two_upstreams(a, b)).await;
    let cut = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
    for _ in 0..2 {
        via.send_raw(lb.addr, cut, true).await;
    }
    // A malformed chunk size: the client hears 400.
    let bad_chunk = via.send_raw(lb.addr, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        false,
    )
    .await;
    assert!(bad_chunk.starts_with("HTTP/1.1 400"), "{bad_chunk}");
    assert_eq!(upstream_state(&lb, 0).await, "up");
    assert_eq!(upstream_state(&lb, 1).await, "up");
    let res = via
        .raw(
            lb.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    // A whole chunked body still goes through.
    let ok = via.raw(lb.addr, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(body_of(&ok), "read");
    lb.shutdown().await;
}

/// Finding 7: a GET that failed on a fresh connection was sent again to the
/// same upstream; it now goes on to the next one at once.
async fn a_failure_on_a_fresh_connection_is_not_repeated_on_that_upstream(via: Transport) {
    let dies = Recorder::start("dies", Then::Drop).await;
    let lives = Recorder::start("lives", Then::Answer).await;
    let lb = via.start(&two_upstreams(dies.addr, lives.addr)).await;
    let res = via
        .raw(
            lb.addr,
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(body_of(&res), "lives");
    assert_eq!(dies.seen().len(), 1, "{:?}", dies.seen());
    assert_eq!(lives.seen().len(), 1);
    lb.shutdown().await;
}

/// Finding 7: a malformed response means the upstream did the work; it is
/// not asked again.
async fn a_malformed_response_is_not_repeated_on_that_upstream(via: Transport) {
    let garbage = Recorder::start("garbage", Then::Garbage).await;
    let lives = Recorder::start("lives", Then::Answer).await;
    let lb = via.start(&two_upstreams(garbage.addr, lives.addr)).await;
    let res = via
        .raw(
            lb.addr,
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(garbage.seen().len(), 1, "{:?}", garbage.seen());
    lb.shutdown().await;
}

/// Finding 7 on the fast path (found by review): an upstream that sent an
/// informational response on a reused connection and then closed had
/// begun to answer, so it is not asked again on a fresh connection (the
/// 1xx is dropped from the buffer, but it counts as a response byte).
async fn an_informational_answer_then_a_close_is_not_a_stale_connection(via: Transport) {
    let hints = Recorder::start(
        "hints",
        Then::AnswerThenRaw(1, b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"),
    )
    .await;
    let lb = via
        .start(&config_text(
            "round_robin",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &[up(hints.addr, 1)],
        ))
        .await;
    let first = via
        .raw(
            lb.addr,
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let second = via
        .raw(
            lb.addr,
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(second.starts_with("HTTP/1.1 502"), "{second}");
    assert_eq!(hints.seen().len(), 2, "asked again: {:?}", hints.seen());
    lb.shutdown().await;
}

/// Finding 7, the case that stays: a reused keep-alive connection that the
/// upstream closed before answering is retried there on a new connection,
/// and the client sees nothing of it.
async fn a_stale_keep_alive_connection_is_retried_on_the_same_upstream(via: Transport) {
    let stale = Recorder::start("stale", Then::AnswerThenDrop(1)).await;
    let lb = via
        .start(&config_text(
            "round_robin",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &[up(stale.addr, 1)],
        ))
        .await;
    for _ in 0..2 {
        let res = via
            .raw(
                lb.addr,
                b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await;
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
        assert_eq!(body_of(&res), "stale");
    }
    // First request, second (dropped on the reused connection), its retry.
    assert_eq!(stale.seen().len(), 3, "{:?}", stale.seen());
    lb.shutdown().await;
}

fn one_upstream(addr: SocketAddr, extra: &str) -> String {
    config_text("round_robin", "127.0.0.1:0", "127.0.0.1:0", &[up(addr, 1)])
        .replace("[balancer]\n", &format!("[balancer]\n{extra}\n"))
}

/// Finding 3: two Hosts reached the backend joined, a missing Host was
/// replaced by the upstream's address, and empty Hosts, Hosts with spaces
/// or `/../` passed. All are 400s (RFC 9112 3.2), and reach no backend.
async fn host_must_be_one_plain_authority(via: Transport) {
    let node = Recorder::start("n", Then::Answer).await;
    let lb = via.start(&one_upstream(node.addr, "")).await;
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: good.example\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
            [..],
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a/../b\r\nConnection: close\r\n\r\n",
    ] {
        let res = via.raw(lb.addr, bad).await;
        assert!(
            res.starts_with("HTTP/1.1 400"),
            "{}: {res}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(node.seen().is_empty(), "{:?}", node.seen());
    // HTTP/1.0 may leave Host out; a plain one passes as it came.
    let res = via.raw(lb.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(res.get(9..12), Some("200"), "{res}");
    let res = via
        .raw(
            lb.addr,
            b"GET / HTTP/1.1\r\nHost: shop.example:8080\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    let seen = node.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[1].head.contains("\r\nhost: shop.example:8080\r\n"),
        "{}",
        seen[1].head
    );
    lb.shutdown().await;
}

/// Finding 4: `X_Real_IP: 6.6.6.6` reached a WSGI backend as
/// `HTTP_X_REAL_IP`: dropped by default, passed with the switch.
async fn underscored_headers_are_dropped_unless_allowed(via: Transport) {
    let spoof = b"GET / HTTP/1.1\r\nHost: a\r\nX_Real_IP: 6.6.6.6\r\nConnection: close\r\n\r\n";
    let node = Recorder::start("n", Then::Answer).await;
    let lb = via.start(&one_upstream(node.addr, "")).await;
    let res = via.raw(lb.addr, spoof).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    let head = node.seen()[0].head.to_ascii_lowercase();
    assert!(!head.contains("x_real_ip"), "{head}");
    assert!(head.contains("\r\nx-real-ip: 127.0.0.1\r\n"), "{head}");
    lb.shutdown().await;

    let node = Recorder::start("n", Then::Answer).await;
    let lb = via
        .start(&one_upstream(node.addr, "underscores_in_headers = true"))
        .await;
    let res = via.raw(lb.addr, spoof).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    let head = node.seen()[0].head.to_ascii_lowercase();
    assert!(head.contains("\r\nx_real_ip: 6.6.6.6\r\n"), "{head}");
    lb.shutdown().await;
}

/// Finding 6: a response with both Content-Length and Transfer-Encoding
/// was cut to the length; the chunked framing wins (RFC 9112 6.1).
async fn a_response_length_beside_chunked_is_dropped(via: Transport) {
    let node = Recorder::start(
        "n",
        Then::Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n"),
    )
    .await;
    let lb = via.start(&one_upstream(node.addr, "")).await;
    let res = via
        .raw(
            lb.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    let head = res
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    assert!(!head.contains("content-length: 5"), "{res}");
    assert!(body_of(&res).contains("hello world"), "{res}");
    // Decoded by a client: the whole body.
    assert_eq!(
        via.get(lb.addr, "/").await,
        Ok((200, "hello world".to_string()))
    );
    lb.shutdown().await;
}

/// Finding 2: a backend that sent a head and part of a body, then stalled,
/// held its client until the backend closed. `read_timeout` closes it.
async fn a_backend_stalled_mid_body_is_cut_after_read_timeout(via: Transport) {
    let node = Recorder::start(
        "n",
        Then::Stall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart of it"),
    )
    .await;
    let lb = via
        .start(&one_upstream(node.addr, "read_timeout = \"500ms\""))
        .await;
    // `raw` panics unless the balancer closes within 10 s; the backend
    // holds on for 60.
    let res = via
        .raw(
            lb.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(body_of(&res), "part of it", "{res}");
    lb.shutdown().await;
}

/// Finding 2: a client that never read an endless body was still connected
/// at 70 s. `send_timeout` closes it, and with it the upstream connection.
async fn a_client_that_stops_reading_is_closed_after_send_timeout(via: Transport) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = listener.local_addr().expect("addr");
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<u64>();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut head = [0u8; 1024];
        let _ = s.read(&mut head).await;
        let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
        let mut sent = 0u64;
        if s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .is_ok()
        {
            // Endless, until the balancer lets go of the connection.
            while s.write_all(chunk.as_bytes()).await.is_ok() {
                sent += 1;
            }
        }
        let _ = gone_tx.send(sent);
    });
    let lb = via
        .start(&one_upstream(backend, "send_timeout = \"500ms\""))
        .await;
    let mut client = via.open(lb.addr).await;
    client
        .write_all(b"GET /endless HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    // The client reads nothing; the balancer gives up on it, drops the
    // upstream's response, and the backend's writes fail.
    let sent = tokio::time::timeout(Duration::from_secs(30), gone_rx)
        .await
        .expect("the balancer let go of a client that stopped reading")
        .expect("backend task");
    assert!(sent > 0, "the response had started");
    // And the client's connection is closed: reading drains what was
    // buffered, then ends.
    let mut sink = vec![0u8; 1 << 16];
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert_eq!(drained, Ok(true));
    drop(client);
    lb.shutdown().await;
}

/// Reads until a whole response head is in (at most 10 s), leaving the
/// connection open: for answers that come while a body is still unsent.
async fn read_head(s: &mut (impl AsyncRead + Unpin)) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Finding 8: no cap on request bodies (2 MB and 2^63 declared, a chunk
/// size of 2^64-1 streamed). Over `max_body` is a 413, before or while the
/// body comes, and no upstream is marked for it; a chunk size past 2^63 - 1
/// (2^64 - 1 here) is a 400, as in Nginx, where it was a 413 once the data
/// ran past `max_body` (hyper takes sizes up to 2^64 - 1).
async fn bodies_over_max_body_are_413(via: Transport) {
    let (node, _) = reading_backend().await;
    let lb = via.start(&one_upstream(node, "")).await;
    for declared in [
        &b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\nConnection: close\r\n\r\n"[..],
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775808\r\nConnection: close\r\n\r\n",
    ] {
        let res = via.raw(lb.addr, declared).await;
        assert!(res.starts_with("HTTP/1.1 413"), "{res}");
    }
    lb.shutdown().await;

    let (node, whole) = reading_backend().await;
    let lb = via.start(&one_upstream(node, "max_body = 1000")).await;
    let mut s = via.open(lb.addr).await;
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
    )
    .await
    .expect("write");
    // Written alongside: the answer may come before all of it is taken.
    let writer = tokio::spawn(async move {
        let _ = s.write_all(&[b'x'; 4000]).await;
        s
    });
    let mut s = writer.await.expect("writer");
    let res = read_head(&mut s).await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    assert_eq!(whole.load(Ordering::Relaxed), 0);
    // A size that fits but is over max_body: 413 from its size line, before
    // any of its data.
    let res = via
        .raw(
            lb.addr,
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n",
        )
        .await;
    assert!(res.starts_with("HTTP/1.1 413"), "{res}");
    assert_eq!(whole.load(Ordering::Relaxed), 0);
    // Under the cap, a chunked body still goes through.
    let ok = via.raw(lb.addr, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(upstream_state(&lb, 0).await, "up");
    lb.shutdown().await;
}

/// Finding 8: a small body had to arrive within `response_timeout` in all,
/// so a slow upload got 400. Now only a silence of `body_timeout` between
/// reads is.
async fn a_slow_upload_is_fine_and_a_stalled_one_is_400(via: Transport) {
    let node = Recorder::start("n", Then::Answer).await;
    let text = one_upstream(node.addr, "body_timeout = \"1500ms\"")
        .replace("response_timeout = \"5s\"", "response_timeout = \"500ms\"");
    let lb = via.start(&text).await;
    let mut s = via.open(lb.addr).await;
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhello",
    )
    .await
    .expect("write");
    // Longer than response_timeout, shorter than body_timeout.
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.write_all(b"world").await.expect("write");
    let res = read_head(&mut s).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(node.seen().len(), 1);
    assert_eq!(node.seen()[0].body, b"helloworld");

    let mut s = via.open(lb.addr).await;
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhello",
    )
    .await
    .expect("write");
    let res = read_head(&mut s).await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    assert_eq!(node.seen().len(), 1, "a stalled body reaches no upstream");
    lb.shutdown().await;
}

/// Finding 8: CONNECT and TRACE are 405s, as in Nginx, and reach no
/// backend; a backend's `HTTP/1.0` status line goes out as HTTP/1.1.
async fn connect_and_trace_are_405_and_responses_are_http_1_1(via: Transport) {
    let node = Recorder::start("n", Then::Answer).await;
    let lb = via.start(&one_upstream(node.addr, "")).await;
    for req in [
        &b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nConnection: close\r\n\r\n"[..],
        b"TRACE / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ] {
        let res = via.raw(lb.addr, req).await;
        assert!(res.starts_with("HTTP/1.1 405"), "{res}");
        assert!(res.to_ascii_lowercase().contains("\r\nallow: "), "{res}");
    }
    assert!(node.seen().is_empty(), "{:?}", node.seen());
    lb.shutdown().await;

    let old = Recorder::start(
        "old",
        Then::Raw(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    )
    .await;
    let lb = via.start(&one_upstream(old.addr, "")).await;
    let res = via
        .raw(
            lb.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(body_of(&res), "ok");
    lb.shutdown().await;
}

/// Issue 23: the balancer's own 405 and 413 answers (from either path:
/// a declared body over `max_body`, and a chunked one whose sizes add up
/// past it) are counted under their own codes in
/// `spike_balancer_local_responses_total`, not as 502s.
async fn local_405_and_413_are_counted_under_their_own_codes(via: Transport) {
    let node = Recorder::start("n", Then::Answer).await;
    let lb = via.start(&one_upstream(node.addr, "max_body = 1000")).await;
    for (req, status) in [
        (
            &b"TRACE / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"[..],
            "405",
        ),
        (
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n",
            "413",
        ),
        (
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1000\r\n",
            "413",
        ),
    ] {
        let res = via.raw(lb.addr, req).await;
        assert_eq!(res.get(9..12), Some(status), "{res}");
    }
    let metrics = get_ok(&http(), &format!("http://{}/metrics", lb.admin)).await;
    let sample = |code: &str| {
        let name = format!("spike_balancer_local_responses_total{{code=\"{code}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .map(str::to_owned)
    };
    assert_eq!(sample("502").as_deref(), Some("0"), "{metrics}");
    assert_eq!(sample("405").as_deref(), Some("1"), "{metrics}");
    assert_eq!(sample("413").as_deref(), Some("2"), "{metrics}");
    assert!(node.seen().is_empty(), "{:?}", node.seen());
    lb.shutdown().await;
}

/// Finding 5: with many connections open (here `max_connections = 16`, so
/// more than one counts as crowded), a second pipelined request whose head
/// came partly with the first was never answered: the idle connection was
/// handed back with its first bytes still in hyper's buffer.
async fn a_split_pipelined_request_survives_a_crowded_balancer(via: Transport) {
    let node = Recorder::start("n", Then::Answer).await;
    let text = format!(
        "{}\n[server]\nmax_connections = 16\n",
        one_upstream(node.addr, "")
    );
    let lb = via.start(&text).await;
    // Another client, open and idle: the balancer is now crowded.
    let mut other = via.open(lb.addr).await;
    other
        .write_all(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    assert!(read_response(&mut other).await.starts_with("HTTP/1.1 200"));

    let mut s = via.open(lb.addr).await;
    s.write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHo")
        .await
        .expect("write");
    let first = read_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Time for the balancer to go idle on this connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b"st: a\r\n\r\n").await.expect("write");
    let second = read_response(&mut s).await;
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "second request lost: {second:?}"
    );
    let lines: Vec<String> = node.seen().iter().map(|r| r.request_line.clone()).collect();
    assert!(lines.contains(&"GET /b HTTP/1.1".to_string()), "{lines:?}");
    drop(other);
    lb.shutdown().await;
}

/// Finding 1, the slow upload: a streamed body that took longer than
/// `response_timeout` was a 504 and a failure mark. The wait for the
/// response now counts from the end of the body.
async fn a_slow_streamed_upload_is_no_upstream_timeout(via: Transport) {
    let (node, whole) = reading_backend().await;
    let text =
        one_upstream(node, "").replace("response_timeout = \"5s\"", "response_timeout = \"500ms\"");
    let lb = via.start(&text).await;
    let mut s = via.open(lb.addr).await;
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    for _ in 0..5 {
        s.write_all(b"5\r\nhello\r\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.write_all(b"0\r\n\r\n").await.expect("write");
    let res = read_response(&mut s).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(whole.load(Ordering::Relaxed), 1);
    assert_eq!(upstream_state(&lb, 0).await, "up");
    lb.shutdown().await;
}

/// Finding 1 and 8: a streamed body that stalls for `body_timeout` is the
/// client's 400, and no mark on the upstream that waited for it.
async fn a_stalled_streamed_upload_is_the_client_s_400(via: Transport) {
    let (node, whole) = reading_backend().await;
    let lb = via
        .start(&one_upstream(node, "body_timeout = \"300ms\""))
        .await;
    let mut s = via.open(lb.addr).await;
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .expect("write");
    let res = read_head(&mut s).await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    assert_eq!(whole.load(Ordering::Relaxed), 0);
    assert_eq!(upstream_state(&lb, 0).await, "up");
    lb.shutdown().await;
}

/// Finding 7: a reused connection on which the upstream began to answer
/// (part of a head) and then closed is not a stale connection: the
/// upstream did the work, and is not asked again.
async fn a_reused_connection_that_began_to_answer_is_not_retried_there(via: Transport) {
    let node = Recorder::start("n", Then::AnswerThenRaw(1, b"HTTP/1.1 200 OK\r\nContent-")).await;
    let lb = via.start(&one_upstream(node.addr, "")).await;
    let get = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let first = via.raw(lb.addr, get).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let second = via.raw(lb.addr, get).await;
    assert!(second.starts_with("HTTP/1.1 502"), "{second}");
    assert_eq!(node.seen().len(), 2, "{:?}", node.seen());
    lb.shutdown().await;
}

/// A client's first request head must be in within `header_read_timeout`
/// of the accept (Nginx's `client_header_timeout`). The fast path started
/// a second full period at the first byte, so a client that sent a byte
/// just before the limit was held for almost twice as long. Both paths:
/// the fast one and hyper's (`fast_path = false`).
async fn the_first_head_counts_from_the_accept(via: Transport) {
    let node = Recorder::start("n", Then::Answer).await;
    for fast in [true, false] {
        let text = format!(
            "{}\n[server]\nheader_read_timeout = \"2s\"\n",
            one_upstream(node.addr, &format!("fast_path = {fast}"))
        );
        let lb = via.start(&text).await;
        let started = tokio::time::Instant::now();
        let mut s = via.open(lb.addr).await;
        tokio::time::sleep(Duration::from_millis(1400)).await;
        // A start, then nothing more: the head never ends.
        s.write_all(b"GET /late HTTP/1.1\r\n").await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let held = started.elapsed();
        // 2 s from the accept, not 1.4 s + 2 s; the margin is for a busy
        // machine's timers.
        assert!(
            held < Duration::from_millis(2900),
            "fast_path = {fast}: the unfinished first head was held {held:?}"
        );
        assert!(
            held >= Duration::from_millis(1900),
            "fast_path = {fast}: closed after {held:?}, before header_read_timeout"
        );
        let answer = String::from_utf8_lossy(&out);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "fast_path = {fast}: {answer:?}"
        );
        lb.shutdown().await;
    }
    assert!(
        node.seen().is_empty(),
        "an unfinished head reached the backend"
    );
}

/// A keep-alive client is closed after `keepalive_timeout` of silence, not
/// after `header_read_timeout`: that one counts from the first byte of a
/// head (and, for the first request, from the accept), never over the
/// wait between requests. A first head that came late (most of its
/// `header_read_timeout` gone) does not shorten the waits after it either.
/// Both paths.
async fn the_wait_between_requests_is_keepalive_timeout_s(via: Transport) {
    let node = Recorder::start("n", Then::Answer).await;
    for (fast, late) in [(true, 0), (true, 700), (false, 0), (false, 700)] {
        let text = format!(
            "{}\n[server]\nheader_read_timeout = \"1s\"\nkeepalive_timeout = \"30s\"\n",
            one_upstream(node.addr, &format!("fast_path = {fast}"))
        );
        let lb = via.start(&text).await;
        let mut s = via.open(lb.addr).await;
        // The first head on time, or ending just before its deadline.
        tokio::time::sleep(Duration::from_millis(late)).await;
        s.write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let first = read_response(&mut s).await;
        assert!(
            first.starts_with("HTTP/1.1 200"),
            "fast_path = {fast}, {late} ms late: {first}"
        );
        for round in 0..2 {
            // Silence longer than header_read_timeout, well within keepalive.
            tokio::time::sleep(Duration::from_millis(1600)).await;
            s.write_all(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .expect("write");
            let next = read_response(&mut s).await;
            assert!(
                next.starts_with("HTTP/1.1 200"),
                "fast_path = {fast}, first head {late} ms late, wait {round}: the kept-alive connection was closed: {next:?}"
            );
        }
        lb.shutdown().await;
    }
}

/// Each probe as two tests: over plain TCP, and over TLS.
macro_rules! plain_and_tls {
    ($($name:ident),* $(,)?) => {
        mod plain {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Transport::Plain).await
                }
            )*
        }
        mod over_tls {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Transport::tls()).await
                }
            )*
        }
    };
}

plain_and_tls!(
    a_client_s_broken_body_never_marks_an_upstream_failed,
    a_failure_on_a_fresh_connection_is_not_repeated_on_that_upstream,
    a_malformed_response_is_not_repeated_on_that_upstream,
    an_informational_answer_then_a_close_is_not_a_stale_connection,
    a_stale_keep_alive_connection_is_retried_on_the_same_upstream,
    host_must_be_one_plain_authority,
    underscored_headers_are_dropped_unless_allowed,
    a_response_length_beside_chunked_is_dropped,
    a_backend_stalled_mid_body_is_cut_after_read_timeout,
    a_client_that_stops_reading_is_closed_after_send_timeout,
    bodies_over_max_body_are_413,
    a_slow_upload_is_fine_and_a_stalled_one_is_400,
    connect_and_trace_are_405_and_responses_are_http_1_1,
    local_405_and_413_are_counted_under_their_own_codes,
    a_split_pipelined_request_survives_a_crowded_balancer,
    a_slow_streamed_upload_is_no_upstream_timeout,
    a_stalled_streamed_upload_is_the_client_s_400,
    a_reused_connection_that_began_to_answer_is_not_retried_there,
    the_first_head_counts_from_the_accept,
    the_wait_between_requests_is_keepalive_timeout_s,
);
