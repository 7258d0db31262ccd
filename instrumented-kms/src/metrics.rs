//! Runtime and per-RPC task metrics (feature `runtime-metrics`), from
//! tokio-metrics, sampled on a named OS thread (`kms-diag-metrics`).
//!
//! Every interval (default 5 s) the thread takes one
//! [`RuntimeMonitor`](tokio_metrics::RuntimeMonitor) interval per watched
//! runtime, plus the heartbeat lag when the watchdog watches that runtime, and
//! emits `kms.runtime`; and one [`TaskMonitor`] interval per RPC method seen by
//! [`monitor_rpc`], emitted as `kms.task_metrics` and logged at debug.
//!
//! tokio-metrics learns about a poll when it returns, so it cannot see a poll
//! that never returns or a task never woken again; the watchdog covers those.

#[cfg(not(tokio_unstable))]
compile_error!(
    "instrumented-kms feature `runtime-metrics` needs tokio's unstable runtime metrics: build \
     with RUSTFLAGS=\"--cfg tokio_unstable\" (or set it in .cargo/config.toml), or disable the feature."
);

use std::collections::HashMap;
use std::future::Future;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_metrics::{RuntimeMetrics, TaskMetrics, TaskMonitor};

use crate::event::{DiagEvent, Severity};
use crate::runtime::RuntimeLimits;
use crate::sink::EventSink;

/// Sampler settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetricsConfig {
    /// Sampling interval. Default 5 s.
    pub(crate) interval: Duration,
}

impl MetricsConfig {
    /// Default of [`MetricsConfig::interval`].
    pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            interval: Self::DEFAULT_INTERVAL,
        }
    }
}

/// A worker counts as busy when its busy time in the interval is at least
/// this share of the interval (`runtime.busy_workers`).
pub(crate) const BUSY_WORKER_RATIO: f64 = 0.9;

/// A runtime waiting to be sampled, with what the host told us about it.
type Pending = (tokio::runtime::Handle, RuntimeLimits);

/// Adds runtimes to a running sampler. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct MetricsHandle {
    pending: Arc<Mutex<Vec<Pending>>>,
}

impl MetricsHandle {
    /// Samples the runtime behind `handle` from the next interval on.
    pub(crate) fn watch_runtime(&self, handle: &tokio::runtime::Handle, limits: RuntimeLimits) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((handle.clone(), limits));
    }
}

/// Starts the sampler thread; it runs until `stop` receives a message or its
/// sender is dropped.
///
/// # Errors
///
/// The OS refused to start the thread.
pub(crate) fn spawn(
    config: MetricsConfig,
    sink: EventSink,
    stop: Receiver<()>,
) -> std::io::Result<(MetricsHandle, JoinHandle<()>)> {
    let handle = MetricsHandle {
        pending: Arc::new(Mutex::new(Vec::new())),
    };
    let pending = Arc::clone(&handle.pending);
    let thread = std::thread::Builder::new()
        .name("kms-diag-metrics".into())
        .spawn(move || run(config, sink, stop, pending))?;
    Ok((handle, thread))
}

struct SampledRuntime {
    runtime: u64,
    handle: tokio::runtime::Handle,
    limits: RuntimeLimits,
    /// Each worker's total busy time at the last sample.
    busy: Vec<Duration>,
    intervals: tokio_metrics::RuntimeIntervals,
    /// Heartbeat count at the last sample (to tell whether it beat since).
    #[cfg_attr(not(feature = "watchdog"), allow(dead_code))]
    last_beats: Option<u64>,
    /// The workers' CPU counters at the last sample.
    #[cfg(feature = "watchdog")]
    cpu: Option<crate::watchdog::worker_cpu::WorkerCpu>,
}

