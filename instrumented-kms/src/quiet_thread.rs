//! Named OS threads for diagnostic machinery that never instruments itself.

use std::io;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How long a spawner waits for the new thread to install its dispatcher.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Spawns a named thread whose default dispatcher is `Dispatch::none()`, so
/// tokio, hyper and tonic on it report to no subscriber, and returns once that
/// dispatcher is in place (or after a bounded wait).
///
/// Why wait: tracing-core recomputes the global max level each time a
/// dispatcher is registered. A thread registering its quiet dispatcher while
/// the host installs its subscriber can leave the max level computed without
/// the host's subscriber, which disables tokio's trace-level spawn span and
/// hides every task from tokio-console (seen in about a third of starts).
pub(crate) fn spawn<F, T>(name: &str, body: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (ready_tx, ready) = mpsc::sync_channel::<()>(1);
    let handle = thread::Builder::new().name(name.into()).spawn(move || {
        let _quiet = tracing::dispatcher::set_default(&tracing::Dispatch::none());
        let _ = ready_tx.send(());
        body()
    })?;
    let _ = ready.recv_timeout(READY_TIMEOUT);
    Ok(handle)
}
