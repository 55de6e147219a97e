//! The validated sections of a [`super::Config`]: typed values (addresses,
//! durations, counts) that the rest of spike reads without parsing anything.
//!
//! Their defaults are in [`super::defaults`], their checks in
//! [`super::validate`]: these are only the shapes.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

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
    /// Most tickets one purchase may ask for (`?quantity=N`, default 1):
    /// a family buys its seats together, in one order, all or nothing.
    /// Checked by the node that takes the request; within
    /// `per_user_limit` when there is one.
    pub max_per_purchase: u64,
    /// Units a node asks for when its lease runs low: a node sends at most
    /// this many purchases before it asks the store again.
    pub lease: u64,
    /// How long a lease lives unless its node calls the store again, so the
    /// units of a node that died come back by themselves.
    pub lease_ttl: Duration,
    /// In a fleet of several sales, a node drops its state of a sale (its
    /// lease, given back; its poll and sweep; its store's batch queue and
    /// clock once no node of the process holds the sale) after this long
    /// without a request for it, and makes it again on the next: a node's
    /// memory and polls follow the sales in use, not the file's list. At
    /// least two `lease_ttl`s; default 60 s (or two `lease_ttl`s if more).
    pub idle_after: Duration,
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
    /// When the sale opens, Unix ms (`opens_at`, RFC 3339): before it
    /// every purchase is answered `not_open` (from memory, and by the store
    /// in Redis's clock at the edge of the moment). Stored with the sale by
    /// `stock init`, so that `stock init` can come well before the opening.
    pub opens_at_ms: Option<u64>,
    /// When the sale closes for good, Unix ms (`closes_at`); `spike stock
    /// close` closes it at once.
    pub closes_at_ms: Option<u64>,
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
    /// Where it serves its internal routes (`/holders`, `/stats`,
    /// `/metrics`, `/sale`, `/sold_out`, `/healthz`) instead of on
    /// `listen`, so that they can be firewalled; `None`: on `listen`.
    pub internal: Option<SocketAddr>,
    /// Its share of the traffic (the balancer's weight for it).
    pub weight: u32,
    /// Runtime threads of a `spike node` process; `None` is one per CPU.
    /// Several nodes sharing a few CPUs (a benchmark on one machine) run
    /// cheaper with one each: every hand-off between threads of a process
    /// is a wake-up and a context switch.
    pub threads: Option<usize>,
}

/// An access log line's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessLogFormat {
    /// Nginx's `combined`, then the upstream and the times: what log
    /// tools read.
    #[default]
    Combined,
    /// One JSON object a line: what log pipelines read.
    Json,
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
    /// Where it serves its internal routes (a node's `[[node]] internal`),
    /// when not on `addr`: the edge's reads of the sale and the health
    /// checks go there.
    pub internal: Option<SocketAddr>,
    /// Given by host name with `resolve`: `addr` is that name's address,
    /// looked up again every so often while the balancer runs.
    pub name: Option<UpstreamName>,
    /// A `[[node]]` of the file (a spike node, which takes purchases in
    /// batches), not another backend that a `[[balancer.upstream]]` names.
    pub node: bool,
}

/// An upstream's host name, resolved again every `every` (Nginx's `server
/// … resolve`; see `crate::balancer::resolver`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamName {
    /// The name, as written.
    pub host: String,
    /// The port, as written.
    pub port: u16,
    /// Between two lookups.
    pub every: Duration,
}

impl UpstreamConfig {
    /// Where the balancer asks for the upstream's internal routes (the
    /// sale, the holders, the health check): `internal`, else `addr`.
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal.unwrap_or(self.addr)
    }
}

