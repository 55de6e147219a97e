//! The policy alone, through a scripted transport: which upstream and
//! connection each attempt goes on, and what the client gets, with no
//! socket and no HTTP.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::Method;

use super::limit::{self, Admitted, Held};
use super::{Conn, Failure, Plan, Reply, Transport, run};
use crate::balancer::answer::LocalAnswer;
use crate::balancer::pool::ConnectError;
use crate::balancer::select::Pick;
use crate::balancer::state::Shared;
use crate::balancer::upstream::Upstream;
use crate::config::Config;

/// How one scripted attempt ends.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Answer(u16),
    Connect,
    /// The connect found no file descriptor left.
    OutOfFiles,
    Timeout,
    Broken {
        stale: bool,
    },
}

/// A transport that plays a script and records where each attempt went.
struct Script {
    outcomes: VecDeque<Outcome>,
    /// How many more times the request can be sent (a streamed body: 1).
    sendable: usize,
    fault: Option<LocalAnswer>,
    sent: Vec<(u16, Conn)>,
}

impl Script {
    fn new(outcomes: &[Outcome]) -> Script {
        Script {
            outcomes: outcomes.iter().copied().collect(),
            sendable: usize::MAX,
            fault: None,
            sent: Vec::new(),
        }
    }
}

impl Transport for &mut Script {
    type Request = ();
    type Response = u16;
    type Error = &'static str;
    /// The upstream's status, or the balancer's own.
    type Output = Result<u16, u16>;

    fn request(&mut self, _upstream: &Upstream) -> Option<()> {
        self.sendable = self.sendable.checked_sub(1)?;
        Some(())
    }

    async fn send(
        &mut self,
        upstream: &Upstream,
        (): (),
        conn: Conn,
    ) -> Result<u16, Failure<&'static str>> {
        self.sent.push((upstream.config.addr.port(), conn));
        match self.outcomes.pop_front().expect("a scripted outcome") {
            Outcome::Answer(status) => Ok(status),
            Outcome::Connect => Err(Failure::Connect(ConnectError::Timeout(
                Duration::from_secs(1),
            ))),
            Outcome::OutOfFiles => Err(Failure::Connect(ConnectError::Io(
                std::io::Error::from_raw_os_error(24),
            ))),
            Outcome::Timeout => Err(Failure::Timeout),
            Outcome::Broken { stale } => Err(Failure::Broken {
                stale,
                error: "reset",
            }),
        }
    }

    fn client_fault(&self) -> Option<LocalAnswer> {
        self.fault
    }

    fn status(&self, status: &u16) -> u16 {
        *status
    }

    fn sold_out_mark(&self, _: &u16) -> bool {
        false
    }

    async fn deliver(&mut self, status: u16, _pick: Pick, _held: Held) -> Result<u16, u16> {
        Ok(status)
    }

    async fn reply(&mut self, reply: Reply) -> Result<u16, u16> {
        Err(reply.status.as_u16())
    }

    fn logged(&self) -> (crate::balancer::access_log::Request<'_>, Option<&str>) {
        (crate::balancer::access_log::Request::default(), None)
    }

    fn body_size(&self, _status: &u16) -> Option<u64> {
        None
    }
}

/// A balancer's state over upstreams on ports 1 and 2 (never connected
/// to), round-robin.
fn shared() -> Shared {
    shared_with("")
}

/// [`shared`] with `extra` lines in its `[balancer]`.
fn shared_with(extra: &str) -> Shared {
    let text = &format!(
        "[balancer]\n{extra}\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\n\
        [[balancer.upstream]]\naddr = \"127.0.0.1:1\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:2\"\n"
    );
    let config = Config::parse(Path::new("forward-test.toml"), text).expect("config");
    Shared::new(config, 1).expect("shared")
}

async fn forward(shared: &Shared, method: Method, t: &mut Script) -> Result<u16, u16> {
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let plan = Plan::new(Instant::now(), false, client, &method, false);
    let active = shared.current.load_full();
    run(shared, &active, t, plan, Admitted::FREE).await
}

fn failures(shared: &Shared, port: u16) -> u64 {
    let active = shared.current.load();
    let u = active
        .selector
        .upstreams()
        .find(|u| u.config.addr == SocketAddr::from(([127, 0, 0, 1], port)))
        .expect("upstream");
    u.live.failures.load(Ordering::Relaxed)
}

