//! Pass 2, probe correlation: what the GetMeta probe saw, when it began
//! failing, how it failed (TLS vs timeout is evidence about the runtime), and
//! which requests were open at that moment. Sets the failure window the later
//! passes judge.

use std::collections::BTreeMap;

use serde::Serialize;

use super::attrs::ms_between;
use super::{fmt_time, Context, Pass, StuckSpan};
use crate::store::{ProbeAttempt, ProbeOutcome, ReadError};

/// When the KMS was failing, and how that was decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureWindow {
    /// Start (the first failed probe of the last failure run, or the start of
    /// the oldest stuck request).
    pub from_ns: i64,
    /// End (the last failed probe's end, or the end of the analysed window).
    pub to_ns: i64,
    /// `probe` or `stuck_spans`.
    pub source: String,
    /// True when still failing at the end of the record.
    pub ongoing: bool,
}

/// A request open when the probe began failing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpenAtOnset {
    /// Trace id.
    pub trace_id: String,
    /// Span id of the request.
    pub span_id: String,
    /// `rpc.method` or span name.
    pub what: String,
    /// What it waits on.
    pub waits_on: String,
    /// Its start.
    pub start_ns: i64,
}

/// The probe's record (the JSON `probe` object).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProbeSummary {
    /// Attempts in the window.
    pub attempts: usize,
    /// Attempts that succeeded.
    pub ok: usize,
    /// Attempts that failed.
    pub failed: usize,
    /// Failed attempts by class (`tls`, `timeout`, `connect`, `http_status`, `other`).
    pub failures_by_outcome: BTreeMap<String, usize>,
    /// Probed URLs.
    pub targets: Vec<String>,
    /// First attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_attempt_at: Option<String>,
    /// Last successful attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_ok_at: Option<String>,
    /// First failure of the last failure run: when GetMeta began failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failure_at: Option<String>,
    /// Same, Unix nanoseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failure_ns: Option<i64>,
    /// From the first attempt to the first failure of the last run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_first_failure_ms: Option<i64>,
    /// True when the last attempt failed.
    pub failing_now: bool,
    /// Outcome of the last attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<String>,
    /// Error of the last failed attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Dominant failure class of the last failure run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_class: Option<String>,
    /// Requests open when the probe began failing.
    pub open_at_onset: Vec<OpenAtOnset>,
    /// All attempts (for the timeline; not in JSON).
    #[serde(skip)]
    pub series: Vec<ProbeAttempt>,
}

/// The pass.
#[derive(Debug)]
pub(crate) struct Probe;

impl Pass for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let attempts = cx.reader.probe_attempts(cx.window)?;
        let summary = summarise(&attempts, &cx.diagnosis.stuck);
        let failure = match summary.first_failure_ns {
            Some(from) => {
                let run_end = attempts
                    .iter()
                    .rev()
                    .find(|a| a.outcome != ProbeOutcome::Ok)
                    .map(attempt_end)
                    .unwrap_or(from);
                Some(FailureWindow {
                    from_ns: from,
                    to_ns: if summary.failing_now {
                        cx.window.to_ns.max(run_end)
                    } else {
                        run_end
                    },
                    source: "probe".into(),
                    ongoing: summary.failing_now,
                })
            }
            // The probe did not fail (or there is no probe): a request still
            // open marks the hang, from the oldest one's start.
            None => cx
                .diagnosis
                .stuck
                .iter()
                .map(|s| s.start_ns)
                .min()
                .map(|from| FailureWindow {
                    from_ns: from,
                    to_ns: cx.window.to_ns,
                    source: "stuck_spans".into(),
                    ongoing: true,
                }),
        };
        cx.diagnosis.probe = summary;
        cx.diagnosis.failure = failure;
        Ok(())
    }
}

fn attempt_end(a: &ProbeAttempt) -> i64 {
    a.time_ns + a.latency_ms.map(|ms| (ms * 1e6) as i64).unwrap_or(0)
}

fn summarise(attempts: &[ProbeAttempt], stuck: &[StuckSpan]) -> ProbeSummary {
    let mut s = ProbeSummary {
        attempts: attempts.len(),
        series: attempts.to_vec(),
        ..ProbeSummary::default()
    };
    for a in attempts {
        if !s.targets.contains(&a.target) {
            s.targets.push(a.target.clone());
        }
        if a.outcome == ProbeOutcome::Ok {
            s.ok += 1;
            s.last_ok_at = Some(fmt_time(a.time_ns));
        } else {
            s.failed += 1;
            *s.failures_by_outcome
                .entry(a.outcome.as_str().to_owned())
                .or_default() += 1;
            s.last_error = a.error.clone().or(s.last_error.take());
        }
    }
    let Some(first) = attempts.first() else {
        return s;
    };
    s.first_attempt_at = Some(fmt_time(first.time_ns));
    if let Some(last) = attempts.last() {
        s.failing_now = last.outcome != ProbeOutcome::Ok;
        s.last_outcome = Some(last.outcome.as_str().to_owned());
    }
    // The last failure run: failed attempts after the last success that
    // precedes the last failure.
    let Some(last_fail) = attempts.iter().rposition(|a| a.outcome != ProbeOutcome::Ok) else {
        return s;
    };
    let run_start = attempts[..last_fail]
        .iter()
        .rposition(|a| a.outcome == ProbeOutcome::Ok)
        .map_or(0, |i| i + 1);
    let run = &attempts[run_start..=last_fail];
    let onset = run[0].time_ns;
    // Open then: requests open at the onset, or started during the first
    // failed attempt (often the probe's own request).
    let onset_end = attempt_end(&run[0]).max(onset);
    s.first_failure_at = Some(fmt_time(onset));
    s.first_failure_ns = Some(onset);
    s.time_to_first_failure_ms = Some(ms_between(first.time_ns, onset));
    let mut classes: BTreeMap<&str, usize> = BTreeMap::new();
    for a in run {
        *classes.entry(a.outcome.as_str()).or_default() += 1;
    }
    s.failure_class = classes
        .iter()
        .max_by_key(|(name, n)| (**n, std::cmp::Reverse(**name)))
        .map(|(name, _)| (*name).to_owned());
    s.open_at_onset = stuck
        .iter()
        .filter(|st| st.start_ns <= onset_end && st.last_seen_ns >= onset)
        .map(|st| OpenAtOnset {
            trace_id: st.trace_id.clone(),
            span_id: st.span_id.clone(),
            what: st.rpc_method.clone().unwrap_or_else(|| st.name.clone()),
            waits_on: st.waits_on.as_str().to_owned(),
            start_ns: st.start_ns,
        })
        .collect();
    s
}
