//! `[balancer]` and its `[[balancer.upstream]]`s, with Nginx's names and
//! Nginx's refusals.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::cx::{Cx, optional};
use crate::config::defaults::{DEFAULT_LIMIT_BURST, DEFAULT_LIMIT_NODELAY};
use crate::config::error::ConfigError;
use crate::config::file::{BalancerFile, UpstreamFile};
use crate::config::sections::{
    AccessLogFormat, BalancerConfig, ClientLimits, HealthCheck, NodeConfig, RateLimit, Strategy,
    UpstreamConfig, UpstreamName,
};
use crate::server::tls::{CertPart, CertRefusal, ListenerTls, TlsCert};

/// `[balancer]`; without one, the defaults in front of the `[[node]]`s, or
/// `None` when there are no nodes either. `has_sale`: the file has a
/// `[sale]`, so the upstreams are spike nodes and only their public API
/// passes (`public_only`).
pub(super) fn validate(
    cx: &Cx,
    file: Option<&Spanned<BalancerFile>>,
    nodes: &[NodeConfig],
    has_sale: bool,
) -> Result<Option<BalancerConfig>, ConfigError> {
    let d = BalancerConfig::default();
    let Some(b) = file else {
        if nodes.is_empty() {
            return Ok(None);
        }
        return Ok(Some(BalancerConfig {
            upstreams: nodes.iter().map(UpstreamConfig::from_node).collect(),
            public_only: has_sale,
            ..d
        }));
    };
    let (span, b) = (b.span(), b.get_ref());
    let listen = optional(&b.listen, d.listen, |v| {
        cx.socket_addr("balancer.listen", v)
    })?;
    let admin = optional(&b.admin, d.admin, |v| cx.socket_addr("balancer.admin", v))?;
    let tls = tls(cx, b)?;
    let strategy = optional(&b.strategy, d.strategy, |v| strategy(cx, v))?;
    let trusted_proxies = trusted_proxies(cx, &b.trusted_proxies)?;
    let proxy_protocol = b.proxy_protocol.as_ref().is_some_and(|p| *p.get_ref());
    if let (Some(p), true) = (
        &b.proxy_protocol,
        proxy_protocol && trusted_proxies.is_empty(),
    ) {
        return Err(cx.err(
            "balancer.proxy_protocol",
            p.span(),
            "proxy_protocol = true needs trusted_proxies: only those addresses may say who the client is, every other connection is closed",
        ));
    }
    let (max_header_line, max_head) = head_limits(cx, b, &d)?;
    // Every upstream's that sets none; unset, each keeps its own default.
    let max_conns = optional(&b.max_conns, None, |v| {
        Ok(Some(
            cx.count("balancer.max_conns", v, 0)?.min(u32::MAX as u64) as u32,
        ))
    })?;
    let hosts_file = optional(&b.hosts_file, None, |v| {
        let p = v.get_ref().trim();
        if p.is_empty() {
            return Err(cx.err(
                "balancer.hosts_file",
                v.span(),
                "an empty path: leave hosts_file out to use the system's resolver only",
            ));
        }
        Ok(Some(std::path::PathBuf::from(p)))
    })?;
    let mut upstreams = upstreams(cx, &b.upstream, strategy, max_conns, hosts_file.as_deref())?;
    // An upstream at a `[[node]]`'s address is that node (and serves its
    // internal routes, batches among them, where the node does).
    for u in &mut upstreams {
        if let Some(n) = nodes.iter().find(|n| n.listen == u.addr) {
            u.node = true;
            u.internal = u.internal.or(n.internal);
        }
    }
    if upstreams.is_empty() {
        upstreams = nodes
            .iter()
            .map(|n| {
                let u = UpstreamConfig::from_node(n);
                UpstreamConfig {
                    max_conns: max_conns.unwrap_or(u.max_conns),
                    ..u
                }
            })
            .collect();
    }
    if upstreams.is_empty() {
        return Err(cx.err(
            "balancer.upstream",
            span,
            "the balancer has no upstreams: add [[balancer.upstream]] entries or [[node]] entries",
        ));
    }
    if upstreams.iter().all(|u| u.backup) {
        return Err(cx.err(
            "balancer.upstream",
            span,
            "every upstream is a backup: at least one must be a primary",
        ));
    }
    Ok(Some(BalancerConfig {
        listen,
        admin,
        tls,
        strategy,
        connect_timeout: optional(&b.connect_timeout, d.connect_timeout, |v| {
            cx.duration("balancer.connect_timeout", v)
        })?,
        response_timeout: optional(&b.response_timeout, d.response_timeout, |v| {
            cx.duration("balancer.response_timeout", v)
        })?,
        keepalive: optional(&b.keepalive, d.keepalive, |v| {
            Ok(cx.count("balancer.keepalive", v, 0)? as usize)
        })?,
        keepalive_timeout: optional(&b.keepalive_timeout, d.keepalive_timeout, |v| {
            cx.duration("balancer.keepalive_timeout", v)
        })?,
        read_timeout: optional(&b.read_timeout, d.read_timeout, |v| {
            cx.duration("balancer.read_timeout", v)
        })?,
        send_timeout: optional(&b.send_timeout, d.send_timeout, |v| {
            cx.duration("balancer.send_timeout", v)
        })?,
        drain_delay: optional(&b.drain_delay, d.drain_delay, |v| {
            cx.duration_or_zero("balancer.drain_delay", v)
        })?,
        max_header_line,
        max_head,
        body_timeout: optional(&b.body_timeout, d.body_timeout, |v| {
            cx.duration("balancer.body_timeout", v)
        })?,
        max_body: optional(&b.max_body, d.max_body, |v| {
            cx.count("balancer.max_body", v, 0)
        })?,
        underscores_in_headers: b.underscores_in_headers,
        fast_path: b.fast_path.unwrap_or(d.fast_path),
        trusted_proxies,
        proxy_protocol,
        ready_before_open: b.ready_before_open.unwrap_or(d.ready_before_open),
        access_log: optional(&b.access_log, None, |v| {
            let p = v.get_ref().trim();
            if p.is_empty() {
                return Err(cx.err(
                    "balancer.access_log",
                    v.span(),
                    "an empty path: leave access_log out for no access log",
                ));
            }
            Ok(Some(std::path::PathBuf::from(p)))
        })?,
        hosts_file,
        tunnel_timeout: optional(&b.tunnel_timeout, d.tunnel_timeout, |v| {
            cx.duration("balancer.tunnel_timeout", v)
        })?,
        access_log_format: optional(&b.access_log_format, d.access_log_format, |v| {
            match v.get_ref().as_str() {
                "combined" => Ok(AccessLogFormat::Combined),
                "json" => Ok(AccessLogFormat::Json),
                other => Err(cx.err(
                    "balancer.access_log_format",
                    v.span(),
                    format!("{other:?} is not one of combined, json"),
                )),
            }
        })?,
        sold_out_at_edge: b
            .sold_out_at_edge
            .as_ref()
            .map_or(d.sold_out_at_edge, |v| *v.get_ref()),
        batch_purchases: b.batch_purchases.unwrap_or(d.batch_purchases),
        public_only: has_sale,
        pass_paths: pass_paths(cx, &b.pass_paths, has_sale)?,
        queue: optional(&b.queue, d.queue, |v| {
            Ok(cx.count("balancer.queue", v, 0)? as usize)
        })?,
        queue_timeout: optional(&b.queue_timeout, d.queue_timeout, |v| {
            cx.duration("balancer.queue_timeout", v)
        })?,
        health: health_check(cx, b)?,
        // Zero is a setting here (no slow start), where every other
        // duration refuses it.
        slow_start: optional(&b.slow_start, d.slow_start, |v| {
            if v.get_ref().trim() == "0s" {
                return Ok(Duration::ZERO);
            }
            cx.duration("balancer.slow_start", v)
        })?,
        limits: limits(cx, b)?,
        upstreams,
        // Set from [auth] once it is validated (see `super::validate`).
        auth: None,
        sale_opens_at_ms: 0,
        sale_closes_at_ms: 0,
        sale_max_per_purchase: 1,
        several_sales: false,
        waiting_room: None,
    }))
}

