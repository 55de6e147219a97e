//! spike: a flash-sale ticket seller and an Nginx-compatible load balancer in
//! one binary. The library holds everything; `main.rs` only parses the command
//! line and dispatches here, so tests drive the same code the binary runs.

pub mod auth;
pub mod auth_commands;
pub mod balancer;
pub mod check;
pub mod cli;
pub mod config;
pub mod haproxy_conf;
pub mod http1;
pub mod nginx_conf;
pub mod node;
pub mod orders_tail;
pub mod prometheus;
pub mod protocol;
pub mod redis_client;
pub mod resolve;
pub mod server;
pub mod signals;
pub mod stock;
pub mod up;
