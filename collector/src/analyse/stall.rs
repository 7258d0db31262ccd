//! Pass 3, runtime stall: `kms.stall` episodes (a worker stuck in one poll:
//! which worker, task and span; or the heartbeat lagging) and the heartbeat
//! health of `kms.runtime` samples through the failure window.

use std::collections::BTreeMap;

use serde::Serialize;

use super::attrs::{bool_of, i64_of, str_of};
use super::worker_cpu::{CpuUse, WorkersCpu};
use super::{AnalyseConfig, Context, Pass};
use crate::store::{EventRow, ReadError, TimeWindow};

/// One stall, from its first `kms.stall` to its `kms.stall_end` (or the last
/// repeat when it never ended).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StallEpisode {
    /// `poll` or `heartbeat`.
    pub kind: String,
    /// Worker index (poll stalls).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<i64>,
    /// OS thread name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_name: Option<String>,
    /// OS thread id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<i64>,
    /// tokio task id being polled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<i64>,
    /// Innermost span entered on the worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_name: Option<String>,
    /// Its trace id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Its span id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    /// Thread state letter (`S`, `R`, `D`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_state: Option<String>,
    /// Kernel wait channel, e.g. `futex_wait_queue`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wchan: Option<String>,
    /// Start: the first report minus the duration it reported.
    pub first_ns: i64,
    /// Last report (or the end).
    pub last_ns: i64,
    /// Longest duration reported.
    pub duration_ms: i64,
    /// The threshold that fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_ms: Option<i64>,
    /// Most workers stuck at once, and the worker count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers_stuck: Option<i64>,
    /// Worker count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<i64>,
    /// The workers' CPU accounting over a heartbeat stall, from its newest
    /// report (absent from older producers and runtimes the library did not
    /// build).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers_cpu: Option<WorkersCpu>,
    /// A heartbeat stall that began as a task dump was requested, on a
    /// runtime that had not been stalling in the seconds before: tokio's
    /// dump of a busy runtime can stall it by itself (workers spinning in the
    /// dump, no task poll running long), so the stall does not show a fault
    /// of the application.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub during_taskdump: bool,
    /// True when a `kms.stall_end` closed it.
    pub ended: bool,
}

impl StallEpisode {
    /// What the workers did during a heartbeat stall; `None` for a poll
    /// stall or without CPU accounting.
    pub fn cpu_use(&self) -> Option<CpuUse> {
        (self.kind == "heartbeat")
            .then_some(self.workers_cpu?)
            .map(|c| c.classify())
    }

    /// True for a heartbeat stall during which the workers waited for a CPU
    /// longer than they ran: the host, not the runtime, held the heartbeat.
    pub fn host_starved(&self) -> bool {
        self.cpu_use() == Some(CpuUse::Starved)
    }

    /// True for a heartbeat stall something other than the runtime's own
    /// work explains: a starved host, or a task dump in progress.
    pub fn not_the_runtimes(&self) -> bool {
        self.host_starved() || self.during_taskdump
    }
}

/// What the stall pass found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StallFindings {
    /// Stall episodes, oldest first.
    pub episodes: Vec<StallEpisode>,
    /// Heartbeat threshold used.
    pub threshold_ms: i64,
    /// `kms.runtime` samples in the analysed window.
    pub runtime_samples: usize,
    /// Of those, inside the failure window.
    pub samples_in_failure: usize,
    /// Largest heartbeat lag in the failure window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_lag_in_failure_ms: Option<i64>,
    /// Samples in the failure window over the threshold, or with
    /// `heartbeat.ok = false`, whose workers were not starved of CPU by the
    /// host.
    pub lagging_samples_in_failure: usize,
    /// Samples in the failure window that lagged while the workers waited
    /// for a CPU longer than they ran (not counted as lagging).
    pub host_starved_samples_in_failure: usize,
    /// Samples in the failure window that lagged during a heartbeat stall a
    /// task dump began (not counted as lagging).
    pub taskdump_samples_in_failure: usize,
    /// First such sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_lagging_ns: Option<i64>,
    /// Longest stretch of the failure window with no `kms.runtime` sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub largest_gap_in_failure_ms: Option<i64>,
    /// Median interval between samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_interval_ms: Option<i64>,
    /// True when the samples cover the failure window with no gap over
    /// three intervals.
    pub covers_failure: bool,
    /// True when the lag persisted: at least two lagging samples making up
    /// a third or more of the samples in the failure window (a single spike
    /// is not a stall).
    pub lag_persistent: bool,
    /// A quarter of the threshold: a heartbeat this late while the workers
    /// are busy means a woken task waits about that long for each turn.
    pub busy_late_bar_ms: i64,
    /// Samples in the failure window whose heartbeat was at least
    /// `busy_late_bar_ms` late, or missed, while the workers were busy on a
    /// CPU (not waiting for one, and not in a stall a task dump began).
    pub busy_late_samples_in_failure: usize,
    /// First such sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_busy_late_ns: Option<i64>,
    /// The median lag of those samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub busy_late_median_lag_ms: Option<i64>,
    /// True when the runtime was saturated: at least three such samples,
    /// making up half or more of the samples in the failure window. Each
    /// may be under the threshold (no stall), yet a request needs many
    /// turns, so it waits many times as long.
    pub saturated: bool,
    /// (time, lag ms) of every sample, for the timeline.
    #[serde(skip)]
    pub lag_series: Vec<(i64, i64)>,
}

