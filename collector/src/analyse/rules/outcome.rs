//! The report's first line: `healthy`, `explained` or `unexplained`, the
//! confirmed hypotheses ordered cause first, and for an unexplained failure
//! where the requests wait and what would decide.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Model;
use crate::analyse::{fmt_time, Verdict};

/// The top-level judgement of a report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// No failure after the KMS came up.
    #[default]
    Healthy,
    /// A failure, and at least one hypothesis confirmed.
    Explained,
    /// A failure, and nothing confirmed.
    Unexplained,
}

impl OutcomeKind {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Healthy => "healthy",
            OutcomeKind::Explained => "explained",
            OutcomeKind::Unexplained => "unexplained",
        }
    }
}

/// The outcome, its sentence, and the confirmed hypotheses cause first.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Outcome {
    /// Healthy, explained or unexplained.
    pub kind: OutcomeKind,
    /// One sentence: the first line of every rendering.
    pub summary: String,
    /// Confirmed hypotheses, the cause first.
    pub causes: Vec<String>,
}

/// Decides the outcome from the verdicts (`m.decided`) and when each
/// confirmed hypothesis's facts began (`since`).
pub(crate) fn decide(m: &Model<'_>, since: &BTreeMap<String, i64>) -> Outcome {
    let d = m.d;
    let Some(failure) = &d.failure else {
        let p = &d.probe;
        let summary = if p.attempts == 0 {
            "healthy: no failure seen (no probe attempts stored and no request stuck)".to_owned()
        } else {
            format!(
                "healthy: GetMeta answered {} of {} probes{}",
                p.ok,
                p.attempts,
                if p.not_up_yet > 0 {
                    format!(
                        "; the first {} failed before the KMS was up (not up yet, not a failure)",
                        p.not_up_yet
                    )
                } else {
                    String::new()
                }
            )
        };
        return Outcome {
            kind: OutcomeKind::Healthy,
            summary,
            causes: Vec::new(),
        };
    };
    let state = match d
        .probe
        .episodes
        .last()
        .filter(|_| failure.source == "probe")
    {
        Some(ep) => match &ep.end {
            Some(end) => format!("failed from {} and recovered at {end}", ep.start),
            None => format!("failing since {}", ep.start),
        },
        None => format!("requests stuck since {}", fmt_time(failure.from_ns)),
    };
    let mut causes: Vec<(&str, i64)> = m
        .decided
        .iter()
        .filter(|(_, h)| h.verdict == Verdict::Confirmed)
        .map(|(l, _)| (l.as_str(), since.get(l).copied().unwrap_or(i64::MAX)))
        .collect();
    // What began first caused what followed; on a tie, a hung call causes
    // the exhaustion it holds resources in.
    causes.sort_by_key(|(l, t)| (*t, matches!(*l, "C" | "E")));
    if causes.is_empty() {
        return Outcome {
            kind: OutcomeKind::Unexplained,
            summary: format!(
                "unexplained: {state}; nothing confirmed; {}",
                where_they_wait(m)
            ),
            causes: Vec::new(),
        };
    }
    let culprit = |l: &str| {
        m.decided
            .get(l)
            .and_then(|h| h.culprit.clone())
            .unwrap_or_default()
    };
    let mut text = format!("{} ({})", causes[0].0, culprit(causes[0].0));
    let held = m.hung().filter(|s| s.waits_on.is_outbound()).count();
    for (l, _) in &causes[1..] {
        let why = match (*l, causes[0].0) {
            ("E", "A" | "B") if held > 0 => {
                format!(": the {held} hung outbound calls hold their sockets")
            }
            ("C", "A" | "B") if m.hung().next().is_some() => {
                ": the hung requests hold their memory".to_owned()
            }
            ("E", "D") => ": connections pile up while the runtime does not serve them".to_owned(),
            _ => String::new(),
        };
        text.push_str(&format!(", which led to {l}{why} ({})", culprit(l)));
    }
    Outcome {
        kind: OutcomeKind::Explained,
        summary: format!("explained: {state}; {text}"),
        causes: causes.iter().map(|(l, _)| (*l).to_owned()).collect(),
    }
}

/// Where the hung requests wait, the largest groups first.
fn where_they_wait(m: &Model<'_>) -> String {
    let waits = &m.d.requests.waits;
    if waits.is_empty() {
        return "no request span was open or cancelled: where requests wait is not shown (see the D and E evidence for what is missing)".to_owned();
    }
    let groups = waits
        .iter()
        .take(3)
        .map(|w| {
            format!(
                "{} {} in `{}` (longest {:.1} s)",
                w.count,
                w.fate.as_str(),
                w.span,
                w.longest_ms as f64 / 1000.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("requests wait: {groups}")
}
