//! Pass 9, request fates: every `kms.request` in the failure window is
//! accounted for as completed, failed, cancelled or still open, and every
//! hung one (open or cancelled) gets a wait location: the innermost span it
//! was in. Then:
//!
//! - a request cancelled without a response (closed with no
//!   `http.response.status_code` after longer than the probe timeout or the
//!   open-span threshold) was given up on by its client and dropped by the
//!   server, as HTTP/2 and most frameworks do; its closed children tell
//!   where it was when dropped;
//! - a request idle in a span under which another hung request's outbound
//!   call runs (a once-cell, a lock scope) is queued behind that call;
//! - a `kms.taskdump` event for a request adds its await chain.
//!
//! The result is the "where requests wait" table, the first thing to read in
//! a hang nothing explains.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::attrs::{i64_of, json_of, str_of};
use super::stuck_io::{stuck_requests, stuck_span, OUTBOUND_SPAN, REQUEST_SPAN};
use super::{Context, Pass, StuckSpan, WaitsOn};
use crate::store::{ProbeOutcome, ReadError, SpanRow, TimeWindow};

/// At most this many cancelled requests have their trace read for a wait
/// location (the newest); the rest are counted.
const MAX_TRACES_READ: usize = 500;
/// Requests that started this long before the failure window are not read
/// (open ones still are, through their snapshots): a request cancelled that
/// early was hung before GetMeta's failure began.
const LOOKBACK_NS: i64 = 10 * 60 * 1_000_000_000;
/// Spans that closed this close to their request's end were dropped with it.
const DROP_TOLERANCE_NS: i64 = 100_000_000;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Answered with a status below 500.
    Completed,
    /// Answered with a 5xx status, or closed with an error status.
    Failed,
    /// Closed without a response after the client gave up.
    Cancelled,
    /// Still open at its last snapshot.
    Open,
}

impl Fate {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Fate::Completed => "completed",
            Fate::Failed => "failed",
            Fate::Cancelled => "cancelled",
            Fate::Open => "open",
        }
    }
}

/// The hung request another one is queued behind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueuedBehind {
    /// The span both share: the scope the blocking call runs under.
    pub scope: String,
    /// What the call waits on.
    pub peer: WaitsOn,
    /// The call, `peer `call``.
    pub call: String,
    /// The request holding the scope.
    pub trace_id: String,
}

/// The JSON `requests` object: every request of the failure window by fate.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestCounts {
    /// Answered with a status below 500.
    pub completed: usize,
    /// Answered with a 5xx or an error status.
    pub failed: usize,
    /// Closed without a response after the client gave up.
    pub cancelled: usize,
    /// Still open.
    pub open: usize,
}

/// Task dumps the library skipped so as not to freeze the runtime
/// (`kms.taskdump` with `taskdump.outcome` = `skipped`, one per stretch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TaskdumpSkips {
    /// Stretches of skipped dumps.
    pub count: usize,
    /// When the first was reported.
    pub first_ns: i64,
    /// The deepest local run queues (summed over workers) they report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_local_queue_depth: Option<i64>,
}

/// One row of the "where requests wait" table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WaitLocation {
    /// The innermost span, or ``kms.outbound <peer> `<call>` ``.
    pub span: String,
    /// `open` or `cancelled`.
    pub fate: Fate,
    /// Requests there.
    pub count: usize,
    /// The longest of them.
    pub longest_ms: i64,
    /// The peer of an outbound call.
    pub peer: Option<String>,
    /// The call it is queued behind, for requests idle in a shared scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_behind: Option<String>,
    /// One of them, to look up.
    pub example_trace_id: String,
    /// Its await chain from the task dump, outermost first (empty: none).
    pub await_chain: Vec<String>,
}

