//! A crowd of distinct buyers, for the benchmarks (`scripts/compare.sh`,
//! scenario `tokens`): every request is the next buyer of a list, sent
//! either with that buyer's own token (`Authorization: Bearer`) or, for
//! the same code without `[auth]`, as `?user=`. oha sends the same headers
//! with every request, so it cannot play buyers who each hold a token;
//! this client is oha's shape otherwise (`-c` keep-alive connections, one
//! request in flight on each, a run of `--duration`) and writes oha's JSON
//! (`summary.requestsPerSec`, `latencyPercentiles`,
//! `statusCodeDistribution`, `errorDistribution`), so that compare.sh
//! reads both alike.
//!
//! ```text
//! spike token --config F --buyer b --count 200000 > buyers.txt
//! cargo run --release --example crowd -- --buyers buyers.txt --send token \
//!     --duration 5s --concurrency 100 http://127.0.0.1:8000/buy/ticket
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How a buyer says who they are.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Send {
    /// `Authorization: Bearer TOKEN` (a sale with `[auth]`).
    Token,
    /// `?user=BUYER` (a sale without `[auth]`).
    Query,
}

#[derive(Parser, Debug)]
struct Args {
    /// `http://HOST:PORT/PATH`: where every buyer sends their purchase.
    url: String,
    /// `BUYER TOKEN` lines, as `spike token --count` prints them; each
    /// request takes the next line, and the run ends early when none is
    /// left.
    #[arg(long)]
    buyers: std::path::PathBuf,
    /// How each buyer says who they are.
    #[arg(long, value_enum, default_value = "token")]
    send: Send,
    /// Connections, each with one request in flight (oha's -c).
    #[arg(short = 'c', long, default_value_t = 100)]
    concurrency: usize,
    /// How long to send ("5s").
    #[arg(short = 'z', long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The request method.
    #[arg(short = 'm', long, default_value = "GET")]
    method: hyper::Method,
    /// Runtime threads (oha uses every CPU).
    #[arg(long)]
    threads: Option<usize>,
}

/// One connection's record.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    codes: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    rt.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let uri: hyper::Uri = args.url.parse().context("the URL")?;
    let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
        bail!("{}: the URL needs a host and a port", args.url);
    };
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .with_context(|| format!("{host}:{port} is not an IP address and port"))?;
    let path = uri.path().to_string();
    let text = std::fs::read_to_string(&args.buyers)
        .with_context(|| format!("{}", args.buyers.display()))?;
    // Built before the clock starts: the run measures the server, not
    // this client's string handling.
    let sep = if path.contains('?') { '&' } else { '?' };
    let requests: Vec<(String, Option<String>)> = text
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(buyer, token)| match args.send {
            Send::Token => (path.clone(), Some(format!("Bearer {}", token.trim()))),
            Send::Query => (format!("{path}{sep}user={buyer}"), None),
        })
        .collect();
    if requests.is_empty() {
        bail!("{}: no `BUYER TOKEN` line", args.buyers.display());
    }
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let host_header = format!("{host}:{port}");
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut lanes = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (requests, next, method, host) = (
            requests.clone(),
            next.clone(),
            args.method.clone(),
            host_header.clone(),
        );
        lanes.push(tokio::spawn(async move {
            lane(addr, &host, method, &requests, &next, deadline).await
        }));
    }
    let mut all = Tally::default();
    for l in lanes {
        let t = l.await?;
        all.latencies_us.extend(t.latencies_us);
        for (k, v) in t.codes {
            *all.codes.entry(k).or_default() += v;
        }
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    let took = start.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let pct = |p: f64| -> Option<f64> {
        let n = all.latencies_us.len();
        (n > 0).then(|| {
            let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            f64::from(all.latencies_us[i]) / 1e6
        })
    };
    let answered = all.latencies_us.len();
    let report = serde_json::json!({
        "summary": {
            "requestsPerSec": answered as f64 / took,
            "total": took,
            "buyersUsed": next.load(Ordering::Relaxed).min(requests.len()),
            "buyersListed": requests.len(),
        },
        "latencyPercentiles": { "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99) },
        "statusCodeDistribution": all.codes.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "errorDistribution": all.errors,
    });
    println!("{report}");
    Ok(())
}

/// One keep-alive connection's requests until the deadline or the end of
/// the list; a connection that fails is opened again.
async fn lane(
    addr: SocketAddr,
    host: &str,
    method: hyper::Method,
    requests: &[(String, Option<String>)],
    next: &AtomicUsize,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
    while Instant::now() < deadline {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some((path, bearer)) = requests.get(i) else {
            break;
        };
        let sender = match conn.as_mut() {
            Some(s) if !s.is_closed() => s,
            _ => match connect(addr).await {
                Ok(s) => conn.insert(s),
                Err(e) => {
                    *tally.errors.entry(e).or_default() += 1;
                    continue;
                }
            },
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path.as_str())
            .header(hyper::header::HOST, host);
        if let Some(b) = bearer {
            req = req.header(hyper::header::AUTHORIZATION, b.as_str());
        }
        let Ok(req) = req.body(Empty::<Bytes>::new()) else {
            *tally.errors.entry("bad request".into()).or_default() += 1;
            continue;
        };
        let sent = Instant::now();
        let left = deadline.saturating_duration_since(sent) + Duration::from_secs(5);
        let answer = tokio::time::timeout(left, async {
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        })
        .await;
        match answer {
            Ok(Ok(status)) => {
                let us = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                tally.latencies_us.push(us);
                *tally.codes.entry(status).or_default() += 1;
            }
            Ok(Err(e)) => {
                *tally.errors.entry(e.to_string()).or_default() += 1;
                conn = None;
            }
            Err(_) => {
                *tally.errors.entry("timeout".into()).or_default() += 1;
                conn = None;
            }
        }
    }
    tally
}

async fn connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}
