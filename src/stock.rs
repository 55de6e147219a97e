//! `spike stock`: write a sale's total, show it, and audit its invariants.
//! These talk to Redis through the same scripts the nodes use, so what they
//! report is exactly what the nodes see.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::{Config, SaleConfig};
use crate::node::store::{Audit, Control, ControlAnswer, Snapshot, Store, StoreError};

/// Which sales of the file a `spike stock` command is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which<'a> {
    /// The sale of `--event`, or without it the file's only one (with
    /// several, an error naming them).
    Named(Option<&'a str>),
    /// Every sale of the file, one after another (`--all`).
    All,
}

/// Runs `f` on each sale `which` names, each with its store, over one
/// connection to Redis; the exit code is the first failure's, else
/// success (every sale is still run, so `--all` reports them all).
fn with_store(
    config_path: &Path,
    which: Which<'_>,
    mut f: impl AsyncFnMut(&Config, &SaleConfig, Store) -> anyhow::Result<ExitCode>,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let sales: Vec<SaleConfig> = match which {
        Which::Named(event) => vec![config.pick_sale(event)?.clone()],
        Which::All if config.sales.is_empty() => vec![config.require_sale()?.clone()],
        Which::All => config.sales.clone(),
    };
    let Some(redis) = config.redis.clone() else {
        anyhow::bail!(
            "{}: no [redis] section: the embedded store lives inside the running `spike up` process; read it at a node's GET /sale",
            config.path.display()
        );
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let conn = crate::node::store::RedisConn::connect(&redis).await?;
        let mut code = ExitCode::SUCCESS;
        let mut failed = 0;
        for sale in &sales {
            let store = Store::Redis(std::sync::Arc::new(
                crate::node::store::RedisStore::on(&conn, sale).await,
            ));
            match f(&config, sale, store).await {
                Ok(this) => {
                    if this != ExitCode::SUCCESS && code == ExitCode::SUCCESS {
                        code = this;
                    }
                }
                // One sale alone: its error is the command's. Of several
                // (`--all`), it is said and the others still run; the
                // command fails at the end.
                Err(e) if sales.len() == 1 => {
                    return Err(e.context(format!("the sale {}", sale.event)));
                }
                Err(e) => {
                    eprintln!("spike stock: the sale {}: {e:#}", sale.event);
                    failed += 1;
                }
            }
        }
        if failed > 0 {
            anyhow::bail!("{failed} of {} sales failed (each said above)", sales.len());
        }
        Ok(code)
    })
}

/// Why a sale may not start on a store: the one gate of every way a sale
/// starts (`stock init`, `spike up`), so that neither can start a sale on
/// a Redis that `stock init` would refuse.
#[derive(Debug, thiserror::Error)]
pub enum StartRefused {
    /// The store may forget answered orders, and the operator did not
    /// allow it.
    #[error(
        "refusing to start the sale {event} on a Redis that may lose answered orders; fix the above, or pass --allow-volatile for a throwaway test"
    )]
    Volatile {
        /// The sale.
        event: String,
    },
    /// Redis's durability could not be read.
    #[error("reading Redis's durability: {0}")]
    Store(#[from] StoreError),
}

/// The durability gate before a new sale: every problem that lets the
/// store forget an answered order, printed on stderr (`spike: PROBLEM`,
/// as `stock init` always has), then a refusal unless `allow_volatile`.
/// The embedded store has nothing to check (it ends with its process, and
/// says so elsewhere).
pub async fn start_gate(
    store: &Store,
    event: &str,
    allow_volatile: bool,
) -> Result<(), StartRefused> {
    let problems = store
        .durability()
        .await?
        .map(|d| d.problems())
        .unwrap_or_default();
    for problem in &problems {
        eprintln!("spike: {problem}");
    }
    if problems.is_empty() {
        return Ok(());
    }
    if !allow_volatile {
        return Err(StartRefused::Volatile {
            event: event.to_string(),
        });
    }
    eprintln!("spike: --allow-volatile: starting the sale anyway; answered orders may be lost");
    Ok(())
}

