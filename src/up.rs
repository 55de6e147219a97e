//! `spike up`: a whole sale on one machine from one command.

use std::path::Path;
use std::process::ExitCode;

/// Entry point of `spike up`.
pub fn main(_config: &Path) -> anyhow::Result<ExitCode> {
    anyhow::bail!("spike up is not built yet")
}
