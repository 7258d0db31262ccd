//! The application runtime, built so the diagnostic parts can see inside it.
//!
//! [`runtime_builder`] returns an ordinary multi-thread tokio
//! [`Builder`](tokio::runtime::Builder). With the `watchdog` feature it also
//! installs tokio's task poll hooks, which record per worker thread which task
//! it is polling (see [`slots`]); with `watchdog` or `deadlock-detection` it
//! registers each runtime thread's name and OS thread id (see [`threads`]), so
//! stall and deadlock reports can name threads.

#[cfg(all(feature = "watchdog", not(tokio_unstable)))]
compile_error!(
    "instrumented-kms feature `watchdog` needs tokio's unstable task poll hooks: build with \
     RUSTFLAGS=\"--cfg tokio_unstable\" (or set it in .cargo/config.toml), or disable the feature."
);

#[cfg(all(feature = "watchdog", tokio_unstable))]
pub(crate) mod slots;
#[cfg(any(feature = "watchdog", feature = "deadlock-detection"))]
pub(crate) mod threads;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Prefix of the names of the runtime's threads: `kms-worker-0`, `kms-worker-1`, ...
///
/// tokio names worker and blocking-pool threads with the same function, so
/// blocking-pool threads carry this prefix too.
pub const WORKER_THREAD_PREFIX: &str = "kms-worker-";

/// What the host knows about a runtime's configuration that tokio does not
/// report, told to [`DiagGuard::watch_runtime_with`](crate::DiagGuard::watch_runtime_with).
///
/// tokio reports how many blocking threads exist, not how many may: without
/// the configured maximum the collector cannot tell a busy blocking pool
/// from an exhausted one. The library cannot read it back from a built
/// runtime, so the host, which set it, says it.
///
/// # Examples
///
/// ```
/// use instrumented_kms::RuntimeLimits;
///
/// let max_blocking = 64;
/// let rt = instrumented_kms::runtime_builder(Some(2))
///     .max_blocking_threads(max_blocking)
///     .build()?;
/// let limits = RuntimeLimits::default().max_blocking_threads(max_blocking);
/// assert_eq!(limits.blocking_threads_max(), Some(64));
/// // guard.watch_runtime_with(rt.handle(), limits);
/// # drop(rt);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct RuntimeLimits {
    pub(crate) max_blocking_threads: Option<usize>,
}

impl RuntimeLimits {
    /// tokio's default `max_blocking_threads`, for a host that builds its
    /// runtime without setting it.
    pub const TOKIO_DEFAULT_MAX_BLOCKING_THREADS: usize = 512;

    /// The runtime's `max_blocking_threads` (exported as
    /// `runtime.blocking_threads_max`). Default: unknown, and not exported.
    pub fn max_blocking_threads(mut self, max: usize) -> Self {
        self.max_blocking_threads = Some(max);
        self
    }

    /// The configured blocking-thread maximum, if told.
    pub fn blocking_threads_max(&self) -> Option<usize> {
        self.max_blocking_threads
    }
}

/// A tokio runtime builder for the application: multi-thread, all drivers
/// enabled, threads named `kms-worker-N`.
///
/// `worker_threads` sets the worker count; `None` (or `Some(0)`) keeps tokio's
/// default (one per CPU).
///
/// With the `watchdog` feature the builder carries tokio's
/// `on_before_task_poll` / `on_after_task_poll` hooks. They cost a
/// thread-local read and three atomic stores per poll (no clock, no lock;
/// about 9 ns per poll measured by the `poll_hooks` example), and let the
/// watchdog see, from its own OS thread, a poll that never returns. Build the
/// runtime that serves requests through this function and pass its handle to
/// `DiagGuard::watch_runtime`, or to `DiagGuard::watch_runtime_with` with its
/// [`RuntimeLimits`] (tokio's default blocking-thread maximum is
/// [`RuntimeLimits::TOKIO_DEFAULT_MAX_BLOCKING_THREADS`]; this builder keeps it
/// unless the host sets another).
///
/// # Examples
///
/// ```
/// let rt = instrumented_kms::runtime_builder(Some(2)).build()?;
/// let name = rt.block_on(async {
///     tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
///         .await
///         .unwrap()
/// });
/// assert!(name.unwrap().starts_with("kms-worker-"));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn runtime_builder(worker_threads: Option<usize>) -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = worker_threads.filter(|n| *n > 0) {
        builder.worker_threads(n);
    }
    let next = Arc::new(AtomicUsize::new(0));
    builder.thread_name_fn(move || {
        format!(
            "{WORKER_THREAD_PREFIX}{}",
            next.fetch_add(1, Ordering::Relaxed)
        )
    });
    #[cfg(any(feature = "watchdog", feature = "deadlock-detection"))]
    {
        builder.on_thread_start(threads::register_current);
        builder.on_thread_stop(on_thread_stop);
    }
    #[cfg(all(feature = "watchdog", tokio_unstable))]
    {
        builder.on_before_task_poll(slots::before_poll);
        builder.on_after_task_poll(slots::after_poll);
    }
    builder
}

#[cfg(any(feature = "watchdog", feature = "deadlock-detection"))]
fn on_thread_stop() {
    #[cfg(all(feature = "watchdog", tokio_unstable))]
    slots::release_current();
    threads::unregister_current();
}

/// A tokio id (`tokio::task::Id`, `tokio::runtime::Id`) as the `u64` it wraps.
///
/// tokio keeps `as_u64` private; both ids hash as exactly one `write_u64` of
/// their value, so a hasher that keeps that value recovers it without the
/// cost of formatting on the poll path.
pub(crate) fn tokio_id_u64(id: impl std::hash::Hash) -> u64 {
    struct Keep(u64);
    impl std::hash::Hasher for Keep {
        fn write(&mut self, bytes: &[u8]) {
            // Not used by tokio's ids; keep something stable anyway.
            for b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(*b);
            }
        }
        fn write_u64(&mut self, v: u64) {
            self.0 = v;
        }
        fn finish(&self) -> u64 {
            self.0
        }
    }
    let mut keep = Keep(0);
    id.hash(&mut keep);
    keep.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokio_ids_convert_to_their_displayed_value() {
        let rt = runtime_builder(Some(1)).build().unwrap();
        let rt_id = rt.handle().id();
        assert_eq!(tokio_id_u64(rt_id).to_string(), rt_id.to_string());
        let task = rt.spawn(async {});
        let task_id = task.id();
        assert_eq!(tokio_id_u64(task_id).to_string(), task_id.to_string());
        rt.block_on(task).unwrap();
    }
}
