//! Hot reload triggers: SIGHUP, a change of the file on disk, and the
//! [`Reloader`] handle for tests and `spike up`. Each reads `config.toml`
//! again through [`Shared::reload`], which decides whether it goes in force.

use std::sync::Arc;
use std::time::Duration;

use super::error::BalancerError;
use super::state::Shared;

/// How often the file's modification time is looked at.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// A handle to reload the balancer from its file, for SIGHUP, the file
/// watcher, tests and `spike up`.
#[derive(Debug, Clone)]
pub struct Reloader {
    pub(crate) shared: Arc<Shared>,
}

impl Reloader {
    /// Reloads now; returns the new version, or why the file was refused
    /// (then the old config stays in force). Blocking: call it from
    /// `spawn_blocking` or a plain thread inside a runtime.
    pub fn reload_now(&self) -> Result<u64, BalancerError> {
        self.shared.reload()
    }

    /// The config version in force (1 until the first successful reload).
    pub fn version(&self) -> u64 {
        self.shared.current.load().version
    }
}

/// Reloads off the async threads and logs the outcome.
pub async fn reload_logged(shared: &Arc<Shared>, why: &'static str) {
    let s = shared.clone();
    let before = shared.current.load().version;
    match tokio::task::spawn_blocking(move || s.reload()).await {
        // `reload` said so already.
        Ok(Ok(version)) if version == before => {}
        Ok(Ok(version)) => tracing::info!(version, trigger = why, "new config in force"),
        Ok(Err(e)) => tracing::error!(
            trigger = why,
            version = shared.current.load().version,
            "config refused, the old one stays in force: {e}"
        ),
        Err(e) => tracing::error!(trigger = why, "config reload crashed: {e}"),
    }
}

/// Reloads on every SIGHUP until the task is aborted.
pub async fn watch_sighup(shared: Arc<Shared>) {
    #[cfg(unix)]
    {
        let Some(mut hup) = crate::signals::take_hangup() else {
            tracing::warn!("cannot listen for SIGHUP, reload by editing the file");
            return;
        };
        while hup.recv().await.is_some() {
            reload_logged(&shared, "SIGHUP").await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = shared;
    }
}

/// Reloads when the file's modification time or length changes, polled every
/// [`POLL_INTERVAL`] (cheap, and needs no platform file-watching API).
pub async fn watch_file(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let s = shared.clone();
        let changed = tokio::task::spawn_blocking(move || s.changed_on_disk())
            .await
            .unwrap_or(false);
        if changed {
            reload_logged(&shared, "file changed").await;
        }
    }
}