impl StallFindings {
    /// Start of a full runtime stall still going on at the end (a heartbeat
    /// stall, or every worker stuck in a poll): no future can make progress
    /// from then on. A runtime that keeps stalling, recovering for moments
    /// between stalls (a heartbeat that lags, beats once and lags again),
    /// has been stalled since the first stall of that run: stalls less than
    /// two thresholds apart join it. Heartbeat stalls the host caused (its
    /// workers waited for a CPU) are not the runtime's.
    pub fn full_stall_since(&self) -> Option<i64> {
        let mut full: Vec<&StallEpisode> = self
            .episodes
            .iter()
            .filter(|e| {
                (e.kind == "heartbeat" && !e.not_the_runtimes())
                    || matches!((e.workers_stuck, e.workers), (Some(s), Some(w)) if w > 0 && s >= w)
            })
            .collect();
        full.sort_by_key(|e| e.first_ns);
        let mut since: Option<i64> = None;
        let mut reach = i64::MIN;
        for e in full {
            let gap_ns = e.threshold_ms.unwrap_or(self.threshold_ms).max(1) * 2_000_000;
            if since.is_none() || e.first_ns > reach.saturating_add(gap_ns) {
                since = Some(e.first_ns);
            }
            reach = reach.max(if e.ended { e.last_ns } else { i64::MAX });
        }
        // Only a run that is still going on.
        since.filter(|_| reach == i64::MAX)
    }

    /// The first sample of a saturated runtime (see `saturated`), if it was.
    pub fn saturated_since(&self) -> Option<i64> {
        self.first_busy_late_ns.filter(|_| self.saturated)
    }

    /// Episodes that overlap `w`.
    pub fn episodes_in(&self, w: TimeWindow) -> impl Iterator<Item = &StallEpisode> {
        self.episodes
            .iter()
            .filter(move |e| w.overlaps(e.first_ns, e.last_ns))
    }
}

/// The pass.
#[derive(Debug)]
pub(crate) struct Stall;

