//! `config.toml`: read once into a serde file struct, then validated into a typed
//! [`Config`] so that nothing on the hot path ever parses a string.
//!
//! Every validation error names the file, the key and the line, because the
//! person reading it is about to start a sale and needs to fix the file fast.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

/// Why a config file was refused: where (file, key, line) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file was read but a key is missing, unknown, or has a bad value.
    #[error("{path}:{line}: `{key}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, dotted (`node[2].weight`).
        key: String,
        /// The 1-based line the key (or its table) stands on.
        line: usize,
        /// What is wrong, in words a user can act on.
        message: String,
    },
    /// The command asks for something the file does not have (a node named
    /// on the command line, a section the command needs): there is no line
    /// to point at, and blaming line 1 would send the reader to the wrong
    /// place.
    #[error("{path}: {message}")]
    Lacks {
        /// The file.
        path: PathBuf,
        /// What is missing, and what the file has instead.
        message: String,
    },
}

impl ConfigError {
    /// The key the error is about, for tests and for logs.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } | ConfigError::Lacks { .. } => None,
            ConfigError::Invalid { key, .. } => Some(key),
        }
    }
    /// The line the error is about.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } | ConfigError::Lacks { .. } => None,
            ConfigError::Invalid { line, .. } => Some(*line),
        }
    }
}

// ---------------------------------------------------------------------------
// The file as written. Spanned where a later check needs to say which line.
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    sale: Option<Spanned<SaleFile>>,
    redis: Option<Spanned<RedisFile>>,
    #[serde(default)]
    node: Vec<Spanned<NodeFile>>,
    balancer: Option<Spanned<BalancerFile>>,
    server: Option<Spanned<ServerFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaleFile {
    event: Spanned<String>,
    total: Spanned<i64>,
    #[serde(default)]
    per_user_limit: Option<Spanned<i64>>,
    /// Read so that old files still load; it no longer does anything.
    buffer: Option<Spanned<i64>>,
    lease: Option<Spanned<i64>>,
    lease_ttl: Option<Spanned<String>>,
    pay_within: Option<Spanned<String>>,
    events_max: Option<Spanned<i64>>,
    stream: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedisFile {
    url: Spanned<String>,
    timeout: Option<Spanned<String>>,
    pool_size: Option<Spanned<i64>>,
    max_clock_offset: Option<Spanned<String>>,
    replicas: Option<Spanned<i64>>,
    tls_ca_file: Option<Spanned<String>>,
    tls_cert_file: Option<Spanned<String>>,
    tls_key_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: Spanned<String>,
    listen: Spanned<String>,
    weight: Option<Spanned<i64>>,
    /// Read so that old files still load; it no longer does anything.
    stock: Option<Spanned<i64>>,
    threads: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BalancerFile {
    listen: Option<Spanned<String>>,
    strategy: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    response_timeout: Option<Spanned<String>>,
    keepalive: Option<Spanned<i64>>,
    keepalive_timeout: Option<Spanned<String>>,
    read_timeout: Option<Spanned<String>>,
    send_timeout: Option<Spanned<String>>,
    body_timeout: Option<Spanned<String>>,
    max_body: Option<Spanned<i64>>,
    #[serde(default)]
    underscores_in_headers: bool,
    fast_path: Option<bool>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
    sold_out_at_edge: Option<bool>,
    max_conns: Option<Spanned<i64>>,
    queue: Option<Spanned<i64>>,
    queue_timeout: Option<Spanned<String>>,
    health_check: Option<Spanned<String>>,
    health_interval: Option<Spanned<String>>,
    health_timeout: Option<Spanned<String>>,
    health_fails: Option<Spanned<i64>>,
    health_passes: Option<Spanned<i64>>,
    slow_start: Option<Spanned<String>>,
    #[serde(default)]
    upstream: Vec<Spanned<UpstreamFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    addr: Spanned<String>,
    weight: Option<Spanned<i64>>,
    max_fails: Option<Spanned<i64>>,
    fail_timeout: Option<Spanned<String>>,
    max_conns: Option<Spanned<i64>>,
    #[serde(default)]
    backup: bool,
    #[serde(default)]
    down: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    max_connections: Option<Spanned<i64>>,
    header_read_timeout: Option<Spanned<String>>,
    keepalive_timeout: Option<Spanned<String>>,
    grace_period: Option<Spanned<String>>,
    max_body: Option<Spanned<i64>>,
}

// ---------------------------------------------------------------------------
// The validated config.
// ---------------------------------------------------------------------------

/// A config that has passed every check; what the rest of spike runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from, for reloads and messages.
    pub path: PathBuf,
    /// The sale, when the file has one (the balancer alone needs none).
    pub sale: Option<SaleConfig>,
    /// Redis, when configured; absent means the embedded store.
    pub redis: Option<RedisConfig>,
    /// The ticket-selling nodes, in file order.
    pub nodes: Vec<NodeConfig>,
    /// The balancer; present whenever the file has `[balancer]` or `[[node]]`s.
    pub balancer: Option<BalancerConfig>,
    /// Limits of the HTTP servers (both modes).
    pub server: ServerConfig,
    /// Keys the file sets that no longer do anything, each with what to
    /// do instead: logged at start, so an old file still runs.
    pub warnings: Vec<String>,
}

/// What is on sale and under which rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleConfig {
    /// The event name; every Redis key of the sale is hash-tagged with it.
    pub event: String,
    /// Tickets on sale.
    pub total: u64,
    /// Tickets one buyer may hold; 0 means anonymous buyers are allowed.
    /// Written into the store by `stock init`; nodes enforce the stored one.
    pub per_user_limit: u64,
    /// Units a node asks for when its lease runs low: a node sends at most
    /// this many purchases before it asks the store again.
    pub lease: u64,
    /// How long a lease lives unless its node calls the store again, so the
    /// units of a node that died come back by themselves.
    pub lease_ttl: Duration,
    /// With it, a purchase is a reservation the buyer must pay within this
    /// long, or its ticket goes back on sale; without it, purchases are
    /// final. Written into the store by `stock init`, like the limit.
    pub pay_within: Option<Duration>,
    /// About how many events the sale's stream keeps (`MAXLEN ~`): the
    /// hand-off to an order service must not grow without bound.
    pub events_max: u64,
    /// Final sales are appended to the event stream too (a `sold` event per
    /// order), for an order service that must hear of every order; off by
    /// default because the append costs Redis time on every sale. A sale
    /// with a payment window always streams. Stored with the sale by
    /// `stock init`, so every node agrees.
    pub stream: bool,
}

