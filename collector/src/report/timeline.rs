//! The timeline's series, downsampled so a long record stays a small page.

use serde::Serialize;

use crate::analyse::{Diagnosis, WaitsOn};
use crate::store::TimeWindow;

/// Points kept per series.
const MAX_POINTS: usize = 600;
/// Open-span bars kept.
const MAX_BARS: usize = 60;

/// One probe attempt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbePoint {
    /// Start, Unix ns.
    pub t: i64,
    /// `ok`, `tls`, `timeout`, ...
    pub outcome: String,
    /// Latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

/// An interval drawn as a bar: an open span or a stall.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bar {
    /// Label.
    pub label: String,
    /// Start, Unix ns.
    pub start_ns: i64,
    /// End (last seen), Unix ns.
    pub end_ns: i64,
    /// Class: what the span waits on, or the stall kind.
    pub class: String,
    /// Trace id, for spans.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// The timeline: probe results, heartbeat lag, open spans, RSS, fds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timeline {
    /// Start of the x axis.
    pub from_ns: i64,
    /// End of the x axis.
    pub to_ns: i64,
    /// Failure window, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<(i64, i64)>,
    /// Probe attempts.
    pub probes: Vec<ProbePoint>,
    /// (t, heartbeat lag ms).
    pub heartbeat_lag_ms: Vec<(i64, i64)>,
    /// Heartbeat threshold.
    pub heartbeat_threshold_ms: i64,
    /// Stuck requests.
    pub open_spans: Vec<Bar>,
    /// Stall episodes.
    pub stalls: Vec<Bar>,
    /// (t, RSS bytes).
    pub rss_bytes: Vec<(i64, i64)>,
    /// Memory limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<i64>,
    /// (t, open fds).
    pub open_fds: Vec<(i64, i64)>,
    /// (t, inbound CLOSE_WAIT).
    pub close_wait: Vec<(i64, i64)>,
    /// fd limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd_limit: Option<i64>,
}

/// Keeps at most [`MAX_POINTS`] points: the maximum of each time bucket.
fn downsample(series: &[(i64, i64)], w: TimeWindow) -> Vec<(i64, i64)> {
    if series.len() <= MAX_POINTS {
        return series.to_vec();
    }
    let span = (w.to_ns - w.from_ns).max(1) as i128;
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(MAX_POINTS);
    let mut last_bucket = None;
    for &(t, v) in series {
        let b = ((t - w.from_ns) as i128 * MAX_POINTS as i128 / span) as i64;
        if last_bucket == Some(b) {
            if let Some(p) = out.last_mut() {
                p.1 = p.1.max(v);
            }
        } else {
            out.push((t, v));
            last_bucket = Some(b);
        }
    }
    out
}

impl Timeline {
    /// Builds the timeline from what the passes found.
    pub fn build(d: &Diagnosis, w: TimeWindow) -> Self {
        let probes_raw: Vec<ProbePoint> = d
            .probe
            .series
            .iter()
            .map(|a| ProbePoint {
                t: a.time_ns,
                outcome: a.outcome.as_str().to_owned(),
                latency_ms: a.latency_ms,
            })
            .collect();
        // Probes: keep every change of outcome, thin the runs.
        let step = probes_raw.len().div_ceil(MAX_POINTS).max(1);
        let probes = probes_raw
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                i % step == 0
                    || *i + 1 == probes_raw.len()
                    || probes_raw
                        .get(i.wrapping_sub(1))
                        .is_none_or(|q| q.outcome != p.outcome)
            })
            .map(|(_, p)| p.clone())
            .collect();
        let mut open_spans: Vec<Bar> = d
            .stuck
            .iter()
            .map(|s| Bar {
                label: match s.waits_on {
                    WaitsOn::Handler => {
                        format!("{} (handler)", s.rpc_method.as_deref().unwrap_or(&s.name))
                    }
                    other => format!(
                        "{} -> {}{}",
                        s.rpc_method.as_deref().unwrap_or(&s.name),
                        other.as_str(),
                        s.innermost
                            .call
                            .as_deref()
                            .map(|c| format!(" {c}"))
                            .unwrap_or_default()
                    ),
                },
                start_ns: s.start_ns.max(w.from_ns),
                end_ns: s.last_seen_ns,
                class: s.waits_on.as_str().to_owned(),
                trace_id: Some(s.trace_id.clone()),
            })
            .collect();
        open_spans.truncate(MAX_BARS);
        let stalls = d
            .stall
            .episodes
            .iter()
            .take(MAX_BARS)
            .map(|e| Bar {
                label: format!(
                    "{} stall{}",
                    e.kind,
                    e.thread_name
                        .as_deref()
                        .map(|n| format!(" {n}"))
                        .unwrap_or_default()
                ),
                start_ns: e.first_ns.max(w.from_ns),
                end_ns: e.last_ns,
                class: e.kind.clone(),
                trace_id: e.trace_id.clone(),
            })
            .collect();
        Timeline {
            from_ns: w.from_ns,
            to_ns: w.to_ns,
            failure: d.failure.as_ref().map(|f| (f.from_ns, f.to_ns)),
            probes,
            heartbeat_lag_ms: downsample(&d.stall.lag_series, w),
            heartbeat_threshold_ms: d.stall.threshold_ms,
            open_spans,
            stalls,
            rss_bytes: downsample(&d.memory.rss_series, w),
            memory_limit_bytes: d.memory.limit_bytes,
            open_fds: downsample(&d.connections.fd_series, w),
            close_wait: downsample(&d.connections.close_wait_series, w),
            fd_limit: d.connections.fd_limit,
        }
    }
}
