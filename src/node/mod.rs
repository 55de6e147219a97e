//! The ticket-selling node.
use std::path::Path;
use std::process::ExitCode;
/// Entry point of `spike node`.
pub fn main(_c: &Path, _name: &str) -> anyhow::Result<ExitCode> { anyhow::bail!("todo") }
