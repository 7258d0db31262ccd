//! Pass 2, probe episodes: what the GetMeta probe saw, split into failure
//! episodes (failures before the first success only mean the KMS was not up
//! yet), how the judged episode failed (the class means different things
//! over TLS and plain HTTP), and which requests were open when it began.
//! Sets the failure window the later passes judge: the current episode, or
//! the last one if it recovered.

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

/// One run of failed probe attempts between successes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeEpisode {
    /// First failed attempt, RFC 3339.
    pub start: String,
    /// Same, Unix nanoseconds.
    pub start_ns: i64,
    /// When it ended: the next successful attempt (`None`: still failing).
    pub end: Option<String>,
    /// Same, Unix nanoseconds.
    pub end_ns: Option<i64>,
    /// True when the record ends inside it.
    pub ongoing: bool,
    /// Failed attempts by class.
    pub classes: BTreeMap<String, usize>,
    /// End of its last failed attempt (start plus latency).
    #[serde(skip)]
    pub last_failure_end_ns: i64,
}

impl ProbeEpisode {
    /// The dominant failure class (ties: alphabetical).
    pub fn class(&self) -> Option<&str> {
        self.classes
            .iter()
            .max_by_key(|(name, n)| (**n, std::cmp::Reverse(name.as_str())))
            .map(|(name, _)| name.as_str())
    }

    /// True when GetMeta hung rather than answered with an error status.
    pub fn is_hang(&self) -> bool {
        self.classes.keys().any(|c| c != "http_status")
    }
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
    /// Every failure episode after the KMS first answered, oldest first.
    pub episodes: Vec<ProbeEpisode>,
    /// Failed attempts before the first success: the KMS was not up yet.
    pub not_up_yet: usize,
    /// URL scheme of the probed target (`https` or `http`): what a failure
    /// class says about the runtime depends on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
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
        let failure = match summary.episodes.last() {
            Some(ep) => Some(FailureWindow {
                from_ns: ep.start_ns,
                to_ns: match ep.end_ns {
                    Some(_) => ep.last_failure_end_ns,
                    None => cx.window.to_ns.max(ep.last_failure_end_ns),
                },
                source: "probe".into(),
                ongoing: ep.ongoing,
            }),
            // The probe did not fail after the KMS came up (or there is no
            // probe): a request still open marks the hang, from the oldest
            // one's start.
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

/// Runs of failed attempts that follow a success (or, with no success at
/// all, every run once the leading refused connections are passed).
fn episodes(attempts: &[ProbeAttempt]) -> Vec<ProbeEpisode> {
    let start = match attempts.iter().position(|a| a.outcome == ProbeOutcome::Ok) {
        Some(i) => i,
        None => attempts
            .iter()
            .take_while(|a| a.outcome == ProbeOutcome::Connect)
            .count(),
    };
    let mut out: Vec<ProbeEpisode> = Vec::new();
    let mut open: Option<ProbeEpisode> = None;
    for a in &attempts[start..] {
        if a.outcome == ProbeOutcome::Ok {
            if let Some(mut ep) = open.take() {
                ep.end = Some(fmt_time(a.time_ns));
                ep.end_ns = Some(a.time_ns);
                out.push(ep);
            }
            continue;
        }
        let ep = open.get_or_insert_with(|| ProbeEpisode {
            start: fmt_time(a.time_ns),
            start_ns: a.time_ns,
            end: None,
            end_ns: None,
            ongoing: false,
            classes: BTreeMap::new(),
            last_failure_end_ns: a.time_ns,
        });
        *ep.classes.entry(a.outcome.as_str().to_owned()).or_default() += 1;
        ep.last_failure_end_ns = attempt_end(a).max(ep.last_failure_end_ns);
    }
    if let Some(mut ep) = open {
        ep.ongoing = true;
        out.push(ep);
    }
    out
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
    s.scheme = first.target.split_once("://").map(|(k, _)| k.to_owned());
    if let Some(last) = attempts.last() {
        s.failing_now = last.outcome != ProbeOutcome::Ok;
        s.last_outcome = Some(last.outcome.as_str().to_owned());
    }
    s.episodes = episodes(attempts);
    let first_ok = attempts.iter().position(|a| a.outcome == ProbeOutcome::Ok);
    // Failures before the first success: the KMS was not up yet. With no
    // success at all, refused connections still mean "not up"; anything
    // else (it listens and does not answer) is a hang from the start.
    s.not_up_yet = match first_ok {
        Some(i) => i,
        None => attempts
            .iter()
            .take_while(|a| a.outcome == ProbeOutcome::Connect)
            .count(),
    };
    let Some(ep) = s.episodes.last() else {
        s.failing_now = false;
        return s;
    };
    let onset = ep.start_ns;
    let Some(run0) = attempts.iter().find(|a| a.time_ns == onset) else {
        return s;
    };
    // Open then: requests open at the onset, or started during the first
    // failed attempt (often the probe's own request).
    let onset_end = attempt_end(run0).max(onset);
    s.first_failure_at = Some(fmt_time(onset));
    s.first_failure_ns = Some(onset);
    s.time_to_first_failure_ms = Some(ms_between(first.time_ns, onset));
    s.failure_class = ep.class().map(str::to_owned);
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
