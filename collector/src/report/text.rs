//! The report for the terminal.

use std::fmt::Write as _;

use crate::analyse::{fmt_time, Verdict, HYPOTHESES};

use super::Report;

fn mark(v: Verdict) -> &'static str {
    match v {
        Verdict::Confirmed => "CONFIRMED",
        Verdict::RuledOut => "ruled out",
        Verdict::Inconclusive => "inconclusive",
    }
}

/// Stuck requests listed one by one; the rest are counted.
const MAX_LISTED: usize = 20;

/// Renders `report` as plain text.
pub fn render_text(report: &Report) -> String {
    let mut o = String::new();
    let w = &report.window;
    let _ = writeln!(o, "KMS hang report");
    if w.empty {
        let _ = writeln!(o, "  The store is empty: nothing received yet.");
    } else {
        let _ = writeln!(
            o,
            "  window   {} .. {} ({:.0} s)",
            w.from,
            w.to,
            (w.to_ns - w.from_ns) as f64 / 1e9
        );
    }
    match &report.failure_window {
        Some(f) => {
            let _ = writeln!(
                o,
                "  failing  since {} (from {}){}",
                fmt_time(f.from_ns),
                f.source,
                if f.ongoing { ", still failing" } else { "" }
            );
        }
        None => {
            let _ = writeln!(o, "  failing  no failure seen");
        }
    }
    let p = &report.probe;
    if p.attempts > 0 {
        let classes = p
            .failures_by_outcome
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            o,
            "  probe    {} attempts: {} ok, {} failed{}; last {}",
            p.attempts,
            p.ok,
            p.failed,
            if classes.is_empty() {
                String::new()
            } else {
                format!(" ({classes})")
            },
            p.last_outcome.as_deref().unwrap_or("-")
        );
    } else {
        let _ = writeln!(o, "  probe    no probe attempts stored");
    }
    let _ = writeln!(o, "\nVerdicts");
    for (letter, title) in HYPOTHESES {
        let Some(h) = report.hypotheses.get(letter) else {
            continue;
        };
        let _ = writeln!(o, "  {letter}  {:<40} {}", title, mark(h.verdict));
        if let Some(c) = &h.culprit {
            let _ = writeln!(o, "       culprit: {c}");
        }
        for e in &h.evidence {
            let mut cite = String::new();
            if let Some(t) = &e.trace_id {
                let _ = write!(cite, " [trace {t}");
                if let Some(s) = &e.span_id {
                    let _ = write!(cite, " span {s}");
                }
                cite.push(']');
            }
            let _ = writeln!(o, "       - {}{cite}", e.summary);
        }
    }
    let _ = writeln!(o, "\nStuck requests ({})", report.stuck_spans.len());
    for s in report.stuck_spans.iter().take(MAX_LISTED) {
        let _ = writeln!(
            o,
            "  {}  trace {} span {}\n      {}",
            s.start,
            s.trace_id,
            s.span_id,
            s.describe()
        );
    }
    if report.stuck_spans.len() > MAX_LISTED {
        let _ = writeln!(
            o,
            "  ... and {} more (all of them in --format json)",
            report.stuck_spans.len() - MAX_LISTED
        );
    }
    if !p.open_at_onset.is_empty() {
        let _ = writeln!(
            o,
            "\nOpen when GetMeta began failing ({})",
            p.first_failure_at.as_deref().unwrap_or("?")
        );
        for s in p.open_at_onset.iter().take(MAX_LISTED) {
            let _ = writeln!(
                o,
                "  {} waits on {}  trace {}",
                s.what, s.waits_on, s.trace_id
            );
        }
    }
    o
}
