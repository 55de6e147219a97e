//! The command line, as clap types. Parsing only: each command's work lives in
//! its own module.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// spike: sell a few thousand tickets to a million buyers without selling one twice.
#[derive(Debug, Parser)]
#[command(name = "spike", version, about, long_about = None)]
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

/// spike's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one ticket-selling node from the file's [[node]] entries.
    Node {
        #[command(flatten)]
        config: ConfigArg,
        /// The [[node]] name to run.
        #[arg(long)]
        name: String,
    },
    /// Run the HTTP load balancer from the file's [balancer] section.
    Balancer {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run a whole sale on this machine: the balancer and every [[node]].
    Up {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Manage the sale's stock in Redis.
    Stock {
        #[command(subcommand)]
        action: StockAction,
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
}

/// What `spike stock` can do.
#[derive(Debug, Subcommand)]
pub enum StockAction {
    /// Write the sale's total into Redis (refuses to touch a started sale).
    Init {
        #[command(flatten)]
        config: ConfigArg,
        /// Reset a started sale: total, sold count, buyers and orders.
        #[arg(long)]
        force: bool,
    },
    /// Print the sale's state as one JSON object.
    Show {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check the sale's invariants; exits non-zero when any is broken.
    Audit {
        #[command(flatten)]
        config: ConfigArg,
    },
}
