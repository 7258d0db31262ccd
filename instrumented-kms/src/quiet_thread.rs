//! Named OS threads for diagnostic machinery that never instruments itself.

use std::io;
use std::sync::mpsc::{self, SyncSender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How long a spawner waits for the new thread to say it is set up.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Handed to a quiet thread's body, which signals it once its early tracing
/// registrations are done (for a thread with a tokio runtime: after its first
/// `tokio::spawn`). Dropping it signals too.
#[derive(Debug)]
pub(crate) struct Ready(Option<SyncSender<()>>);

impl Ready {
    /// The thread is set up; the spawner may return.
    pub(crate) fn signal(mut self) {
        self.send();
    }

    fn send(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        self.send();
    }
}

/// Spawns a named thread whose default dispatcher is `Dispatch::none()`, so
/// tokio, hyper and tonic on it report to no subscriber, and returns once the
/// body signals [`Ready`] (or after a bounded wait).
///
/// Why wait: tracing-core updates callsite interests and the global max level
/// each time a dispatcher or a callsite is registered. A diagnostic thread
/// registering its dispatcher, or tokio's spawn callsite, while the host
/// installs its subscriber can leave that subscriber without the callsite
/// (console-subscriber then never learns tokio's spawn span is a task, and
/// tokio-console lists no tasks; seen in about a third of starts). With the
/// thread set up before `init`/`build` returns, the host's installation sees
/// every registration.
pub(crate) fn spawn<F, T>(name: &str, body: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce(Ready) -> T + Send + 'static,
    T: Send + 'static,
{
    let (ready_tx, ready) = mpsc::sync_channel::<()>(1);
    let handle = thread::Builder::new().name(name.into()).spawn(move || {
        let _quiet = tracing::dispatcher::set_default(&tracing::Dispatch::none());
        body(Ready(Some(ready_tx)))
    })?;
    let _ = ready.recv_timeout(READY_TIMEOUT);
    Ok(handle)
}
