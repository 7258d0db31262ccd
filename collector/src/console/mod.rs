//! The tokio-console recorder: `serve --console http://HOST:6669`.
//!
//! Subscribes to the KMS's console-subscriber with the `console-api` client
//! (`Instrument/WatchUpdates`, the stream tokio-console reads), keeps the
//! task, resource and async-op state as tokio-console does, and stores a
//! snapshot of it every [`ConsoleConfig::DEFAULT_SNAPSHOT_INTERVAL`]
//! (`console_tasks`, `console_resources`, `console_async_ops`). So the task
//! states at the moment of a hang are on disk even if no one had
//! tokio-console open.
//!
//! Each task row has the console id, tokio's task id, name, kind, spawn
//! location, fields, state (`running`, `idle`, `scheduled`, `completed`,
//! derived as tokio-console derives it), polls, busy/idle/scheduled time,
//! wakes, live waker count, last poll start and end, and the lint warnings
//! tokio-console would show ([`lints`]: `lost-waker`, `never-yielded`,
//! `self-wakes`, ... plus our `long-poll`).
//!
//! Times in a snapshot (`snapshot_ns` included) are the remote's clock at the
//! latest update received, which is what durations are computed against. A
//! snapshot is stored only when updates arrived since the previous one, so a
//! silent KMS leaves a gap rather than repeated stale rows. A completed task
//! (dropped resource, finished async op) is stored in one snapshot, then
//! forgotten: the state holds live entities only.
//!
//! When the KMS is unreachable, or the stream breaks, the recorder reconnects
//! with exponential backoff; each new connection starts from a fresh state
//! (the subscriber resends everything it retains).

pub mod lints;
mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use console_api::instrument::instrument_client::InstrumentClient;
use console_api::instrument::InstrumentRequest;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

use crate::probe::SinkError;
use crate::store::{ConsoleSnapshot, Record, Writer};
use lints::Lints;
use state::ConsoleState;

/// Where console snapshots go: the store, or anything else that keeps them.
///
/// `write_console_snapshot` may block (it is called from a blocking thread);
/// when it returns `Ok`, the snapshot is kept.
pub trait SnapshotSink: Send + Sync + 'static {
    /// Keeps one snapshot.
    ///
    /// # Errors
    ///
    /// Whatever kept the snapshot from being stored; the recorder counts it
    /// and goes on.
    fn write_console_snapshot(&self, snapshot: &ConsoleSnapshot) -> Result<(), SinkError>;
}

/// A store used directly (tests, tools): each snapshot is one transaction.
impl<W> SnapshotSink for std::sync::Mutex<W>
where
    W: Writer + Send + 'static,
{
    fn write_console_snapshot(&self, snapshot: &ConsoleSnapshot) -> Result<(), SinkError> {
        let mut writer = self
            .lock()
            .map_err(|_| "the store's lock is poisoned".to_owned())?;
        writer.write(&[Record::Console(snapshot.clone())])?;
        Ok(())
    }
}

/// Errors of [`spawn`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// The console URL is not usable.
    #[error("invalid console URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// Configuration of the console recorder.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use kms_collector::console::ConsoleConfig;
///
/// let config = ConsoleConfig::new("http://127.0.0.1:6669")
///     .snapshot_interval(Duration::from_secs(2))
///     .poll_threshold(Duration::from_millis(500));
/// assert_eq!(config.target_url(), "http://127.0.0.1:6669");
/// ```
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    target: String,
    snapshot_interval: Duration,
    lints: Lints,
    connect_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig::new(Self::DEFAULT_TARGET)
    }
}

