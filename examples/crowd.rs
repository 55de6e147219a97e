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
    /// Play each buyer's whole visit instead of one request: wait while
    /// the sale is not open or paused (as `Retry-After` says), buy once,
    /// and pay a share of the reservations (as the payment service, with
    /// the config's `payment_key`); one outcome per buyer, in `outcomes`.
    #[arg(long)]
    flow: bool,
    /// With --flow: the config file whose `[auth] payment_key` signs the
    /// payments.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// With --flow: the share of reservations paid (0 to 1); the rest
    /// expire unpaid.
    #[arg(long, default_value_t = 1.0)]
    pay_share: f64,
    /// With --flow: how long one buyer keeps trying before giving up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    patience: Duration,
    /// With --flow: every buyer is a visitor of their own, arriving in list
    /// order spread evenly over this long, all of them waiting at once (a
    /// waiting room's line) and sharing the `-c` connections; without it
    /// each connection plays one buyer after another.
    #[arg(long, value_parser = humantime::parse_duration)]
    arrive: Option<Duration>,
}

/// A buyer's place in a waiting room's line.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    /// The buyer's arrival order (their line in the buyers' file).
    arrival: usize,
    /// Their place.
    position: u64,
    /// They joined before the opening (the shuffled pre-queue).
    prequeue: bool,
    /// The line admitted them.
    admitted: bool,
}

/// One connection's record.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    codes: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    /// With --flow: how each buyer's visit ended.
    outcomes: BTreeMap<&'static str, u64>,
    /// With --flow: requests that were told to come back (not open,
    /// paused, busy, limited).
    waits: u64,
    /// With --flow: every buyer who was given a place in a waiting room's
    /// line.
    places: Vec<Place>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    rt.enable_all().build()?.block_on(run(args))
}

/// What every lane shares.
struct Crowd {
    addr: SocketAddr,
    host: String,
    method: hyper::Method,
    /// Per buyer: the purchase's path and its `Authorization`, if any.
    requests: Vec<(String, Option<String>)>,
    next: AtomicUsize,
    deadline: Instant,
    /// With --flow: the payment service's key, the share paid, patience.
    flow: Option<Flow>,
}

struct Flow {
    payment_key: Option<spike::auth::PaymentKey>,
    pay_share: f64,
    patience: Duration,
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
    let flow = if args.flow {
        let payment_key = match &args.config {
            Some(path) => spike::config::Config::load(path)?
                .auth
                .and_then(|a| a.payment_key),
            None => None,
        };
        if args.pay_share > 0.0 && payment_key.is_none() {
            bail!("--flow with --pay-share above 0 needs --config FILE with [auth] payment_key");
        }
        Some(Flow {
            payment_key,
            pay_share: args.pay_share.clamp(0.0, 1.0),
            patience: args.patience,
        })
    } else {
        None
    };
    let start = Instant::now();
    let crowd = Arc::new(Crowd {
        addr,
        host: format!("{host}:{port}"),
        method: args.method.clone(),
        requests,
        next: AtomicUsize::new(0),
        deadline: start + args.duration,
        flow,
    });
    let mut lanes = Vec::new();
    match args.arrive.filter(|_| crowd.flow.is_some()) {
        Some(window) => {
            let pool = Arc::new(Pool {
                addr,
                permits: tokio::sync::Semaphore::new(args.concurrency.max(1)),
                idle: std::sync::Mutex::new(Vec::new()),
            });
            let n = crowd.requests.len();
            for i in 0..n {
                let at = start + window.mul_f64(i as f64 / n as f64);
                lanes.push(tokio::spawn(arrival(crowd.clone(), pool.clone(), i, at)));
            }
        }
        None => {
            for _ in 0..args.concurrency.max(1) {
                let crowd = crowd.clone();
                lanes.push(tokio::spawn(async move { lane(&crowd).await }));
            }
        }
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
        for (k, v) in t.outcomes {
            *all.outcomes.entry(k).or_default() += v;
        }
        all.waits += t.waits;
        all.places.extend(t.places);
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
    let listed = crowd.requests.len();
    let mut report = serde_json::json!({
        "summary": {
            "requestsPerSec": answered as f64 / took,
            "total": took,
            "buyersUsed": crowd.next.load(Ordering::Relaxed).min(listed),
            "buyersListed": listed,
        },
        "latencyPercentiles": { "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99) },
        "statusCodeDistribution": all.codes.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "errorDistribution": all.errors,
    });
    if crowd.flow.is_some() {
        report["outcomes"] = serde_json::json!(all.outcomes);
        report["waits"] = serde_json::json!(all.waits);
        report["line"] = line_report(&mut all.places);
    }
    println!("{report}");
    Ok(())
}

/// A keep-alive connection to the server, opened again when it breaks.
struct Conn {
    addr: SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
}

/// One answer: status, `Retry-After` (seconds), the cookies it sets
/// (`name=value`) and body.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    cookies: Vec<String>,
    body: Bytes,
}

impl Conn {
    async fn send(
        &mut self,
        method: hyper::Method,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        left: Duration,
    ) -> Result<Answer, String> {
        let sender = match self.sender.as_mut() {
            Some(s) if !s.is_closed() => s,
            _ => self.sender.insert(connect(self.addr).await?),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|_| "bad request".to_string())?;
        let answer = tokio::time::timeout(left, async {
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let cookies = resp
                .headers()
                .get_all(hyper::header::SET_COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(|v| v.split(';').next())
                .map(str::to_string)
                .collect();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<Answer, hyper::Error>(Answer {
                status,
                retry_after,
                cookies,
                body,
            })
        })
        .await;
        match answer {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e.to_string())
            }
            Err(_) => {
                self.sender = None;
                Err("timeout".into())
            }
        }
    }
}