/// How to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// A `redis://` (or `rediss://`) URL, or fred's `redis-cluster://` and
    /// `redis-sentinel://` forms (`rediss-cluster://`, `rediss-sentinel://`
    /// over TLS).
    pub url: String,
    /// Where `url` is set (`FILE:LINE`), so that a Redis that cannot be
    /// reached is reported with the line to fix.
    pub origin: String,
    /// The CA and client certificate of a TLS URL, when the file names
    /// them (`tls_ca_file`, `tls_cert_file`, `tls_key_file`); `None` with a
    /// TLS URL trusts the system's roots.
    pub tls: Option<crate::redis_client::RedisTls>,
    /// Bound on one command, so a stalled Redis becomes a 503, not a hang.
    pub timeout: Duration,
    /// Connections per node process, and deduction calls in flight at once
    /// (default 2: one on the wire while the last one's answers go out;
    /// more slots make smaller batches, and more work for Redis per sale).
    pub pool_size: usize,
    /// A node whose wall clock is further than this from Redis's reports
    /// itself unhealthy (deadlines are safe either way: they are kept in
    /// Redis's clock).
    pub max_clock_offset: Duration,
    /// Replicas that must acknowledge a sale (`WAIT`) before its buyer
    /// hears 200, so that a failover cannot lose an answered order; 0
    /// answers as soon as the primary has it.
    pub replicas: u64,
}

/// One ticket-selling node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Unique name; goes into every order it sells.
    pub name: String,
    /// Where it listens.
    pub listen: SocketAddr,
    /// Its share of the traffic (the balancer's weight for it).
    pub weight: u32,
    /// Runtime threads of a `spike node` process; `None` is one per CPU.
    /// Several nodes sharing a few CPUs (a benchmark on one machine) run
    /// cheaper with one each: every hand-off between threads of a process
    /// is a wake-up and a context switch.
    pub threads: Option<usize>,
}

/// How the balancer picks an upstream; the names are Nginx's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every upstream in turn, weights taken as 1.
    RoundRobin,
    /// Nginx's smooth weighted round-robin.
    WeightedRoundRobin,
    /// Nginx's ip_hash over the client's /24 (IPv4) or whole address (IPv6).
    IpHash,
    /// Fewest active requests relative to weight.
    LeastConn,
}

impl Strategy {
    /// The name used in the file and in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::WeightedRoundRobin => "weighted_round_robin",
            Strategy::IpHash => "ip_hash",
            Strategy::LeastConn => "least_conn",
        }
    }
}

/// One upstream, as Nginx's `server` line describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Resolved address.
    pub addr: SocketAddr,
    /// Weight, at least 1.
    pub weight: u32,
    /// Failures within `fail_timeout` that mark it failed; 0 disables marking.
    pub max_fails: u32,
    /// The window for counting failures, and how long a failed peer rests.
    pub fail_timeout: Duration,
    /// Requests in flight to it at most (Nginx's `max_conns`, HAProxy's
    /// `maxconn`); 0: no limit. More wait in the balancer's queue.
    pub max_conns: u32,
    /// Takes traffic only when no primary can.
    pub backup: bool,
    /// Never takes traffic.
    pub down: bool,
}

/// The balancer's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerConfig {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Where `/healthz`, `/status`, `/metrics` are served.
    pub admin: SocketAddr,
    /// How upstreams are picked.
    pub strategy: Strategy,
    /// Bound on connecting to an upstream.
    pub connect_timeout: Duration,
    /// Bound on waiting for an upstream's response head.
    pub response_timeout: Duration,
    /// Idle keep-alive connections kept per upstream and worker thread (as
    /// Nginx's `keepalive`, which counts per upstream block and worker).
    pub keepalive: usize,
    /// How long an idle upstream connection is kept.
    pub keepalive_timeout: Duration,
    /// Longest silence between two reads of an upstream's response body
    /// (Nginx's `proxy_read_timeout` once the head is in): a backend that
    /// stalls mid-body must not hold its client forever.
    pub read_timeout: Duration,
    /// Longest wait for a client to take more of a response (Nginx's
    /// `send_timeout`): a client that stops reading must not hold a
    /// connection and an upstream forever. Read at start.
    pub send_timeout: Duration,
    /// Longest silence of a client between two reads of its request body
    /// (Nginx's `client_body_timeout`): slow is fine, stalled is not.
    pub body_timeout: Duration,
    /// Largest request body in bytes, 0 for no limit (Nginx's
    /// `client_max_body_size`): more is a 413, so no client can stream
    /// without end through the balancer.
    pub max_body: u64,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Whether request headers with `_` in their name are forwarded. Off
    /// (Nginx's `underscores_in_headers off`): CGI-style backends read
    /// `X_Real_IP` as `X-Real-IP`, so a client could spoof the headers the
    /// balancer sets.
    pub underscores_in_headers: bool,
    /// Whether ordinary requests take the balancer's own HTTP/1 path
    /// (`crate::balancer::h1`); off, hyper's server and client carry
    /// every request, as before that path existed.
    pub fast_path: bool,
    /// With a `[sale]` in the file: answer `sold_out` (and `already_bought`
    /// for holders) here once the nodes say the sale is sold out, instead
    /// of sending the flood to them (see `crate::balancer::edge`).
    pub sold_out_at_edge: bool,
    /// Requests that may wait for an upstream below its `max_conns` (Nginx
    /// Plus's `queue`); 0: none wait, they get 503 at once.
    pub queue: usize,
    /// How long a request waits in that queue before its 503.
    pub queue_timeout: Duration,
    /// Active health checks, when configured.
    pub health: Option<HealthCheck>,
    /// After an upstream comes back (its health check passes again, or its
    /// `fail_timeout` ends), its share of the traffic grows from a tenth to
    /// all of it over this long (Nginx Plus's `slow_start`); zero: at once.
    pub slow_start: Duration,
    /// The upstreams, in file order (order matters to Nginx's algorithms).
    pub upstreams: Vec<UpstreamConfig>,
}

/// An active health check (Nginx Plus's `health_check`, HAProxy's `check`):
/// a `GET` of `path` on every upstream every `interval`; an upstream that
/// fails `fails` in a row is taken out before buyers hit it, and one that
/// passes `passes` in a row comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The path asked (a node's is `/healthz`).
    pub path: String,
    /// Between two checks of one upstream.
    pub interval: Duration,
    /// A check that has no 2xx answer by then fails.
    pub timeout: Duration,
    /// Failed checks in a row that take an upstream out.
    pub fails: u32,
    /// Passed checks in a row that bring it back.
    pub passes: u32,
}