/// `tls_cert` and `tls_key` (the default certificate) and the
/// `[[balancer.tls_sni]]` certificates, each file read and checked now (a
/// key that is not the certificate's, a name the certificate does not
/// cover), so that a bad file is refused with its line, at start or by a
/// reload, and never at a client's handshake.
fn tls(cx: &Cx, b: &BalancerFile) -> Result<Option<ListenerTls>, ConfigError> {
    let dir = cx.path.parent();
    let (cert, key) = match (&b.tls_cert, &b.tls_key) {
        (None, None) => {
            if let Some(sni) = b.tls_sni.first() {
                return Err(cx.err(
                    "balancer.tls_sni",
                    sni.span(),
                    "needs `tls_cert` and `tls_key`: the default certificate, for clients that ask for no name or another",
                ));
            }
            return Ok(None);
        }
        (Some(c), None) => {
            return Err(cx.err(
                "balancer.tls_cert",
                c.span(),
                "needs `tls_key`, the certificate's private key (PEM)",
            ));
        }
        (None, Some(k)) => {
            return Err(cx.err(
                "balancer.tls_key",
                k.span(),
                "needs `tls_cert`, the certificate (PEM) of this key",
            ));
        }
        (Some(c), Some(k)) => (c, k),
    };
    for (name, v) in [("balancer.tls_cert", cert), ("balancer.tls_key", key)] {
        if v.get_ref().trim().is_empty() {
            return Err(cx.err(name, v.span(), "must name a PEM file"));
        }
    }
    let mut certs = vec![
        TlsCert::load(dir, &[], cert.get_ref(), key.get_ref()).map_err(|e| {
            cert_refused(
                cx,
                e,
                ["balancer.tls_cert", "balancer.tls_key", ""],
                [cert, key],
                &[],
            )
        })?,
    ];
    let mut seen = HashSet::new();
    for sni in &b.tls_sni {
        let sni = sni.get_ref();
        if sni.names.get_ref().is_empty() {
            return Err(cx.err(
                "balancer.tls_sni.names",
                sni.names.span(),
                "must list the names (SNI) this certificate is for",
            ));
        }
        for n in sni.names.get_ref() {
            if !seen.insert(n.get_ref().trim().to_ascii_lowercase()) {
                return Err(cx.err(
                    "balancer.tls_sni.names",
                    n.span(),
                    format!("{:?} is listed for two certificates", n.get_ref()),
                ));
            }
        }
        let names: Vec<String> = sni
            .names
            .get_ref()
            .iter()
            .map(|n| n.get_ref().clone())
            .collect();
        certs.push(
            TlsCert::load(dir, &names, sni.cert.get_ref(), sni.key.get_ref()).map_err(|e| {
                cert_refused(cx, e, SNI_KEYS, [&sni.cert, &sni.key], sni.names.get_ref())
            })?,
        );
    }
    Ok(Some(ListenerTls { certs }))
}

