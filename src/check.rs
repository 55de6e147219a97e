//! `spike check`: what `nginx -t` and `haproxy -c` are to their files. An
//! operator about to start (or reload) a sale learns, without starting
//! anything or writing anywhere, whether the file is valid, whether Redis
//! answers, whether it keeps what it acknowledges, and whether the file's
//! `[sale]` is the sale the store holds.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::node::store::{StoreError, Stores};
use crate::redis_client::redacted;

/// Runs every check, printing one line each on stderr; exit 0 when all
/// pass, 1 otherwise.
pub fn run(config_path: &Path) -> anyhow::Result<ExitCode> {
    let file = config_path.display();
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spike: {e}");
            eprintln!("spike: configuration file {file} test failed");
            return Ok(ExitCode::FAILURE);
        }
    };
    eprintln!("spike: the configuration file {file} syntax is ok");
    for warning in &config.warnings {
        eprintln!("spike: warning: {warning}");
    }
    let passed = match (config.sales.as_slice(), config.redis.as_ref()) {
        ([], _) => true,
        (sales, Some(redis)) => {
            let url = redacted(&redis.url);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(check_redis(sales, redis, &url))
        }
        (_, None) => {
            eprintln!(
                "spike: no [redis]: the embedded store, inside the `spike up` process (nothing to reach; it ends with the process)"
            );
            true
        }
    };
    if passed {
        eprintln!("spike: configuration file {file} test is successful");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("spike: configuration file {file} test failed");
        Ok(ExitCode::FAILURE)
    }
}

/// Sales of a file of several listed one line each; past this many only
/// those to act on are, and a count of the rest.
const LISTED: usize = 20;

/// Redis answers, every sale of the file is compared with the one the
/// store holds (one connection for all), and Redis keeps what it
/// acknowledges: asked once of one server, once of each Cluster primary
/// that holds a sale of the file (each keeps its own).
async fn check_redis(
    sales: &[crate::config::SaleConfig],
    redis: &crate::config::RedisConfig,
    url: &str,
) -> bool {
    // An unreachable Redis's error names the URL and its line already.
    let say = |e: &StoreError| match e {
        StoreError::Unreachable { .. } => eprintln!("spike: {e}"),
        _ => eprintln!("spike: redis at {url}: {e}"),
    };
    let stores = match Stores::open(sales, Some(redis)).await {
        Ok(s) => s,
        Err(e) => {
            say(&e);
            return false;
        }
    };
    let (mut stored, mut unstarted, mut answered) = (0usize, 0usize, false);
    // One store per server to ask of durability (`None`: the one server).
    let mut durability_stores: Vec<(Option<String>, _)> = Vec::new();
    for sale in sales {
        let Some(store) = stores.get(&sale.event).await else {
            continue;
        };
        let snap = match store.snapshot().await {
            Ok(s) => s,
            Err(e) => {
                say(&e);
                return false;
            }
        };
        if !answered {
            eprintln!("spike: redis at {url} answers");
            answered = true;
        }
        let listed = sales.len() <= LISTED;
        if snap.initialised {
            stored += 1;
            if listed {
                eprintln!(
                    "spike: the sale {} is stored: {} tickets, {} sold, at most {} per buyer (epoch {})",
                    snap.event, snap.total, snap.sold, snap.per_user_limit, snap.epoch
                );
            }
            if let Some(differs) = crate::stock::sale_differs(sale, &snap) {
                eprintln!("spike: warning: {differs}");
            }
        } else {
            unstarted += 1;
            if listed || unstarted <= LISTED {
                let how = if sales.len() > 1 {
                    format!("`spike stock init --event {}`", sale.event)
                } else {
                    "`spike stock init`".to_string()
                };
                eprintln!(
                    "spike: the sale {} is not initialised: {how} starts it",
                    sale.event
                );
            }
        }
        let primary = store.primary();
        if !durability_stores.iter().any(|(p, _)| *p == primary) {
            durability_stores.push((primary, store));
        }
    }
    if sales.len() > 1 {
        eprintln!(
            "spike: {} sales: {stored} stored, {unstarted} not initialised",
            sales.len()
        );
    }
    let mut durable = true;
    for (primary, store) in durability_stores {
        let at = primary.map_or_else(String::new, |p| format!("redis primary {p}: "));
        durable &= match store.durability().await {
            Ok(Some(d)) => {
                let problems = d.problems();
                for problem in &problems {
                    eprintln!("spike: {at}{problem}");
                }
                if problems.is_empty() {
                    eprintln!(
                        "spike: {at}redis keeps what it acknowledges (append-only file, no eviction of the sale's keys)"
                    );
                }
                problems.is_empty()
            }
            Ok(None) => true,
            Err(e) => {
                eprintln!("spike: reading redis's durability at {url}: {at}{e}");
                false
            }
        };
    }
    durable
}