/// Limits shared by the node and balancer HTTP servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Open client connections at most; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// A client that has not sent its request head by then is closed.
    pub header_read_timeout: Duration,
    /// A keep-alive client that sends no next request by then is closed
    /// (Nginx's `keepalive_timeout`, whose default this is).
    pub keepalive_timeout: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish.
    pub grace_period: Duration,
    /// Largest request body accepted on `/buy`.
    pub max_body: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 20_000,
            header_read_timeout: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(75),
            grace_period: Duration::from_secs(10),
            max_body: 4096,
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (tests and fuzzing use this).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let cx = Cx { path, text };
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| cx.line(s.start)).unwrap_or(1);
            ConfigError::Invalid {
                path: path.to_path_buf(),
                key: key_from_toml_error(text, &e),
                line,
                message: e.message().trim().to_string(),
            }
        })?;
        cx.validate(file)
    }

    /// The sale, or an error that says this mode needs one.
    pub fn require_sale(&self) -> Result<&SaleConfig, ConfigError> {
        self.sale.as_ref().ok_or_else(|| ConfigError::Lacks {
            path: self.path.clone(),
            message: "this command sells tickets and needs a [sale] section".into(),
        })
    }

    /// The node named `name`, or an error listing the names there are.
    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ConfigError::Lacks {
                path: self.path.clone(),
                message: format!(
                    "--name {name}: no [[node]] is named {name:?}; the file has: {}",
                    self.nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// The balancer section, or an error that says this mode needs one.
    pub fn require_balancer(&self) -> Result<&BalancerConfig, ConfigError> {
        self.balancer.as_ref().ok_or_else(|| ConfigError::Lacks {
            path: self.path.clone(),
            message: "the balancer needs a [balancer] section with upstreams, or [[node]] entries"
                .into(),
        })
    }
}

/// The largest a toml integer may be for a count of tickets (keeps Lua's
/// doubles exact: 2^53).
const MAX_COUNT: i64 = 1 << 53;

struct Cx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Cx<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err(
        &self,
        key: impl Into<String>,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            line: self.line(span.start),
            message: message.into(),
        }
    }

    fn count(&self, key: &str, v: &Spanned<i64>, min: i64) -> Result<u64, ConfigError> {
        let n = *v.get_ref();
        if n < min || n > MAX_COUNT {
            return Err(self.err(
                key,
                v.span(),
                format!("must be a whole number from {min} to {MAX_COUNT}, not {n}"),
            ));
        }
        Ok(n as u64)
    }

    fn duration(&self, key: &str, v: &Spanned<String>) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(v.get_ref().trim()).map_err(|e| {
            self.err(
                key,
                v.span(),
                format!(
                    "{:?} is not a duration like \"500ms\" or \"10s\": {e}",
                    v.get_ref()
                ),
            )
        })?;
        if d.is_zero() {
            return Err(self.err(key, v.span(), "must be longer than zero"));
        }
        Ok(d)
    }

    fn socket_addr(&self, key: &str, v: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        let s = v.get_ref().trim();
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a);
        }
        // A hostname is resolved once, here, so the hot path only ever sees addresses.
        let bad = |why: String| {
            self.err(
                key,
                v.span(),
                format!("{s:?} is not an address like \"127.0.0.1:3001\": {why}"),
            )
        };
        if !s.contains(':') {
            return Err(bad("a port is required".into()));
        }
        let mut addrs = s.to_socket_addrs().map_err(|e| bad(e.to_string()))?;
        addrs
            .next()
            .ok_or_else(|| bad("the name resolved to no address".into()))
    }

    fn validate(&self, file: FileConfig) -> Result<Config, ConfigError> {
        let server = match &file.server {
            None => ServerConfig::default(),
            Some(s) => {
                let d = ServerConfig::default();
                let s = s.get_ref();
                ServerConfig {
                    max_connections: match &s.max_connections {
                        Some(v) => self.count("server.max_connections", v, 1)? as usize,
                        None => d.max_connections,
                    },
                    header_read_timeout: match &s.header_read_timeout {
                        Some(v) => self.duration("server.header_read_timeout", v)?,
                        None => d.header_read_timeout,
                    },
                    keepalive_timeout: match &s.keepalive_timeout {
                        Some(v) => self.duration("server.keepalive_timeout", v)?,
                        None => d.keepalive_timeout,
                    },
                    grace_period: match &s.grace_period {
                        Some(v) => self.duration("server.grace_period", v)?,
                        None => d.grace_period,
                    },
                    max_body: match &s.max_body {
                        Some(v) => self.count("server.max_body", v, 0)?,
                        None => d.max_body,
                    },
                }
            }
        };

        let redis = match &file.redis {
            None => None,
            Some(r) => {
                let r = r.get_ref();
                let url = r.url.get_ref().trim();
                const SCHEMES: [&str; 6] = [
                    "redis://",
                    "rediss://",
                    "redis-cluster://",
                    "rediss-cluster://",
                    "redis-sentinel://",
                    "rediss-sentinel://",
                ];
                let shown = crate::redis_client::redacted(url);
                if !SCHEMES.iter().any(|s| url.starts_with(s)) {
                    return Err(self.err(
                        "redis.url",
                        r.url.span(),
                        format!(
                            "{shown:?} is not a redis://, rediss://, redis-cluster://, rediss-cluster://, redis-sentinel:// or rediss-sentinel:// URL"
                        ),
                    ));
                }
                // fred reads the URL when a store opens; checking it here
                // names the line instead of failing later with no place.
                if let Err(e) = fred::types::config::Config::from_url(url) {
                    return Err(self.err("redis.url", r.url.span(), format!("{shown:?}: {e}")));
                }
                let tls = crate::redis_client::tls_files(
                    self.path.parent(),
                    (url.starts_with("rediss"), r.url.span()),
                    [&r.tls_ca_file, &r.tls_cert_file, &r.tls_key_file]
                        .map(|v| v.as_ref().map(|v| (v.get_ref().as_str(), v.span()))),
                )
                .map_err(|e| self.err(e.key, e.span, e.message))?;
                Some(RedisConfig {
                    url: url.to_string(),
                    origin: format!("{}:{}", self.path.display(), self.line(r.url.span().start)),
                    tls,
                    timeout: match &r.timeout {
                        Some(v) => {
                            let d = self.duration("redis.timeout", v)?;
                            // Deadlines are whole milliseconds in Redis's
                            // clock, less a 1 ms margin for the clocks'
                            // drift: a shorter timeout makes every purchase
                            // "too late" before it is sent.
                            if d < Duration::from_millis(10) {
                                return Err(self.err(
                                    "redis.timeout",
                                    v.span(),
                                    format!("must be at least 10ms (deadlines are whole milliseconds of Redis's clock, less a 1 ms margin), not {:?}", v.get_ref()),
                                ));
                            }
                            d
                        }
                        None => Duration::from_millis(1000),
                    },
                    max_clock_offset: match &r.max_clock_offset {
                        Some(v) => self.duration("redis.max_clock_offset", v)?,
                        None => Duration::from_secs(1),
                    },
                    pool_size: match &r.pool_size {
                        Some(v) => self.count("redis.pool_size", v, 1)?.min(64) as usize,
                        None => 2,
                    },
                    replicas: match &r.replicas {
                        Some(v) => self.count("redis.replicas", v, 0)?,
                        None => 0,
                    },
                })
            }
        };

        let mut warnings = Vec::new();
        let mut names = HashSet::new();
        let mut nodes = Vec::with_capacity(file.node.len());
        for (i, n) in file.node.iter().enumerate() {
            let n = n.get_ref();
            let name = n.name.get_ref().trim().to_string();
            if name.is_empty() || name.len() > 32 || !name.bytes().all(is_name_byte) {
                return Err(self.err(
                    format!("node[{i}].name"),
                    n.name.span(),
                    "must be 1 to 32 characters of letters, digits, '-', '_' or '.'",
                ));
            }
            if !names.insert(name.clone()) {
                return Err(self.err(
                    format!("node[{i}].name"),
                    n.name.span(),
                    format!("duplicate node name {name:?}"),
                ));
            }
            let listen = self.socket_addr(&format!("node[{i}].listen"), &n.listen)?;
            let weight = match &n.weight {
                Some(w) => self.weight(&format!("node[{i}].weight"), w)?,
                None => 1,
            };
            if let Some(s) = &n.stock {
                warnings.push(format!(
                    "{}:{}: `node[{i}].stock` no longer does anything: a node leases its stock from the store as it sells (see [sale] lease); remove it",
                    self.path.display(),
                    self.line(s.span().start)
                ));
            }
            let threads = match &n.threads {
                Some(t) => {
                    Some(self.count(&format!("node[{i}].threads"), t, 1)?.min(1024) as usize)
                }
                None => None,
            };
            nodes.push(NodeConfig {
                name,
                listen,
                weight,
                threads,
            });
        }

        let sale = match &file.sale {
            None => None,
            Some(s) => {
                let s = s.get_ref();
                let event = s.event.get_ref().trim().to_string();
                if event.is_empty() || event.len() > 64 || !event.bytes().all(is_name_byte) {
                    return Err(self.err(
                        "sale.event",
                        s.event.span(),
                        "must be 1 to 64 characters of letters, digits, '-', '_' or '.' (it becomes part of every Redis key)",
                    ));
                }
                let total = self.count("sale.total", &s.total, 1)?;
                let per_user_limit = match &s.per_user_limit {
                    Some(v) => self.count("sale.per_user_limit", v, 0)?,
                    None => 1,
                };
                if let Some(b) = &s.buffer {
                    warnings.push(format!(
                        "{}:{}: `sale.buffer` no longer does anything: nodes lease stock from the store as they sell, and a dead node's lease comes back by itself (see [sale] lease and lease_ttl); remove it",
                        self.path.display(),
                        self.line(b.span().start)
                    ));
                }
                let lease = match &s.lease {
                    Some(v) => self.count("sale.lease", v, 1)?,
                    None => default_lease(total, nodes.len()),
                };
                let lease_ttl = match &s.lease_ttl {
                    Some(v) => {
                        let d = self.duration("sale.lease_ttl", v)?;
                        if d < Duration::from_secs(3) {
                            return Err(self.err(
                                "sale.lease_ttl",
                                v.span(),
                                format!("must be at least 3s (a live node renews its lease at least every 2 s), not {:?}", v.get_ref()),
                            ));
                        }
                        d
                    }
                    None => Duration::from_secs(10),
                };
                let pay_within = match &s.pay_within {
                    Some(v) => {
                        let d = self.duration("sale.pay_within", v)?;
                        if d < Duration::from_secs(1) {
                            return Err(self.err(
                                "sale.pay_within",
                                v.span(),
                                format!("must be at least 1s (expiry runs about every half second), not {:?}", v.get_ref()),
                            ));
                        }
                        Some(d)
                    }
                    None => None,
                };
                let events_max = match &s.events_max {
                    Some(v) => self.count("sale.events_max", v, 1000)?,
                    None => 100_000,
                };
                let stream = s.stream.as_ref().is_some_and(|v| *v.get_ref());
                if let Some(v) = s.stream.as_ref().filter(|v| *v.get_ref())
                    && file.redis.is_none()
                {
                    // Not refused: the same file may run with and without
                    // [redis] (a rehearsal under `spike up`), and nothing
                    // sold is at risk; but the operator must not believe
                    // orders are handed off.
                    warnings.push(format!(
                        "{}:{}: `sale.stream` does nothing without [redis]: the embedded store has no event stream (read orders at GET /orders/ID)",
                        self.path.display(),
                        self.line(v.span().start)
                    ));
                }
                Some(SaleConfig {
                    event,
                    total,
                    per_user_limit,
                    lease,
                    lease_ttl,
                    pay_within,
                    events_max,
                    stream,
                })
            }
        };

        let balancer = self.balancer(file.balancer.as_ref(), &nodes)?;
        self.check_address_clashes(&file, &nodes, balancer.as_ref())?;

        Ok(Config {
            path: self.path.to_path_buf(),
            sale,
            redis,
            nodes,
            balancer,
            server,
            warnings,
        })
    }

    /// Refuses two listeners on one address (the balancer's `listen` and
    /// `admin`, every node's `listen`): under `spike up` the second could not
    /// bind, and a node on the balancer's address would have the balancer
    /// proxy to itself. Addresses clash when their ports are equal (and not
    /// 0, which the OS picks) and their IPs are equal, or one is the
    /// wildcard and the other the wildcard or loopback: both then bind on
    /// the same machine. The error stands on the later key and names the
    /// earlier one.
    fn check_address_clashes(
        &self,
        file: &FileConfig,
        nodes: &[NodeConfig],
        balancer: Option<&BalancerConfig>,
    ) -> Result<(), ConfigError> {
        /// One address something listens on: its key, and its span when
        /// the file sets it (a default has none).
        struct Bound {
            key: String,
            addr: SocketAddr,
            span: Option<Range<usize>>,
        }
        let mut bound = Vec::with_capacity(nodes.len() + 2);
        if let Some(b) = balancer {
            let section = file.balancer.as_ref().map(|s| s.get_ref());
            let listen = section.and_then(|s| s.listen.as_ref()).map(|v| v.span());
            let admin = section.and_then(|s| s.admin.as_ref()).map(|v| v.span());
            bound.push(Bound {
                key: "balancer.listen".into(),
                addr: b.listen,
                span: listen,
            });
            bound.push(Bound {
                key: "balancer.admin".into(),
                addr: b.admin,
                span: admin,
            });
        }
        for (i, (node, nf)) in nodes.iter().zip(&file.node).enumerate() {
            bound.push(Bound {
                key: format!("node[{i}].listen"),
                addr: node.listen,
                span: Some(nf.get_ref().listen.span()),
            });
        }
        let clash = |a: SocketAddr, b: SocketAddr| {
            let near = |x: IpAddr, y: IpAddr| {
                x.is_unspecified() && (y.is_unspecified() || y.is_loopback())
            };
            a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip() || near(a.ip(), b.ip()) || near(b.ip(), a.ip()))
        };
        for (j, later) in bound.iter().enumerate() {
            for earlier in &bound[..j] {
                if !clash(earlier.addr, later.addr) {
                    continue;
                }
                // The error stands on a key the file sets; a default names itself.
                let (here, other) = match (&later.span, &earlier.span) {
                    (Some(_), _) => (later, earlier),
                    (None, Some(_)) => (earlier, later),
                    (None, None) => continue,
                };
                let Some(span) = here.span.clone() else {
                    continue;
                };
                let other_is = match &other.span {
                    Some(s) => format!(
                        "`{}` (line {}) is {}",
                        other.key,
                        self.line(s.start),
                        other.addr
                    ),
                    None => format!(
                        "`{}` is {} by default (set it in [balancer])",
                        other.key, other.addr
                    ),
                };
                return Err(self.err(
                    here.key.clone(),
                    span,
                    format!(
                        "{} clashes with another listener: {other_is}; two listeners cannot share an address",
                        here.addr
                    ),
                ));
            }
        }
        Ok(())
    }

    fn weight(&self, key: &str, w: &Spanned<i64>) -> Result<u32, ConfigError> {
        let n = *w.get_ref();
        if !(1..=1_000_000).contains(&n) {
            return Err(self.err(key, w.span(), format!("must be from 1 to 1000000, not {n}")));
        }
        Ok(n as u32)
    }

    fn health_check(&self, b: &BalancerFile) -> Result<Option<HealthCheck>, ConfigError> {
        let Some(path) = &b.health_check else {
            let stray = [
                (
                    "balancer.health_interval",
                    b.health_interval.as_ref().map(|v| v.span()),
                ),
                (
                    "balancer.health_timeout",
                    b.health_timeout.as_ref().map(|v| v.span()),
                ),
                (
                    "balancer.health_fails",
                    b.health_fails.as_ref().map(|v| v.span()),
                ),
                (
                    "balancer.health_passes",
                    b.health_passes.as_ref().map(|v| v.span()),
                ),
            ];
            if let Some((key, Some(span))) = stray.into_iter().find(|(_, s)| s.is_some()) {
                return Err(self.err(
                    key,
                    span,
                    "has no effect without `health_check` (the path to ask, e.g. \"/healthz\")",
                ));
            }
            return Ok(None);
        };
        let p = path.get_ref().trim();
        if !p.starts_with('/') || p.len() > 1024 || !p.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(self.err(
                "balancer.health_check",
                path.span(),
                format!("{p:?} is not a path like \"/healthz\""),
            ));
        }
        let interval = match &b.health_interval {
            Some(v) => self.duration("balancer.health_interval", v)?,
            None => Duration::from_secs(1),
        };
        // A node's /healthz asks its store: give it a second, as HAProxy's
        // `timeout check` would be at the default interval.
        let timeout = match &b.health_timeout {
            Some(v) => self.duration("balancer.health_timeout", v)?,
            None => Duration::from_secs(1),
        };
        Ok(Some(HealthCheck {
            path: p.to_string(),
            interval,
            timeout,
            fails: match &b.health_fails {
                Some(v) => self.count("balancer.health_fails", v, 1)?.min(1000) as u32,
                None => 1,
            },
            passes: match &b.health_passes {
                Some(v) => self.count("balancer.health_passes", v, 1)?.min(1000) as u32,
                None => 1,
            },
        }))
    }

    fn balancer(
        &self,
        file: Option<&Spanned<BalancerFile>>,
        nodes: &[NodeConfig],
    ) -> Result<Option<BalancerConfig>, ConfigError> {
        let Some(b) = file else {
            if nodes.is_empty() {
                return Ok(None);
            }
            return Ok(Some(BalancerConfig {
                upstreams: nodes_as_upstreams(nodes),
                ..default_balancer()
            }));
        };
        let (span, b) = (b.span(), b.get_ref());
        let d = default_balancer();
        let listen = match &b.listen {
            Some(v) => self.socket_addr("balancer.listen", v)?,
            None => d.listen,
        };
        let admin = match &b.admin {
            Some(v) => self.socket_addr("balancer.admin", v)?,
            None => d.admin,
        };
        let strategy = match &b.strategy {
            None => d.strategy,
            Some(v) => match v.get_ref().trim() {
                "round_robin" => Strategy::RoundRobin,
                "weighted_round_robin" => Strategy::WeightedRoundRobin,
                "ip_hash" => Strategy::IpHash,
                "least_conn" => Strategy::LeastConn,
                other => {
                    return Err(self.err(
                        "balancer.strategy",
                        v.span(),
                        format!(
                            "{other:?} is not one of round_robin, weighted_round_robin, ip_hash, least_conn"
                        ),
                    ));
                }
            },
        };
        let mut trusted_proxies = Vec::with_capacity(b.trusted_proxies.len());
        for (i, t) in b.trusted_proxies.iter().enumerate() {
            let s = t.get_ref().trim();
            let net = s
                .parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    self.err(
                        format!("balancer.trusted_proxies[{i}]"),
                        t.span(),
                        format!("{s:?} is not an IP address or CIDR like \"10.0.0.0/8\""),
                    )
                })?;
            trusted_proxies.push(net);
        }
        let max_conns = match &b.max_conns {
            Some(v) => self.count("balancer.max_conns", v, 0)?.min(u32::MAX as u64) as u32,
            None => 0,
        };
        let mut upstreams = Vec::with_capacity(b.upstream.len());
        let mut seen = HashSet::new();
        for (i, u) in b.upstream.iter().enumerate() {
            let (uspan, u) = (u.span(), u.get_ref());
            let key = |k: &str| format!("balancer.upstream[{i}].{k}");
            let addr = self.socket_addr(&key("addr"), &u.addr)?;
            if !seen.insert(addr) {
                return Err(self.err(
                    key("addr"),
                    u.addr.span(),
                    format!("{addr} is listed twice"),
                ));
            }
            if u.backup && strategy == Strategy::IpHash {
                return Err(self.err(
                    key("backup"),
                    uspan,
                    "ip_hash cannot have backup upstreams (Nginx refuses this too): remove `backup` or pick another strategy",
                ));
            }
            upstreams.push(UpstreamConfig {
                addr,
                weight: match &u.weight {
                    Some(w) => self.weight(&key("weight"), w)?,
                    None => 1,
                },
                max_fails: match &u.max_fails {
                    Some(v) => self.count(&key("max_fails"), v, 0)?.min(u32::MAX as u64) as u32,
                    None => 1,
                },
                fail_timeout: match &u.fail_timeout {
                    Some(v) => self.duration(&key("fail_timeout"), v)?,
                    None => Duration::from_secs(10),
                },
                max_conns: match &u.max_conns {
                    Some(v) => self.count(&key("max_conns"), v, 0)?.min(u32::MAX as u64) as u32,
                    None => max_conns,
                },
                backup: u.backup,
                down: u.down,
            });
        }
        if upstreams.is_empty() {
            upstreams = nodes_as_upstreams(nodes);
            upstreams.iter_mut().for_each(|u| u.max_conns = max_conns);
        }
        if upstreams.is_empty() {
            return Err(self.err(
                "balancer.upstream",
                span,
                "the balancer has no upstreams: add [[balancer.upstream]] entries or [[node]] entries",
            ));
        }
        if upstreams.iter().all(|u| u.backup) {
            return Err(self.err(
                "balancer.upstream",
                span,
                "every upstream is a backup: at least one must be a primary",
            ));
        }
        Ok(Some(BalancerConfig {
            listen,
            admin,
            strategy,
            connect_timeout: match &b.connect_timeout {
                Some(v) => self.duration("balancer.connect_timeout", v)?,
                None => d.connect_timeout,
            },
            response_timeout: match &b.response_timeout {
                Some(v) => self.duration("balancer.response_timeout", v)?,
                None => d.response_timeout,
            },
            keepalive: match &b.keepalive {
                Some(v) => self.count("balancer.keepalive", v, 0)? as usize,
                None => d.keepalive,
            },
            keepalive_timeout: match &b.keepalive_timeout {
                Some(v) => self.duration("balancer.keepalive_timeout", v)?,
                None => d.keepalive_timeout,
            },
            read_timeout: match &b.read_timeout {
                Some(v) => self.duration("balancer.read_timeout", v)?,
                None => d.read_timeout,
            },
            send_timeout: match &b.send_timeout {
                Some(v) => self.duration("balancer.send_timeout", v)?,
                None => d.send_timeout,
            },
            body_timeout: match &b.body_timeout {
                Some(v) => self.duration("balancer.body_timeout", v)?,
                None => d.body_timeout,
            },
            max_body: match &b.max_body {
                Some(v) => self.count("balancer.max_body", v, 0)?,
                None => d.max_body,
            },
            underscores_in_headers: b.underscores_in_headers,
            fast_path: b.fast_path.unwrap_or(d.fast_path),
            trusted_proxies,
            sold_out_at_edge: b.sold_out_at_edge.unwrap_or(d.sold_out_at_edge),
            queue: match &b.queue {
                Some(v) => self.count("balancer.queue", v, 0)? as usize,
                None => d.queue,
            },
            queue_timeout: match &b.queue_timeout {
                Some(v) => self.duration("balancer.queue_timeout", v)?,
                None => d.queue_timeout,
            },
            health: self.health_check(b)?,
            slow_start: match &b.slow_start {
                Some(v) if v.get_ref().trim() == "0s" => Duration::ZERO,
                Some(v) => self.duration("balancer.slow_start", v)?,
                None => d.slow_start,
            },
            upstreams,
        }))
    }
}