/// Where a visit's requests go: its lane's own connection, or one of the
/// crowd's shared ones (`--arrive`).
enum Via<'a> {
    Own(&'a mut Conn),
    Shared(&'a Pool),
}

/// The connections every arriving buyer shares (`--arrive`): at most `-c`
/// requests in flight, each on an idle connection or a new one.
struct Pool {
    addr: SocketAddr,
    permits: tokio::sync::Semaphore,
    idle: std::sync::Mutex<Vec<Conn>>,
}

impl Via<'_> {
    /// One request, its answer (or error) and latency counted in `tally`.
    async fn send_counted(
        &mut self,
        tally: &mut Tally,
        method: hyper::Method,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        left: Duration,
    ) -> Result<Answer, String> {
        let answer = match self {
            Via::Own(conn) => {
                let sent = Instant::now();
                let a = conn.send(method, host, path, headers, left).await;
                (sent, a)
            }
            Via::Shared(pool) => {
                let _permit = pool.permits.acquire().await.map_err(|e| e.to_string())?;
                let idle = pool.idle.lock().ok().and_then(|mut v| v.pop());
                let mut conn = idle.unwrap_or(Conn {
                    addr: pool.addr,
                    sender: None,
                });
                let sent = Instant::now();
                let a = conn.send(method, host, path, headers, left).await;
                if let Ok(mut v) = pool.idle.lock() {
                    v.push(conn);
                }
                (sent, a)
            }
        };
        let (sent, answer) = answer;
        record(
            tally,
            sent,
            answer.as_ref().map(|a| a.status).map_err(Clone::clone),
        );
        answer
    }
}