impl ConsoleConfig {
    /// Default console-subscriber address (tokio-console's default port).
    pub const DEFAULT_TARGET: &'static str = "http://127.0.0.1:6669";
    /// Default time between two stored snapshots.
    pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);
    /// Default threshold of `never-yielded` and `long-poll` (tokio-console's 1 s).
    pub const DEFAULT_POLL_THRESHOLD: Duration = Duration::from_secs(1);
    /// Default `self-wakes` threshold in percent (tokio-console's 50).
    pub const DEFAULT_SELF_WAKE_PERCENT: u64 = 50;
    /// Default `large-future` threshold in bytes (tokio-console's 1024).
    pub const DEFAULT_LARGE_FUTURE_BYTES: u64 = 1024;
    /// Default limit of one connection attempt.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default first reconnection delay; it doubles up to [`Self::DEFAULT_BACKOFF_MAX`].
    pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(500);
    /// Default longest reconnection delay.
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

    /// A configuration recording from `url` (e.g. `http://10.0.2.2:6669`) with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        ConsoleConfig {
            target: url.into(),
            snapshot_interval: Self::DEFAULT_SNAPSHOT_INTERVAL,
            lints: Lints {
                self_wake_percent: Self::DEFAULT_SELF_WAKE_PERCENT,
                poll_threshold: Self::DEFAULT_POLL_THRESHOLD,
                large_future_bytes: Self::DEFAULT_LARGE_FUTURE_BYTES,
            },
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            backoff_min: Self::DEFAULT_BACKOFF_MIN,
            backoff_max: Self::DEFAULT_BACKOFF_MAX,
        }
    }

    /// The console-subscriber URL.
    pub fn target_url(&self) -> &str {
        &self.target
    }

    /// Time between stored snapshots (default [`Self::DEFAULT_SNAPSHOT_INTERVAL`]).
    pub fn snapshot_interval(mut self, interval: Duration) -> Self {
        self.snapshot_interval = interval;
        self
    }

    /// Poll duration past which `never-yielded` (first poll) and `long-poll`
    /// (any poll) fire (default [`Self::DEFAULT_POLL_THRESHOLD`]).
    pub fn poll_threshold(mut self, threshold: Duration) -> Self {
        self.lints.poll_threshold = threshold;
        self
    }

    /// Self-wake percentage past which `self-wakes` fires (default
    /// [`Self::DEFAULT_SELF_WAKE_PERCENT`]).
    pub fn self_wake_percent(mut self, percent: u64) -> Self {
        self.lints.self_wake_percent = percent;
        self
    }

    /// Future size from which `large-future` fires (default
    /// [`Self::DEFAULT_LARGE_FUTURE_BYTES`]).
    pub fn large_future_bytes(mut self, bytes: u64) -> Self {
        self.lints.large_future_bytes = bytes;
        self
    }

    /// Limit of one connection attempt (default [`Self::DEFAULT_CONNECT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Reconnection delays: the first, doubling up to the longest (defaults
    /// [`Self::DEFAULT_BACKOFF_MIN`], [`Self::DEFAULT_BACKOFF_MAX`]).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }
}

/// Counters of a running recorder.
#[derive(Debug, Default)]
struct Counters {
    connect_attempts: AtomicU64,
    connections: AtomicU64,
    updates: AtomicU64,
    snapshots: AtomicU64,
    store_errors: AtomicU64,
}

/// What a recorder has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecorderStats {
    /// Connection attempts, successful or not.
    pub connect_attempts: u64,
    /// Connections that delivered a stream.
    pub connections: u64,
    /// Updates received.
    pub updates: u64,
    /// Snapshots stored.
    pub snapshots: u64,
    /// Snapshots that could not be stored.
    pub store_errors: u64,
}

impl Counters {
    fn read(&self) -> RecorderStats {
        RecorderStats {
            connect_attempts: self.connect_attempts.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            updates: self.updates.load(Ordering::Relaxed),
            snapshots: self.snapshots.load(Ordering::Relaxed),
            store_errors: self.store_errors.load(Ordering::Relaxed),
        }
    }
}

