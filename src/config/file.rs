//! `config.toml` as written: serde structs that only read the file.
//!
//! Nothing here checks a value: [`super::validate`] does that once, into the
//! typed [`super::Config`]. Values are `Spanned` where a later check must
//! say which line they stand on, and every struct denies unknown keys, so a
//! typo is an error with a line rather than a setting silently ignored.
//! (The field order is the order serde lists in "expected one of" messages.)

use serde::Deserialize;
use toml::Spanned;

/// The whole file: every section optional here, because which ones a
/// command needs is the command's business (see [`super::Config::require_sale`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) sale: Option<Spanned<SaleSection>>,
    pub(super) redis: Option<Spanned<RedisFile>>,
    #[serde(default)]
    pub(super) node: Vec<Spanned<NodeFile>>,
    pub(super) balancer: Option<Spanned<BalancerFile>>,
    pub(super) server: Option<Spanned<ServerFile>>,
    pub(super) auth: Option<Spanned<AuthFile>>,
    pub(super) waiting_room: Option<Spanned<WaitingRoomFile>>,
}

/// `[waiting_room]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WaitingRoomFile {
    pub(super) admit: Spanned<String>,
    pub(super) pass_ttl: Option<Spanned<String>>,
    pub(super) prequeue_from: Option<Spanned<String>>,
}

/// `[auth]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuthFile {
    #[serde(default)]
    pub(super) buyer_keys: Vec<Spanned<String>>,
    pub(super) payment_key: Option<Spanned<String>>,
    pub(super) clock_skew: Option<Spanned<String>>,
}

/// `sale` as written: one `[sale]` table (today's files) or a list of
/// `[[sale]]` tables (several sales in one fleet). toml itself refuses a
/// file with both (the second header redefines `sale`).
#[derive(Debug)]
pub(super) enum SaleSection {
    /// `[sale]`: the fleet's one sale.
    One(Box<SaleFile>),
    /// `[[sale]]`, each entry with its own span.
    Many(Vec<Spanned<SaleFile>>),
}

impl<'de> Deserialize<'de> for SaleSection {
    /// A table is one sale, an array of tables a list: decided by what
    /// the file holds, with toml's own errors (and spans) inside either.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = SaleSection;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a [sale] table or a list of [[sale]] tables")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<SaleSection, A::Error> {
                SaleFile::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|s| SaleSection::One(Box::new(s)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<SaleSection, A::Error> {
                Vec::<Spanned<SaleFile>>::deserialize(serde::de::value::SeqAccessDeserializer::new(
                    seq,
                ))
                .map(SaleSection::Many)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// One sale as written (`[sale]`, or one `[[sale]]` entry).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SaleFile {
    pub(super) event: Spanned<String>,
    pub(super) total: Spanned<i64>,
    #[serde(default)]
    pub(super) per_user_limit: Option<Spanned<i64>>,
    pub(super) max_per_purchase: Option<Spanned<i64>>,
    /// Read so that old files still load; it no longer does anything.
    pub(super) buffer: Option<Spanned<i64>>,
    pub(super) lease: Option<Spanned<i64>>,
    pub(super) lease_ttl: Option<Spanned<String>>,
    pub(super) idle_after: Option<Spanned<String>>,
    pub(super) pay_within: Option<Spanned<String>>,
    pub(super) events_max: Option<Spanned<i64>>,
    pub(super) stream: Option<Spanned<bool>>,
    pub(super) opens_at: Option<Spanned<String>>,
    pub(super) closes_at: Option<Spanned<String>>,
}

/// `[redis]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RedisFile {
    pub(super) url: Spanned<String>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) pool_size: Option<Spanned<i64>>,
    pub(super) max_clock_offset: Option<Spanned<String>>,
    pub(super) replicas: Option<Spanned<i64>>,
    pub(super) tls_ca_file: Option<Spanned<String>>,
    pub(super) tls_cert_file: Option<Spanned<String>>,
    pub(super) tls_key_file: Option<Spanned<String>>,
}