/// One lane: a connection, and the next buyer's request (or visit) after
/// another until the deadline or the end of the list.
async fn lane(crowd: &Crowd) -> Tally {
    let mut tally = Tally::default();
    let mut conn = Conn {
        addr: crowd.addr,
        sender: None,
    };
    while Instant::now() < crowd.deadline {
        let i = crowd.next.fetch_add(1, Ordering::Relaxed);
        let Some((path, bearer)) = crowd.requests.get(i) else {
            break;
        };
        let auth = bearer.as_deref().map(|b| ("authorization", b));
        match &crowd.flow {
            None => {
                let left = crowd.deadline.saturating_duration_since(Instant::now())
                    + Duration::from_secs(5);
                let headers: Vec<(&str, &str)> = auth.into_iter().collect();
                let _ = Via::Own(&mut conn)
                    .send_counted(
                        &mut tally,
                        crowd.method.clone(),
                        &crowd.host,
                        path,
                        &headers,
                        left,
                    )
                    .await;
            }
            Some(flow) => {
                let outcome =
                    visit(crowd, flow, Via::Own(&mut conn), &mut tally, i, path, auth).await;
                *tally.outcomes.entry(outcome).or_default() += 1;
            }
        }
    }
    tally
}

/// Buyer `i`'s visit as one arrival of a crowd that all waits at once
/// (`--arrive`): it comes at its moment of the arrival window, on the
/// shared connections.
async fn arrival(crowd: Arc<Crowd>, pool: Arc<Pool>, i: usize, at: Instant) -> Tally {
    let mut tally = Tally::default();
    tokio::time::sleep_until(at.into()).await;
    let (Some(flow), Some((path, bearer))) = (&crowd.flow, crowd.requests.get(i)) else {
        return tally;
    };
    crowd.next.fetch_add(1, Ordering::Relaxed);
    let auth = bearer.as_deref().map(|b| ("authorization", b));
    let outcome = visit(&crowd, flow, Via::Shared(&pool), &mut tally, i, path, auth).await;
    *tally.outcomes.entry(outcome).or_default() += 1;
    tally
}

fn record(tally: &mut Tally, sent: Instant, answer: Result<u16, String>) {
    match answer {
        Ok(status) => {
            let us = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            tally.latencies_us.push(us);
            *tally.codes.entry(status).or_default() += 1;
        }
        Err(e) => *tally.errors.entry(e).or_default() += 1,
    }
}

/// One buyer's visit, as a person with a browser plays it: buy; while told
/// to come back (the sale is not open, paused; a waiting room's line;
/// busy; limited), wait as `Retry-After` says and ask again, with the
/// cookies the answers set (a place in line, a pass); with a reservation,
/// pay it (a share of buyers) as the payment service would. Returns how it
/// ended; a place in line goes into `tally.places`.
async fn visit(
    crowd: &Crowd,
    flow: &Flow,
    mut via: Via<'_>,
    tally: &mut Tally,
    i: usize,
    path: &str,
    auth: Option<(&str, &str)>,
) -> &'static str {
    let give_up = Instant::now() + flow.patience;
    let mut jar: Vec<String> = Vec::new();
    let mut place: Option<Place> = None;
    let mut prequeued = false;
    let outcome = loop {
        if Instant::now() >= give_up {
            break "gave_up";
        }
        let cookie = jar.join("; ");
        let mut headers: Vec<(&str, &str)> = auth.into_iter().collect();
        if !cookie.is_empty() {
            headers.push(("cookie", cookie.as_str()));
        }
        let answer = via
            .send_counted(
                tally,
                hyper::Method::POST,
                &crowd.host,
                path,
                &headers,
                Duration::from_secs(10),
            )
            .await;
        let Ok(a) = answer else {
            tally.waits += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        for c in a.cookies {
            let name = c.split('=').next().unwrap_or("").to_string();
            jar.retain(|old| old.split('=').next() != Some(name.as_str()));
            jar.push(c);
        }
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_default();
        let status = v["status"].as_str().unwrap_or("");
        if a.status == 202 {
            match v["position"].as_u64() {
                Some(p) => {
                    let place = place.get_or_insert(Place {
                        arrival: i,
                        position: p,
                        prequeue: prequeued,
                        admitted: false,
                    });
                    place.admitted |= status == "admitted";
                }
                None => prequeued = true,
            }
        }
        match (a.status, status) {
            (200, _) => {
                let reserved = v["state"] == "reserved";
                if !reserved {
                    break "sold";
                }
                // The payment service pays a share of the reservations,
                // spread evenly over the buyers.
                let pays =
                    (i as f64 * flow.pay_share).floor() < ((i + 1) as f64 * flow.pay_share).floor();
                let (Some(key), Some(order), true) = (&flow.payment_key, v["order"].as_str(), pays)
                else {
                    break "reserved_unpaid";
                };
                let target = format!("/orders/{order}/pay?ref=crowd-{i}");
                let signature = spike::auth::sign_payment(
                    key,
                    spike::auth::unix_now(),
                    &format!("POST {target}"),
                );
                let paid = via
                    .send_counted(
                        tally,
                        hyper::Method::POST,
                        &crowd.host,
                        &target,
                        &[("spike-signature", signature.as_str())],
                        Duration::from_secs(10),
                    )
                    .await;
                break match paid {
                    Ok(p) if p.status == 200 => "paid",
                    _ => "payment_failed",
                };
            }
            (409, "sold_out") => break "sold_out",
            (409, "already_bought") => break "already_bought",
            (409, "closed") => break "closed",
            // Admitted by the waiting room: buy now, with the pass.
            (202, "admitted") => {}
            // Not open yet, paused, a waiting room's line (202), busy or
            // limited: come back when told.
            (409, "not_open" | "paused") | (202, _) | (429, _) | (503, _) => {
                tally.waits += 1;
                let secs = a.retry_after.unwrap_or(1).max(1);
                // Not all at once: a crowd told "come back in 5 s" spreads
                // over the next second, as real clocks and clicks do.
                let jitter = Duration::from_millis((i as u64).wrapping_mul(7919) % 1000);
                tokio::time::sleep(Duration::from_secs(secs) + jitter).await;
            }
            _ => break "refused",
        }
    };
    if let Some(place) = place {
        tally.places.push(place);
    }
    outcome
}

