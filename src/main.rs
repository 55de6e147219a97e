//! The `spike` binary: parse the command line and hand over to the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use spike::cli::{Cli, Command, OrdersAction, StockAction};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `orders tail` says itself, in words, what Redis did; fred's own
    // warnings would repeat it as a Rust struct on the same stderr.
    let default_filter = match cli.command {
        Command::Orders { .. } => "info,fred=error",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(spike::cli::colour_logs(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .init();
    let result: anyhow::Result<ExitCode> = match cli.command {
        Command::Node { config, name } => spike::node::main(&config.config, &name),
        Command::Balancer { config } => spike::balancer::main(&config.config),
        Command::Up {
            config,
            allow_volatile,
        } => spike::up::main(&config.config, allow_volatile),
        Command::Check { config } => spike::check::run(&config.config),
        Command::Stock { action } => match action {
            StockAction::Init {
                config,
                sales,
                force,
                allow_volatile,
                trust_client_buyer_ids,
            } => spike::stock::init(
                &config.config,
                sales.which(),
                force,
                allow_volatile,
                trust_client_buyer_ids,
            ),
            StockAction::Show { config, sales } => {
                spike::stock::show(&config.config, sales.which())
            }
            StockAction::Audit { config, sales } => {
                spike::stock::audit(&config.config, sales.which())
            }
            StockAction::Pause { config, sale } => spike::stock::control(
                &config.config,
                sale.which(),
                spike::node::store::Control::Pause,
            ),
            StockAction::Resume { config, sale } => spike::stock::control(
                &config.config,
                sale.which(),
                spike::node::store::Control::Resume,
            ),
            StockAction::Close { config, sale } => spike::stock::control(
                &config.config,
                sale.which(),
                spike::node::store::Control::Close,
            ),
            StockAction::Add {
                config,
                sale,
                tickets,
            } => spike::stock::control(
                &config.config,
                sale.which(),
                spike::node::store::Control::Add(tickets),
            ),
        },
        Command::Orders {
            action:
                OrdersAction::Tail {
                    config,
                    sale,
                    group,
                    consumer,
                    claim_after,
                },
        } => spike::orders_tail::main(
            &config.config,
            sale.event.as_deref(),
            &group,
            &consumer,
            claim_after,
        ),
        Command::Token {
            config,
            events,
            buyer,
            ttl,
            not_before,
            count,
        } => spike::auth_commands::token(&config.config, &events, &buyer, ttl, not_before, count),
        Command::PaySign {
            config,
            order,
            reference,
        } => spike::auth_commands::pay_sign(&config.config, &order, reference.as_deref()),
        Command::NginxConf {
            config,
            listen,
            workers,
        } => spike::nginx_conf::run(&config.config, listen, workers.map(usize::from)),
        Command::HaproxyConf {
            config,
            listen,
            threads,
        } => spike::haproxy_conf::run(&config.config, listen, threads.map(usize::from)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spike: {}", spike::cli::error_line(&e));
            ExitCode::FAILURE
        }
    }
}