/// What the request-fates pass found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestFindings {
    /// Requests of the failure window by fate.
    pub counts: RequestCounts,
    /// Closed requests count as cancelled past this long without a status.
    pub cancelled_after_ms: i64,
    /// Cancelled requests with their wait location, oldest first.
    pub cancelled: Vec<StuckSpan>,
    /// Cancelled requests whose trace was not read (over the cap).
    pub cancelled_not_read: usize,
    /// The "where requests wait" table, most requests first.
    pub waits: Vec<WaitLocation>,
    /// Task dumps that timed out (a runtime that cannot answer).
    pub taskdump_timeouts: usize,
    /// When the first of them was taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_taskdump_timeout_ns: Option<i64>,
    /// Stretches of task dumps the library skipped because a dump could
    /// have frozen the runtime (too many tasks queued, or the heartbeat
    /// late): stuck requests have no await chain then. Absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taskdump_skips: Option<TaskdumpSkips>,
    /// The producer's open-span threshold (`config.open_span_threshold_ms`
    /// of its `kms.startup`): a span it reports open for less than this
    /// was reported only because its trace is stuck.
    #[serde(skip)]
    pub producer_open_span_threshold_ms: Option<i64>,
}

impl RequestFindings {
    /// Every hung request: cancelled ones here, open ones from `stuck`.
    pub fn hung<'a>(&'a self, stuck: &'a [StuckSpan]) -> impl Iterator<Item = &'a StuckSpan> {
        stuck.iter().chain(self.cancelled.iter())
    }
}

/// The pass.
#[derive(Debug)]
pub(crate) struct Requests;

impl Pass for Requests {
    fn name(&self) -> &'static str {
        "requests"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let mut f = RequestFindings {
            cancelled_after_ms: cancelled_after_ms(cx)?,
            producer_open_span_threshold_ms: super::stall::producer_setting_ms(
                cx,
                "config.open_span_threshold_ms",
            )?,
            ..RequestFindings::default()
        };
        let open_ids: std::collections::HashSet<&str> = cx
            .diagnosis
            .stuck
            .iter()
            .map(|s| s.span_id.as_str())
            .collect();
        f.counts.open = cx.diagnosis.stuck.len();
        let mut cancelled_rows = Vec::new();
        if let Some(failure) = cx.diagnosis.failure.as_ref() {
            let failure = TimeWindow::new(failure.from_ns, failure.to_ns);
            let reach = TimeWindow::new(
                failure
                    .from_ns
                    .saturating_sub(LOOKBACK_NS)
                    .max(cx.window.from_ns),
                failure.to_ns,
            );
            for r in cx.reader.spans_started(reach, REQUEST_SPAN, 1_000_000)? {
                if r.incomplete || r.end_ns < failure.from_ns || open_ids.contains(&*r.span_id) {
                    continue;
                }
                match fate(&r, f.cancelled_after_ms) {
                    Fate::Completed => f.counts.completed += 1,
                    Fate::Failed => f.counts.failed += 1,
                    Fate::Cancelled => cancelled_rows.push(r),
                    Fate::Open => {}
                }
            }
        }
        f.counts.cancelled = cancelled_rows.len();
        let skip = cancelled_rows.len().saturating_sub(MAX_TRACES_READ);
        f.cancelled_not_read = skip;
        for r in &cancelled_rows[skip..] {
            let trace = cx.reader.trace(&r.trace_id)?;
            f.cancelled.push(where_dropped(r, &trace));
        }
        mark_queued(&mut cx.diagnosis.stuck, &mut f.cancelled);