/// The balancer's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerConfig {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Where `/healthz`, `/status`, `/metrics` are served.
    pub admin: SocketAddr,
    /// TLS on `listen` (`tls_cert`, `tls_key` and `[[balancer.tls_sni]]`),
    /// the files read and checked; `None`: plain HTTP. Whether there is
    /// TLS is fixed at start; a reload changes the certificates.
    pub tls: Option<crate::server::tls::ListenerTls>,
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
    /// On SIGTERM, how long the balancer goes on serving (and accepting)
    /// with `/ready` failing before it stops accepting: an L4 balancer or a
    /// load balancer's health check in front needs a few checks to take it
    /// out, and keeps sending until then. Then `[server] grace_period`.
    pub drain_delay: Duration,
    /// Longest request line and longest header line in bytes (Nginx's
    /// `large_client_header_buffers` size, 8k): a longer request line is a
    /// 414, a longer header line a 431, so that no client can push a 64 KiB
    /// header through to the nodes.
    pub max_header_line: usize,
    /// Longest request head in bytes (Nginx's `large_client_header_buffers`
    /// count times its size, 4 × 8k): more is a 431.
    pub max_head: usize,
    /// Longest silence of a client between two reads of its request body
    /// (Nginx's `client_body_timeout`): slow is fine, stalled is not.
    pub body_timeout: Duration,
    /// Largest request body in bytes, 0 for no limit (Nginx's
    /// `client_max_body_size`): more is a 413, so no client can stream
    /// without end through the balancer.
    pub max_body: u64,
    /// Peers whose `X-Forwarded-For` is believed, and with
    /// `proxy_protocol` the only peers the listener accepts.
    pub trusted_proxies: Vec<IpNet>,
    /// The listener speaks the PROXY protocol (v1 and v2): every
    /// connection from a `trusted_proxies` address begins with a header
    /// carrying the client's address, which stands for the peer's
    /// everywhere (`ip_hash`, `X-Forwarded-For`, `X-Real-IP`, the limits,
    /// the logs); a connection from any other address is closed. For a
    /// balancer behind an L4 tier (HAProxy in TCP mode, an NLB), where
    /// every peer is the tier. Reloadable.
    pub proxy_protocol: bool,
    /// Whether `/ready` is 200 before the sale opens (`[sale] opens_at`).
    /// Off: 503 `not_open` until the opening, so an L4 tier sends nobody
    /// here before the sale (the edge answers an early crowd from memory
    /// either way).
    pub ready_before_open: bool,
    /// Where the access log goes (one line per request, see
    /// `crate::balancer::access_log`); `None`: no access log (the
    /// default, as for benchmarks). Read at start: a change takes a
    /// restart; the file is reopened on SIGUSR1.
    pub access_log: Option<std::path::PathBuf>,
    /// The access log's format.
    pub access_log_format: AccessLogFormat,
    /// Longest silence both ways of an upgraded connection (a WebSocket)
    /// tunnelled to an upstream (HAProxy's `timeout tunnel`), after which
    /// both ends are closed.
    pub tunnel_timeout: Duration,
    /// A file in `/etc/hosts`'s format where upstream host names are
    /// looked up before the system's resolver (see `crate::resolve`).
    pub hosts_file: Option<std::path::PathBuf>,
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
    /// Send the purchases for one `[[node]]` that arrive while a batch to
    /// it is out as the next batch (`POST /purchases`), on the balancer's
    /// own HTTP/1 path (see `crate::balancer::batch`). Off: each alone.
    pub batch_purchases: bool,
    /// The file has a `[sale]`, so the upstreams are spike nodes: only
    /// their public API ([`crate::protocol::is_public_path`]) and
    /// `pass_paths` are forwarded, every other path is the balancer's 404,
    /// so the nodes' internal routes (the holders, the stats) stay inside.
    /// Off (no `[sale]`, in front of other backends): every path passes.
    pub public_only: bool,
    /// With `public_only`, more paths to forward (each a prefix of the
    /// path, starting with `/`): for other routes the upstreams serve
    /// beside a sale.
    pub pass_paths: Vec<String>,
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
    /// Per-client limits (Nginx's `limit_req` and `limit_conn`), keyed on
    /// the client's address, so that one client cannot take the sale's
    /// capacity; none by default.
    pub limits: ClientLimits,
    /// The upstreams, in file order (order matters to Nginx's algorithms).
    pub upstreams: Vec<UpstreamConfig>,
    /// With `[auth]` and a sale: the keys the edge checks a token with
    /// before it tells a sold-out buyer they hold an order. Part of the
    /// balancer's config so that a reload that changes only the keys
    /// makes a new version (and reaches `spike up`'s nodes).
    pub auth: Option<EdgeAuth>,
    /// The sale's `opens_at` and `closes_at`, Unix ms (0: none): before
    /// the opening and after the closing the edge answers every purchase
    /// from memory, whatever the strategy, so a crowd that comes early
    /// never reaches a node.
    pub sale_opens_at_ms: u64,
    /// See `sale_opens_at_ms`.
    pub sale_closes_at_ms: u64,
    /// The sale's `max_per_purchase` (1 without a sale): a purchase whose
    /// `quantity` a node would refuse goes to a node, never answered at
    /// the edge.
    pub sale_max_per_purchase: u64,
    /// The file has several sales (`[[sale]]`): a purchase names its own
    /// (`/events/{event}/buy`, which then passes, or `?event=`), and the
    /// edge, which knows one sale, is off.
    pub several_sales: bool,
    /// `[waiting_room]`: the line every buyer joins before a purchase
    /// reaches a node; `None`: purchases go straight on.
    pub waiting_room: Option<WaitingRoomConfig>,
}

