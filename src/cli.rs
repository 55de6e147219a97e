//! The command line, as clap types. Parsing only: each command's work lives in
//! its own module.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// What `spike --help` adds under the commands: what an operator needs
/// before running any of them, said once for all.
const MAIN_HELP: &str = "\
Configuration: one config.toml (--config FILE picks another); every error
names the file, the key and the line.

Signals:
  SIGTERM, SIGINT  stop gracefully: stop accepting, let requests in flight
                   finish for [server] grace_period, then exit
  SIGHUP           reload the balancer's config (`balancer`, `up`); saving
                   the file does the same

Admin endpoints of the balancer ([balancer] admin, 127.0.0.1:8001 by
default): GET / (a live status page for a browser), GET /healthz, GET /status
(JSON), GET /sale (a node's /sale), GET /metrics (Prometheus).

Exit codes: 0 success; 1 an error (config, bind, store), printed on stderr
as one line; `spike stock audit` exits 1 when the sale breaks an invariant;
`spike stock init` and `spike up` exit 1 on a Redis that may forget answered
orders (without --allow-volatile), `stock init` also on a started sale
(without --force); `spike check` exits 1 when any check fails.

Logs go to stderr. RUST_LOG sets what is logged (default info, e.g.
RUST_LOG=warn or RUST_LOG=spike=debug); colour only on a terminal, and never
when NO_COLOR is set.";

/// What `spike balancer --help` adds.
const BALANCER_HELP: &str = "\
Reload: SIGHUP, or saving the file (polled every 500 ms), reads it again; a
valid file goes in force for the next request, an invalid one is refused and
the old config stays (GET /status shows last_reload and why). A file that
validates to the config in force is no new version. listen and admin need a
restart.

Admin endpoints on [balancer] admin: GET / (the live status page), GET
/healthz, GET /status (strategy, version, last_reload, rates and p99 of the
last 10 s, edge, sale, upstreams by node name), GET /sale
(a node's /sale, when the file has [sale]), GET /metrics (Prometheus text,
answers counted by status code).

With [sale] in the file, only the nodes' public API (/buy/ticket, /orders/...)
and [balancer] pass_paths are forwarded; any other path is a 404 here.

SIGTERM/SIGINT: stop accepting, let requests in flight finish for [server]
grace_period, then exit 0. Exit code 1 when the file is invalid or an
address cannot be bound.";

/// What `spike node --help` adds.
const NODE_HELP: &str = "\
Endpoints on the node's listen address: POST|GET /buy/ticket?user=ID,
with a payment window GET /orders/ID?user=ID, POST
/orders/ID/pay?user=ID[&ref=R] and POST /orders/ID/cancel?user=ID; GET
/healthz (503 with the reason when the store is unreachable, the sale not
initialised, or too few Redis replicas connected), GET /stats, GET /sale,
GET /sold_out, GET /holders, GET /metrics (Prometheus text). With
[[node]] internal = \"ADDR\", those last six (the internal routes) are served
on ADDR only, and are 404 on the listen address.

SIGTERM/SIGINT: stop accepting, let purchases in flight finish for [server]
grace_period, then exit 0. Exit code 1 when the file is invalid, --name is
not one of its [[node]]s, or the address cannot be bound.";

/// What `spike up --help` adds.
const UP_HELP: &str = "\
Runs the balancer and one node per [[node]] in this process, with the
embedded store unless the file has [redis].

SIGHUP, or saving the file, reloads the balancer's config (see `spike
balancer --help`) and follows the [[node]] entries: an added node is started
before the balancer routes to it, a removed one is taken out of the balancer
and stopped once its requests have finished; a node that cannot listen
refuses the whole file. The admin endpoints (/ the status page, /healthz,
/status, /sale, /metrics) are on [balancer] admin. SIGTERM/SIGINT stops everything gracefully within [server]
grace_period and exits 0. Exit code 1 on an error.

With [redis], a sale not yet in Redis is started as `spike stock init`
starts it, and refused on a Redis that may forget answered orders unless
--allow-volatile; a sale already there is joined as it is: [sale] is the
store's, and the banner shows the stored figures (change them with `spike
stock init --force`, which starts a new sale).";

/// What `spike check --help` adds.
const CHECK_HELP: &str = "\
Prints one line per check on stderr: the file (every error names the file,
the key and the line), Redis reached (its URL), the stored sale (or that
none is initialised), Redis's durability (the problems `stock init`
refuses), and whether the file's [sale] differs from the stored one (a
warning: [sale] is the store's). Writes nothing anywhere.

Exit codes: 0 when the file is valid and, with [redis], Redis answers and
keeps what it acknowledges; 1 otherwise.";

/// What `spike stock audit --help` adds.
const AUDIT_HELP: &str = "\
Checks, each a sentence in \"problems\" when broken:
  the sale is initialised; sold <= total; sold + leased <= total;
  sold + released == orders; orders == the order sequence; keys recorded
  <= orders; with a payment window: sold == reserved + paid and the
  deadlines set holds every reservation; without one: nothing reserved,
  paid or released; with a per_user_limit: no buyer over it, and the
  tickets buyers hold == sold; a pass over the buyers agrees with the
  counters (when the sale stood still while it ran); with a payment
  window or [sale] stream = true, a pass over this sale's part of the
  order stream (since its last reset) agrees with the orders, payments
  and releases (when nothing was trimmed).
It also prints what Redis says of its durability (durability_problems).

Exit codes: 0 when every check holds; 1 when any is broken (the JSON it
prints lists the problems) or the store cannot be read.";

/// spike: sell a few thousand tickets to a million buyers without selling one twice.
#[derive(Debug, Parser)]
#[command(name = "spike", version, about, long_about = None, after_help = MAIN_HELP)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The config file every command reads.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Path to config.toml.
    #[arg(long, short = 'c', default_value = "config.toml")]
    pub config: PathBuf,
}

/// Which sale of the file a `spike stock` command is about.
#[derive(Debug, Args)]
pub struct EventArg {
    /// The sale's event (default: the file's only sale; a file of several
    /// sales must name one).
    #[arg(long)]
    pub event: Option<String>,
}

/// Which sales `spike stock init|show|audit` are about: one, or `--all`.
#[derive(Debug, Args)]
pub struct EventsArg {
    /// The sale's event (default: the file's only sale; a file of several
    /// sales must name one, or pass --all).
    #[arg(long, conflicts_with = "all")]
    pub event: Option<String>,
    /// Every sale of the file, one after another (one JSON line each);
    /// exits non-zero if any fails.
    #[arg(long)]
    pub all: bool,
}

impl EventsArg {
    /// What the library takes.
    pub fn which(&self) -> crate::stock::Which<'_> {
        if self.all {
            crate::stock::Which::All
        } else {
            crate::stock::Which::Named(self.event.as_deref())
        }
    }
}

impl EventArg {
    /// What the library takes.
    pub fn which(&self) -> crate::stock::Which<'_> {
        crate::stock::Which::Named(self.event.as_deref())
    }
}

/// spike's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one ticket-selling node from the file's [[node]] entries.
    #[command(after_help = NODE_HELP)]
    Node {
        #[command(flatten)]
        config: ConfigArg,
        /// The [[node]] name to run.
        #[arg(long)]
        name: String,
    },
    /// Run the HTTP load balancer from the file's [balancer] section.
    #[command(after_help = BALANCER_HELP)]
    Balancer {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run a whole sale on this machine: the balancer and every [[node]].
    #[command(after_help = UP_HELP)]
    Up {
        #[command(flatten)]
        config: ConfigArg,
        /// Start a new sale even on a Redis that may forget answered
        /// orders (as `stock init --allow-volatile`): a throwaway test only.
        #[arg(long)]
        allow_volatile: bool,
    },
    /// Check the file without starting anything (as `nginx -t`): validate
    /// it, reach Redis when it has [redis], report its durability and the
    /// stored sale; exit 0 when all is well, 1 otherwise.
    #[command(after_help = CHECK_HELP)]
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Manage the sale's stock in Redis.
    Stock {
        #[command(subcommand)]
        action: StockAction,
    },
    /// Follow the sale's orders (Redis only).
    Orders {
        #[command(subcommand)]
        action: OrdersAction,
    },
    /// Print a buyer token (a JWT) for --buyer, signed with the first
    /// hs256 key of [auth] buyer_keys: for tests, demos and load tests.
    #[command(after_help = TOKEN_HELP)]
    Token {
        #[command(flatten)]
        config: ConfigArg,
        /// The sale the token buys in (its `aud`; default: the file's only
        /// sale). Several (`--event a --event b`, or `--event a,b`): one
        /// token for each of them, its `aud` their list.
        #[arg(long = "event", value_delimiter = ',')]
        events: Vec<String>,
        /// The buyer id the token names (its `sub`).
        #[arg(long)]
        buyer: String,
        /// How long the token is valid ("1h", "15m").
        #[arg(long, default_value = "1h", value_parser = duration)]
        ttl: std::time::Duration,
        /// Valid only from this long from now on (its `nbf`).
        #[arg(long, value_parser = duration)]
        not_before: Option<std::time::Duration>,
        /// Mint tokens for N buyers, `BUYER-1` to `BUYER-N`, one
        /// `BUYER-i TOKEN` line each: a crowd for a load test.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print the payment service's Spike-Signature header that pays
    /// --order, signed now with [auth] payment_key (valid for 5 minutes).
    PaySign {
        #[command(flatten)]
        config: ConfigArg,
        /// The order to pay.
        #[arg(long)]
        order: String,
        /// The payment's reference, sent as ?ref= and kept with the order.
        #[arg(long = "ref")]
        reference: Option<String>,
    },
    /// Print the nginx.conf equivalent to the [balancer] section.
    NginxConf {
        #[command(flatten)]
        config: ConfigArg,
        /// Listen on this address instead of [balancer] listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// worker_processes (default: one per CPU, as spike's runtime threads).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        workers: Option<u16>,
    },
    /// Print the haproxy.cfg nearest to the [balancer] section (comments
    /// mark what HAProxy cannot express exactly).
    HaproxyConf {
        #[command(flatten)]
        config: ConfigArg,
        /// Listen on this address instead of [balancer] listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// nbthread (default: one per CPU, as spike's runtime threads).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        threads: Option<u16>,
    },
}

/// What `spike orders tail --help` adds.
const TAIL_HELP: &str = "\
Events (the `type` field): reserved (a purchase with a payment window, with
pay_by), sold (a final purchase, with [sale] stream = true), paid (with
payment_ref when one was given), cancelled, expired, and reset (`spike stock
init --force`: epoch, old_epoch, and voided, the reservations of the old
sale that were still open and never will close; voided_orders lists them
when there are at most 100). Each line has the stream's `id`; a line may
come twice (a tail killed between printing and acknowledging, or a claim),
never not at all.

Exit codes: 1 when the sale was never initialised, when it writes no stream
(final purchases without [sale] stream = true), or when Redis cannot be
reached at start; 0 on SIGTERM/SIGINT. Once running, a Redis that goes away
is waited for.";

/// A humantime duration on the command line ("30s", "2m", "1h"); for
/// `--claim-after`, "0s" turns claiming off.
fn duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (a duration such as 30s)"))
}

/// What `spike token --help` adds.
const TOKEN_HELP: &str = "\
Send it as `Authorization: Bearer TOKEN` or as the cookie spike_token=TOKEN:
  curl -X POST -H \"Authorization: Bearer $(spike token --buyer alice)\" \\
       http://127.0.0.1:8000/buy/ticket
Its claims: sub = the buyer, aud = [sale] event, exp, and nbf with
--not-before. In production an identity provider issues the tokens, with a
key of its own listed in [auth] buyer_keys.";

/// What `spike orders` can do.
#[derive(Debug, Subcommand)]
pub enum OrdersAction {
    /// Print every order event of the sale's stream as a JSON line
    /// (reserved or sold, paid, cancelled, expired, reset), acknowledging
    /// what it printed: stopped and started again, it goes on where it
    /// stopped.
    #[command(after_help = TAIL_HELP)]
    Tail {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        sale: EventArg,
        /// The consumer group: tails of one group share the events, each
        /// group gets all of them.
        #[arg(long, default_value = "spike-orders")]
        group: String,
        /// This reader's name in the group (its unacknowledged events are
        /// its own to print again after a restart).
        #[arg(long, default_value = "tail")]
        consumer: String,
        /// Take over (and print) events another consumer of the group read
        /// but has not acknowledged for this long: that consumer died, or
        /// stalls. "0s": never.
        #[arg(long, default_value = "30s", value_parser = duration)]
        claim_after: std::time::Duration,
    },
}

/// What `spike stock` can do.
#[derive(Debug, Subcommand)]
pub enum StockAction {
    /// Write the sale's total into Redis (refuses to touch a started sale).
    Init {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        sales: EventsArg,
        /// Reset a started sale: total, sold count, buyers and orders.
        #[arg(long)]
        force: bool,
        /// Write the sale even to a Redis that may forget answered orders
        /// (no append-only file, or an eviction policy that may drop the
        /// sale's keys): for a throwaway test only.
        #[arg(long)]
        allow_volatile: bool,
        /// Start a sale with a per-user limit and no [auth]: the limit is
        /// then per buyer id as the client states it, which anyone can
        /// vary; for a sale among trusted clients only.
        #[arg(long)]
        trust_client_buyer_ids: bool,
    },
    /// Print the sale's state as one JSON object.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        sales: EventsArg,
    },
    /// Check the sale's invariants; exits non-zero when any is broken.
    #[command(after_help = AUDIT_HELP)]
    Audit {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        sales: EventsArg,
    },
    /// Stop selling now, until `stock resume` (every node within a
    /// second: the store refuses each purchase meanwhile).
    Pause {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        sale: EventArg,
    },
    /// Sell again after `stock pause`.
    Resume {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        sale: EventArg,
    },
    /// Close the sale for good, now (`stock init --force` starts another).
    Close {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        sale: EventArg,
    },
    /// Put N more tickets on sale in a running sale, without a reset (a
    /// staged release); a sold-out sale sells again.
    Add {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        sale: EventArg,
        /// Tickets to add.
        tickets: u64,
    },
}

/// An error and its causes on one line, each said once. Library errors
/// often put their source in their own message as well as expose it as the
/// source (`cannot read: No such file or directory`), so anyhow's `{:#}`
/// would print it twice.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Whether log lines may carry ANSI colour codes: only on a terminal (in a
/// file, a pipe or journald the codes are noise), and never when `NO_COLOR`
/// is set to anything but the empty string (<https://no-color.org>).
pub fn colour_logs(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour_logs(true, None));
        assert!(colour_logs(true, Some(OsStr::new(""))));
        assert!(!colour_logs(true, Some(OsStr::new("1"))));
        assert!(!colour_logs(false, None));
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let config = crate::config::ConfigError::Read {
            path: "x.toml".into(),
            source: io,
        };
        let e = anyhow::Error::new(config).context("starting");
        assert_eq!(error_line(&e), "starting: x.toml: cannot read: gone");
    }
}