impl Pass for Stall {
    fn name(&self) -> &'static str {
        "stall"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let stalls = cx.reader.events("kms.stall", cx.window)?;
        let ends = cx.reader.events("kms.stall_end", cx.window)?;
        let samples = cx.reader.events("kms.runtime", cx.window)?;
        let threshold_ms = match cx.config.heartbeat_lag_threshold {
            Some(t) => i64::try_from(t.as_millis()).unwrap_or(i64::MAX),
            None => producer_setting_ms(cx, "config.stall_heartbeat_threshold_ms")?.unwrap_or_else(
                || {
                    i64::try_from(AnalyseConfig::DEFAULT_HEARTBEAT_LAG_THRESHOLD.as_millis())
                        .unwrap_or(i64::MAX)
                },
            ),
        };
        let failure = cx.failure_or_window();
        let dumps = taskdump_periods(&cx.reader.events("kms.taskdump", cx.window)?);
        let mut f = StallFindings {
            episodes: episodes(&stalls, &ends),
            threshold_ms,
            runtime_samples: samples.len(),
            ..StallFindings::default()
        };
        f.busy_late_bar_ms = threshold_ms / 4;
        let mut times: Vec<i64> = samples.iter().map(|s| s.time_ns).collect();
        times.sort_unstable();
        let mut gaps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort_unstable();
        let interval = gaps.get(gaps.len() / 2).copied();
        // Per sample: was its heartbeat late with the workers busy (whatever
        // dump was going on)?
        let late_busy: Vec<bool> = samples
            .iter()
            .map(|s| late_and_busy(&s.attributes, f.busy_late_bar_ms))
            .collect();
        // A stall is the dump's when it began with a dump request on a
        // runtime that was not stalling already (a dump requested of a stuck
        // runtime times out because of the stall, not the other way round),
        // nor late with its workers busy in the samples just before (a
        // saturated runtime: each lag under the threshold, so no stall yet).
        let spans: Vec<(i64, i64)> = f
            .episodes
            .iter()
            .map(|e| (e.first_ns, if e.ended { e.last_ns } else { i64::MAX }))
            .collect();
        for (i, ep) in f.episodes.iter_mut().enumerate() {
            if ep.kind != "heartbeat" {
                continue;
            }
            let with_a_request = dumps.iter().any(|&(from, _)| {
                ep.first_ns >= from - TASKDUMP_LEAD_NS && ep.first_ns <= from + TASKDUMP_LAG_NS
            });
            let stalling_before = spans.iter().enumerate().any(|(j, &(from, to))| {
                j != i && from < ep.first_ns && to.saturating_add(RECOVERED_NS) >= ep.first_ns
            });
            let late_before = samples.iter().zip(&late_busy).any(|(s, &late)| {
                late && s.time_ns < ep.first_ns
                    && s.time_ns >= ep.first_ns - RECOVERED_NS - interval.unwrap_or(0)
            });
            ep.during_taskdump = with_a_request && !stalling_before && !late_before;
        }
        // A sample lags during such a stall when taken from its start to
        // one sample after its end (a sample reports the largest lag of the
        // interval before it).
        let dump_stalls: Vec<(i64, i64)> = f
            .episodes
            .iter()
            .filter(|e| e.during_taskdump)
            .map(|e| (e.first_ns, if e.ended { e.last_ns } else { i64::MAX }))
            .collect();
        let mut busy_late_lags = Vec::new();
        for (s, &late_busy) in samples.iter().zip(&late_busy) {
            let lag = i64_of(&s.attributes, "heartbeat.lag_ms").unwrap_or(0);
            f.lag_series.push((s.time_ns, lag));
            if !failure.contains(s.time_ns) {
                continue;
            }
            f.samples_in_failure += 1;
            f.max_lag_in_failure_ms = Some(f.max_lag_in_failure_ms.unwrap_or(0).max(lag));
            let ok = bool_of(&s.attributes, "heartbeat.ok").unwrap_or(true);
            let starved = WorkersCpu::from_attrs(&s.attributes)
                .is_some_and(|c| c.classify() == CpuUse::Starved);
            let in_dump_stall = dump_stalls.iter().any(|&(from, to)| {
                s.time_ns >= from && s.time_ns <= to.saturating_add(SAMPLE_AFTER_NS)
            });
            if late_busy && !in_dump_stall {
                busy_late_lags.push(lag);
                f.first_busy_late_ns.get_or_insert(s.time_ns);
            }
            if (lag > threshold_ms || !ok) && starved {
                f.host_starved_samples_in_failure += 1;
            } else if (lag > threshold_ms || !ok) && in_dump_stall {
                f.taskdump_samples_in_failure += 1;
            } else if lag > threshold_ms || !ok {
                f.lagging_samples_in_failure += 1;
                f.first_lagging_ns.get_or_insert(s.time_ns);
            }
        }
        f.lag_persistent = f.lagging_samples_in_failure >= 2
            && f.lagging_samples_in_failure * 3 >= f.samples_in_failure;
        f.busy_late_samples_in_failure = busy_late_lags.len();
        busy_late_lags.sort_unstable();
        f.busy_late_median_lag_ms = busy_late_lags.get(busy_late_lags.len() / 2).copied();
        f.saturated = busy_late_lags.len() >= 3 && busy_late_lags.len() * 2 >= f.samples_in_failure;
        f.sample_interval_ms = interval.map(|g| g / 1_000_000);
        // Gaps inside the failure window, its edges included (bounded by the
        // analysed window, which ends at the last stored fact).
        let mut edges = vec![failure.from_ns.max(cx.window.from_ns)];
        edges.extend(times.iter().copied().filter(|t| failure.contains(*t)));
        edges.push(failure.to_ns.min(cx.window.to_ns));
        let largest = edges.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        f.largest_gap_in_failure_ms = Some(largest / 1_000_000);
        f.covers_failure = match interval {
            Some(iv) => f.samples_in_failure > 0 && largest <= 3 * iv.max(1_000_000_000),
            None => f.samples_in_failure > 0,
        };
        cx.diagnosis.stall = f;
        Ok(())
    }
}