/// The keys of a `[[balancer.tls_sni]]`: certificate, key, names.
const SNI_KEYS: [&str; 3] = [
    "balancer.tls_sni.cert",
    "balancer.tls_sni.key",
    "balancer.tls_sni.names",
];

/// A refused certificate as the config error about its key and line:
/// `keys` are the certificate's, the key's and the names' keys, `files`
/// the certificate's and key's values.
fn cert_refused(
    cx: &Cx,
    e: CertRefusal,
    keys: [&str; 3],
    [cert, key]: [&Spanned<String>; 2],
    names: &[Spanned<String>],
) -> ConfigError {
    match e.part {
        CertPart::Cert => cx.err(keys[0], cert.span(), e.message),
        CertPart::Key => cx.err(keys[1], key.span(), e.message),
        CertPart::Name(i) => cx.err(
            keys[2],
            names.get(i).map_or(cert.span(), |n| n.span()),
            e.message,
        ),
    }
}

/// `limit_rate` (with `limit_burst` and `limit_nodelay`, which do nothing
/// without it) and `limit_conns`, as Nginx's `limit_req` and `limit_conn`
/// take them.
fn limits(cx: &Cx, b: &BalancerFile) -> Result<ClientLimits, ConfigError> {
    let conns = optional(&b.limit_conns, ClientLimits::default().conns, |v| {
        Ok(cx.count("balancer.limit_conns", v, 0)?.min(u32::MAX as u64) as u32)
    })?;
    let Some(rate) = &b.limit_rate else {
        let stray = [
            (
                "balancer.limit_burst",
                b.limit_burst.as_ref().map(|v| v.span()),
            ),
            (
                "balancer.limit_nodelay",
                b.limit_nodelay.as_ref().map(|v| v.span()),
            ),
        ];
        if let Some((key, Some(span))) = stray.into_iter().find(|(_, s)| s.is_some()) {
            return Err(cx.err(
                key,
                span,
                "has no effect without `limit_rate` (requests per client, e.g. \"20r/s\")",
            ));
        }
        return Ok(ClientLimits { rate: None, conns });
    };
    let (requests, per_minute) = limit_rate(cx, rate)?;
    let burst = optional(&b.limit_burst, DEFAULT_LIMIT_BURST, |v| {
        let n = *v.get_ref();
        if !(0..=MAX_LIMIT).contains(&n) {
            return Err(cx.err(
                "balancer.limit_burst",
                v.span(),
                format!("must be a whole number from 0 to {MAX_LIMIT}, not {n}"),
            ));
        }
        Ok(n as u32)
    })?;
    let nodelay = b
        .limit_nodelay
        .as_ref()
        .map_or(DEFAULT_LIMIT_NODELAY, |v| *v.get_ref());
    Ok(ClientLimits {
        rate: Some(RateLimit {
            requests,
            per_minute,
            burst,
            nodelay,
        }),
        conns,
    })
}