        let dumps = cx.reader.events("kms.taskdump", cx.window)?;
        let mut chains: HashMap<String, Vec<String>> = HashMap::new();
        for d in &dumps {
            match str_of(&d.attributes, "taskdump.outcome").as_deref() {
                Some("timeout") => {
                    f.taskdump_timeouts += 1;
                    f.first_taskdump_timeout_ns.get_or_insert(d.time_ns);
                    continue;
                }
                Some("skipped") => {
                    let skips = f.taskdump_skips.get_or_insert(TaskdumpSkips {
                        count: 0,
                        first_ns: d.time_ns,
                        max_local_queue_depth: None,
                    });
                    skips.count += 1;
                    skips.max_local_queue_depth = skips
                        .max_local_queue_depth
                        .max(i64_of(&d.attributes, "taskdump.local_queue_depth"));
                    continue;
                }
                _ => {}
            }
            let chain: Vec<String> = json_of(&d.attributes, "taskdump.chain")
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default();
            if let Some(id) = d.span_id.clone().filter(|_| !chain.is_empty()) {
                chains.insert(id, chain);
            }
        }
        for s in cx.diagnosis.stuck.iter_mut().chain(f.cancelled.iter_mut()) {
            if let Some(c) = chains.get(&s.span_id) {
                s.await_chain = c.clone();
            }
        }
        f.waits = wait_table(&cx.diagnosis.stuck, &f.cancelled);
        cx.diagnosis.requests = f;
        Ok(())
    }
}

/// How a closed request ended.
fn fate(r: &SpanRow, cancelled_after_ms: i64) -> Fate {
    let status = i64_of(&r.attributes, "http.response.status_code");
    match status {
        Some(s) if s >= 500 => Fate::Failed,
        Some(_) => Fate::Completed,
        None if r.status_code == 2 => Fate::Failed,
        None if (r.end_ns - r.start_ns) / 1_000_000 >= cancelled_after_ms => Fate::Cancelled,
        None => Fate::Completed,
    }
}

/// The probe timeout (its timed-out attempts' latency) or the producer's
/// open-span threshold, whichever is shorter, else the configured default.
fn cancelled_after_ms(cx: &Context<'_>) -> Result<i64, ReadError> {
    if let Some(t) = cx.config.cancelled_after {
        return Ok(i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
    }
    let probe = cx
        .diagnosis
        .probe
        .series
        .iter()
        .filter(|a| matches!(a.outcome, ProbeOutcome::Timeout | ProbeOutcome::Tls))
        .filter_map(|a| a.latency_ms)
        .map(|ms| ms as i64)
        .min();
    let open_span = super::stall::producer_setting_ms(cx, "config.open_span_threshold_ms")?;
    Ok([probe, open_span]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| {
            i64::try_from(super::AnalyseConfig::DEFAULT_CANCELLED_AFTER.as_millis())
                .unwrap_or(i64::MAX)
        }))
}

/// Where a cancelled request was when it was dropped: the spans of its trace
/// still open at its end, reduced like open snapshots.
fn where_dropped(request: &SpanRow, trace: &[SpanRow]) -> StuckSpan {
    let mut s = innermost_at_drop(request, trace);
    s.fate = Fate::Cancelled;
    s
}

fn innermost_at_drop(request: &SpanRow, trace: &[SpanRow]) -> StuckSpan {
    let open_at_drop: Vec<SpanRow> = trace
        .iter()
        .filter(|s| s.start_ns <= request.end_ns)
        .filter(|s| s.incomplete || s.end_ns >= request.end_ns - DROP_TOLERANCE_NS)
        .cloned()
        .collect();
    stuck_requests(&open_at_drop)
        .into_iter()
        .find(|s| s.span_id == request.span_id)
        .unwrap_or_else(|| stuck_span(request, request, 1))
}

/// Marks each hung request idle in a scope that another hung request's
/// outbound call runs under as queued behind that call.
fn mark_queued(open: &mut [StuckSpan], cancelled: &mut [StuckSpan]) {
    // Scope span name -> the call running under it.
    let mut scopes: BTreeMap<String, QueuedBehind> = BTreeMap::new();
    for s in open.iter().chain(cancelled.iter()) {
        if !s.waits_on.is_outbound() {
            continue;
        }
        let Some(at) = s.path_names.iter().position(|n| n == OUTBOUND_SPAN) else {
            continue;
        };
        for scope in s.path_names[at + 1..]
            .iter()
            .take_while(|n| *n != REQUEST_SPAN)
        {
            scopes.entry(scope.clone()).or_insert_with(|| QueuedBehind {
                scope: scope.clone(),
                peer: s.waits_on,
                call: s.call_label(),
                trace_id: s.trace_id.clone(),
            });
        }
    }
    for s in open.iter_mut().chain(cancelled.iter_mut()) {
        if s.waits_on == WaitsOn::Handler {
            s.queued_behind = scopes.get(&s.innermost.name).cloned();
        }
    }
}