/// True when a `kms.runtime` sample shows the heartbeat at least `bar_ms`
/// late (or missed) while the workers were busy.
fn late_and_busy(a: &serde_json::Value, bar_ms: i64) -> bool {
    let late = i64_of(a, "heartbeat.lag_ms").is_some_and(|lag| lag >= bar_ms)
        || bool_of(a, "heartbeat.ok") == Some(false);
    late && workers_busy(a)
}

/// True when a `kms.runtime` sample shows the workers busy: on a CPU for
/// half the interval or more by their CPU accounting (tokio's own busy count
/// can read zero for workers that ran the whole interval); without it, every
/// worker busy by tokio's count.
fn workers_busy(a: &serde_json::Value) -> bool {
    if let Some(cpu) = WorkersCpu::from_attrs(a) {
        return cpu.classify() == CpuUse::Busy;
    }
    super::resources::all_busy_by_tokio(a)
}

/// A positive millisecond setting of the producer (`key`, e.g.
/// `config.stall_heartbeat_threshold_ms`), from its newest `kms.startup`
/// event up to the end of the window.
pub(crate) fn producer_setting_ms(cx: &Context<'_>, key: &str) -> Result<Option<i64>, ReadError> {
    let startups = cx
        .reader
        .events("kms.startup", TimeWindow::new(i64::MIN, cx.window.to_ns))?;
    Ok(startups
        .iter()
        .rev()
        .find_map(|e| i64_of(&e.attributes, key))
        .filter(|t| *t > 0))
}

/// How long before a task dump's request a heartbeat stall may seem to
/// begin and still be the dump's: the heartbeat's last beat comes up to a
/// period (at most 100 ms) before the runtime stops, and the watchdog looks
/// every 100 ms at most.
const TASKDUMP_LEAD_NS: i64 = 500_000_000;

/// How long after a task dump's request a heartbeat stall may begin and
/// still be the dump's (the dump stops the workers at once).
const TASKDUMP_LAG_NS: i64 = 1_000_000_000;

/// How long a runtime must have been free of stalls before a dump request
/// for a stall beginning then to be the dump's.
const RECOVERED_NS: i64 = 4_000_000_000;

/// How long after a stall's end a `kms.runtime` sample still reports it
/// (the default sample interval is 5 s).
const SAMPLE_AFTER_NS: i64 = 6_000_000_000;

/// When task dumps were in progress: from each dump's request to its
/// answer, or with no end when it timed out and no answer followed (the
/// library keeps a timed-out dump pending and reports its total wait).
fn taskdump_periods(dumps: &[EventRow]) -> Vec<(i64, i64)> {
    let started = |d: &EventRow| {
        let waited = super::attrs::f64_of(&d.attributes, "taskdump.duration_ms").unwrap_or(0.0);
        d.time_ns - (waited * 1e6) as i64
    };
    let outcome = |d: &EventRow| str_of(&d.attributes, "taskdump.outcome");
    let answers: Vec<(i64, i64)> = dumps
        .iter()
        .filter(|d| outcome(d).as_deref() == Some("ok"))
        .map(|d| (started(d), d.time_ns))
        .collect();
    let mut periods = answers.clone();
    for d in dumps
        .iter()
        .filter(|d| outcome(d).as_deref() == Some("timeout"))
    {
        let from = started(d);
        // The answer to this very dump: requested at (about) the same time.
        let to = answers
            .iter()
            .filter(|(s, e)| (s - from).abs() <= 1_000_000_000 && *e >= d.time_ns)
            .map(|(_, e)| *e)
            .min()
            .unwrap_or(i64::MAX);
        periods.push((from, to));
    }
    periods
}

fn stall_key(e: &EventRow) -> (String, Option<i64>, Option<i64>) {
    let a = &e.attributes;
    let kind = str_of(a, "stall.kind").unwrap_or_else(|| "poll".into());
    if kind == "heartbeat" {
        (kind, None, None)
    } else {
        (kind, i64_of(a, "tokio.worker"), i64_of(a, "tokio.task.id"))
    }
}

