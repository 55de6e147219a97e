//! The balancer's live status page, loaded in a real headless browser
//! (Debian's `chromium`, which scripts/test.sh installs): after its script
//! ran, the page shows the strategy, each upstream by address with its
//! numbers, and the sale's sold and remaining, as `/status` and the store
//! have them.

mod common;

use std::process::Command;

use common::http::{client, get, json};
use common::spike::remove_config;
use common::up::{start_up, up_config};
use hyper::StatusCode;

/// The page as Chromium renders it once its script has run.
fn rendered(url: &str) -> String {
    let profile = std::env::temp_dir().join(format!(
        "spike-chromium-{}-{}",
        std::process::id(),
        common::free_port()
    ));
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.display()),
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ])
        .output()
        .expect("chromium is not installed: apt-get install -y chromium (scripts/test.sh does)");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(out.status.success(), "chromium failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element `<... id="ID">TEXT<`, or of the table row whose
/// `data-address` is ID.
fn element<'a>(dom: &'a str, marker: &str) -> &'a str {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not on the page: {dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').expect("tag end") + 1;
    let end = rest.find("</tr>").unwrap_or(rest.len());
    let text_end = rest[start..].find('<').map_or(end, |e| start + e);
    if marker.starts_with("data-address") {
        &rest[start..end]
    } else {
        &rest[start..text_end]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_balancer_its_upstreams_and_the_sale() {
    let (text, ports) = up_config(50, 2, None);
    let (up, path) = start_up(&text, &ports);
    let c = client();
    // A reload refused: the page says when and why.
    std::fs::write(&path, format!("{text}\nnonsense = 1\n")).expect("write");
    up.signal("HUP");
    common::wait_for(
        "the refusal",
        std::time::Duration::from_secs(10),
        async || {
            let (_, body) = get(&c, ports.admin, "/status").await.expect("status");
            json(&body)["last_reload"]["ok"] == false
        },
    )
    .await;
    for i in 0..12 {
        let (status, _) = get(&c, ports.balancer, &format!("/buy/ticket?user=p{i}"))
            .await
            .expect("buy");
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _) = get(&c, ports.balancer, "/buy/ticket?user=p0")
        .await
        .expect("buy again");
    assert_eq!(status, StatusCode::CONFLICT);

    let (_, status) = get(&c, ports.admin, "/status").await.expect("status");
    let status = json(&status);
    let dom = rendered(&format!("http://{}/", ports.admin));

    assert_eq!(element(&dom, "id=\"strategy\""), "weighted_round_robin");
    assert_eq!(element(&dom, "id=\"version\""), "1");
    let reload = element(&dom, "id=\"reload\"");
    let error = status["last_reload"]["error"].as_str().expect("error");
    assert!(reload.contains("refused"), "{reload}");
    assert!(reload.contains("nonsense"), "{reload} / {error}");
    for u in status["upstreams"].as_array().expect("upstreams") {
        let addr = u["address"].as_str().expect("address");
        let row = element(&dom, &format!("data-address=\"{addr}\""));
        let cells: Vec<&str> = row
            .split("<td")
            .skip(1)
            .map(|c| {
                let c = &c[c.find('>').expect("td") + 1..];
                &c[..c.find("</td>").expect("/td")]
            })
            .collect();
        let weight = u["weight"].to_string();
        let requests = u["requests"].to_string();
        let ok = format!("200: {}", u["responses"]["200"]);
        assert_eq!(cells[0], addr, "{row}");
        assert_eq!(cells[1], "up", "{row}");
        assert_eq!(cells[2], weight, "{row}");
        assert_eq!(cells[5], requests, "{row}");
        assert_eq!(cells[6], "0", "{row}");
        assert!(cells[7].contains(&ok), "{row}");
    }
    // The two rows' requests add up to what the test sent.
    let sent: u64 = status["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .map(|u| u["requests"].as_u64().expect("requests"))
        .sum();
    assert_eq!(sent, 13);
    assert_eq!(element(&dom, "id=\"sale-sold\""), "12");
    assert_eq!(element(&dom, "id=\"sale-remaining\""), "38");
    assert_eq!(element(&dom, "id=\"event\""), "up");
    // No reservations in this sale's snapshot: the fields are omitted.
    assert!(!dom.contains("id=\"sale-reserved\""), "{dom}");
    remove_config(&path);
}

/// Without a `[sale]` the admin's `/sale` is a 404 with the reason, and the
/// page leaves the sale out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sale_the_page_shows_no_sale() {
    let backend = common::backend::Backend::start("b1").await;
    let listen = common::free_addr();
    let admin = common::free_addr();
    let text = format!(
        "[balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\n\n[[balancer.upstream]]\naddr = \"{}\"\n",
        backend.addr
    );
    let path = common::spike::write_config(&text);
    let _lb = common::spike::SpikeProcess::start(&[
        "balancer",
        "--config",
        path.to_str().expect("utf-8 path"),
    ]);
    common::spike::wait_listening(&admin.to_string(), std::time::Duration::from_secs(10));
    let c = client();
    let (status, body) = get(&c, admin, "/sale").await.expect("sale");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(json(&body)["reason"].as_str().is_some(), "{body}");
    let dom = rendered(&format!("http://{admin}/"));
    assert_eq!(element(&dom, "id=\"strategy\""), "weighted_round_robin");
    assert!(
        dom.contains(&format!("data-address=\"{}\"", backend.addr)),
        "{dom}"
    );
    assert!(dom.contains("<section id=\"sale\" hidden"), "{dom}");
    remove_config(&path);
}
