//! The HTTP load balancer: Nginx's upstream strategies, keep-alive pools,
//! failover and hot reload.

use std::path::Path;
use std::process::ExitCode;

/// Entry point of `spike balancer`.
pub fn main(_config: &Path) -> anyhow::Result<ExitCode> {
    anyhow::bail!("spike balancer is not built yet")
}