/// The address clash check ([`Cx::check_address_clashes`]).
#[cfg(test)]
mod clash_tests {
    use super::*;

    /// Parses `text`, expects it refused on `key` at `line`; returns the message.
    fn refused(text: &str, key: &str, line: usize) -> String {
        let e = Config::parse(Path::new("test.toml"), text).expect_err("must be refused");
        let msg = e.to_string();
        assert_eq!((e.key(), e.line()), (Some(key), Some(line)), "{msg}");
        msg
    }

    #[test]
    fn balancer_listen_and_admin_on_one_address() {
        let msg = refused(
            "[balancer]\nlisten = \"127.0.0.1:9000\"\nadmin = \"127.0.0.1:9000\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\n",
            "balancer.admin",
            3,
        );
        assert!(
            msg.contains("`balancer.listen` (line 2) is 127.0.0.1:9000"),
            "{msg}"
        );
    }

    #[test]
    fn two_nodes_on_one_address_name_each_other() {
        let msg = refused(
            "[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:3001\"\n[[node]]\nname = \"b\"\nlisten = \"127.0.0.1:3001\"\n",
            "node[1].listen",
            6,
        );
        assert!(msg.contains("`node[0].listen` (line 3)"), "{msg}");
    }

    #[test]
    fn a_node_on_the_balancer_address() {
        let msg = refused(
            "[balancer]\nlisten = \"127.0.0.1:3001\"\n[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:3001\"\n",
            "node[0].listen",
            5,
        );
        assert!(msg.contains("`balancer.listen` (line 2)"), "{msg}");
    }