fn wait_table(open: &[StuckSpan], cancelled: &[StuckSpan]) -> Vec<WaitLocation> {
    let mut rows: BTreeMap<(String, Fate), WaitLocation> = BTreeMap::new();
    for (s, fate) in open
        .iter()
        .map(|s| (s, Fate::Open))
        .chain(cancelled.iter().map(|s| (s, Fate::Cancelled)))
    {
        let span = match s.waits_on {
            WaitsOn::Handler => s.innermost.name.clone(),
            _ => format!("{OUTBOUND_SPAN} {}", s.call_label()),
        };
        let row = rows
            .entry((span.clone(), fate))
            .or_insert_with(|| WaitLocation {
                span,
                fate,
                count: 0,
                longest_ms: 0,
                peer: s
                    .waits_on
                    .is_outbound()
                    .then(|| s.waits_on.as_str().to_owned()),
                queued_behind: s
                    .queued_behind
                    .as_ref()
                    .map(|q| format!("{} (trace {})", q.call, q.trace_id)),
                example_trace_id: s.trace_id.clone(),
                await_chain: Vec::new(),
            });
        row.count += 1;
        if s.open_ms >= row.longest_ms {
            row.longest_ms = s.open_ms;
            row.example_trace_id = s.trace_id.clone();
        }
        if row.await_chain.is_empty() {
            row.await_chain = s.await_chain.clone();
        }
    }
    let mut out: Vec<WaitLocation> = rows.into_values().collect();
    out.sort_by_key(|w| std::cmp::Reverse((w.count, w.longest_ms)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn span(id: &str, parent: Option<&str>, name: &str, start: i64, end: i64) -> SpanRow {
        SpanRow {
            trace_id: "t".into(),
            span_id: id.into(),
            parent_span_id: parent.map(str::to_owned),
            name: name.into(),
            kind: 0,
            service: None,
            scope: None,
            start_ns: start,
            end_ns: end,
            status_code: 0,
            status_message: None,
            incomplete: false,
            snapshot_seq: None,
            attributes: json!({}),
            events: json!([]),
            resource: json!({}),
            received_ns: end,
        }
    }

    #[test]
    fn fate_reads_the_status_then_the_duration() {
        let mut r = span("r", None, REQUEST_SPAN, 0, 20_000_000_000);
        assert_eq!(fate(&r, 5_000), Fate::Cancelled);
        assert_eq!(fate(&r, 30_000), Fate::Completed);
        r.attributes = json!({"http.response.status_code": 503});
        assert_eq!(fate(&r, 5_000), Fate::Failed);
        r.attributes = json!({"http.response.status_code": "200"});
        assert_eq!(fate(&r, 5_000), Fate::Completed);
    }

    #[test]
    fn a_cancelled_request_waits_where_its_children_were_dropped() {
        let s = 1_000_000_000;
        let req = span("r", None, REQUEST_SPAN, 0, 12 * s);
        let early = span("a", Some("r"), "kms.read_config", s / 10, s / 5);
        let mut call = span("b", Some("r"), OUTBOUND_SPAN, s, 12 * s - 1_000);
        call.attributes = json!({"kms.peer": "auth_webhook", "kms.call": "get_info"});
        let w = where_dropped(&req, &[req.clone(), early, call]);
        assert_eq!(w.waits_on, WaitsOn::AuthWebhook);
        assert_eq!(w.innermost.span_id, "b");
        let alone = where_dropped(&req, std::slice::from_ref(&req));
        assert_eq!(alone.waits_on, WaitsOn::Handler);
        assert_eq!(alone.innermost.name, REQUEST_SPAN);
    }
}