/// How the file's `[sale]` differs from the sale the store holds, as one
/// sentence (`None` when they agree). The stored sale is the one in force
/// (`stock init` wrote it, and every node enforces it), so a file edited
/// afterwards changes nothing until a new sale is started.
pub fn sale_differs(file: &SaleConfig, stored: &Snapshot) -> Option<String> {
    let file_window = file.pay_within.map_or(0, |d| d.as_millis() as u64);
    let mut diffs = Vec::new();
    if file.total != stored.total {
        // `stock add` grows a running sale on purpose.
        let added = if stored.controls > 0 && stored.total > file.total {
            ", grown by `spike stock add`"
        } else {
            ""
        };
        diffs.push(format!(
            "total {} (stored: {}{added})",
            file.total, stored.total
        ));
    }
    if file.per_user_limit != stored.per_user_limit {
        diffs.push(format!(
            "per_user_limit {} (stored: {})",
            file.per_user_limit, stored.per_user_limit
        ));
    }
    if file_window != stored.pay_within_ms {
        let show = |ms: u64| match ms {
            0 => "none".to_string(),
            ms => humantime::format_duration(std::time::Duration::from_millis(ms)).to_string(),
        };
        diffs.push(format!(
            "pay_within {} (stored: {})",
            show(file_window),
            show(stored.pay_within_ms)
        ));
    }
    // Only Redis stores `stream` (the embedded store has no stream), and
    // only a sale of final purchases is changed by it.
    if stored.events.is_some()
        && file_window == 0
        && stored.pay_within_ms == 0
        && file.stream != stored.stream
    {
        diffs.push(format!(
            "stream = {} (stored: {})",
            file.stream, stored.stream
        ));
    }
    // The moments: a closing moved by `stock close` is the operator's, not
    // a difference to report.
    let moment = |ms: u64| match ms {
        0 => "none".to_string(),
        ms => crate::protocol::rfc3339_ms(ms),
    };
    let file_opens = file.opens_at_ms.unwrap_or(0);
    if stored.initialised && file_opens != stored.opens_at_ms {
        diffs.push(format!(
            "opens_at {} (stored: {})",
            moment(file_opens),
            moment(stored.opens_at_ms)
        ));
    }
    let file_closes = file.closes_at_ms.unwrap_or(0);
    if stored.initialised && !stored.closed && file_closes != stored.closes_at_ms {
        diffs.push(format!(
            "closes_at {} (stored: {})",
            moment(file_closes),
            moment(stored.closes_at_ms)
        ));
    }
    (!diffs.is_empty()).then(|| {
        format!(
            "the file's [sale] says {}, but [sale] is the store's: the stored sale {} is in force; to change it use `spike stock init --force` (a new sale: the old one's orders are wiped)",
            diffs.join(", "),
            stored.event
        )
    })
}

/// `spike stock init`: refuses to touch a started sale unless `force`, and
/// a Redis that may forget answered orders unless `allow_volatile`.
pub fn init(
    config_path: &Path,
    which: Which<'_>,
    force: bool,
    allow_volatile: bool,
    trust_client_buyer_ids: bool,
) -> anyhow::Result<ExitCode> {
    with_store(config_path, which, async |config, sale, store| {
        // Said once, here; with the flag the operator has read it (every
        // node still logs it, and /healthz shows "buyers": "unverified").
        if let Some(why) = unverified_buyers(config)
            && !trust_client_buyer_ids
        {
            eprintln!("spike: {why}; pass --trust-client-buyer-ids to start it anyway");
            return Ok(ExitCode::FAILURE);
        }
        match start_gate(&store, &sale.event, allow_volatile).await {
            Ok(()) => {}
            Err(e @ StartRefused::Volatile { .. }) => {
                eprintln!("spike: {e}");
                return Ok(ExitCode::FAILURE);
            }
            Err(e) => return Err(anyhow::Error::new(e).context("stock init")),
        }
        if let Some(epoch) = store.init(force).await.context("stock init")? {
            println!(
                "{}",
                serde_json::json!({
                    "event": sale.event,
                    "total": sale.total,
                    "per_user_limit": sale.per_user_limit,
                    "pay_within": sale.pay_within.map(|d| humantime::format_duration(d).to_string()),
                    "stream": sale.stream || sale.pay_within.is_some(),
                    "epoch": epoch,
                    "initialised": true,
                })
            );
            Ok(ExitCode::SUCCESS)
        } else {
            let snap = store.snapshot().await?;
            eprintln!(
                "spike: the sale {} has started ({} of {} sold, {} orders); use --force to wipe it and start again",
                sale.event, snap.sold, snap.total, snap.orders
            );
            Ok(ExitCode::FAILURE)
        }
    })
}

/// Why the sale's per-user limit holds only for honest clients, when it
/// does: a limit with no `[auth]` counts buyer ids as the client states
/// them (`?user=`, `X-User-Id`), and a bot that varies them buys without
/// limit. `None` for an anonymous sale or one with `[auth]`. The gate is
/// `stock init` (as `--allow-volatile` is for a Redis that forgets);
/// `spike up` and every node warn with the same words.
pub fn unverified_buyers(config: &crate::config::Config) -> Option<String> {
    let sale = config.sales.iter().find(|s| s.per_user_limit > 0)?;
    (sale.per_user_limit > 0 && config.auth.is_none()).then(|| {
        format!(
            "{}: the sale {} limits each buyer to {} but has no [auth]: buyers are who the client says they are (?user=, X-User-Id), so anyone can buy as anyone and a bot that changes its id is not limited",
            config.path.display(),
            sale.event,
            sale.per_user_limit
        )
    })
}

