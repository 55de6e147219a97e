//! `spike nginx-conf`: the nginx.conf that does what the balancer does.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

/// Entry point of `spike nginx-conf`.
pub fn main(_config: &Path, _listen: Option<SocketAddr>) -> anyhow::Result<ExitCode> {
    anyhow::bail!("spike nginx-conf is not built yet")
}
