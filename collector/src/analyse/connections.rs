//! Pass 8, connections: open fds and CLOSE_WAIT growth against the fd limit
//! (`kms.process`), accept errors (EMFILE in any log record), and whether
//! requests still reach the handler while the probe fails (a `kms.request`
//! span starts for every request the handler sees). fds near the limit or
//! accept errors point at E; probe failures with no request span starting
//! mean the requests are stuck before the handler.

use serde::Serialize;

use super::attrs::{i64_of, json_of};
use super::stuck_io::REQUEST_SPAN;
use super::{Context, Pass};
use crate::store::{ReadError, TimeWindow};

/// Body fragments of an accept failing for want of fds.
const ACCEPT_ERRORS: [&str; 2] = ["Too many open files", "os error 24"];

/// What the connections pass found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConnectionFindings {
    /// `kms.process` samples with an fd count.
    pub samples: usize,
    /// First open-fd count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_fds: Option<i64>,
    /// Highest open-fd count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_fds: Option<i64>,
    /// When it peaked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_ns: Option<i64>,
    /// Last open-fd count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_fds: Option<i64>,
    /// Soft RLIMIT_NOFILE (the last one reported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd_limit: Option<i64>,
    /// Peak fds / limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_ratio: Option<f64>,
    /// True when the peak reached the near-limit fraction.
    pub near_limit: bool,
    /// Inbound CLOSE_WAIT connections on the listen port: first, peak, last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_wait: Option<[i64; 3]>,
    /// Inbound ESTABLISHED connections: first, peak, last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub established: Option<[i64; 3]>,
    /// Samples that reported the fd limit but could not count open fds
    /// (reading `/proc/self/fd` failed) after earlier samples could: what a
    /// process with no fd left reports.
    pub fd_unreadable: usize,
    /// The first of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_fd_unreadable_ns: Option<i64>,
    /// Log records saying accept ran out of fds.
    pub accept_errors: usize,
    /// The first of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_accept_error_ns: Option<i64>,
    /// When fds ran out: the first sample at the near-limit fraction, the
    /// first unreadable `/proc/self/fd`, or the first accept error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exhausted_since_ns: Option<i64>,
    /// Median interval between process samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_interval_ms: Option<i64>,
    /// `kms.request` spans that started in the failure window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_started_in_failure: Option<u64>,
    /// Failed probe attempts in the failure window.
    pub probe_failures_in_failure: usize,
    /// Diagnostic samples received in the failure window (telemetry alive).
    pub samples_in_failure: usize,
    /// (time, open fds), for the timeline.
    #[serde(skip)]
    pub fd_series: Vec<(i64, i64)>,
    /// (time, CLOSE_WAIT), for the timeline.
    #[serde(skip)]
    pub close_wait_series: Vec<(i64, i64)>,
    /// (time, peers the process held an outbound connection to), from
    /// `tcp.outbound`.
    #[serde(skip)]
    pub outbound_series: Vec<(i64, Vec<String>)>,
}

impl ConnectionFindings {
    /// True when fds ran out: at the near-limit fraction, accept failing
    /// with EMFILE, or `/proc/self/fd` unreadable after fds had reached half
    /// the limit.
    pub fn exhausted(&self) -> bool {
        let half_way = matches!((self.peak_fds, self.fd_limit), (Some(p), Some(l)) if p * 2 >= l);
        self.near_limit || self.accept_errors > 0 || (self.fd_unreadable > 0 && half_way)
    }

    /// Whether the process held a connection to `server` (`host:port`) in a
    /// sample taken after `after_ns`: `None` when no sample after it listed
    /// outbound connections.
    pub fn connected_to(&self, server: &str, after_ns: i64) -> Option<bool> {
        let mut later = self
            .outbound_series
            .iter()
            .filter(|(t, _)| *t >= after_ns)
            .peekable();
        later.peek()?;
        Some(later.any(|(_, peers)| peers.iter().any(|p| p == server)))
    }

    /// True when the probe failed in the failure window, telemetry kept
    /// arriving, and not one request span started: requests never reached
    /// the handler.
    pub fn requests_not_reaching_handler(&self) -> bool {
        self.probe_failures_in_failure > 0
            && self.samples_in_failure > 0
            && self.requests_started_in_failure == Some(0)
    }

    /// True when fds or CLOSE_WAIT grew over the window (by half or more,
    /// and by at least ten).
    pub fn growing(&self) -> bool {
        let grew = |first: i64, peak: i64| peak - first >= 10 && peak * 2 >= first * 3;
        matches!((self.first_fds, self.peak_fds), (Some(a), Some(b)) if grew(a, b))
            || matches!(self.close_wait, Some([a, b, _]) if grew(a, b))
    }
}

