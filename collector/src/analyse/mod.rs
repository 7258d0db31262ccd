//! Diagnosis: an ordered list of small passes that turn stored facts into
//! one model (requests and their fates, where they wait, the runtime's
//! resources, probe episodes, process facts), then small rules over that
//! model into a verdict per hypothesis and an outcome.
//!
//! | | hypothesis | rules |
//! |---|---|---|
//! | A | attestation / PCCS call hangs | `rules/a_attestation.rs` |
//! | B | auth webhook / Ethereum RPC hangs | `rules/b_webhook.rs` |
//! | C | memory exhaustion | `rules/c_memory.rs` |
//! | D | async runtime deadlocked or stalled | `rules/d_runtime.rs` |
//! | E | connection / fd exhaustion | `rules/e_connections.rs` |
//!
//! Each pass lives in its own file and reads only what it needs through a
//! [`Reader`]; the order is [`standard_passes`]. Like Jaeger's query
//! adjusters, a pass only adds to the [`Diagnosis`] the earlier ones built.
//! Every rule is stated in terms of `docs/wire-format.md`, never in terms of
//! a particular program; `docs/diagnosis.md` lists them with the facts they
//! read.

use std::time::Duration;

use serde::Serialize;

use crate::store::{ReadError, Reader, TimeWindow};

mod attrs;
mod connections;
mod deadlock;
mod evidence;
mod lock_wait;
mod memory;
mod probe;
mod requests;
mod resources;
mod rules;
mod senders;
mod stall;
mod stuck_io;
mod worker_cpu;

pub use connections::ConnectionFindings;
pub use deadlock::{DeadlockCycle, DeadlockFindings, DeadlockThread};
pub use evidence::{fmt_time, Evidence, Hypothesis, Verdict, HYPOTHESES};
pub use lock_wait::{ConsoleGaps, LockWait, LockWaitFindings};
pub use memory::MemoryFindings;
pub use probe::{FailureWindow, ProbeEpisode, ProbeSummary};
pub use requests::{
    Fate, QueuedBehind, RequestCounts, RequestFindings, TaskdumpSkips, WaitLocation,
};
pub use resources::{
    BlockingPool, ListenQueue, ResourceFindings, ResourceRun, SchedulerQueues, UnwakeableTask,
};
pub use rules::{Outcome, OutcomeKind};
pub use senders::RejectedSender;
pub use stall::{StallEpisode, StallFindings};
pub use stuck_io::{Innermost, StuckSpan, WaitsOn};
pub use worker_cpu::{CpuUse, WorkersCpu};

/// Thresholds of the diagnosis. Every default is a public associated const.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyseConfig {
    /// Heartbeat lag above which a `kms.runtime` sample counts as lagging.
    /// `None`: the producer's own `config.stall_heartbeat_threshold_ms`
    /// (from its `kms.startup` event), else
    /// [`AnalyseConfig::DEFAULT_HEARTBEAT_LAG_THRESHOLD`].
    pub heartbeat_lag_threshold: Option<Duration>,
    /// A stall that ended counts as a runtime stall (D) only when it lasted
    /// this long; shorter ones are cited as transient.
    pub long_stall: Duration,
    /// A closed outbound call in the failure window this slow counts as a
    /// hanging peer (when the client gave up and the call was cancelled, no
    /// open span is left to show it).
    pub slow_call_threshold: Duration,
    /// An open-span snapshot counts as a stuck request only once open this long.
    pub stuck_threshold: Duration,
    /// An async lock wait counts once it has lasted this long.
    pub lock_wait_threshold: Duration,
    /// A closed request without a response status counts as cancelled (its
    /// client gave up) once it lasted this long. `None`: the probe's timeout
    /// or the producer's open-span threshold, whichever is shorter, else
    /// [`AnalyseConfig::DEFAULT_CANCELLED_AFTER`].
    pub cancelled_after: Option<Duration>,
    /// A task idle this long with no waker left can never be woken.
    pub never_woken_threshold: Duration,
    /// RSS at or above this fraction of the memory limit confirms C.
    pub memory_near_limit: f64,
    /// Open fds at or above this fraction of the fd limit confirm E.
    pub fd_near_limit: f64,
}

impl AnalyseConfig {
    /// Default heartbeat lag threshold when the producer did not announce
    /// its own: 2 s, the library's default `stall_heartbeat_threshold`.
    pub const DEFAULT_HEARTBEAT_LAG_THRESHOLD: Duration = Duration::from_secs(2);
    /// Default long stall: 10 s.
    pub const DEFAULT_LONG_STALL: Duration = Duration::from_secs(10);
    /// Default slow-call threshold: 10 s.
    pub const DEFAULT_SLOW_CALL_THRESHOLD: Duration = Duration::from_secs(10);
    /// Default stuck threshold: 0, i.e. trust the producer, which only
    /// snapshots spans open past its own `KMS_DIAG_OPEN_SPAN_THRESHOLD`.
    pub const DEFAULT_STUCK_THRESHOLD: Duration = Duration::ZERO;
    /// Default async lock wait threshold: 5 s.
    pub const DEFAULT_LOCK_WAIT_THRESHOLD: Duration = Duration::from_secs(5);
    /// Default cancelled-request age when neither the probe timeout nor the
    /// producer's open-span threshold is known: 10 s.
    pub const DEFAULT_CANCELLED_AFTER: Duration = Duration::from_secs(10);
    /// Default never-woken threshold: 10 s.
    pub const DEFAULT_NEVER_WOKEN_THRESHOLD: Duration = Duration::from_secs(10);
    /// Default memory fraction: 0.8.
    pub const DEFAULT_MEMORY_NEAR_LIMIT: f64 = 0.8;
    /// Default fd fraction: 0.9.
    pub const DEFAULT_FD_NEAR_LIMIT: f64 = 0.9;
}