/// One `[[node]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NodeFile {
    pub(super) name: Spanned<String>,
    pub(super) listen: Spanned<String>,
    pub(super) internal: Option<Spanned<String>>,
    pub(super) weight: Option<Spanned<i64>>,
    /// Read so that old files still load; it no longer does anything.
    pub(super) stock: Option<Spanned<i64>>,
    pub(super) threads: Option<Spanned<i64>>,
}

/// `[balancer]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BalancerFile {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) strategy: Option<Spanned<String>>,
    pub(super) admin: Option<Spanned<String>>,
    pub(super) tls_cert: Option<Spanned<String>>,
    pub(super) tls_key: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) tls_sni: Vec<Spanned<SniFile>>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) response_timeout: Option<Spanned<String>>,
    pub(super) keepalive: Option<Spanned<i64>>,
    pub(super) keepalive_timeout: Option<Spanned<String>>,
    pub(super) read_timeout: Option<Spanned<String>>,
    pub(super) send_timeout: Option<Spanned<String>>,
    pub(super) drain_delay: Option<Spanned<String>>,
    pub(super) max_header_line: Option<Spanned<i64>>,
    pub(super) max_head: Option<Spanned<i64>>,
    pub(super) body_timeout: Option<Spanned<String>>,
    pub(super) max_body: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) underscores_in_headers: bool,
    pub(super) fast_path: Option<bool>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<Spanned<String>>,
    pub(super) proxy_protocol: Option<Spanned<bool>>,
    pub(super) ready_before_open: Option<bool>,
    pub(super) access_log: Option<Spanned<String>>,
    pub(super) access_log_format: Option<Spanned<String>>,
    pub(super) hosts_file: Option<Spanned<String>>,
    pub(super) tunnel_timeout: Option<Spanned<String>>,
    pub(super) sold_out_at_edge: Option<Spanned<bool>>,
    pub(super) batch_purchases: Option<bool>,
    #[serde(default)]
    pub(super) pass_paths: Vec<Spanned<String>>,
    pub(super) max_conns: Option<Spanned<i64>>,
    pub(super) queue: Option<Spanned<i64>>,
    pub(super) queue_timeout: Option<Spanned<String>>,
    pub(super) health_check: Option<Spanned<String>>,
    pub(super) health_interval: Option<Spanned<String>>,
    pub(super) health_timeout: Option<Spanned<String>>,
    pub(super) health_fails: Option<Spanned<i64>>,
    pub(super) health_passes: Option<Spanned<i64>>,
    pub(super) slow_start: Option<Spanned<String>>,
    pub(super) limit_rate: Option<Spanned<String>>,
    pub(super) limit_burst: Option<Spanned<i64>>,
    pub(super) limit_nodelay: Option<Spanned<bool>>,
    pub(super) limit_conns: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) upstream: Vec<Spanned<UpstreamFile>>,
}

/// One `[[balancer.tls_sni]]` as written: a certificate and the names it
/// is for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SniFile {
    pub(super) names: Spanned<Vec<Spanned<String>>>,
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
}

/// One `[[balancer.upstream]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamFile {
    pub(super) addr: Spanned<String>,
    pub(super) internal: Option<Spanned<String>>,
    pub(super) weight: Option<Spanned<i64>>,
    pub(super) max_fails: Option<Spanned<i64>>,
    pub(super) fail_timeout: Option<Spanned<String>>,
    pub(super) max_conns: Option<Spanned<i64>>,
    pub(super) resolve: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) backup: bool,
    #[serde(default)]
    pub(super) down: bool,
}

/// `[server]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServerFile {
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) header_read_timeout: Option<Spanned<String>>,
    pub(super) keepalive_timeout: Option<Spanned<String>>,
    pub(super) grace_period: Option<Spanned<String>>,
    pub(super) max_body: Option<Spanned<i64>>,
}
