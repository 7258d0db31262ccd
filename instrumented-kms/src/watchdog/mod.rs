//! Runtime-stall watchdog (feature `watchdog`): finds a task poll that does
//! not return and a runtime that stops polling, from outside the runtime.
//!
//! Two signals, both read by one named OS thread (`kms-diag-watchdog`):
//!
//! - **Poll stalls.** The poll hooks of [`runtime_builder`](crate::runtime_builder)
//!   record per worker thread which task it is polling (see
//!   [`crate::runtime::slots`]). A poll still running after
//!   [`WatchdogConfig::poll_threshold`] is a stall: a handler blocking its
//!   worker (`std::thread::sleep`, a blocking syscall, a sync lock, a busy
//!   loop). tokio-metrics cannot see this: it learns about a poll only when it
//!   returns.
//! - **Heartbeat stalls.** A heartbeat task on the watched runtime ticks every
//!   few milliseconds. If its beat is late by more than
//!   [`WatchdogConfig::heartbeat_threshold`], the runtime as a whole is not
//!   getting round to ready tasks (all workers blocked, or a flood of work).
//!
//! A task inside `tokio::task::block_in_place` stays in its poll while its
//! worker's duties move to another thread; the watchdog reports it as a poll
//! stall all the same (it is one, for that task).
//!
//! Each stall is reported as `kms.stall` when found, again every threshold
//! while it lasts, and as `kms.stall_end` when over (`docs/wire-format.md`).
//! A heartbeat stall carries the workers' CPU time and run-queue wait since
//! just before it (see [`worker_cpu`]): busy workers are the runtime's own
//! stall, workers waiting for a CPU are a starved host.
//!
//! The thread reads `/proc` for the stuck thread's kernel state and asks the
//! span registry which span that thread is in. It never creates spans, and
//! never touches the watched runtime's workers, so it keeps reporting when
//! every worker is blocked.

mod heartbeat;
mod os_thread;
mod stall;
pub(crate) mod worker_cpu;

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

#[cfg_attr(not(feature = "runtime-metrics"), allow(unused_imports))]
pub(crate) use heartbeat::for_runtime as heartbeat_for_runtime;

pub(crate) use heartbeat::Heartbeat;

use crate::sink::EventSink;

/// Watchdog settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WatchdogConfig {
    /// A poll running longer than this is a stall. Default 1 s.
    pub(crate) poll_threshold: Duration,
    /// A heartbeat late by more than this is a stall. Default 2 s.
    pub(crate) heartbeat_threshold: Duration,
}

impl WatchdogConfig {
    /// Default of [`WatchdogConfig::poll_threshold`].
    pub(crate) const DEFAULT_POLL_THRESHOLD: Duration = Duration::from_secs(1);
    /// Default of [`WatchdogConfig::heartbeat_threshold`].
    pub(crate) const DEFAULT_HEARTBEAT_THRESHOLD: Duration = Duration::from_secs(2);

    /// How often the watchdog thread looks: a tenth of the smaller
    /// threshold, between 5 ms and 100 ms. This bounds how much a reported
    /// poll duration can undercount (durations are timed from the first
    /// check that sees the poll).
    pub(crate) fn check_interval(&self) -> Duration {
        (self.poll_threshold.min(self.heartbeat_threshold) / 10)
            .clamp(Duration::from_millis(5), Duration::from_millis(100))
    }

    /// Heartbeat tick: a tenth of the heartbeat threshold, 5 ms to 100 ms.
    pub(crate) fn heartbeat_period(&self) -> Duration {
        (self.heartbeat_threshold / 10).clamp(Duration::from_millis(5), Duration::from_millis(100))
    }
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        Self {
            poll_threshold: Self::DEFAULT_POLL_THRESHOLD,
            heartbeat_threshold: Self::DEFAULT_HEARTBEAT_THRESHOLD,
        }
    }
}

/// Adds runtimes to a running watchdog. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct WatchdogHandle {
    config: WatchdogConfig,
    pending: Arc<Mutex<Vec<Watch>>>,
}

#[derive(Debug)]
struct Watch {
    handle: tokio::runtime::Handle,
    heartbeat: Arc<Heartbeat>,
}

