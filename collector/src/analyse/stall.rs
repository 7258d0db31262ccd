//! Pass 3, runtime stall: `kms.stall` episodes (a worker stuck in one poll:
//! which worker, task and span; or the heartbeat lagging) and the heartbeat
//! health of `kms.runtime` samples through the failure window.

use std::collections::BTreeMap;

use serde::Serialize;

use super::attrs::{bool_of, i64_of, str_of};
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
    /// True when a `kms.stall_end` closed it.
    pub ended: bool,
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
    /// Samples in the failure window over the threshold, or with `heartbeat.ok = false`.
    pub lagging_samples_in_failure: usize,
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
    /// (time, lag ms) of every sample, for the timeline.
    #[serde(skip)]
    pub lag_series: Vec<(i64, i64)>,
}

impl StallFindings {
    /// Start of a full runtime stall still going on at the end (a heartbeat
    /// stall, or every worker stuck in a poll): no future can make progress
    /// from then on.
    pub fn full_stall_since(&self) -> Option<i64> {
        self.episodes
            .iter()
            .filter(|e| !e.ended)
            .filter(|e| {
                e.kind == "heartbeat"
                    || matches!((e.workers_stuck, e.workers), (Some(s), Some(w)) if w > 0 && s >= w)
            })
            .map(|e| e.first_ns)
            .min()
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
        let mut f = StallFindings {
            episodes: episodes(&stalls, &ends),
            threshold_ms,
            runtime_samples: samples.len(),
            ..StallFindings::default()
        };
        let mut times = Vec::with_capacity(samples.len());
        for s in &samples {
            let lag = i64_of(&s.attributes, "heartbeat.lag_ms").unwrap_or(0);
            f.lag_series.push((s.time_ns, lag));
            times.push(s.time_ns);
            if !failure.contains(s.time_ns) {
                continue;
            }
            f.samples_in_failure += 1;
            f.max_lag_in_failure_ms = Some(f.max_lag_in_failure_ms.unwrap_or(0).max(lag));
            let ok = bool_of(&s.attributes, "heartbeat.ok").unwrap_or(true);
            if lag > threshold_ms || !ok {
                f.lagging_samples_in_failure += 1;
                f.first_lagging_ns.get_or_insert(s.time_ns);
            }
        }
        f.lag_persistent = f.lagging_samples_in_failure >= 2
            && f.lagging_samples_in_failure * 3 >= f.samples_in_failure;
        let mut gaps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort_unstable();
        let interval = gaps.get(gaps.len() / 2).copied();
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
            ended: false,
        });
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