/// The largest rate and burst taken: a million requests a second is no
/// limit for one client, and it keeps the bucket's arithmetic (thousandths
/// of a request, in 64 bits) far from overflowing.
const MAX_LIMIT: i64 = 1_000_000;

/// `limit_rate`: "Nr/s" or "Nr/m" with N a whole number from 1, as Nginx's
/// `rate=` (a rate Nginx would truncate to zero, under 1r/m, cannot be
/// written).
fn limit_rate(cx: &Cx, v: &Spanned<String>) -> Result<(u32, bool), ConfigError> {
    let s = v.get_ref().trim();
    let bad = || {
        cx.err(
            "balancer.limit_rate",
            v.span(),
            format!(
                "{s:?} is not a rate like \"20r/s\" or \"30r/m\" (a whole number of requests from 1 to {MAX_LIMIT}, per second or per minute)"
            ),
        )
    };
    let (n, per_minute) = if let Some(n) = s.strip_suffix("r/s") {
        (n, false)
    } else if let Some(n) = s.strip_suffix("r/m") {
        (n, true)
    } else {
        return Err(bad());
    };
    if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    match n.parse::<i64>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok((n as u32, per_minute)),
        _ => Err(bad()),
    }
}

/// `strategy`, by Nginx's names.
fn strategy(cx: &Cx, v: &Spanned<String>) -> Result<Strategy, ConfigError> {
    Ok(match v.get_ref().trim() {
        "round_robin" => Strategy::RoundRobin,
        "weighted_round_robin" => Strategy::WeightedRoundRobin,
        "ip_hash" => Strategy::IpHash,
        "least_conn" => Strategy::LeastConn,
        other => {
            return Err(cx.err(
                "balancer.strategy",
                v.span(),
                format!(
                    "{other:?} is not one of round_robin, weighted_round_robin, ip_hash, least_conn"
                ),
            ));
        }
    })
}