/// What the places in a waiting room's line say of its fairness: the rank
/// correlation (Spearman) of arrival order against place, near 0 among
/// the pre-queue's admitted buyers (the shuffle: arriving early bought
/// nothing) and near 1 after the opening (arrival order: among those placed,
/// and among those of them the line admitted). The pre-queue's
/// is taken over the buyers the line admitted, every one of whom learned
/// their place: over every buyer who learned one it would be skewed by
/// who asked again before the sell-out, which depends on when they came.
fn line_report(places: &mut [Place]) -> serde_json::Value {
    fn spearman(v: &[Place]) -> Option<f64> {
        let n = v.len() as f64;
        if v.len() < 3 {
            return None;
        }
        let rank = |key: &dyn Fn(&Place) -> u64| {
            let mut order: Vec<usize> = (0..v.len()).collect();
            order.sort_by_key(|&k| key(&v[k]));
            let mut r = vec![0f64; v.len()];
            for (rk, k) in order.into_iter().enumerate() {
                r[k] = rk as f64;
            }
            r
        };
        let by_arrival = rank(&|p| p.arrival as u64);
        let by_place = rank(&|p| p.position);
        let d2: f64 = by_arrival
            .iter()
            .zip(&by_place)
            .map(|(a, p)| (a - p).powi(2))
            .sum();
        Some(1.0 - 6.0 * d2 / (n * (n * n - 1.0)))
    }
    let admitted_pre: Vec<Place> = places
        .iter()
        .filter(|p| p.prequeue && p.admitted)
        .copied()
        .collect();
    let after: Vec<Place> = places.iter().filter(|p| !p.prequeue).copied().collect();
    let admitted_after: Vec<Place> = after.iter().filter(|p| p.admitted).copied().collect();
    serde_json::json!({
        "placed": places.len(),
        "prequeue_placed": places.iter().filter(|p| p.prequeue).count(),
        "prequeue_admitted": admitted_pre.len(),
        "prequeue_rank_correlation": spearman(&admitted_pre),
        "after_opening": after.len(),
        "after_opening_rank_correlation": spearman(&after),
        "after_opening_admitted": admitted_after.len(),
        "after_opening_admitted_rank_correlation": spearman(&admitted_after),
    })
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