fn episodes(stalls: &[EventRow], ends: &[EventRow]) -> Vec<StallEpisode> {
    let mut open: BTreeMap<(String, Option<i64>, Option<i64>), StallEpisode> = BTreeMap::new();
    let mut done = Vec::new();
    // Merge both streams in time order.
    let mut all: Vec<(&EventRow, bool)> = stalls
        .iter()
        .map(|e| (e, false))
        .chain(ends.iter().map(|e| (e, true)))
        .collect();
    all.sort_by_key(|(e, is_end)| (e.time_ns, *is_end));
    for (e, is_end) in all {
        let key = stall_key(e);
        let a = &e.attributes;
        let duration = i64_of(a, "stall.duration_ms")
            .or_else(|| i64_of(a, "heartbeat.lag_ms"))
            .unwrap_or(0);
        if is_end {
            if let Some(mut ep) = open.remove(&key) {
                ep.last_ns = e.time_ns;
                ep.workers_cpu = WorkersCpu::from_attrs(a).or(ep.workers_cpu);
                ep.duration_ms = ep.duration_ms.max(duration);
                ep.ended = true;
                done.push(ep);
            }
            continue;
        }
        let ep = open.entry(key.clone()).or_insert_with(|| StallEpisode {
            kind: key.0.clone(),
            worker: key.1,
            thread_name: str_of(a, "thread.name"),
            thread_id: i64_of(a, "thread.id"),
            task_id: i64_of(a, "tokio.task.id"),
            span_name: str_of(a, "span.name"),
            trace_id: str_of(a, "span.trace_id").or_else(|| e.trace_id.clone()),
            span_id: str_of(a, "span.span_id").or_else(|| e.span_id.clone()),
            thread_state: None,
            wchan: None,
            first_ns: e.time_ns - duration.max(0).saturating_mul(1_000_000),
            last_ns: e.time_ns,
            duration_ms: 0,
            threshold_ms: i64_of(a, "stall.threshold_ms"),
            workers_stuck: None,
            workers: i64_of(a, "runtime.workers"),
            workers_cpu: None,
            during_taskdump: false,
            ended: false,
        });
        if let Some(cpu) = WorkersCpu::from_attrs(a) {
            ep.workers_cpu = Some(cpu);
        }
        ep.last_ns = e.time_ns;
        ep.duration_ms = ep.duration_ms.max(duration);
        // The newest thread state says the most about where it is stuck now.
        if let Some(s) = str_of(a, "os.thread.state") {
            ep.thread_state = Some(s);
        }
        if let Some(w) = str_of(a, "os.thread.wchan") {
            ep.wchan = Some(w);
        }
        if ep.span_name.is_none() {
            ep.span_name = str_of(a, "span.name");
        }
        if let Some(n) = i64_of(a, "runtime.workers_stuck") {
            ep.workers_stuck = Some(ep.workers_stuck.unwrap_or(0).max(n));
        }
    }
    done.extend(open.into_values());
    done.sort_by_key(|e| (e.first_ns, e.worker));
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    fn heartbeat(from_s: i64, to_s: i64, ended: bool) -> StallEpisode {
        StallEpisode {
            kind: "heartbeat".into(),
            worker: None,
            thread_name: None,
            thread_id: None,
            task_id: None,
            span_name: None,
            trace_id: None,
            span_id: None,
            thread_state: None,
            wchan: None,
            first_ns: from_s * S,
            last_ns: to_s * S,
            duration_ms: (to_s - from_s) * 1000,
            threshold_ms: Some(2000),
            workers_stuck: Some(0),
            workers: Some(2),
            workers_cpu: None,
            during_taskdump: false,
            ended,
        }
    }

    fn since(episodes: Vec<StallEpisode>) -> Option<i64> {
        StallFindings {
            episodes,
            threshold_ms: 2000,
            ..StallFindings::default()
        }
        .full_stall_since()
        .map(|ns| ns / S)
    }

    #[test]
    fn a_runtime_that_keeps_stalling_is_stalled_since_the_first_stall_of_the_run() {
        // Lags, beats once, lags again: one run from 10 s.
        assert_eq!(
            since(vec![
                heartbeat(10, 14, true),
                heartbeat(15, 20, true),
                heartbeat(21, 30, false)
            ]),
            Some(10)
        );
        // A stall long over (more than two thresholds before) is not part of it.
        assert_eq!(
            since(vec![heartbeat(10, 14, true), heartbeat(30, 40, false)]),
            Some(30)
        );
        // Nothing still going on: no full stall.
        assert_eq!(since(vec![heartbeat(10, 14, true)]), None);
    }

    #[test]
    fn a_heartbeat_the_host_starved_is_no_runtime_stall() {
        let mut starved = heartbeat(10, 30, false);
        starved.workers_cpu = Some(WorkersCpu {
            cpu_ms: 300,
            wait_ms: Some(2600),
            window_ms: 3000,
        });
        assert!(starved.host_starved());
        assert_eq!(since(vec![starved]), None);
    }
}