/// `trusted_proxies`: networks, or single addresses taken as /32 or /128.
fn trusted_proxies(cx: &Cx, list: &[Spanned<String>]) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let s = t.get_ref().trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    cx.err(
                        format!("balancer.trusted_proxies[{i}]"),
                        t.span(),
                        format!("{s:?} is not an IP address or CIDR like \"10.0.0.0/8\""),
                    )
                })
        })
        .collect()
}

/// `pass_paths`: each a path prefix like `"/api/"`: it starts with `/`, and
/// has only letters, digits and `/-._~:@` and no dot segment (a request
/// path is matched as it came, so a prefix must have one spelling);
/// refused without a `[sale]`, where every path passes anyway.
fn pass_paths(
    cx: &Cx,
    list: &[Spanned<String>],
    has_sale: bool,
) -> Result<Vec<String>, ConfigError> {
    if let (false, Some(first)) = (has_sale, list.first()) {
        return Err(cx.err(
            "balancer.pass_paths",
            first.span(),
            "has no effect without a [sale]: a balancer in front of other backends passes every path",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let s = p.get_ref().trim();
            // Plain enough to write as it is in nginx.conf and haproxy.cfg.
            let plain = s
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"/-._~:@".contains(&c));
            let dotted = s.split('/').any(|seg| seg == "." || seg == "..");
            if !s.starts_with('/') || s.len() > 1024 || !plain || dotted
            {
                return Err(cx.err(
                    format!("balancer.pass_paths[{i}]"),
                    p.span(),
                    format!("{s:?} is not a path prefix like \"/api/\": it starts with '/', has only letters, digits and '/-._~:@', and no '.' or '..' segment"),
                ));
            }
            Ok(s.to_string())
        })
        .collect()
}

/// Every `[[balancer.upstream]]`, in file order; one that sets no
/// `max_conns` takes the balancer's, when that sets one.
fn upstreams(
    cx: &Cx,
    file: &[Spanned<UpstreamFile>],
    strategy: Strategy,
    max_conns: Option<u32>,
    hosts_file: Option<&std::path::Path>,
) -> Result<Vec<UpstreamConfig>, ConfigError> {
    let mut upstreams = Vec::with_capacity(file.len());
    let mut seen = HashSet::new();
    for (i, u) in file.iter().enumerate() {
        let (uspan, u) = (u.span(), u.get_ref());
        let key = |k: &str| format!("balancer.upstream[{i}].{k}");
        let (addr, name) = upstream_addr(cx, &key, u, hosts_file)?;
        if !seen.insert(addr) {
            return Err(cx.err(
                key("addr"),
                u.addr.span(),
                format!("{addr} is listed twice"),
            ));
        }
        if u.backup && strategy == Strategy::IpHash {
            return Err(cx.err(
                key("backup"),
                uspan,
                "ip_hash cannot have backup upstreams (Nginx refuses this too): remove `backup` or pick another strategy",
            ));
        }
        let d = UpstreamConfig::new(addr);
        upstreams.push(UpstreamConfig {
            weight: optional(&u.weight, d.weight, |w| cx.weight(&key("weight"), w))?,
            max_fails: optional(&u.max_fails, d.max_fails, |v| {
                Ok(cx.count(&key("max_fails"), v, 0)?.min(u32::MAX as u64) as u32)
            })?,
            fail_timeout: optional(&u.fail_timeout, d.fail_timeout, |v| {
                cx.duration(&key("fail_timeout"), v)
            })?,
            max_conns: optional(&u.max_conns, max_conns.unwrap_or(d.max_conns), |v| {
                Ok(cx.count(&key("max_conns"), v, 0)?.min(u32::MAX as u64) as u32)
            })?,
            backup: u.backup,
            down: u.down,
            internal: optional(&u.internal, None, |v| {
                Ok(Some(cx.socket_addr(&key("internal"), v)?))
            })?,
            name,
            ..d
        });
    }
    Ok(upstreams)
}