impl WatchdogHandle {
    /// Starts watching the runtime behind `handle`: spawns the heartbeat task
    /// on it. Poll stalls are seen only on runtimes built by
    /// [`runtime_builder`](crate::runtime_builder) (which installs the poll
    /// hooks); heartbeat stalls on any runtime.
    pub(crate) fn watch_runtime(&self, handle: &tokio::runtime::Handle) {
        let heartbeat = Heartbeat::start(handle, self.config.heartbeat_period());
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Watch {
                handle: handle.clone(),
                heartbeat,
            });
    }
}

/// Starts the watchdog thread. It runs until `stop` receives a message or
/// its sender is dropped; runtimes are added with the returned handle.
///
/// # Errors
///
/// The OS refused to start the thread.
pub(crate) fn spawn(
    config: WatchdogConfig,
    sink: EventSink,
    stop: Receiver<()>,
) -> std::io::Result<(WatchdogHandle, JoinHandle<()>)> {
    let handle = WatchdogHandle {
        config: config.clone(),
        pending: Arc::new(Mutex::new(Vec::new())),
    };
    let pending = Arc::clone(&handle.pending);
    let thread = std::thread::Builder::new()
        .name("kms-diag-watchdog".into())
        .spawn(move || run(config, sink, stop, pending))?;
    Ok((handle, thread))
}

fn run(
    config: WatchdogConfig,
    sink: EventSink,
    stop: Receiver<()>,
    pending: Arc<Mutex<Vec<Watch>>>,
) {
    #[cfg(feature = "deadlock-detection")]
    crate::runtime::threads::register_current();
    let mut watched: Vec<stall::Watched> = Vec::new();
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(config.check_interval()) {
        for watch in pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            watched.push(stall::Watched::new(watch.handle, watch.heartbeat));
        }
        for runtime in &mut watched {
            runtime.check(&config, &sink);
        }
        // A runtime that shut down dropped its heartbeat task: stop watching.
        watched.retain(|w| !w.is_gone());
    }
    for runtime in &watched {
        runtime.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DiagEvent;
    use std::time::Instant;

    fn capture() -> (EventSink, Arc<Mutex<Vec<DiagEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let into = Arc::clone(&events);
        (
            EventSink::new(move |e| into.lock().unwrap().push(e)),
            events,
        )
    }

    fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn stops_promptly_when_its_stop_sender_is_dropped() {
        let config = WatchdogConfig {
            poll_threshold: Duration::from_secs(60),
            heartbeat_threshold: Duration::from_secs(60),
        };
        let (stop, stopped) = std::sync::mpsc::channel();
        let (_handle, thread) = spawn(config, EventSink::new(|_| {}), stopped).unwrap();
        assert_eq!(thread.thread().name(), Some("kms-diag-watchdog"));
        let asked = Instant::now();
        drop(stop);
        wait_for("the watchdog thread to end", Duration::from_secs(5), || {
            thread.is_finished()
        });
        // It waits at most one check interval (100 ms at these thresholds).
        assert!(asked.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_runtime_that_shuts_down_is_forgotten_without_a_false_stall() {
        let config = WatchdogConfig {
            poll_threshold: Duration::from_millis(50),
            heartbeat_threshold: Duration::from_millis(100),
        };
        let (sink, events) = capture();
        let (_stop, stopped) = std::sync::mpsc::channel();
        let (handle, _thread) = spawn(config.clone(), sink, stopped).unwrap();
        let rt = crate::runtime_builder(Some(1)).build().unwrap();
        let runtime = crate::runtime::tokio_id_u64(rt.handle().id());
        handle.watch_runtime(rt.handle());

        // Control: a real stall on this runtime is seen, and ends.
        rt.block_on(async {
            tokio::spawn(async { std::thread::sleep(Duration::from_millis(300)) })
                .await
                .unwrap();
        });
        let count = |name: &str| {
            events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.name == name)
                .count()
        };
        wait_for("the control stall to end", Duration::from_secs(5), || {
            count("kms.stall_end") >= 1
        });

        drop(rt);
        wait_for("the heartbeat to go", Duration::from_secs(5), || {
            heartbeat::for_runtime(runtime).is_none()
        });
        let before = count("kms.stall");
        // Several heartbeat thresholds without a runtime: nothing to report.
        let window = Instant::now() + config.heartbeat_threshold * 5;
        while Instant::now() < window {
            assert_eq!(
                count("kms.stall"),
                before,
                "stall reported for a runtime that is gone"
            );
            std::thread::sleep(config.check_interval());
        }
    }
}
