//! `spike stock`: init, show and audit a sale.
use std::path::Path;
use std::process::ExitCode;
/// `spike stock init`.
pub fn init(_c: &Path, _force: bool) -> anyhow::Result<ExitCode> { anyhow::bail!("todo") }
/// `spike stock show`.
pub fn show(_c: &Path) -> anyhow::Result<ExitCode> { anyhow::bail!("todo") }
/// `spike stock audit`.
pub fn audit(_c: &Path) -> anyhow::Result<ExitCode> { anyhow::bail!("todo") }
