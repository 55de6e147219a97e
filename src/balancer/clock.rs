//! The balancer's clock for failure windows and body deadlines, at the
//! bottom of its layers so that every module can read it.

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds on a monotonic clock that starts with the process; what the
/// failure windows are measured in (Nginx uses whole seconds; finer is fine).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
