//! The heartbeat: a tiny task on the watched runtime that ticks every period.
//! If the runtime cannot poll it (all workers busy or blocked, or the timer
//! driver not turning), its last beat ages; the watchdog thread reads that
//! age from outside the runtime.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

/// Shared between the heartbeat task, the watchdog thread and the runtime
/// metrics sampler.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    /// The runtime beating (tokio runtime id).
    pub(crate) runtime: u64,
    period: Duration,
    /// Nanoseconds since [`epoch`] of the last beat.
    last_beat_ns: AtomicU64,
    /// Beats so far.
    beats: AtomicU64,
    /// Largest lag seen since the metrics sampler last took it, in ns.
    max_lag_ns: AtomicU64,
    stopped: AtomicBool,
    /// Set when the heartbeat task is dropped (runtime shut down, or stopped).
    gone: AtomicBool,
}

/// Marks the heartbeat gone when the task is dropped, which is how the
/// watchdog learns that the runtime shut down.
struct Alive(Arc<Heartbeat>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.gone.store(true, Ordering::Release);
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Heartbeat {
    /// Starts a heartbeat task on `handle`, beating every `period`.
    pub(crate) fn start(handle: &tokio::runtime::Handle, period: Duration) -> Arc<Self> {
        let heartbeat = Arc::new(Self {
            runtime: crate::runtime::tokio_id_u64(handle.id()),
            period,
            last_beat_ns: AtomicU64::new(now_ns()),
            beats: AtomicU64::new(0),
            max_lag_ns: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            gone: AtomicBool::new(false),
        });
        register(&heartbeat);
        // Moved into the future, so dropped with it even if never polled.
        let alive = Alive(Arc::clone(&heartbeat));
        handle.spawn(async move {
            let beating = &alive.0;
            let mut ticks = tokio::time::interval(beating.period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !beating.stopped.load(Ordering::Relaxed) {
                ticks.tick().await;
                beating.beat();
            }
        });
        heartbeat
    }

    fn beat(&self) {
        let now = now_ns();
        let previous = self.last_beat_ns.swap(now, Ordering::AcqRel);
        if self.beats.fetch_add(1, Ordering::AcqRel) > 0 {
            let lag = now
                .saturating_sub(previous)
                .saturating_sub(duration_ns(self.period));
            self.max_lag_ns.fetch_max(lag, Ordering::AcqRel);
        }
    }

    /// How late the next beat is right now (0 while on time). Also folds
    /// the value into the interval maximum.
    pub(crate) fn current_lag(&self) -> Duration {
        let since = now_ns().saturating_sub(self.last_beat_ns.load(Ordering::Acquire));
        let lag = since.saturating_sub(duration_ns(self.period));
        self.max_lag_ns.fetch_max(lag, Ordering::AcqRel);
        Duration::from_nanos(lag)
    }

    /// Beats so far.
    pub(crate) fn beats(&self) -> u64 {
        self.beats.load(Ordering::Acquire)
    }

    /// The largest lag since the last call (for `kms.runtime`), including
    /// the lag still building up now.
    #[cfg_attr(not(feature = "runtime-metrics"), allow(dead_code))]
    pub(crate) fn take_max_lag(&self) -> Duration {
        let now = self.current_lag();
        let max = self.max_lag_ns.swap(0, Ordering::AcqRel);
        now.max(Duration::from_nanos(max))
    }

    /// Whether the heartbeat task is gone (its runtime shut down).
    pub(crate) fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Ends the heartbeat task at its next tick.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Heartbeats by runtime, so the metrics sampler can report the heartbeat of
/// the runtime it samples without the two parts being wired together.
static REGISTRY: Mutex<Vec<Weak<Heartbeat>>> = Mutex::new(Vec::new());

fn register(heartbeat: &Arc<Heartbeat>) {
    let mut all = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(heartbeat));
}

/// The live heartbeat of runtime `runtime` (a tokio runtime id), if watched.
#[cfg_attr(not(feature = "runtime-metrics"), allow(dead_code))]
pub(crate) fn for_runtime(runtime: u64) -> Option<Arc<Heartbeat>> {
    REGISTRY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .find(|h| h.runtime == runtime && !h.stopped.load(Ordering::Relaxed) && !h.is_gone())
}
