//! Pass 6, runtime resources: what the runtime's own resources did through
//! the failure window, read from `kms.runtime` and `kms.process` samples and
//! the newest tokio-console snapshot. Each finding is a fact about one
//! resource the D rules weigh:
//!
//! - the blocking pool: tokio queues a `spawn_blocking` job only when every
//!   pool thread is busy and the pool is at its maximum, so a queue that stays
//!   above zero and does not drain means the pool is exhausted;
//! - the scheduler queues: queues that grow while every worker stays busy;
//! - the listen queue: connections the kernel completed and the runtime never
//!   accepted, whether or not the process holds them;
//! - tasks that can never be woken: idle, not completed, with no waker left
//!   (tokio-console's lost-waker lint), spawned during the failure.

use serde::Serialize;

use super::attrs::{i64_of, json_of};
use super::worker_cpu::{CpuUse, WorkersCpu};
use super::{Context, Pass};
use crate::store::ReadError;

/// Queue growth (tasks) that counts as scheduler starvation.
pub(crate) const STARVATION_MIN_GROWTH: i64 = 64;
/// Busy ratio at or above which a worker counts as saturated.
pub(crate) const BUSY_RATIO: f64 = 0.9;

/// A run of samples in which one resource stayed in one state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourceRun {
    /// First sample of the run.
    pub from_ns: i64,
    /// Last sample of the run.
    pub to_ns: i64,
    /// Samples in the run.
    pub samples: usize,
    /// The measured value at the first sample.
    pub first: i64,
    /// The measured value at the last sample.
    pub last: i64,
    /// The largest value in the run.
    pub peak: i64,
}

/// The blocking pool in the failure window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BlockingPool {
    /// Samples with blocking-pool figures.
    pub samples: usize,
    /// Most pool threads seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_threads: Option<i64>,
    /// The configured maximum (`runtime.blocking_threads_max`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_threads: Option<i64>,
    /// The longest run of samples with jobs queued and no idle thread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued: Option<ResourceRun>,
    /// True when that run is still going at the last sample and did not
    /// drain (its last queue depth is at least its first).
    pub exhausted: bool,
}

/// The scheduler's queues in the failure window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SchedulerQueues {
    /// Samples with queue figures.
    pub samples: usize,
    /// Worker count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<i64>,
    /// The longest run of samples with every worker busy, with the total
    /// queue depth (global + local) it carried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saturated: Option<ResourceRun>,
    /// True when queues grew through that run by at least
    /// `STARVATION_MIN_GROWTH` (64) tasks and doubled.
    pub starving: bool,
    /// Samples whose workers were busy by tokio's clock but waited for a
    /// CPU longer than they ran: the host starved them, so they do not
    /// count as saturated.
    pub host_starved_samples: usize,
}

/// The listen socket in the failure window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ListenQueue {
    /// Samples with listen-queue figures.
    pub samples: usize,
    /// The listen backlog (the queue's capacity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
    /// The longest run of samples with connections waiting to be accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<ResourceRun>,
    /// Unaccepted connections whose client already gave up (CLOSE_WAIT) at
    /// their peak.
    pub unaccepted_close_wait_peak: i64,
    /// True when connections waited unaccepted in two or more samples in a
    /// row, up to the last sample, without draining.
    pub not_accepting: bool,
}

/// A task that can never be woken.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnwakeableTask {
    /// Console task id.
    pub task_id: i64,
    /// Task name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where it was spawned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spawn_location: Option<String>,
    /// How long it has been idle.
    pub idle_ms: i64,
}

/// What the resources pass found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResourceFindings {
    /// The blocking pool.
    pub blocking_pool: BlockingPool,
    /// The scheduler's queues.
    pub queues: SchedulerQueues,
    /// The listen socket.
    pub listen: ListenQueue,
    /// Tasks idle with no waker, spawned after the failure began.
    pub unwakeable: Vec<UnwakeableTask>,
    /// Time of the console snapshot `unwakeable` was read from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_snapshot_ns: Option<i64>,
}