impl Default for AnalyseConfig {
    fn default() -> Self {
        AnalyseConfig {
            heartbeat_lag_threshold: None,
            long_stall: Self::DEFAULT_LONG_STALL,
            slow_call_threshold: Self::DEFAULT_SLOW_CALL_THRESHOLD,
            stuck_threshold: Self::DEFAULT_STUCK_THRESHOLD,
            lock_wait_threshold: Self::DEFAULT_LOCK_WAIT_THRESHOLD,
            cancelled_after: None,
            never_woken_threshold: Self::DEFAULT_NEVER_WOKEN_THRESHOLD,
            memory_near_limit: Self::DEFAULT_MEMORY_NEAR_LIMIT,
            fd_near_limit: Self::DEFAULT_FD_NEAR_LIMIT,
        }
    }
}

/// Why the diagnosis failed: only a store that cannot be read stops it;
/// missing data make verdicts inconclusive instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnalyseError {
    /// A pass could not read the store.
    #[error("pass {pass}: {source}")]
    Read {
        /// The pass.
        pass: &'static str,
        /// The read error.
        #[source]
        source: ReadError,
    },
}

/// Everything the passes found, in the order they ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Diagnosis {
    /// Stuck requests (open-span snapshots), oldest first.
    pub stuck: Vec<StuckSpan>,
    /// The GetMeta probe's record and when it began failing.
    pub probe: ProbeSummary,
    /// When the KMS was failing: from the probe, else from the stuck requests.
    pub failure: Option<FailureWindow>,
    /// Runtime stalls and heartbeat health.
    pub stall: StallFindings,
    /// parking_lot deadlock cycles.
    pub deadlock: DeadlockFindings,
    /// Async lock waits (tokio-console) and suspected cycles.
    pub lock_wait: LockWaitFindings,
    /// RSS against its limit.
    pub memory: MemoryFindings,
    /// fds, connections, accept errors, requests reaching the handler.
    pub connections: ConnectionFindings,
    /// The runtime's resources: blocking pool, queues, listen queue, tasks
    /// that can never be woken.
    pub resources: ResourceFindings,
    /// Every request of the failure window by fate, and where hung ones wait.
    pub requests: RequestFindings,
    /// Verdicts, keyed `A` to `E`.
    pub hypotheses: std::collections::BTreeMap<String, Hypothesis>,
    /// Healthy, explained or unexplained.
    pub outcome: Outcome,
    /// Export attempts the collector refused, by sender and reason.
    pub rejected_senders: Vec<RejectedSender>,
}

/// What a pass sees: the store, the thresholds, the analysed window, and
/// what the earlier passes found.
pub struct Context<'a> {
    /// The store.
    pub reader: &'a dyn Reader,
    /// Thresholds.
    pub config: &'a AnalyseConfig,
    /// The analysed window.
    pub window: TimeWindow,
    /// Findings so far.
    pub diagnosis: Diagnosis,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .field("window", &self.window)
            .field("diagnosis", &self.diagnosis)
            .finish_non_exhaustive()
    }
}

impl Context<'_> {
    /// The window the hang covers: the failure window if one was found, else
    /// the whole analysed window.
    pub fn failure_or_window(&self) -> TimeWindow {
        self.diagnosis
            .failure
            .as_ref()
            .map(|f| TimeWindow::new(f.from_ns, f.to_ns))
            .unwrap_or(self.window)
    }
}

/// One diagnosis step: reads facts, adds findings.
pub trait Pass: std::fmt::Debug {
    /// Short name, used in errors.
    fn name(&self) -> &'static str;
    /// Adds this pass's findings to `cx.diagnosis`.
    ///
    /// # Errors
    ///
    /// A read error from the store.
    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError>;
}

/// The passes, in order: stuck requests, probe episodes (and the failure
/// window), stall, deadlock, async lock wait, runtime resources, memory,
/// connections, request fates, the verdicts, then the refused senders.
pub fn standard_passes() -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(stuck_io::StuckIo),
        Box::new(probe::Probe),
        Box::new(stall::Stall),
        Box::new(deadlock::Deadlock),
        Box::new(lock_wait::LockWaitPass),
        Box::new(resources::Resources),
        Box::new(memory::Memory),
        Box::new(connections::Connections),
        Box::new(requests::Requests),
        Box::new(rules::Verdicts),
        Box::new(senders::Senders),
    ]
}

/// Runs [`standard_passes`] over `window` of the store.
///
/// # Errors
///
/// [`AnalyseError::Read`] when the store cannot be read.
pub fn analyse(
    reader: &dyn Reader,
    config: &AnalyseConfig,
    window: TimeWindow,
) -> Result<Diagnosis, AnalyseError> {
    let mut cx = Context {
        reader,
        config,
        window,
        diagnosis: Diagnosis::default(),
    };
    for pass in standard_passes() {
        pass.run(&mut cx).map_err(|source| AnalyseError::Read {
            pass: pass.name(),
            source,
        })?;
    }
    Ok(cx.diagnosis)
}