/// A running console recorder, from [`spawn`]. Dropping the handle stops it.
#[derive(Debug)]
pub struct ConsoleHandle {
    stop: watch::Sender<bool>,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl ConsoleHandle {
    /// What the recorder has done so far.
    pub fn stats(&self) -> RecorderStats {
        self.counters.read()
    }

    /// Stops the recorder and returns its final counters.
    pub async fn stop(self) -> RecorderStats {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.counters.read()
    }
}

/// Starts recording on the current runtime, writing snapshots to `sink`.
///
/// # Errors
///
/// [`ConsoleError::InvalidUrl`] when `config`'s URL is neither an http(s)
/// URL nor a Unix socket (`file://localhost/PATH`, `unix:/PATH`).
/// An unreachable KMS is not an error: the recorder retries.
pub fn spawn(
    config: ConsoleConfig,
    sink: Arc<dyn SnapshotSink>,
) -> Result<ConsoleHandle, ConsoleError> {
    let invalid = |reason: String| ConsoleError::InvalidUrl {
        url: config.target.clone(),
        reason,
    };
    // A Unix socket (the library's `unix:PATH` bind) is named as the
    // tokio-console CLI names it, `file://localhost/PATH`, or `unix:PATH`.
    let target = match config
        .target
        .strip_prefix("file://localhost")
        .or_else(|| config.target.strip_prefix("file://"))
    {
        Some(path) if path.starts_with('/') => format!("unix:{path}"),
        Some(_) => {
            return Err(invalid(
                "expected file://localhost/ABSOLUTE/PATH".to_owned(),
            ))
        }
        None => config.target.clone(),
    };
    if !(target.starts_with("http://")
        || target.starts_with("https://")
        || target.starts_with("unix:/"))
    {
        return Err(invalid(
            "expected http://HOST:PORT or file://localhost/PATH (a Unix socket)".to_owned(),
        ));
    }
    let endpoint = Endpoint::from_shared(target)
        .map_err(|e| invalid(e.to_string()))?
        .connect_timeout(config.connect_timeout)
        // A KMS that stops (SIGSTOP, frozen VM) answers no pings: the stream
        // fails instead of waiting forever.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let (stop, stopped) = watch::channel(false);
    let counters = Arc::new(Counters::default());
    let recorder = Recorder {
        config,
        endpoint,
        sink,
        counters: Arc::clone(&counters),
        stopped,
    };
    let task = tokio::spawn(recorder.run());
    Ok(ConsoleHandle {
        stop,
        counters,
        task,
    })
}

struct Recorder {
    config: ConsoleConfig,
    endpoint: Endpoint,
    sink: Arc<dyn SnapshotSink>,
    counters: Arc<Counters>,
    stopped: watch::Receiver<bool>,
}

/// How a connection ended.
enum Ended {
    /// Asked to stop.
    Stopped,
    /// Lost after receiving at least one update (reconnect at once).
    Lost(String),
    /// Never delivered an update (back off).
    Failed(String),
}

impl Recorder {
    async fn run(mut self) {
        let mut backoff = self.config.backoff_min;
        let mut failures = 0u64;
        loop {
            if *self.stopped.borrow() {
                return;
            }
            match self.connection().await {
                Ended::Stopped => return,
                Ended::Lost(why) => {
                    tracing::warn!(console = %self.config.target, error = %why, "Console stream lost; reconnecting.");
                    backoff = self.config.backoff_min;
                    failures = 0;
                }
                Ended::Failed(why) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(console = %self.config.target, error = %why, "Console unreachable; retrying with backoff.");
                    } else {
                        tracing::debug!(console = %self.config.target, error = %why, failures, "Console still unreachable.");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stopped.changed() => return,
                    }
                    backoff = (backoff * 2).min(self.config.backoff_max);
                }
            }
        }
    }

    /// One connection: connect, stream updates, snapshot on the interval.
    async fn connection(&mut self) -> Ended {
        self.counters
            .connect_attempts
            .fetch_add(1, Ordering::Relaxed);
        let connect = async {
            let channel = self.endpoint.connect().await.map_err(|e| e.to_string())?;
            let mut client = InstrumentClient::new(channel)
                // The first update carries everything retained; console-subscriber
                // caps it at 4 MiB, tokio-console accepts more.
                .max_decoding_message_size(64 * 1024 * 1024);
            client
                .watch_updates(InstrumentRequest {})
                .await
                .map(tonic::Response::into_inner)
                .map_err(|e| e.to_string())
        };
        let limit = self.config.connect_timeout;
        let mut stream = tokio::select! {
            r = tokio::time::timeout(limit, connect) => match r {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Ended::Failed(e),
                Err(_) => return Ended::Failed(format!("no answer within {}", humantime::format_duration(limit))),
            },
            _ = self.stopped.changed() => return Ended::Stopped,
        };

        let mut state = ConsoleState::default();
        let mut ticks =
            tokio::time::interval(self.config.snapshot_interval.max(Duration::from_millis(10)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut received = false;
        let mut stale_reported = false;
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(update)) => {
                        if !received {
                            received = true;
                            self.counters.connections.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(console = %self.config.target, "Recording tokio-console updates.");
                        }
                        self.counters.updates.fetch_add(1, Ordering::Relaxed);
                        if state.would_displace(&update) {
                            // Store a completed task before a new one takes its id.
                            self.snapshot(&mut state).await;
                        }
                        state.apply(update);
                        stale_reported = false;
                    }
                    Ok(None) => return self.ended(received, "the console closed the stream".to_owned(), &mut state).await,
                    Err(status) => return self.ended(received, status.to_string(), &mut state).await,
                },
                _ = ticks.tick() => {
                    if state.has_fresh_updates() {
                        self.snapshot(&mut state).await;
                    } else if received && !stale_reported {
                        stale_reported = true;
                        tracing::warn!(console = %self.config.target, "No console update since the last snapshot; not storing a stale one.");
                    }
                }
                _ = self.stopped.changed() => {
                    if state.has_fresh_updates() {
                        self.snapshot(&mut state).await;
                    }
                    return Ended::Stopped;
                }
            }
        }
    }

    /// Stores what the connection had seen last, then says how it ended.
    async fn ended(&self, received: bool, why: String, state: &mut ConsoleState) -> Ended {
        if state.has_fresh_updates() {
            self.snapshot(state).await;
        }
        if received {
            Ended::Lost(why)
        } else {
            Ended::Failed(why)
        }
    }

    async fn snapshot(&self, state: &mut ConsoleState) {
        let Some(snapshot) = state.take_snapshot(&self.config.lints) else {
            return;
        };
        let dropped = state.take_dropped_events();
        if dropped > 0 {
            // The subscriber's event buffer overflowed: some polls, wakes or
            // spawns are missing from this snapshot.
            tracing::warn!(
                console = %self.config.target,
                dropped,
                "The console dropped events; this snapshot may be incomplete."
            );
        }
        let sink = Arc::clone(&self.sink);
        let rows = snapshot.tasks.len();
        let written =
            tokio::task::spawn_blocking(move || sink.write_console_snapshot(&snapshot)).await;
        match written {
            Ok(Ok(())) => {
                self.counters.snapshots.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, tasks = rows, "Console snapshot not stored.");
            }
            Err(e) => {
                self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, tasks = rows, "Console snapshot not stored: the writer panicked.");
            }
        }
        tracing::trace!(live = state.len(), "Console state after snapshot.");
    }
}
