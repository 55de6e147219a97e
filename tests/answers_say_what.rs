//! Small answers that must say what happened (issue 22, point 10): the
//! help of `node` and `stock audit`, the order routes' refusals, and one
//! type for the sale's epoch wherever it is shown.

mod common;

use common::http::{client, get, get_bytes, json};
use common::sale::{InProcessSale, sale_config};
use common::spike::run;
use hyper::StatusCode;

#[test]
fn node_help_names_the_order_routes_and_audit_help_every_check() {
    let node = String::from_utf8_lossy(&run(&["node", "--help"]).stdout).into_owned();
    for route in ["/orders/ID/pay", "/orders/ID/cancel", "GET /orders/ID"] {
        assert!(node.contains(route), "node --help lacks {route}: {node}");
    }
    let audit = String::from_utf8_lossy(&run(&["stock", "audit", "--help"]).stdout).into_owned();
    for check in [
        "sold <= total",
        "sold + leased <= total",
        "sold + released == orders",
        "reserved + paid",
        "no buyer over it",
        "stream",
    ] {
        assert!(
            audit.contains(check),
            "stock audit --help lacks {check:?}: {audit}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_routes_say_what_they_refuse_and_the_epoch_is_one_type() {
    let text = sale_config("small", 5, 1, &[1], None, "pay_within = \"15m\"\n");
    let sale = InProcessSale::start(&text).await;
    let node = sale.addrs()[0];
    let c = client();
    let (status, body) = get(&c, node, "/buy/ticket?user=alice").await.expect("buy");
    assert_eq!(status, StatusCode::OK, "{body}");
    let order = json(&body)["order"].as_str().expect("order").to_string();

    // No buyer named: not "another buyer's".
    let (status, body) = get(&c, node, &format!("/orders/{order}"))
        .await
        .expect("get");
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let reason = json(&body)["reason"].as_str().unwrap_or("").to_string();
    assert!(!reason.contains("another buyer"), "{body}");
    assert!(reason.contains("?user="), "{body}");
    // Another buyer named: it is another buyer's.
    let (status, body) = get(&c, node, &format!("/orders/{order}?user=bob"))
        .await
        .expect("get");
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("another buyer"), "{body}");

    // A body on an order route: 413, and the JSON says so too.
    let mut stream = tokio::net::TcpStream::connect(node).await.expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "POST /orders/{order}/pay?user=alice HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"status\":\"payload_too_large\""),
        "{answer}"
    );

    // The epoch: a number in /stats and in /sale alike.
    let (_, stats) = get(&c, node, "/stats").await.expect("stats");
    let (_, snap) = get(&c, node, "/sale").await.expect("sale");
    let (stats, snap) = (json(&stats), json(&snap));
    assert!(stats["epoch"].is_u64(), "{stats}");
    assert!(snap["epoch"].is_u64(), "{snap}");
    assert_eq!(stats["epoch"], snap["epoch"]);
    sale.stop().await;
}

/// Every JSON body a node writes ends with a newline (one document per
/// line for curl, logs and `jq`), and every refusal says `status` and
/// `reason` (issue 22, points 4 and 10): a sale, its replay, a refusal of
/// each kind, the internal routes (but `/holders`, which answers bytes)
/// and, once sold out, `sold_out` and `already_bought` (the bytes the
/// balancer's edge sends too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_body_ends_with_a_newline_and_every_refusal_says_why() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let text = sale_config("lines", 1, 1, &[1], None, "pay_within = \"15m\"\n");
    let sale = InProcessSale::start(&text).await;
    let node = sale.addrs()[0];
    let c = client();
    let raw = async |request: String| {
        let mut stream = tokio::net::TcpStream::connect(node).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
        let status: u16 = head[9..12].parse().expect("status");
        (status, body.to_string())
    };
    let get_raw =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");

    let (status, body) = get(&c, node, "/buy/ticket?user=alice").await.expect("buy");
    assert_eq!(status, StatusCode::OK, "{body}");
    let order = json(&body)["order"].as_str().expect("order").to_string();
    let mut answers = vec![("a sale", status.as_u16(), body)];
    for (what, path) in [
        ("already_bought", "/buy/ticket?user=alice".to_string()),
        ("sold_out", "/buy/ticket?user=bob".to_string()),
        ("a malformed buyer", "/buy/ticket?user=a%20b".to_string()),
        ("an unknown route", "/nowhere".to_string()),
        ("an unknown order route", format!("/orders/{order}/refund")),
        ("an unknown order", "/orders/1-999?user=alice".to_string()),
        ("another buyer's order", format!("/orders/{order}?user=bob")),
        ("the order", format!("/orders/{order}?user=alice")),
        ("stats", "/stats".to_string()),
        ("sale", "/sale".to_string()),
        ("healthz", "/healthz".to_string()),
        (
            "a too long target",
            format!("/buy/ticket?user={}", "u".repeat(9000)),
        ),
    ] {
        let (status, body) = raw(get_raw(&path)).await;
        answers.push((what, status, body));
    }
    let (status, body) = raw(
        "DELETE /buy/ticket?user=carol HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    answers.push(("a method not allowed", status, body));
    let (status, body) = raw(
        "POST /buy/ticket?user=carol HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    answers.push(("a body too large", status, body));

    for (what, status, body) in &answers {
        assert!(body.ends_with('\n'), "{what} ({status}): {body:?}");
        assert_eq!(body.matches('\n').count(), 1, "{what}: one line: {body:?}");
        let v = json(body);
        // 409s are a sale's outcomes (sold_out, already_bought), not errors.
        if *status >= 400 && *status != 409 {
            assert!(v["status"].is_string(), "{what} ({status}): {v}");
            assert!(
                v["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{what} ({status}): {v}"
            );
        }
    }
    // `/holders` alone answers bytes, not JSON (issue 26): the buyers at
    // the limit, compactly, for a balancer's edge.
    common::wait_for(
        "the node's holders",
        std::time::Duration::from_secs(10),
        async || {
            get_bytes(&c, node, "/holders")
                .await
                .is_ok_and(|(status, _)| status == StatusCode::OK)
        },
    )
    .await;
    let (_, holders) = get_bytes(&c, node, "/holders").await.expect("holders");
    let view = spike::protocol::HoldersView::decode(&holders).expect("a holders list");
    assert_eq!(view.order_of("alice").as_deref(), Some(order.as_str()));
    let statuses: Vec<u16> = answers.iter().map(|a| a.1).collect();
    for expected in [200, 400, 403, 404, 405, 409, 413, 414] {
        assert!(
            statuses.contains(&expected),
            "no {expected} in {statuses:?}"
        );
    }
    sale.stop().await;
}
