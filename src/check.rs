//! `spike check`: what `nginx -t` and `haproxy -c` are to their files. An
//! operator about to start (or reload) a sale learns, without starting
//! anything or writing anywhere, whether the file is valid, whether Redis
//! answers, whether it keeps what it acknowledges, and whether the file's
//! `[sale]` is the sale the store holds.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::node::store::{Store, StoreError};
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
    let passed = match (config.sale(), config.redis.as_ref()) {
        (Some(sale), Some(redis)) => {
            let url = redacted(&redis.url);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                // An unreachable Redis's error names the URL and its line
                // already.
                let say = |e: &StoreError| match e {
                    StoreError::Unreachable { .. } => eprintln!("spike: {e}"),
                    _ => eprintln!("spike: redis at {url}: {e}"),
                };
                let store = match Store::open(sale, Some(redis)).await {
                    Ok(s) => s,
                    Err(e) => {
                        say(&e);
                        return false;
                    }
                };
                let snap = match store.snapshot().await {
                    Ok(s) => s,
                    Err(e) => {
                        say(&e);
                        return false;
                    }
                };
                eprintln!("spike: redis at {url} answers");
                if snap.initialised {
                    eprintln!(
                        "spike: the sale {} is stored: {} tickets, {} sold, at most {} per buyer (epoch {})",
                        snap.event, snap.total, snap.sold, snap.per_user_limit, snap.epoch
                    );
                    if let Some(differs) = crate::stock::sale_differs(sale, &snap) {
                        eprintln!("spike: warning: {differs}");
                    }
                } else {
                    eprintln!(
                        "spike: the sale {} is not initialised: `spike stock init` starts it",
                        sale.event
                    );
                }
                match store.durability().await {
                    Ok(Some(d)) => {
                        let problems = d.problems();
                        for problem in &problems {
                            eprintln!("spike: {problem}");
                        }
                        if problems.is_empty() {
                            eprintln!("spike: redis keeps what it acknowledges (append-only file, no eviction of the sale's keys)");
                        }
                        problems.is_empty()
                    }
                    Ok(None) => true,
                    Err(e) => {
                        eprintln!("spike: reading redis's durability at {url}: {e}");
                        false
                    }
                }
            })
        }
        (Some(_), None) => {
            eprintln!(
                "spike: no [redis]: the embedded store, inside the `spike up` process (nothing to reach; it ends with the process)"
            );
            true
        }
        (None, _) => true,
    };
    if passed {
        eprintln!("spike: configuration file {file} test is successful");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("spike: configuration file {file} test failed");
        Ok(ExitCode::FAILURE)
    }
}