/// The pass.
#[derive(Debug)]
pub(crate) struct Connections;

fn first_peak_last(series: &[(i64, i64)]) -> Option<[i64; 3]> {
    let first = series.first()?.1;
    let last = series.last()?.1;
    let peak = series.iter().map(|p| p.1).max()?;
    Some([first, peak, last])
}

impl Pass for Connections {
    fn name(&self) -> &'static str {
        "connections"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let samples = cx.reader.events("kms.process", cx.window)?;
        let failure = cx.failure_or_window();
        let mut f = ConnectionFindings::default();
        let mut established = Vec::new();
        for s in &samples {
            let a = &s.attributes;
            if failure.contains(s.time_ns) {
                f.samples_in_failure += 1;
            }
            if let Some(l) = i64_of(a, "process.fd_limit").filter(|l| *l > 0) {
                f.fd_limit = Some(l);
            }
            let fds = i64_of(a, "process.open_fds");
            if fds.is_none() && !f.fd_series.is_empty() && i64_of(a, "process.fd_limit").is_some() {
                f.fd_unreadable += 1;
                f.first_fd_unreadable_ns.get_or_insert(s.time_ns);
            }
            if let Some(fds) = fds {
                f.fd_series.push((s.time_ns, fds));
                if f.peak_fds.is_none_or(|p| fds > p) {
                    f.peak_fds = Some(fds);
                    f.peak_ns = Some(s.time_ns);
                }
            }
            let unreadable = fds.is_none() && !f.fd_series.is_empty();
            if let Some(out) = json_of(a, "tcp.outbound").filter(|_| !unreadable) {
                let peers = out
                    .as_array()
                    .map(|v| {
                        v.iter()
                            .filter(|c| {
                                matches!(
                                    c.get("state").and_then(|s| s.as_str()),
                                    Some("ESTABLISHED" | "SYN_SENT" | "CLOSE_WAIT")
                                )
                            })
                            .filter_map(|c| c.get("peer").and_then(|p| p.as_str()))
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                f.outbound_series.push((s.time_ns, peers));
            }
            if let Some(inbound) = json_of(a, "tcp.inbound").filter(|_| !unreadable) {
                let state = |k: &str| inbound.get(k).and_then(|v| v.as_i64()).unwrap_or(0);
                f.close_wait_series.push((s.time_ns, state("CLOSE_WAIT")));
                established.push((s.time_ns, state("ESTABLISHED")));
            }
        }
        f.samples = f.fd_series.len();
        f.first_fds = f.fd_series.first().map(|p| p.1);
        f.last_fds = f.fd_series.last().map(|p| p.1);
        if let (Some(peak), Some(limit)) = (f.peak_fds, f.fd_limit) {
            let ratio = peak as f64 / limit as f64;
            f.peak_ratio = Some((ratio * 1000.0).round() / 1000.0);
            f.near_limit = ratio >= cx.config.fd_near_limit;
        }
        let near_from = f.fd_limit.and_then(|l| {
            f.fd_series
                .iter()
                .find(|(_, n)| *n as f64 >= l as f64 * cx.config.fd_near_limit)
                .map(|(t, _)| *t)
        });
        let mut gaps: Vec<i64> = f.fd_series.windows(2).map(|w| w[1].0 - w[0].0).collect();
        gaps.sort_unstable();
        f.sample_interval_ms = gaps.get(gaps.len() / 2).map(|g| g / 1_000_000);
        f.close_wait = first_peak_last(&f.close_wait_series);
        f.established = first_peak_last(&established);
        for needle in ACCEPT_ERRORS {
            let errs = cx.reader.events_with_body(needle, cx.window, 10_000)?;
            if errs.len() > f.accept_errors {
                f.accept_errors = errs.len();
                f.first_accept_error_ns = errs.first().map(|e| e.time_ns);
            }
        }
        f.exhausted_since_ns = [near_from, f.first_fd_unreadable_ns, f.first_accept_error_ns]
            .into_iter()
            .flatten()
            .min()
            .filter(|_| f.exhausted());
        let probe_failures = cx
            .diagnosis
            .probe
            .series
            .iter()
            .filter(|a| a.outcome != crate::store::ProbeOutcome::Ok && failure.contains(a.time_ns))
            .count();
        f.probe_failures_in_failure = probe_failures;
        if cx.diagnosis.failure.is_some() {
            f.requests_started_in_failure = Some(cx.reader.count_spans_started(
                TimeWindow::new(failure.from_ns, failure.to_ns),
                REQUEST_SPAN,
            )?);
        }
        cx.diagnosis.connections = f;
        Ok(())
    }
}
