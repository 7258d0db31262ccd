//! Pass 7, memory: the RSS trend of `kms.process` samples against the
//! process's memory limit (cgroup `memory.max`, else MemTotal). RSS near the
//! limit points at C.

use serde::Serialize;

use super::attrs::i64_of;
use super::{Context, Pass};
use crate::store::ReadError;

/// What the memory pass found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MemoryFindings {
    /// `kms.process` samples with an RSS.
    pub samples: usize,
    /// First RSS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_rss_bytes: Option<i64>,
    /// Highest RSS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<i64>,
    /// When it peaked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_ns: Option<i64>,
    /// Last RSS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_rss_bytes: Option<i64>,
    /// The memory limit (the last one reported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<i64>,
    /// Peak RSS / limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_ratio: Option<f64>,
    /// Least-squares RSS slope over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slope_bytes_per_s: Option<f64>,
    /// Where the trend meets the limit, when rising.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projected_limit_ns: Option<i64>,
    /// True when the peak reached the near-limit fraction.
    pub near_limit: bool,
    /// Log records in the window whose body carries a captured backtrace
    /// (`Stack backtrace:`, as anyhow prints one with `RUST_BACKTRACE=1` or
    /// `RUST_LIB_BACKTRACE=1`): each costs memory while its error lives.
    pub backtrace_logs: usize,
    /// The first of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_backtrace_ns: Option<i64>,
    /// (time, rss) series, for the timeline.
    #[serde(skip)]
    pub rss_series: Vec<(i64, i64)>,
}

/// What anyhow's `{:?}` prints before a captured backtrace.
const BACKTRACE_MARK: &str = "Stack backtrace:";
/// At most this many such records are read.
const MAX_BACKTRACE_LOGS: usize = 10_000;

/// The pass.
#[derive(Debug)]
pub(crate) struct Memory;

impl Pass for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let samples = cx.reader.events("kms.process", cx.window)?;
        let mut f = MemoryFindings::default();
        for s in &samples {
            let Some(rss) = i64_of(&s.attributes, "process.rss_bytes") else {
                continue;
            };
            f.rss_series.push((s.time_ns, rss));
            if let Some(l) = i64_of(&s.attributes, "process.memory_limit_bytes").filter(|l| *l > 0)
            {
                f.limit_bytes = Some(l);
            }
            if f.peak_rss_bytes.is_none_or(|p| rss > p) {
                f.peak_rss_bytes = Some(rss);
                f.peak_ns = Some(s.time_ns);
            }
        }
        f.samples = f.rss_series.len();
        f.first_rss_bytes = f.rss_series.first().map(|p| p.1);
        f.last_rss_bytes = f.rss_series.last().map(|p| p.1);
        if let (Some(peak), Some(limit)) = (f.peak_rss_bytes, f.limit_bytes) {
            let ratio = peak as f64 / limit as f64;
            f.peak_ratio = Some((ratio * 1000.0).round() / 1000.0);
            f.near_limit = ratio >= cx.config.memory_near_limit;
        }
        f.slope_bytes_per_s = slope(&f.rss_series).map(|s| s.round());
        if let (Some(slope), Some(limit), Some(&(t, last))) =
            (f.slope_bytes_per_s, f.limit_bytes, f.rss_series.last())
        {
            if slope > 0.0 && last < limit {
                let secs = (limit - last) as f64 / slope;
                // Only a projection within the hour says something about a hang.
                if secs < 3600.0 {
                    f.projected_limit_ns = Some(t + (secs * 1e9) as i64);
                }
            }
        }
        let traces = cx
            .reader
            .events_with_body(BACKTRACE_MARK, cx.window, MAX_BACKTRACE_LOGS)?;
        f.backtrace_logs = traces.len();
        f.first_backtrace_ns = traces.first().map(|e| e.time_ns);
        cx.diagnosis.memory = f;
        Ok(())
    }
}

/// Least-squares slope of `(ns, value)` points, per second.
pub(crate) fn slope(points: &[(i64, i64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let t0 = points[0].0;
    let n = points.len() as f64;
    let xs: Vec<f64> = points.iter().map(|p| (p.0 - t0) as f64 / 1e9).collect();
    let mx = xs.iter().sum::<f64>() / n;
    let my = points.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (x, p) in xs.iter().zip(points) {
        num += (x - mx) * (p.1 as f64 - my);
        den += (x - mx) * (x - mx);
    }
    (den > 0.0).then(|| num / den)
}
