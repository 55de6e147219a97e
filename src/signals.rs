//! The signals every command reacts to, caught the same way: SIGTERM and
//! Ctrl-C stop gracefully, SIGHUP reloads. Each is caught before a command
//! binds its ports, so a signal sent the moment they answer means what it
//! says, never the default action (which ends the process).

use std::future::Future;

/// Resolves on Ctrl-C or SIGTERM, so every mode shuts down the same way.
///
/// The handlers are installed when this is called, not when the future is
/// first polled: call it before binding, so that a SIGTERM that arrives as
/// soon as the port answers still means a graceful stop. Needs a runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
                match s {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(int) => {}
                () = wait(term) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// SIGHUP, caught from the start of a process: registered by
/// [`catch_hangup`] before any port is bound, so that a signal sent as soon
/// as the ports answer (a supervisor's, or a test's) reloads instead of
/// ending the process with the default action; taken once by whoever acts
/// on it ([`take_hangup`]).
#[cfg(unix)]
static HANGUP: std::sync::Mutex<Option<tokio::signal::unix::Signal>> = std::sync::Mutex::new(None);

/// Starts catching SIGHUP now (call it first in a command's runtime,
/// before binding); a SIGHUP that arrives before anyone listens is kept.
pub fn catch_hangup() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(s) => *HANGUP.lock().unwrap_or_else(|p| p.into_inner()) = Some(s),
            Err(e) => tracing::warn!("cannot catch SIGHUP: {e}"),
        }
    }
}

/// The SIGHUP stream [`catch_hangup`] started, or a new one when none was
/// (tests that run a balancer in process); `None` when SIGHUP cannot be
/// caught.
#[cfg(unix)]
pub fn take_hangup() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    let kept = HANGUP.lock().unwrap_or_else(|p| p.into_inner()).take();
    kept.or_else(|| signal(SignalKind::hangup()).ok())
}

/// Starts catching SIGUSR1 now (call it before binding): from then on the
/// signal never ends the process (its default action), even before the
/// balancer listens for it to reopen its access log (logrotate's
/// `postrotate` may send it at any time), and while no access log is set,
/// when it does nothing (as Nginx's `USR1`). tokio keeps a signal's
/// handler for the life of the process, so the stream can be dropped.
pub fn catch_user1() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Err(e) = signal(SignalKind::user_defined1()) {
            tracing::warn!("cannot catch SIGUSR1: {e}");
        }
    }
}
