//! Purchases in batches (`[balancer] batch_purchases`, on by default): the
//! balancer sends the purchases for one node that arrive while a batch to
//! it is out as one `POST /purchases`, and each buyer gets the answer the
//! node would have given alone. Real `spike up` / `spike balancer`
//! processes, real redis-server, real sockets; one fake node (an older
//! one, without the route).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::http::{client, json, send};
use common::redis::RedisServer;
use common::sale::{count, storm};
use common::spike::{remove_config, run};
use common::up::{start_up, up_config};
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The upstreams' `batches` in the balancer's `/status`: batches sent and
/// purchases in them, over every upstream, and whether any refused them.
async fn batches(admin: SocketAddr) -> (u64, u64, bool) {
    let c = client();
    let status = send(&c, Method::GET, admin, "/status", &[])
        .await
        .expect("status");
    let v = json(&status.body);
    let ups = v["upstreams"].as_array().expect("upstreams").clone();
    let sum = |k: &str| {
        ups.iter()
            .map(|u| u["batches"][k].as_u64().expect("batches"))
            .sum::<u64>()
    };
    let refused = ups
        .iter()
        .any(|u| u["batches"]["refused"].as_bool() == Some(true));
    (sum("sent"), sum("purchases"), refused)
}

/// 800 purchases by 600 buyers, 64 at a time, through `spike up` (two
/// nodes, Redis) for 200 tickets at one per buyer: exactly 200 sold, each
/// 200 a distinct order of a distinct buyer that the store holds, and no
/// buyer sees an error. With batches the balancer's `/status` shows
/// batches of more than one purchase; with `batch_purchases = false`, none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_go_in_batches_and_sell_exactly() {
    for batched in [true, false] {
        let redis = RedisServer::start();
        let (text, ports) = up_config(200, 2, Some(&redis.url()));
        let text = text.replace(
            "strategy = \"weighted_round_robin\"\n",
            &format!("strategy = \"weighted_round_robin\"\nbatch_purchases = {batched}\n"),
        );
        remove_config(&common::spike::write_and_init(&text));
        let (up, path) = start_up(&text, &ports);
        let c = client();
        let answers = storm(&c, &[ports.balancer], 800, 600, 64, "b").await;
        let sold: Vec<_> = answers
            .iter()
            .filter(|a| a.status == Some(StatusCode::OK))
            .collect();
        assert_eq!(sold.len(), 200, "batched {batched}");
        let orders: HashSet<String> = sold
            .iter()
            .map(|a| json(&a.body)["order"].as_str().expect("order").to_string())
            .collect();
        let buyers: HashSet<&str> = sold.iter().map(|a| a.buyer.as_str()).collect();
        assert_eq!(
            (orders.len(), buyers.len()),
            (200, 200),
            "batched {batched}"
        );
        let refusals = count(&answers, StatusCode::CONFLICT);
        assert_eq!(
            sold.len() + refusals,
            800,
            "batched {batched}: {:?}",
            answers
                .iter()
                .filter(
                    |a| a.status != Some(StatusCode::OK) && a.status != Some(StatusCode::CONFLICT)
                )
                .take(3)
                .collect::<Vec<_>>()
        );
        // Every order a buyer was told of is in the store.
        let mut conn = redis.connection().expect("redis");
        for order in &orders {
            let kept: Option<String> = redis::cmd("HGET")
                .arg("spike:{up}:orders")
                .arg(order)
                .query(&mut conn)
                .expect("HGET");
            assert!(kept.is_some(), "batched {batched}: order {order} not kept");
        }
        let show = run(&["stock", "show", "--config", path.to_str().expect("path")]);
        let show = json(&String::from_utf8_lossy(&show.stdout));
        assert_eq!(show["sold"], 200, "batched {batched}: {show}");
        let (sent, purchases, refused) = batches(ports.admin).await;
        assert!(!refused);
        if batched {
            assert!(sent > 0, "no batch was sent");
            assert!(
                purchases > sent,
                "no batch held more than one purchase: {purchases} in {sent}"
            );
        } else {
            assert_eq!((sent, purchases), (0, 0));
        }
        drop(up);
        remove_config(&path);
    }
}