/// `[waiting_room]`: how the line in front of `/buy/ticket` admits buyers.
/// Part of the balancer's config, so a reload changes the pace of a line
/// that keeps running (the line itself lives in the sale's store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingRoomConfig {
    /// How fast the serving mark moves.
    pub admit: Admit,
    /// How long an admitted buyer's pass lets them reach the nodes.
    pub pass_ttl: Duration,
    /// From when (Unix ms) arrivals before the opening join the shuffled
    /// pre-queue; 0: at any time before the opening. Earlier arrivals are
    /// told to come back then.
    pub prequeue_from_ms: u64,
}

/// `admit`: the waiting room's admission rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// `"N/s"`: N buyers a second, while tickets are free.
    Rate { per_second: u32 },
    /// `"follow_stock"`: about as many buyers at once as there are tickets
    /// free, plus a margin (see `crate::balancer::waiting_room`).
    FollowStock,
}

/// `limit_rate`, `limit_burst`, `limit_nodelay` and `limit_conns`: what one
/// client (one address, after `trusted_proxies`) may ask of the balancer.
/// Kept apart from the rest of [`BalancerConfig`] so the limiter reads
/// only this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientLimits {
    /// Nginx's `limit_req`: a request rate with a burst; `None` without
    /// `limit_rate`.
    pub rate: Option<RateLimit>,
    /// Nginx's `limit_conn`: requests one client may have in flight at
    /// once; 0 for no limit.
    pub conns: u32,
}

/// A request rate and its burst, as Nginx's `limit_req_zone ... rate=`
/// and `limit_req burst= [nodelay]` say them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per [`RateLimit::per_minute`] second or minute (Nginx's
    /// whole numbers: "20r/s", "30r/m").
    pub requests: u32,
    /// The rate is per minute ("r/m") rather than per second ("r/s").
    pub per_minute: bool,
    /// Requests over the rate taken at once (or, without `nodelay`,
    /// delayed) before the next is refused.
    pub burst: u32,
    /// Requests within the burst go on at once instead of being spaced
    /// out at the rate.
    pub nodelay: bool,
}

impl RateLimit {
    /// The rate in thousandths of a request per second, truncated as
    /// Nginx truncates it (`rate * 1000 / scale`): the leaky bucket's
    /// drain, in the same unit as its excess.
    pub fn milli_per_second(&self) -> u64 {
        let scale = if self.per_minute { 60 } else { 1 };
        u64::from(self.requests) * 1000 / scale
    }

    /// The rate as Nginx writes it ("20r/s").
    pub fn as_nginx(&self) -> String {
        let unit = if self.per_minute { "m" } else { "s" };
        format!("{}r/{unit}", self.requests)
    }
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
    /// Open client connections at most, as the file sets it; `None` (left
    /// out): what the open-files limit leaves room for, at most
    /// [`crate::config::DEFAULT_MAX_CONNECTIONS`] (see
    /// [`crate::server::connection_cap`]), as HAProxy sizes its `maxconn`.
    pub max_connections: Option<usize>,
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

/// `[auth]` as the balancer's edge needs it: the keys, and the sale whose
/// tokens they check (a token's `aud`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeAuth {
    /// The file's `[auth]`.
    pub auth: crate::auth::AuthConfig,
    /// The sale's event; `None` in front of several sales, where each
    /// request's token is checked against the sale it names.
    pub event: Option<String>,
}