#[tokio::test]
async fn a_connect_failure_goes_on_whatever_the_method() {
    let s = shared();
    let mut t = Script::new(&[Outcome::Connect, Outcome::Answer(201)]);
    assert_eq!(forward(&s, Method::POST, &mut t).await, Ok(201));
    assert_eq!(t.sent, [(1, Conn::Pooled), (2, Conn::Pooled)]);
}

#[tokio::test]
async fn after_sending_only_what_may_be_sent_twice_goes_on() {
    let s = shared();
    let mut t = Script::new(&[Outcome::Broken { stale: false }]);
    assert_eq!(forward(&s, Method::POST, &mut t).await, Err(502));
    assert_eq!(t.sent, [(1, Conn::Pooled)]);

    let s = shared();
    let mut t = Script::new(&[Outcome::Broken { stale: false }, Outcome::Answer(200)]);
    assert_eq!(forward(&s, Method::GET, &mut t).await, Ok(200));
    assert_eq!(t.sent, [(1, Conn::Pooled), (2, Conn::Pooled)]);
}

#[tokio::test]
async fn a_stale_connection_is_retried_once_on_a_fresh_one() {
    let s = shared();
    let mut t = Script::new(&[Outcome::Broken { stale: true }, Outcome::Answer(200)]);
    assert_eq!(forward(&s, Method::GET, &mut t).await, Ok(200));
    assert_eq!(t.sent, [(1, Conn::Pooled), (1, Conn::Fresh)]);
    assert_eq!(failures(&s, 1), 0, "a stale connection is no failure");

    // Not for a request that may not be sent twice.
    let s = shared();
    let mut t = Script::new(&[Outcome::Broken { stale: true }]);
    assert_eq!(forward(&s, Method::POST, &mut t).await, Err(502));
    assert_eq!(t.sent, [(1, Conn::Pooled)]);
}

#[tokio::test]
async fn a_streamed_body_gets_one_attempt() {
    let s = shared();
    let mut t = Script::new(&[Outcome::Broken { stale: true }]);
    t.sendable = 1;
    assert_eq!(forward(&s, Method::PUT, &mut t).await, Err(502));
    assert_eq!(t.sent, [(1, Conn::Pooled)]);
}

#[tokio::test]
async fn the_last_failure_decides_502_or_504_and_each_is_counted() {
    let s = shared();
    let mut t = Script::new(&[Outcome::Connect, Outcome::Timeout]);
    assert_eq!(forward(&s, Method::GET, &mut t).await, Err(504));
    let s2 = shared();
    let mut t = Script::new(&[Outcome::Timeout, Outcome::Connect]);
    assert_eq!(forward(&s2, Method::GET, &mut t).await, Err(502));
    let counted = |s: &Shared, code: &str| {
        s.metrics
            .local_counts()
            .find(|(label, _)| *label == code)
            .map(|(_, n)| n.load(Ordering::Relaxed))
    };
    assert_eq!(counted(&s, "504"), Some(1));
    assert_eq!(counted(&s, "502"), Some(0));
    assert_eq!(counted(&s2, "502"), Some(1));
}

/// Out of descriptors on every try is the balancer's 503 (nothing was
/// sent); after an attempt that went out and got no answer, which the
/// upstream may have acted on, it is that attempt's 502 or 504, never
/// the 503 that says nothing was done.
#[tokio::test]
async fn out_of_files_is_a_503_only_when_nothing_went_out() {
    let s = shared();
    let mut t = Script::new(&[Outcome::OutOfFiles, Outcome::OutOfFiles]);
    assert_eq!(forward(&s, Method::GET, &mut t).await, Err(503));
    let s = shared();
    let mut t = Script::new(&[Outcome::Timeout, Outcome::OutOfFiles]);
    assert_eq!(forward(&s, Method::GET, &mut t).await, Err(504));
    let s = shared();
    let mut t = Script::new(&[Outcome::Broken { stale: false }, Outcome::OutOfFiles]);
    assert_eq!(forward(&s, Method::GET, &mut t).await, Err(502));
    let s = shared();
    let mut t = Script::new(&[Outcome::Connect, Outcome::OutOfFiles]);
    assert_eq!(forward(&s, Method::GET, &mut t).await, Err(503));
}

