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
    let _ = writeln!(o, "{}", report.outcome_summary);
    let _ = writeln!(o, "\nKMS hang report");
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
    for ep in &p.episodes {
        let classes = ep
            .classes
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            o,
            "  episode  {} .. {} ({classes})",
            ep.start,
            match &ep.end {
                Some(e) => format!("recovered at {e}"),
                None => "still failing".to_owned(),
            }
        );
    }
    if p.not_up_yet > 0 {
        let _ = writeln!(
            o,
            "  not up   {} failed attempts before the KMS first answered (not a failure)",
            p.not_up_yet
        );
    }
    let r = &report.requests;
    if report.failure_window.is_some() {
        let _ = writeln!(
            o,
            "  requests in the failure window: {} completed, {} failed, {} cancelled, {} open",
            r.completed, r.failed, r.cancelled, r.open
        );
    }
    if let Some(gap) = report.findings.lock_wait.console_gaps.describe() {
        let _ = writeln!(
            o,
            "  console  the KMS's tokio-console {gap}: its view of tasks and locks is partial"
        );
    }
    if !report.wait_locations.is_empty() {
        let _ = writeln!(o, "\nWhere requests wait");
        let _ = writeln!(
            o,
            "  {:<48} {:<10} {:>6} {:>10}",
            "innermost span", "fate", "count", "longest"
        );
        for wl in &report.wait_locations {
            let _ = writeln!(
                o,
                "  {:<48} {:<10} {:>6} {:>9.1}s{}",
                wl.span,
                wl.fate.as_str(),
                wl.count,
                wl.longest_ms as f64 / 1000.0,
                wl.queued_behind
                    .as_deref()
                    .map(|q| format!("  queued behind {q}"))
                    .unwrap_or_default()
            );
            if !wl.await_chain.is_empty() {
                let _ = writeln!(o, "      await chain: {}", wl.await_chain.join(" > "));
            }
        }
    }
    if !report.rejected_senders.is_empty() {
        let _ = writeln!(o, "\nRefused senders (their exports were not stored)");
        for r in &report.rejected_senders {
            let _ = writeln!(o, "  {}", r.describe());
        }
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
        if !s.await_chain.is_empty() {
            let _ = writeln!(o, "      await chain: {}", s.await_chain.join(" > "));
        }
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
