//! The verdict vocabulary: hypotheses, verdicts and cited evidence. The JSON
//! names (`hypotheses`, `verdict`, `culprit`, `evidence`) are a fixed
//! interface: extend them, never rename them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The hypotheses, in report order, with their titles.
pub const HYPOTHESES: [(&str, &str); 5] = [
    ("A", "attestation / PCCS call hangs"),
    ("B", "auth webhook / Ethereum RPC call hangs"),
    ("C", "memory exhaustion"),
    ("D", "async runtime deadlocked or stalled"),
    ("E", "connection / fd exhaustion"),
];

/// A verdict on one hypothesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The stored facts show it.
    Confirmed,
    /// The stored facts exclude it.
    RuledOut,
    /// The data needed to decide are missing (the evidence says which).
    Inconclusive,
}

impl Verdict {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Confirmed => "confirmed",
            Verdict::RuledOut => "ruled_out",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// One cited fact.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evidence {
    /// What kind of fact, e.g. `stuck_outbound`, `poll_stall`, `runtime_healthy`.
    pub kind: String,
    /// One human sentence.
    pub summary: String,
    /// The trace it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The span it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    /// When (RFC 3339, UTC, milliseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// When, in Unix nanoseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_ns: Option<i64>,
    /// The rule that cited it (`docs/diagnosis.md`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The facts that rule reads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reads: Option<String>,
}

impl Evidence {
    /// Evidence of `kind` with a summary.
    pub fn new(kind: &str, summary: impl Into<String>) -> Self {
        Evidence {
            kind: kind.to_owned(),
            summary: summary.into(),
            trace_id: None,
            span_id: None,
            at: None,
            at_ns: None,
            rule: None,
            reads: None,
        }
    }

    /// Cites a span.
    pub fn span(mut self, trace_id: Option<&str>, span_id: Option<&str>) -> Self {
        self.trace_id = trace_id.filter(|s| !s.is_empty()).map(str::to_owned);
        self.span_id = span_id.filter(|s| !s.is_empty()).map(str::to_owned);
        self
    }

    /// Dates it.
    pub fn at(mut self, at_ns: i64) -> Self {
        self.at = Some(fmt_time(at_ns));
        self.at_ns = Some(at_ns);
        self
    }
}

/// The verdict on one hypothesis with its evidence, strongest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hypothesis {
    /// What the hypothesis says.
    pub title: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The named culprit when confirmed: a span, a lock, a peer, a worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub culprit: Option<String>,
    /// The facts behind the verdict.
    pub evidence: Vec<Evidence>,
}

/// Formats Unix nanoseconds as RFC 3339 UTC with milliseconds.
pub fn fmt_time(ns: i64) -> String {
    match u64::try_from(ns) {
        Ok(ns) => {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
        }
        Err(_) => humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH).to_string(),
    }
}