    #[test]
    fn a_node_on_a_default_balancer_address() {
        let msg = refused(
            "[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:8001\"\n",
            "node[0].listen",
            3,
        );
        assert!(
            msg.contains("`balancer.admin` is 127.0.0.1:8001 by default"),
            "{msg}"
        );
    }

    #[test]
    fn the_wildcard_clashes_with_loopback_not_with_other_machines() {
        let msg = refused(
            "[balancer]\nlisten = \"0.0.0.0:9000\"\n[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:9000\"\n",
            "node[0].listen",
            5,
        );
        assert!(
            msg.contains("`balancer.listen` (line 2) is 0.0.0.0:9000"),
            "{msg}"
        );
        let other = "[balancer]\nlisten = \"0.0.0.0:9000\"\n[[node]]\nname = \"a\"\nlisten = \"10.0.0.5:9000\"\n";
        Config::parse(Path::new("test.toml"), other).expect("another machine's port is its own");
    }

    #[test]
    fn port_zero_never_clashes() {
        let text = "[balancer]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\n";
        Config::parse(Path::new("test.toml"), text).expect("the OS picks each port");
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

fn default_balancer() -> BalancerConfig {
    BalancerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
        admin: SocketAddr::from(([127, 0, 0, 1], 8001)),
        strategy: Strategy::WeightedRoundRobin,
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(10),
        keepalive: 64,
        keepalive_timeout: Duration::from_secs(60),
        read_timeout: Duration::from_secs(60),
        send_timeout: Duration::from_secs(60),
        body_timeout: Duration::from_secs(60),
        max_body: 1024 * 1024,
        underscores_in_headers: false,
        fast_path: true,
        trusted_proxies: Vec::new(),
        sold_out_at_edge: true,
        queue: 0,
        queue_timeout: Duration::from_secs(10),
        health: None,
        slow_start: Duration::ZERO,
        upstreams: Vec::new(),
    }
}

fn nodes_as_upstreams(nodes: &[NodeConfig]) -> Vec<UpstreamConfig> {
    nodes
        .iter()
        .map(|n| UpstreamConfig {
            addr: n.listen,
            weight: n.weight,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            max_conns: 0,
            backup: false,
            down: false,
        })
        .collect()
}

/// A node's lease when the file sets none: a tenth of a node's even share,
/// between 1 and 100. Small enough that the last tickets are spread over
/// the nodes that have buyers, large enough that a lease call is rare next
/// to the purchases it covers.
pub fn default_lease(total: u64, nodes: usize) -> u64 {
    (total / (10 * nodes.max(1) as u64)).clamp(1, 100)
}

/// Finds the dotted key a toml error is about, from the text around its span,
/// because toml's own message does not always name it.
fn key_from_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message();
    // "unknown field `foo`, expected ..." names the key itself.
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        return with_table(text, e.span(), &rest[..end]);
    }
    if let Some(rest) = msg.strip_prefix("missing field `")
        && let Some(end) = rest.find('`')
    {
        return with_table(text, e.span(), &rest[..end]);
    }
    let Some(span) = e.span() else {
        return "(file)".into();
    };
    let line_start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((k, _)) => with_table(text, Some(span), k.trim()),
        None => line.trim().trim_matches(['[', ']']).to_string(),
    }
}