/// The pass.
#[derive(Debug)]
pub(crate) struct Resources;

impl Pass for Resources {
    fn name(&self) -> &'static str {
        "resources"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let failure = cx.failure_or_window();
        let runtime = cx.reader.events("kms.runtime", failure)?;
        let process = cx.reader.events("kms.process", failure)?;
        let mut f = ResourceFindings::default();

        let mut pool = Vec::new();
        let mut queues = Vec::new();
        for s in &runtime {
            let a = &s.attributes;
            if let Some(depth) = i64_of(a, "runtime.blocking_queue_depth") {
                let threads = i64_of(a, "runtime.blocking_threads");
                let idle = i64_of(a, "runtime.idle_blocking_threads").unwrap_or(0);
                f.blocking_pool.peak_threads = f.blocking_pool.peak_threads.max(threads);
                if let Some(m) = i64_of(a, "runtime.blocking_threads_max") {
                    f.blocking_pool.max_threads = Some(m);
                }
                pool.push((s.time_ns, (depth > 0 && idle == 0).then_some(depth)));
            }
            let global = i64_of(a, "runtime.global_queue_depth");
            let local = i64_of(a, "runtime.local_queue_depth").unwrap_or(0);
            let workers = i64_of(a, "runtime.workers");
            f.queues.workers = workers.or(f.queues.workers);
            if let Some(g) = global {
                let all_busy = all_busy_by_tokio(a);
                // tokio counts a worker busy by the wall clock; one the host
                // does not schedule is "busy" too.
                let host_starved =
                    WorkersCpu::from_attrs(a).is_some_and(|c| c.classify() == CpuUse::Starved);
                if all_busy && host_starved {
                    f.queues.host_starved_samples += 1;
                }
                queues.push((s.time_ns, (all_busy && !host_starved).then_some(g + local)));
            }
        }
        f.blocking_pool.samples = pool.len();
        f.blocking_pool.queued = longest_run(&pool);
        f.blocking_pool.exhausted = f
            .blocking_pool
            .queued
            .as_ref()
            .is_some_and(|r| r.samples >= 2 && ends_at_last(r, &pool) && r.last >= r.first);
        f.queues.samples = queues.len();
        f.queues.saturated = longest_run(&queues);
        f.queues.starving = f.queues.saturated.as_ref().is_some_and(|r| {
            r.samples >= 3
                && r.last - r.first >= STARVATION_MIN_GROWTH
                && r.last >= 2 * r.first.max(1)
        });

        let mut listen = Vec::new();
        for s in &process {
            let a = &s.attributes;
            let queued = i64_of(a, "tcp.listen_queue");
            let unaccepted = json_of(a, "tcp.unaccepted");
            if queued.is_none() && unaccepted.is_none() {
                continue;
            }
            if let Some(b) = i64_of(a, "tcp.listen_backlog") {
                f.listen.backlog = Some(b);
            }
            let by_state = |k: &str| {
                unaccepted
                    .as_ref()
                    .and_then(|u| u.get(k))
                    .and_then(|v| v.as_i64())
                    .unwrap_or(0)
            };
            let total_unaccepted = unaccepted
                .as_ref()
                .and_then(|u| u.as_object())
                .map(|o| o.values().filter_map(|v| v.as_i64()).sum::<i64>())
                .unwrap_or(0);
            f.listen.unaccepted_close_wait_peak = f
                .listen
                .unaccepted_close_wait_peak
                .max(by_state("CLOSE_WAIT"));
            let waiting = queued.unwrap_or(0).max(total_unaccepted);
            listen.push((s.time_ns, (waiting > 0).then_some(waiting)));
        }
        f.listen.samples = listen.len();
        f.listen.waiting = longest_run(&listen);
        f.listen.not_accepting = f
            .listen
            .waiting
            .as_ref()
            .is_some_and(|r| r.samples >= 2 && ends_at_last(r, &listen) && r.last >= r.first);