#[tokio::test]
async fn the_client_s_own_fault_is_its_4xx_and_marks_no_upstream() {
    let s = shared();
    let mut t = Script::new(&[Outcome::Broken { stale: false }]);
    t.fault = Some(LocalAnswer::PayloadTooLarge);
    assert_eq!(forward(&s, Method::PUT, &mut t).await, Err(413));
    assert_eq!(failures(&s, 1), 0);

    let s = shared();
    let mut t = Script::new(&[Outcome::Broken { stale: false }]);
    assert_eq!(forward(&s, Method::POST, &mut t).await, Err(502));
    assert_eq!(failures(&s, 1), 1);
}

/// The per-client limits through the policy: `limit_rate` refuses a
/// client over its burst (and no other client), the delay is waited out
/// in `run`, and `limit_conns` refuses a request while the client has
/// that many in flight; each refusal is a counted 429.
#[tokio::test]
async fn per_client_limits_refuse_delay_and_count() {
    let shared = shared_with("limit_rate = \"10r/s\"\nlimit_burst = 1\nlimit_conns = 1");
    let active = shared.current.load_full();
    let one = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let two = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
    let first = limit::check(&shared, &active, one, || None).expect("the first is free");
    assert!(!first.delays());
    let second = limit::check(&shared, &active, one, || None).expect("within the burst");
    assert!(second.delays(), "no nodelay: spaced at the rate");
    assert_eq!(
        limit::check(&shared, &active, one, || None),
        Err(LocalAnswer::RateLimited { retry_after: 1 })
    );
    assert!(limit::check(&shared, &active, two, || None).is_ok());

    // One in flight for `one`: the next of its requests is refused.
    let held = limit::enter(&shared, &active.config, first)
        .await
        .expect("a slot");
    let started = Instant::now();
    let mut t = Script::new(&[Outcome::Answer(200)]);
    let plan = Plan::new(Instant::now(), false, one, &Method::GET, false);
    assert_eq!(
        run(&shared, &active, &mut t, plan, second.clone()).await,
        Err(429)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "the delay first"
    );
    drop(held);
    let mut t = Script::new(&[Outcome::Answer(200)]);
    assert_eq!(run(&shared, &active, &mut t, plan, second).await, Ok(200));
    assert_eq!(shared.limits.rate_rejected.load(Ordering::Relaxed), 1);
    assert_eq!(shared.limits.conns_rejected.load(Ordering::Relaxed), 1);
    assert_eq!(shared.limits.delayed.load(Ordering::Relaxed), 2);
    assert!(shared.limits.conns.is_empty(), "every slot given back");
    let counted: u64 = shared
        .metrics
        .local_counts()
        .filter(|(code, _)| *code == "429")
        .map(|(_, n)| n.load(Ordering::Relaxed))
        .sum();
    assert_eq!(
        counted, 1,
        "the conns 429 went through run; the rate one is counted by its transport"
    );
}

/// In front of a sale only the public API and `pass_paths` pass; without
/// a sale every path does.
#[test]
fn closed_paths_are_the_balancers_404() {
    use super::closed;
    use crate::config::BalancerConfig;
    let open = BalancerConfig::default();
    let sale = BalancerConfig {
        public_only: true,
        ..BalancerConfig::default()
    };
    let extra = BalancerConfig {
        public_only: true,
        pass_paths: vec!["/api/".to_string(), "/static".to_string()],
        ..BalancerConfig::default()
    };
    for path in ["/holders", "/anything", "/api/x", "*", ""] {
        assert_eq!(closed(path.as_bytes(), &open), None, "{path}");
    }
    for path in ["/buy/ticket", "/orders/1-2", "/orders/1-2/pay"] {
        assert_eq!(closed(path.as_bytes(), &sale), None, "{path}");
        assert_eq!(closed(path.as_bytes(), &extra), None, "{path}");
    }
    for path in ["/holders", "/healthz", "/api/x", "//holders", "/"] {
        assert_eq!(
            closed(path.as_bytes(), &sale),
            Some(LocalAnswer::NotFound),
            "{path}"
        );
    }
    for path in [
        "/api/",
        "/api/v1/x",
        "/static",
        "/static.css",
        "/staticx/a/",
    ] {
        assert_eq!(closed(path.as_bytes(), &extra), None, "{path}");
    }
    for path in [
        "/holders",
        "/api",
        "/api/../holders",
        "/api/..",
        "/api/%2e%2E/holders",
        "/api/.%2e/holders",
        "/api/./x",
        "/api//holders",
        "/static/../holders",
        "/static/%2E",
    ] {
        assert_eq!(
            closed(path.as_bytes(), &extra),
            Some(LocalAnswer::NotFound),
            "{path}"
        );
    }
}