/// An upstream's `addr`: an address, or a host name looked up in
/// `hosts_file` first, then by the system's resolver; with `resolve`
/// (which needs a name), the name too, to be looked up again.
fn upstream_addr(
    cx: &Cx,
    key: &dyn Fn(&str) -> String,
    u: &UpstreamFile,
    hosts_file: Option<&std::path::Path>,
) -> Result<(std::net::SocketAddr, Option<UpstreamName>), ConfigError> {
    let written = u.addr.get_ref().trim();
    if let Ok(addr) = written.parse::<std::net::SocketAddr>() {
        if let Some(r) = &u.resolve {
            return Err(cx.err(
                key("resolve"),
                r.span(),
                format!("{written} is an address, not a host name: there is nothing to resolve"),
            ));
        }
        return Ok((addr, None));
    }
    let Some((host, port)) = crate::resolve::split_host_port(written) else {
        return Err(cx.err(
            key("addr"),
            u.addr.span(),
            format!("{written:?} is not an address like \"127.0.0.1:3001\": a port is required"),
        ));
    };
    let addr = crate::resolve::resolve(host, port, hosts_file).map_err(|e| {
        cx.err(
            key("addr"),
            u.addr.span(),
            format!("{written:?} is not an address like \"127.0.0.1:3001\": {e}"),
        )
    })?;
    let name = optional(&u.resolve, None, |v| {
        Ok(Some(UpstreamName {
            host: host.to_string(),
            port,
            every: cx.duration(&key("resolve"), v)?,
        }))
    })?;
    Ok((addr, name))
}

/// The active health check: `None` without `health_check`, and then any
/// other `health_*` key is refused, as it would do nothing.
fn health_check(cx: &Cx, b: &BalancerFile) -> Result<Option<HealthCheck>, ConfigError> {
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
            return Err(cx.err(
                key,
                span,
                "has no effect without `health_check` (the path to ask, e.g. \"/healthz\")",
            ));
        }
        return Ok(None);
    };
    let p = path.get_ref().trim();
    if !p.starts_with('/') || p.len() > 1024 || !p.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(cx.err(
            "balancer.health_check",
            path.span(),
            format!("{p:?} is not a path like \"/healthz\""),
        ));
    }
    let d = HealthCheck::new(p.to_string());
    Ok(Some(HealthCheck {
        interval: optional(&b.health_interval, d.interval, |v| {
            cx.duration("balancer.health_interval", v)
        })?,
        timeout: optional(&b.health_timeout, d.timeout, |v| {
            cx.duration("balancer.health_timeout", v)
        })?,
        fails: optional(&b.health_fails, d.fails, |v| {
            Ok(cx.count("balancer.health_fails", v, 1)?.min(1000) as u32)
        })?,
        passes: optional(&b.health_passes, d.passes, |v| {
            Ok(cx.count("balancer.health_passes", v, 1)?.min(1000) as u32)
        })?,
        ..d
    }))
}

/// Largest request head the balancer can be told to take: hyper's path
/// reads at most 96 KiB of head, and answers 431 beyond it itself.
const MOST_HEAD: i64 = 64 * 1024;

/// `max_header_line` (1 KiB to 64 KiB) and `max_head` (from
/// `max_header_line` to 64 KiB).
fn head_limits(
    cx: &Cx,
    b: &BalancerFile,
    d: &BalancerConfig,
) -> Result<(usize, usize), ConfigError> {
    let in_range = |key: &str, v: &Spanned<i64>, min: i64| {
        let n = *v.get_ref();
        if (min..=MOST_HEAD).contains(&n) {
            Ok(n as usize)
        } else {
            Err(cx.err(
                key,
                v.span(),
                format!("must be a number of bytes from {min} to {MOST_HEAD}, not {n}"),
            ))
        }
    };
    let line = optional(&b.max_header_line, d.max_header_line, |v| {
        in_range("balancer.max_header_line", v, 1024)
    })?;
    let head = optional(&b.max_head, d.max_head.max(line), |v| {
        in_range("balancer.max_head", v, line as i64)
    })?;
    Ok((line, head))
}