fn run(
    config: MetricsConfig,
    sink: EventSink,
    stop: Receiver<()>,
    pending: Arc<Mutex<Vec<Pending>>>,
) {
    #[cfg(feature = "deadlock-detection")]
    crate::runtime::threads::register_current();
    let mut runtimes: Vec<SampledRuntime> = Vec::new();
    let mut tasks: HashMap<&'static str, tokio_metrics::TaskIntervals> = HashMap::new();
    loop {
        for (handle, limits) in pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let mut intervals = tokio_metrics::RuntimeMonitor::new(&handle).intervals();
            // The first interval runs from the runtime's start; begin from now.
            let _ = intervals.next();
            runtimes.push(SampledRuntime {
                runtime: crate::runtime::tokio_id_u64(handle.id()),
                busy: worker_busy(&handle),
                #[cfg(feature = "watchdog")]
                cpu: crate::watchdog::worker_cpu::WorkerCpu::take(&handle),
                handle,
                limits,
                intervals,
                last_beats: None,
            });
        }
        match stop.recv_timeout(config.interval) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
        for sampled in &mut runtimes {
            if let Some(metrics) = sampled.intervals.next() {
                sink.emit(runtime_event(sampled, &metrics));
            }
        }
        for (method, monitor) in monitors_snapshot() {
            let intervals = tasks.entry(method).or_insert_with(|| monitor.intervals());
            if let Some(metrics) = intervals.next() {
                let event = task_event(method, &monitor.cumulative(), &metrics);
                tracing::debug!(
                    target: "instrumented_kms::metrics",
                    rpc_method = method,
                    attributes = ?event.attributes,
                    "Task metrics sampled."
                );
                sink.emit(event);
            }
        }
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn millis_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Each worker's total busy time since the runtime started.
fn worker_busy(handle: &tokio::runtime::Handle) -> Vec<Duration> {
    let metrics = handle.metrics();
    (0..metrics.num_workers())
        .map(|w| metrics.worker_total_busy_duration(w))
        .collect()
}

/// Workers whose busy time between `before` and `after` is at least
/// [`BUSY_WORKER_RATIO`] of `elapsed`.
fn busy_workers(before: &[Duration], after: &[Duration], elapsed: Duration) -> usize {
    let line = elapsed.mul_f64(BUSY_WORKER_RATIO);
    after
        .iter()
        .enumerate()
        .filter(|(w, now)| {
            let then = before.get(*w).copied().unwrap_or_default();
            !elapsed.is_zero() && now.saturating_sub(then) >= line
        })
        .count()
}

fn runtime_event(sampled: &mut SampledRuntime, m: &RuntimeMetrics) -> DiagEvent {
    let capacity = m.elapsed.as_secs_f64() * m.workers_count as f64;
    let busy_ratio = if capacity > 0.0 {
        m.total_busy_duration.as_secs_f64() / capacity
    } else {
        0.0
    };
    let event = DiagEvent::new(
        "kms.runtime",
        Severity::Info,
        format!(
            "Runtime: {} workers {:.0}% busy, {} polls, {} live tasks, global queue {}.",
            m.workers_count,
            busy_ratio * 100.0,
            m.total_polls_count,
            m.live_tasks_count,
            m.global_queue_depth
        ),
    );
    let busy = worker_busy(&sampled.handle);
    let busy_workers = busy_workers(&sampled.busy, &busy, m.elapsed);
    sampled.busy = busy;
    let mut event = with_worker_cpu(with_heartbeat(event, sampled), sampled);
    if let Some(max) = sampled.limits.max_blocking_threads {
        event = event.attr("runtime.blocking_threads_max", max);
    }
    event
        .attr("tokio.runtime.id", sampled.runtime)
        .attr("runtime.workers", m.workers_count)
        .attr("runtime.alive_tasks", m.live_tasks_count)
        .attr("runtime.global_queue_depth", m.global_queue_depth)
        .attr("runtime.total_polls", m.total_polls_count)
        .attr("runtime.busy_ratio", busy_ratio)
        .attr("runtime.mean_poll_us", micros(m.mean_poll_duration))
        .attr("runtime.max_busy_worker_ms", millis_f(m.max_busy_duration))
        .attr("runtime.blocking_threads", m.blocking_threads_count)
        .attr("runtime.blocking_queue_depth", m.blocking_queue_depth)
        .attr(
            "runtime.idle_blocking_threads",
            m.idle_blocking_threads_count,
        )
        .attr("runtime.local_queue_depth", m.total_local_queue_depth)
        .attr("runtime.max_local_queue_depth", m.max_local_queue_depth)
        .attr("runtime.busy_workers", busy_workers)
        .attr("runtime.elapsed_ms", millis_f(m.elapsed))
}

/// Adds the heartbeat of the sampled runtime when the watchdog watches it.
#[cfg(feature = "watchdog")]
fn with_heartbeat(mut event: DiagEvent, sampled: &mut SampledRuntime) -> DiagEvent {
    if let Some(heartbeat) = crate::watchdog::heartbeat_for_runtime(sampled.runtime) {
        let beats = heartbeat.beats();
        let ok = beats > sampled.last_beats.unwrap_or(0);
        sampled.last_beats = Some(beats);
        event = event
            .attr(
                "heartbeat.lag_ms",
                millis_f(heartbeat.take_max_lag()).round() as i64,
            )
            .attr("heartbeat.ok", ok);
    }
    event
}

#[cfg(not(feature = "watchdog"))]
fn with_heartbeat(event: DiagEvent, _sampled: &mut SampledRuntime) -> DiagEvent {
    event
}

/// Adds the workers' CPU time and run-queue wait since the last sample
/// (threads are known on runtimes built by `runtime_builder`).
#[cfg(feature = "watchdog")]
fn with_worker_cpu(mut event: DiagEvent, sampled: &mut SampledRuntime) -> DiagEvent {
    use crate::watchdog::worker_cpu::{attributes, WorkerCpu};
    let now = WorkerCpu::take(&sampled.handle);
    if let (Some(before), Some(now)) = (&sampled.cpu, &now) {
        let (cpu, window) = now.since(before);
        for (key, value) in attributes(cpu, window) {
            event = event.attr(key, value);
        }
    }
    if now.is_some() {
        sampled.cpu = now;
    }
    event
}

#[cfg(not(feature = "watchdog"))]
fn with_worker_cpu(event: DiagEvent, _sampled: &mut SampledRuntime) -> DiagEvent {
    event
}

/// `total` gives the counts since start (so `task.in_flight` is the number of
/// handlers running now, stuck ones included); `m`, the interval, gives the
/// poll figures.
fn task_event(method: &'static str, total: &TaskMetrics, m: &TaskMetrics) -> DiagEvent {
    let in_flight = total.instrumented_count.saturating_sub(total.dropped_count);
    DiagEvent::new(
        "kms.task_metrics",
        Severity::Info,
        format!(
            "{method}: {in_flight} in flight, {} polls (mean {:.1} us, {} slow).",
            m.total_poll_count,
            micros(m.mean_poll_duration()),
            m.total_slow_poll_count
        ),
    )
    .attr("rpc.method", method)
    .attr("task.instrumented", total.instrumented_count)
    .attr("task.dropped", total.dropped_count)
    .attr("task.in_flight", in_flight)
    .attr("task.polls", m.total_poll_count)
    .attr("task.mean_poll_us", micros(m.mean_poll_duration()))
    .attr("task.slow_polls", m.total_slow_poll_count)
    .attr("task.mean_idle_ms", millis_f(m.mean_idle_duration()))
    .attr(
        "task.mean_scheduled_us",
        micros(m.mean_scheduled_duration()),
    )
}

/// One [`TaskMonitor`] per RPC method.
fn monitors() -> &'static RwLock<HashMap<&'static str, TaskMonitor>> {
    static MONITORS: OnceLock<RwLock<HashMap<&'static str, TaskMonitor>>> = OnceLock::new();
    MONITORS.get_or_init(Default::default)
}

fn monitor_for(method: &'static str) -> TaskMonitor {
    if let Some(monitor) = monitors()
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(method)
    {
        return monitor.clone();
    }
    monitors()
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(method)
        .or_default()
        .clone()
}

fn monitors_snapshot() -> Vec<(&'static str, TaskMonitor)> {
    monitors()
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect()
}

/// Runs `fut` under the [`TaskMonitor`] of RPC `method`.
pub(crate) async fn monitor_rpc<F: Future>(method: &'static str, fut: F) -> F::Output {
    monitor_for(method).instrument(fut).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_promptly_when_its_stop_sender_is_dropped() {
        let (stop, stopped) = std::sync::mpsc::channel();
        let config = MetricsConfig {
            interval: std::time::Duration::from_secs(60),
        };
        let (_handle, thread) =
            spawn(config, crate::sink::EventSink::new(|_| {}), stopped).unwrap();
        assert_eq!(thread.thread().name(), Some("kms-diag-metrics"));
        let asked = std::time::Instant::now();
        drop(stop);
        let deadline = asked + std::time::Duration::from_secs(5);
        while !thread.is_finished() {
            assert!(std::time::Instant::now() < deadline, "thread did not stop");
            std::thread::yield_now();
        }
        // The interval is a minute; stopping does not wait for it.
        assert!(asked.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn busy_workers_count_those_busy_for_nine_tenths_of_the_interval() {
        let ms = Duration::from_millis;
        let before = [ms(100), ms(0), ms(50)];
        let after = [ms(1100), ms(899), ms(950)];
        // 1000 ms busy of 1000: busy; 899: not; 900: busy (the line is inclusive).
        assert_eq!(busy_workers(&before, &after, ms(1000)), 2);
        // A worker that appeared since the last sample counts from zero.
        assert_eq!(busy_workers(&before[..2], &after, ms(1000)), 2);
        assert_eq!(busy_workers(&before, &after, Duration::ZERO), 0);
    }

    #[test]
    fn one_monitor_per_method() {
        let rt = crate::runtime_builder(Some(1)).build().unwrap();
        rt.block_on(async {
            monitor_rpc("UnitA", async {}).await;
            monitor_rpc("UnitA", async {}).await;
            monitor_rpc("UnitB", async {}).await;
        });
        assert_eq!(monitor_for("UnitA").cumulative().instrumented_count, 2);
        assert_eq!(monitor_for("UnitA").cumulative().dropped_count, 2);
        assert_eq!(monitor_for("UnitB").cumulative().instrumented_count, 1);
    }
}