fn with_table(text: &str, span: Option<Range<usize>>, key: &str) -> String {
    let upto = span.map(|s| s.start.min(text.len())).unwrap_or(0);
    let table = text[..upto]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(['[', ']']).trim().to_string());
    match table {
        Some(t) if !t.is_empty() && !key.starts_with(&t) => format!("{t}.{key}"),
        _ => key.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    const FOUR: &str = r#"
[sale]
event = "G1"
total = 1000

[[node]]
name = "n1"
listen = "127.0.0.1:3001"
weight = 1
[[node]]
name = "n2"
listen = "127.0.0.1:3002"
weight = 2
[[node]]
name = "n3"
listen = "127.0.0.1:3003"
weight = 3
[[node]]
name = "n4"
listen = "127.0.0.1:3004"
weight = 4
"#;

    #[test]
    fn leases_default_to_a_tenth_of_an_even_share_and_old_keys_only_warn() {
        let c = parse(FOUR).expect("valid");
        let sale = c.sale.as_ref().expect("sale");
        // 1,000 tickets over 4 nodes: a tenth of 250.
        assert_eq!((sale.lease, sale.lease_ttl), (25, Duration::from_secs(10)));
        assert!(c.warnings.is_empty());
        assert_eq!(default_lease(10_000_000, 4), 100);
        assert_eq!(default_lease(3, 4), 1);

        let old = FOUR
            .replace("total = 1000\n", "total = 1000\nbuffer = 134\n")
            .replace("weight = 2\n", "weight = 2\nstock = 500\n");
        let c = parse(&old).expect("an old file still loads");
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("test.toml:") && c.warnings[0].contains("stock"));
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("`sale.buffer` no longer does anything"))
        );

        let tuned = FOUR.replace(
            "total = 1000\n",
            "total = 1000\nlease = 7\nlease_ttl = \"3s\"\n",
        );
        let c = parse(&tuned).expect("valid");
        let sale = c.sale.as_ref().expect("sale");
        assert_eq!((sale.lease, sale.lease_ttl), (7, Duration::from_secs(3)));
    }

    #[test]
    fn a_payment_window_is_read_and_a_bad_one_named() {
        let with =
            |extra: &str| FOUR.replace("total = 1000\n", &format!("total = 1000\n{extra}\n"));
        let c = parse(&with("pay_within = \"15m\"\nevents_max = 5000")).expect("valid");
        let sale = c.sale.as_ref().expect("sale");
        assert_eq!(sale.pay_within, Some(Duration::from_secs(900)));
        assert_eq!(sale.events_max, 5000);
        let c = parse(FOUR).expect("valid");
        let sale = c.sale.as_ref().expect("sale");
        assert_eq!((sale.pay_within, sale.events_max), (None, 100_000));
        for bad in ["\"500ms\"", "\"0s\"", "\"soon\"", "15"] {
            let e = parse(&with(&format!("pay_within = {bad}"))).expect_err(bad);
            assert_eq!(e.key(), Some("sale.pay_within"), "{bad}: {e}");
            assert!(e.to_string().starts_with("test.toml:"), "{e}");
        }
        let e = parse(&with("events_max = 10")).expect_err("too small a stream");
        assert_eq!(e.key(), Some("sale.events_max"));
    }

    #[test]
    fn a_stream_of_final_sales_is_read_and_said_useless_without_redis() {
        let with =
            |extra: &str| FOUR.replace("total = 1000\n", &format!("total = 1000\n{extra}\n"));
        let c = parse(FOUR).expect("valid");
        assert!(!c.sale.as_ref().expect("sale").stream);
        let c = parse(&with("stream = true")).expect("valid");
        assert!(c.sale.as_ref().expect("sale").stream);
        assert!(
            c.warnings
                .iter()
                .any(|w| w.starts_with("test.toml:") && w.contains("`sale.stream` does nothing")),
            "{:?}",
            c.warnings
        );
        let redis = format!(
            "{}\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n",
            with("stream = true")
        );
        let c = parse(&redis).expect("valid");
        assert!(c.sale.as_ref().expect("sale").stream && c.warnings.is_empty());
        let e = parse(&with("stream = 1")).expect_err("not a boolean");
        assert_eq!(e.key(), Some("sale.stream"), "{e}");
    }

    #[test]
    fn redis_urls_of_every_deployment_are_read_and_bad_ones_named() {
        let with = |url: &str| format!("{FOUR}[redis]\nurl = \"{url}\"\nreplicas = 1\n");
        for url in [
            "redis://127.0.0.1:6379",
            "redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001&node=127.0.0.1:7002",
            "redis-sentinel://127.0.0.1:26379/0?sentinelServiceName=sale&node=127.0.0.1:26380",
            "rediss://127.0.0.1:6380",
            "rediss-cluster://127.0.0.1:7000?node=127.0.0.1:7001",
            "rediss-sentinel://127.0.0.1:26379/0?sentinelServiceName=sale",
        ] {
            let c = parse(&with(url)).unwrap_or_else(|e| panic!("{url}: {e}"));
            let r = c.redis.as_ref().expect("redis");
            assert_eq!(r.replicas, 1);
            assert_eq!(r.origin, "test.toml:23");
            // TLS by the URL alone: fred's defaults, no files of spike's.
            assert!(r.tls.is_none());
        }
        let e = parse(&with("redis://u:hunter2@127.0.0.1:6379/x")).expect_err("bad db");
        assert!(!e.to_string().contains("hunter2"), "the password: {e}");
        let e = parse(&with("http://127.0.0.1:6379")).expect_err("not redis");
        assert_eq!(e.key(), Some("redis.url"));
        let e = parse(&with("redis-sentinel://127.0.0.1:26379/0")).expect_err("no service name");
        assert_eq!(e.key(), Some("redis.url"));
        assert!(e.to_string().contains(":23:"), "the line: {e}");
    }

    #[test]
    fn a_too_short_store_timeout_or_lease_is_refused() {
        let with =
            |extra: &str| format!("{FOUR}[redis]\nurl = \"redis://127.0.0.1:6379\"\n{extra}");
        let e = parse(&with("timeout = \"500us\"\n")).expect_err("refused");
        assert_eq!(e.key(), Some("redis.timeout"));
        assert!(e.to_string().contains("at least 10ms"), "{e}");
        parse(&with("timeout = \"5ms\"\n")).expect_err("5ms is too short");
        parse(&with("timeout = \"10ms\"\n")).expect("10ms is enough");
        let e = parse(&FOUR.replace("total = 1000\n", "total = 1000\nlease_ttl = \"2s\"\n"))
            .expect_err("refused");
        assert_eq!(e.key(), Some("sale.lease_ttl"));
        let e = parse(&FOUR.replace("total = 1000\n", "total = 1000\nlease = 0\n"))
            .expect_err("refused");
        assert_eq!(e.key(), Some("sale.lease"));
    }

    #[test]
    fn redis_and_node_threads_defaults_and_overrides() {
        let with_redis = format!("{FOUR}[redis]\nurl = \"redis://127.0.0.1:6379\"\n");
        let c = parse(&with_redis).expect("valid");
        let r = c.redis.as_ref().expect("redis");
        // Two call slots: bigger batches than more slots would make.
        assert_eq!((r.pool_size, r.timeout), (2, Duration::from_secs(1)));
        assert!(c.nodes.iter().all(|n| n.threads.is_none()));
        let tuned = with_redis
            .replace("weight = 1\n", "weight = 1\nthreads = 1\n")
            .replace("6379\"\n", "6379\"\npool_size = 5\n");
        let c = parse(&tuned).expect("valid");
        assert_eq!(c.redis.as_ref().expect("redis").pool_size, 5);
        assert_eq!(c.nodes[0].threads, Some(1));
        assert_eq!(c.nodes[1].threads, None);
    }

    #[test]
    fn nodes_become_upstreams_when_the_balancer_lists_none() {
        let c = parse(FOUR).expect("valid");
        let b = c.balancer.expect("balancer");
        assert_eq!(b.upstreams.len(), 4);
        assert_eq!(b.upstreams[3].weight, 4);
        assert_eq!(b.strategy, Strategy::WeightedRoundRobin);
    }

    fn expect_err(text: &str, key: &str, line: usize) -> String {
        let e = parse(text).expect_err("must be refused");
        let msg = e.to_string();
        assert_eq!(e.key(), Some(key), "{msg}");
        assert_eq!(e.line(), Some(line), "{msg}");
        assert!(msg.starts_with(&format!("test.toml:{line}:")), "{msg}");
        msg
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let m = expect_err(
            "[sale]\nevent = \"e\"\ntotal = 5\ncolour = 1\n",
            "sale.colour",
            4,
        );
        assert!(m.contains("unknown field"), "{m}");
    }

    #[test]
    fn zero_weight_is_refused() {
        expect_err(
            "[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nweight = 0\n",
            "node[0].weight",
            4,
        );
    }

    #[test]
    fn duplicate_name_is_refused() {
        let m = expect_err(
            "[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:2\"\n",
            "node[1].name",
            5,
        );
        assert!(m.contains("duplicate"), "{m}");
    }

    #[test]
    fn bad_address_is_refused() {
        expect_err(
            "[[node]]\nname = \"a\"\nlisten = \"nowhere\"\n",
            "node[0].listen",
            3,
        );
    }

    #[test]
    fn total_below_one_is_refused() {
        expect_err("[sale]\nevent = \"e\"\ntotal = 0\n", "sale.total", 3);
    }

    #[test]
    fn ip_hash_with_backup_is_refused() {
        let m = expect_err(
            "[balancer]\nstrategy = \"ip_hash\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:1\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:2\"\nbackup = true\n",
            "balancer.upstream[1].backup",
            5,
        );
        assert!(m.contains("ip_hash"), "{m}");
    }

    #[test]
    fn balancer_alone_is_a_valid_file() {
        let c = parse(
            "[balancer]\nlisten = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\nadmin = \"127.0.0.1:0\"\n[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\nfail_timeout = \"3s\"\n",
        )
        .expect("valid");
        assert!(c.sale.is_none());
        let b = c.balancer.expect("balancer");
        assert_eq!(b.upstreams[0].fail_timeout, Duration::from_secs(3));
        assert_eq!(b.upstreams[0].max_fails, 1);
    }

    #[test]
    fn bad_duration_is_refused() {
        expect_err(
            "[balancer]\n[[balancer.upstream]]\naddr = \"127.0.0.1:1\"\nfail_timeout = \"soon\"\n",
            "balancer.upstream[0].fail_timeout",
            4,
        );
    }

    #[test]
    fn balancer_request_limits_parse_and_are_checked() {
        const UP: &str = "[[balancer.upstream]]\naddr = \"127.0.0.1:9\"\n";
        let b = parse(&format!("[balancer]\n{UP}"))
            .expect("valid")
            .balancer
            .expect("balancer");
        assert!(!b.underscores_in_headers);
        assert_eq!(b.read_timeout, Duration::from_secs(60));
        assert_eq!(b.send_timeout, Duration::from_secs(60));
        assert_eq!(b.body_timeout, Duration::from_secs(60));
        assert_eq!(b.max_body, 1024 * 1024);
        let b = parse(&format!(
            "[balancer]\nmax_body = 0\nbody_timeout = \"5s\"\n{UP}"
        ))
        .expect("valid")
        .balancer
        .expect("balancer");
        assert_eq!(b.max_body, 0);
        assert_eq!(b.body_timeout, Duration::from_secs(5));
        expect_err(
            &format!("[balancer]\nmax_body = -1\n{UP}"),
            "balancer.max_body",
            2,
        );
        let b = parse(&format!(
            "[balancer]\nread_timeout = \"2s\"\nsend_timeout = \"300ms\"\n{UP}"
        ))
        .expect("valid")
        .balancer
        .expect("balancer");
        assert_eq!(b.read_timeout, Duration::from_secs(2));
        assert_eq!(b.send_timeout, Duration::from_millis(300));
        expect_err(
            &format!("[balancer]\nlisten = \"127.0.0.1:0\"\nsend_timeout = \"never\"\n{UP}"),
            "balancer.send_timeout",
            3,
        );
        let b = parse(&format!("[balancer]\nunderscores_in_headers = true\n{UP}"))
            .expect("valid")
            .balancer
            .expect("balancer");
        assert!(b.underscores_in_headers);
        expect_err(
            &format!("[balancer]\nunderscores_in_headers = \"yes\"\n{UP}"),
            "balancer.underscores_in_headers",
            2,
        );
    }
}