        if let Some(&latest) = cx.reader.console_snapshot_times(cx.window)?.last() {
            let snap = cx.reader.console_snapshot(latest)?;
            let threshold =
                i64::try_from(cx.config.never_woken_threshold.as_nanos()).unwrap_or(i64::MAX);
            f.console_snapshot_ns = Some(latest);
            f.unwakeable = snap
                .tasks
                .iter()
                .filter(|t| t.state == "idle" && t.waker_count == Some(0))
                // A `block_on` or `spawn_blocking` task is woken through its
                // thread, not a task waker the console counts: no waker left
                // says nothing (tokio-console exempts them from the lint).
                .filter(|t| !matches!(t.kind.as_deref(), Some("block_on" | "blocking")))
                .filter_map(|t| {
                    let idle_since = t.last_poll_ended_ns?;
                    let age = t.busy_ns.unwrap_or(0)
                        + t.idle_ns.unwrap_or(0)
                        + t.scheduled_ns.unwrap_or(0);
                    let spawned = latest - age;
                    (latest - idle_since >= threshold && spawned >= failure.from_ns).then(|| {
                        UnwakeableTask {
                            task_id: t.task_id,
                            name: t.name.clone(),
                            spawn_location: t.spawn_location.clone(),
                            idle_ms: (latest - idle_since) / 1_000_000,
                        }
                    })
                })
                .collect();
        }
        cx.diagnosis.resources = f;
        Ok(())
    }
}

/// True when a `kms.runtime` sample shows every worker busy by tokio's own
/// count: `runtime.busy_workers` of `runtime.workers`, or without them
/// `runtime.busy_ratio` at [`BUSY_RATIO`] or more.
pub(super) fn all_busy_by_tokio(a: &serde_json::Value) -> bool {
    match (
        i64_of(a, "runtime.busy_workers"),
        i64_of(a, "runtime.workers"),
    ) {
        (Some(b), Some(w)) => w > 0 && b >= w,
        _ => super::attrs::f64_of(a, "runtime.busy_ratio").is_some_and(|r| r >= BUSY_RATIO),
    }
}

/// The longest run of consecutive samples with a value (`Some`), latest
/// first on ties.
fn longest_run(series: &[(i64, Option<i64>)]) -> Option<ResourceRun> {
    let mut best: Option<ResourceRun> = None;
    let mut cur: Option<ResourceRun> = None;
    for &(t, v) in series {
        match (v, cur.as_mut()) {
            (Some(v), Some(r)) => {
                r.to_ns = t;
                r.samples += 1;
                r.last = v;
                r.peak = r.peak.max(v);
            }
            (Some(v), None) => {
                cur = Some(ResourceRun {
                    from_ns: t,
                    to_ns: t,
                    samples: 1,
                    first: v,
                    last: v,
                    peak: v,
                })
            }
            (None, _) => {
                if let Some(r) = cur.take() {
                    if best.as_ref().is_none_or(|b| r.samples >= b.samples) {
                        best = Some(r);
                    }
                }
            }
        }
    }
    if let Some(r) = cur {
        if best.as_ref().is_none_or(|b| r.samples >= b.samples) {
            best = Some(r);
        }
    }
    best
}

/// True when `run` reaches the series' last sample.
fn ends_at_last(run: &ResourceRun, series: &[(i64, Option<i64>)]) -> bool {
    series.last().is_some_and(|(t, _)| *t == run.to_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_run_prefers_the_latest_of_equal_runs_and_tracks_values() {
        let s = [
            (1, Some(3)),
            (2, Some(5)),
            (3, None),
            (4, Some(1)),
            (5, Some(9)),
        ];
        let r = longest_run(&s).unwrap();
        assert_eq!(
            (r.from_ns, r.to_ns, r.first, r.last, r.peak),
            (4, 5, 1, 9, 9)
        );
        assert!(ends_at_last(&r, &s));
        assert!(longest_run(&[(1, None)]).is_none());
    }
}