/// A warning when `[auth]` still has the committed `config.toml`'s
/// development key (kid `dev`): it is public, so anyone can sign a token
/// for any buyer with it.
pub fn development_keys(config: &crate::config::Config) -> Option<String> {
    let auth = config.auth.as_ref()?;
    auth.buyer_keys.iter().any(|k| k.kid == "dev").then(|| {
        format!(
            "{}: [auth] buyer_keys has the development key `dev` of the committed config.toml, which is public: anyone can sign a token for any buyer with it; put your own key(s) there before a real sale",
            config.path.display()
        )
    })
}

/// `spike stock pause|resume|close|add N`: the change, then the sale as
/// it is now (one JSON object); a change that makes no sense (adding to a
/// closed sale, resuming one that is not paused) is refused with why, and
/// exits non-zero.
pub fn control(config_path: &Path, which: Which<'_>, change: Control) -> anyhow::Result<ExitCode> {
    if let Control::Add(n) = change
        && !(1..=crate::config::MAX_COUNT).contains(&n)
    {
        anyhow::bail!(
            "stock add: add from 1 to {} tickets, not {n}",
            crate::config::MAX_COUNT
        );
    }
    with_store(config_path, which, async |config, _, store| {
        let what = match change {
            Control::Pause => "stock pause",
            Control::Resume => "stock resume",
            Control::Close => "stock close",
            Control::Add(_) => "stock add",
        };
        match store.control(change).await {
            Ok(ControlAnswer::Done {
                total,
                paused,
                closes_at_ms,
            }) => {
                // Said first, whatever comes next: the change is made, and
                // must not be made twice by an operator who saw an error.
                eprintln!(
                    "spike: {what}: done: total {total}, paused {paused}, closes at {}",
                    if closes_at_ms == 0 {
                        "never".to_string()
                    } else {
                        crate::protocol::rfc3339_ms(closes_at_ms)
                    }
                );
                match store.snapshot().await {
                    Ok(snap) => println!("{}", serde_json::to_string(&snap)?),
                    Err(e) => eprintln!(
                        "spike: {what}: done, but the sale could not be read after it: {e}"
                    ),
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e @ StoreError::NotReplicated { .. }) => anyhow::bail!(
                "{what}: made on the primary, but not acknowledged by [redis] replicas in time ({e}): a failover now could undo it; read `spike stock show` and send it again if it is gone"
            ),
            Err(e @ (StoreError::Timeout | StoreError::Unavailable(_))) => anyhow::bail!(
                "{what}: {e}: the change may have been made; read `spike stock show` before sending it again"
            ),
            Ok(ControlAnswer::Refused(why)) => {
                eprintln!(
                    "spike: {what}: refused for {}: {why}",
                    config.path.display()
                );
                Ok(ExitCode::FAILURE)
            }
            Err(StoreError::NoSale) => anyhow::bail!(
                "{what}: {}: the sale is not initialised: run spike stock init",
                config.path.display()
            ),
            Err(e) => Err(e).context(what),
        }
    })
}

/// `spike stock show`: one JSON object.
pub fn show(config_path: &Path, which: Which<'_>) -> anyhow::Result<ExitCode> {
    with_store(config_path, which, async |_, _, store| {
        let snap = store.snapshot().await.context("stock show")?;
        println!("{}", serde_json::to_string(&snap)?);
        Ok(ExitCode::SUCCESS)
    })
}

/// `spike stock audit`: prints what it found; non-zero exit when anything is off.
pub fn audit(config_path: &Path, which: Which<'_>) -> anyhow::Result<ExitCode> {
    with_store(config_path, which, async |_, _, store| {
        // One pass over the stream and the buyers, counted inside Redis;
        // the stream up to the snapshot's moment, the buyers only when the
        // sale stood still while they were read (see `Store::audit`).
        let Audit {
            snapshot: snap,
            buyers: tally,
            events,
        } = store.audit().await.context("stock audit")?;
        let problems = snap.audit(tally, events);
        let buyers = tally.unwrap_or_default();
        // Reported beside the sale's invariants, not counted among them:
        // the sale can be exact today on a Redis that would forget it
        // tomorrow, and the operator should see both.
        let durability = store.durability().await.context("stock audit")?;
        let durability_problems = durability
            .as_ref()
            .map(|d| d.problems())
            .unwrap_or_default();
        println!(
            "{}",
            serde_json::json!({
                "event": snap.event,
                "total": snap.total,
                "sold": snap.sold,
                "orders": snap.orders,
                "buyers": snap.buyers,
                "buyers_checked": tally.is_some(),
                "most_by_one_buyer": if tally.is_some() { buyers.most_by_one_buyer } else { snap.most_by_one_buyer },
                "tickets_held": if tally.is_some() { buyers.tickets_held } else { snap.tickets_held },
                "leased": snap.leased,
                "keys": snap.keys,
                "reserved": snap.reserved,
                "paid": snap.paid,
                "released": snap.released,
                "due": snap.due,
                "events_checked": events.is_some(),
                "events": events,
                "epoch": snap.epoch,
                "per_user_limit": snap.per_user_limit,
                "ok": problems.is_empty(),
                "problems": problems,
                "durability": durability,
                "durability_problems": durability_problems,
            })
        );
        Ok(if problems.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}