/// A fake node of an older version: `/purchases` is its 404, and a
/// purchase alone its fixed 200. The requests it got, by path.
async fn older_node() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request head (and its body, by its length).
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let length = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < end + 4 + length {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + 4 + length);
                    let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let _ = tx.send(target.clone());
                    let body: &[u8] = if target.starts_with("/buy/ticket") {
                        b"{\"status\":\"sold\",\"order\":\"old-1\"}\n"
                    } else {
                        b"{\"status\":\"not_found\"}\n"
                    };
                    let status = if target.starts_with("/buy/ticket") {
                        "200 OK"
                    } else {
                        "404 Not Found"
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if s.write_all(answer.as_bytes()).await.is_err()
                        || s.write_all(body).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A balancer of this version in front of an older node, which answers
/// `/purchases` 404: the purchase goes alone, and so does every later one;
/// the buyers get the node's answers and `/status` says the node refused
/// batches. A client's `POST /purchases` is the balancer's 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_node_gets_each_purchase_alone() {
    let (node, mut seen) = older_node().await;
    let (listen, admin) = (common::free_addr(), common::free_addr());
    let text = format!(
        "[sale]\nevent = \"older\"\ntotal = 10\n\n[balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\n\n[[node]]\nname = \"old\"\nlisten = \"{node}\"\n"
    );
    let path = common::spike::write_config(&text);
    let lb =
        common::spike::SpikeProcess::start(&["balancer", "--config", path.to_str().expect("path")]);
    common::spike::wait_listening(&listen.to_string(), Duration::from_secs(10));
    let c = client();
    // A client's batch never passes the balancer: it would pass its
    // per-request limits (and, in front of a sale, the edge) by.
    let r = send(
        &c,
        Method::POST,
        listen,
        "/purchases",
        &[("content-length", "0")],
    )
    .await
    .expect("answer");
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    for i in 0..3 {
        let r = send(
            &c,
            Method::GET,
            listen,
            &format!("/buy/ticket?user=u{i}"),
            &[],
        )
        .await
        .expect("answer");
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(json(&r.body)["order"], "old-1", "{}", r.body);
    }
    let mut targets = Vec::new();
    while let Ok(t) = seen.try_recv() {
        targets.push(t);
    }
    let batches_tried = targets.iter().filter(|t| *t == "/purchases").count();
    let alone = targets
        .iter()
        .filter(|t| t.starts_with("/buy/ticket"))
        .count();
    assert_eq!(batches_tried, 1, "asked again after a 404: {targets:?}");
    assert_eq!(alone, 3, "{targets:?}");
    let (_, _, refused) = batches(admin).await;
    assert!(refused, "/status does not say the node refused batches");
    drop(lb);
    remove_config(&path);
}

/// `POST /purchases` straight to `node`, the frames of `items`: the
/// status and, on a 200, the answers' frames as text.
async fn batch_to(node: SocketAddr, items: &[&str]) -> (u16, Vec<String>) {
    let mut body = Vec::new();
    for item in items {
        body.extend_from_slice(&(item.len() as u32).to_be_bytes());
        body.extend_from_slice(item.as_bytes());
    }
    raw_batch(node, &body).await
}

async fn raw_batch(node: SocketAddr, body: &[u8]) -> (u16, Vec<String>) {
    let mut s = TcpStream::connect(node).await.expect("connect");
    let head = format!(
        "POST /purchases HTTP/1.1\r\nhost: n\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.expect("read");
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let status: u16 = String::from_utf8_lossy(&all[9..12])
        .parse()
        .expect("status");
    let mut frames = Vec::new();
    let mut rest = &all[end..];
    if status == 200 {
        while rest.len() >= 4 {
            let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            frames.push(String::from_utf8_lossy(&rest[4..4 + n]).to_string());
            rest = &rest[4 + n..];
        }
    }
    (status, frames)
}

/// A node checks a batch as it would each purchase alone: a body that is
/// not frames is a 400; an item that is not a purchase gets its own 400
/// and the others are served; two purchases of one buyer at a limit of 1
/// in one batch sell one ticket (the other is `already_bought`); and on a
/// node with an internal listener the route is there only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answers_a_batch_item_by_item() {
    let redis = RedisServer::start();
    let (text, ports) = up_config(10, 1, Some(&redis.url()));
    let inside = common::free_addr();
    let text = text.replace(
        &format!("listen = \"{}\"\n", ports.nodes[0]),
        &format!("listen = \"{}\"\ninternal = \"{inside}\"\n", ports.nodes[0]),
    );
    remove_config(&common::spike::write_and_init(&text));
    let (up, path) = start_up(&text, &ports);
    common::spike::wait_listening(&inside.to_string(), Duration::from_secs(5));

    let (status, _) = raw_batch(inside, b"\x00\x00\x01\x00short").await;
    assert_eq!(status, 400);

    let (status, answers) = batch_to(
        inside,
        &[
            "GET /buy/ticket?user=twice HTTP/1.1\r\nhost: n\r\n\r\n",
            "GET /stats HTTP/1.1\r\nhost: n\r\n\r\n",
            "GET /buy/ticket?user=twice HTTP/1.1\r\nhost: n\r\n\r\n",
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(answers[1].starts_with("HTTP/1.1 400"), "{}", answers[1]);
    assert!(answers[1].contains("only purchases"), "{}", answers[1]);
    let mut outcomes: Vec<&str> = [&answers[0], &answers[2]]
        .iter()
        .map(|a| {
            if a.starts_with("HTTP/1.1 200") && a.contains("\"status\":\"sold\"") {
                "sold"
            } else if a.starts_with("HTTP/1.1 409") && a.contains("already_bought") {
                "already_bought"
            } else {
                "other"
            }
        })
        .collect();
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["already_bought", "sold"], "{answers:?}");
    let show = run(&["stock", "show", "--config", path.to_str().expect("path")]);
    let show = json(&String::from_utf8_lossy(&show.stdout));
    assert_eq!(show["sold"], 1, "{show}");

    // The public listener does not have it.
    let (status, _) = batch_to(
        ports.nodes[0],
        &["GET /buy/ticket?user=other HTTP/1.1\r\nhost: n\r\n\r\n"],
    )
    .await;
    assert_eq!(status, 404);
    drop(up);
    remove_config(&path);
}
