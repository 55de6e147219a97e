//! Every default of `config.toml`, named once.
//!
//! A section whose keys all have defaults is `Default`; one with required
//! keys has a constructor that takes just those. Validation starts each
//! section from here and overwrites what the file sets, and tests build
//! their configs from here, so a default changes in one place (and in the
//! README's table, which quotes them).

use std::net::SocketAddr;
use std::time::Duration;

use super::sections::{
    AccessLogFormat, BalancerConfig, ClientLimits, HealthCheck, NodeConfig, RedisConfig,
    SaleConfig, ServerConfig, Strategy, UpstreamConfig,
};

/// `[auth] clock_skew` left out: the leeway on a token's `exp` and `nbf`,
/// since the clocks of an identity provider and a node disagree a little.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// `[server] max_connections` left out, on a machine whose open-files
/// limit leaves room for more (see [`crate::server::connection_cap`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;

impl Default for ServerConfig {
    /// `[server]` left out.
    fn default() -> Self {
        ServerConfig {
            max_connections: None,
            header_read_timeout: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(75),
            grace_period: Duration::from_secs(10),
            max_body: 4096,
        }
    }
}

impl SaleConfig {
    /// A sale of `total` tickets of `event` over `nodes` nodes, every other
    /// key at its default (the lease depends on both counts: see
    /// [`default_lease`]).
    pub fn new(event: String, total: u64, nodes: usize) -> Self {
        SaleConfig {
            event,
            total,
            per_user_limit: 1,
            max_per_purchase: 1,
            lease: default_lease(total, nodes),
            lease_ttl: Duration::from_secs(10),
            idle_after: DEFAULT_IDLE_AFTER,
            pay_within: None,
            events_max: 100_000,
            stream: false,
            opens_at_ms: None,
            closes_at_ms: None,
        }
    }
}

/// `[sale] idle_after` when the file sets none (and two `lease_ttl`s are
/// less).
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(60);

/// A node's lease when the file sets none: a tenth of a node's even share,
/// between 1 and 100. Small enough that the last tickets are spread over
/// the nodes that have buyers, large enough that a lease call is rare next
/// to the purchases it covers.
pub fn default_lease(total: u64, nodes: usize) -> u64 {
    (total / (10 * nodes.max(1) as u64)).clamp(1, 100)
}

impl RedisConfig {
    /// Redis at `url`, set at `origin` (`FILE:LINE`), every other key at
    /// its default (no TLS files: a TLS URL trusts the system's roots).
    pub fn new(url: String, origin: String) -> Self {
        RedisConfig {
            url,
            origin,
            tls: None,
            timeout: Duration::from_millis(1000),
            pool_size: 2,
            max_clock_offset: Duration::from_secs(1),
            replicas: 0,
        }
    }
}

impl NodeConfig {
    /// The node `name` on `listen`, with a weight of 1 and a thread per CPU.
    pub fn new(name: String, listen: SocketAddr) -> Self {
        NodeConfig {
            name,
            listen,
            internal: None,
            weight: 1,
            threads: None,
        }
    }
}

/// `[balancer] limit_burst` left out with a `limit_rate`: no burst, as
/// Nginx's `limit_req` without `burst=`.
pub const DEFAULT_LIMIT_BURST: u32 = 0;

/// `[balancer] limit_nodelay` left out: requests within the burst are
/// delayed to the rate, as Nginx's `limit_req` without `nodelay`.
pub const DEFAULT_LIMIT_NODELAY: bool = false;

impl Default for BalancerConfig {
    /// `[balancer]` with no keys and no upstreams yet: a file with only
    /// `[[node]]`s gets this with its nodes as the upstreams.
    fn default() -> Self {
        BalancerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            admin: SocketAddr::from(([127, 0, 0, 1], 8001)),
            tls: None,
            strategy: Strategy::WeightedRoundRobin,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(10),
            keepalive: 64,
            keepalive_timeout: Duration::from_secs(60),
            read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            drain_delay: Duration::from_secs(5),
            max_header_line: 8 * 1024,
            max_head: 32 * 1024,
            body_timeout: Duration::from_secs(60),
            max_body: 1024 * 1024,
            underscores_in_headers: false,
            fast_path: true,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            ready_before_open: true,
            access_log: None,
            access_log_format: AccessLogFormat::Combined,
            hosts_file: None,
            tunnel_timeout: Duration::from_secs(3600),
            sold_out_at_edge: true,
            batch_purchases: true,
            public_only: false,
            pass_paths: Vec::new(),
            queue: 0,
            queue_timeout: Duration::from_secs(10),
            health: None,
            slow_start: Duration::ZERO,
            limits: ClientLimits::default(),
            upstreams: Vec::new(),
            auth: None,
            sale_opens_at_ms: 0,
            sale_closes_at_ms: 0,
            sale_max_per_purchase: 1,
            several_sales: false,
            waiting_room: None,
        }
    }
}

impl UpstreamConfig {
    /// The upstream at `addr`, every other key at its default. (In a file,
    /// an upstream that sets no `max_conns` takes the `[balancer]`'s, when
    /// that sets one.)
    pub fn new(addr: SocketAddr) -> Self {
        UpstreamConfig {
            addr,
            weight: 1,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            max_conns: 0,
            backup: false,
            down: false,
            internal: None,
            name: None,
            node: false,
        }
    }

    /// The upstream a `[[node]]` becomes when the balancer lists none: its
    /// address, weight and internal address.
    pub fn from_node(node: &NodeConfig) -> Self {
        UpstreamConfig {
            weight: node.weight,
            internal: node.internal,
            node: true,
            ..UpstreamConfig::new(node.listen)
        }
    }
}

impl HealthCheck {
    /// A check of `path`, every other key at its default: once a second,
    /// and one answer either way takes an upstream out or brings it back.
    pub fn new(path: String) -> Self {
        HealthCheck {
            path,
            interval: Duration::from_secs(1),
            // A node's /healthz asks its store: give it a second, as
            // HAProxy's `timeout check` would be at the default interval.
            timeout: Duration::from_secs(1),
            fails: 1,
            passes: 1,
        }
    }
}
