//! The report as one self-contained HTML page: inline CSS, inline SVG, a few
//! lines of inline script, no network access.

use std::fmt::Write as _;

use crate::analyse::{fmt_time, Verdict, HYPOTHESES};

use super::{Report, Timeline};

/// Escapes text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
.meta{color:#5a6270} table{border-collapse:collapse;width:100%;background:#fff}
th,td{border:1px solid #dde1e6;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5} .v{font-weight:600;white-space:nowrap}
.confirmed{color:#b3261e} .ruled_out{color:#2e7d32} .inconclusive{color:#8a6d00}
tr.hyp{cursor:pointer} tr.ev td{font-size:13px;color:#333;background:#fcfcfd}
tr.ev.hidden{display:none} code{font-size:12px;color:#45507a}
svg{background:#fff;border:1px solid #dde1e6} .lane{font-size:11px;fill:#333}
.axis{font-size:10px;fill:#666}
"#;

const SCRIPT: &str = r#"
(function () {
  document.querySelectorAll('tr.hyp').forEach(function (row) {
    row.addEventListener('click', function () {
      document.querySelectorAll('tr.ev[data-h="' + row.dataset.h + '"]').forEach(function (ev) {
        ev.classList.toggle('hidden');
      });
    });
  });
  var tl = document.getElementById('timeline');
  document.body.dataset.ready = tl ? 'timeline' : 'no-timeline';
})();
"#;

/// Renders `report` as a self-contained HTML page.
pub fn render_html(report: &Report) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>KMS hang report</title><style>{STYLE}</style></head><body>"
    );
    let _ = write!(
        o,
        "<p id=\"outcome\" class=\"{}\"><b>{}</b></p>",
        report.outcome.as_str(),
        esc(&report.outcome_summary)
    );
    let _ = write!(
        o,
        "<h1>KMS hang report</h1><div class=\"meta\">{} .. {}",
        esc(&report.window.from),
        esc(&report.window.to)
    );
    if let Some(f) = &report.failure_window {
        let _ = write!(
            o,
            " &middot; failing since {} ({}){}",
            esc(&fmt_time(f.from_ns)),
            esc(&f.source),
            if f.ongoing { ", still failing" } else { "" }
        );
    }
    let p = &report.probe;
    let _ = write!(
        o,
        " &middot; probe: {} attempts, {} ok, {} failed</div>",
        p.attempts, p.ok, p.failed
    );

    if !report.wait_locations.is_empty() {
        o.push_str("<h2>Where requests wait</h2><table id=\"waits\"><tr><th>Innermost span</th><th>Fate</th><th>Count</th><th>Longest</th><th>Await chain</th></tr>");
        for w in &report.wait_locations {
            let _ = write!(
                o,
                "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{:.1} s</td><td>{}</td></tr>",
                esc(&w.span),
                w.queued_behind
                    .as_deref()
                    .map(|q| format!(" (queued behind {})", esc(q)))
                    .unwrap_or_default(),
                w.fate.as_str(),
                w.count,
                w.longest_ms as f64 / 1000.0,
                esc(&w.await_chain.join(" > "))
            );
        }
        o.push_str("</table>");
    }
    if !report.rejected_senders.is_empty() {
        o.push_str("<h2>Refused senders</h2><ul id=\"rejected\">");
        for r in &report.rejected_senders {
            let _ = write!(o, "<li>{}</li>", esc(&r.describe()));
        }
        o.push_str("</ul>");
    }
    o.push_str("<h2>Verdicts</h2><table id=\"verdicts\"><tr><th></th><th>Hypothesis</th><th>Verdict</th><th>Culprit</th></tr>");
    for (letter, title) in HYPOTHESES {
        let Some(h) = report.hypotheses.get(letter) else {
            continue;
        };
        let v = h.verdict.as_str();
        let _ = write!(
            o,
            "<tr class=\"hyp\" data-h=\"{letter}\"><td>{letter}</td><td>{}</td><td class=\"v {v}\">{}</td><td>{}</td></tr>",
            esc(title),
            v.replace('_', " "),
            esc(h.culprit.as_deref().unwrap_or(""))
        );
        let hidden = if h.verdict == Verdict::Confirmed {
            ""
        } else {
            " hidden"
        };
        for e in &h.evidence {
            let cite = match (&e.trace_id, &e.span_id) {
                (Some(t), Some(s)) => format!(" <code>trace {} span {}</code>", esc(t), esc(s)),
                (Some(t), None) => format!(" <code>trace {}</code>", esc(t)),
                _ => String::new(),
            };
            let _ = write!(
                o,
                "<tr class=\"ev{hidden}\" data-h=\"{letter}\"><td></td><td colspan=\"3\"><b>{}</b> {}{cite}{}</td></tr>",
                esc(&e.kind),
                esc(&e.summary),
                e.at.as_deref().map(|a| format!(" <span class=\"meta\">@ {}</span>", esc(a))).unwrap_or_default()
            );
        }
    }
    o.push_str("</table><div class=\"meta\">Click a row to show or hide its evidence.</div>");

    o.push_str("<h2>Timeline</h2>");
    o.push_str(&timeline_svg(&report.timeline));

    let _ = write!(o, "<h2>Stuck requests ({})</h2>", report.stuck_spans.len());
    if !report.stuck_spans.is_empty() {
        o.push_str("<table id=\"stuck\"><tr><th>Started</th><th>Request</th><th>Waits on</th><th>Trace / span</th></tr>");
        for s in &report.stuck_spans {
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{} {}</code></td></tr>",
                esc(&s.start),
                esc(s.rpc_method.as_deref().unwrap_or(&s.name)),
                esc(&s.describe()),
                esc(&s.trace_id),
                esc(&s.innermost.span_id)
            );
        }
        o.push_str("</table>");
    }
    let _ = writeln!(o, "<script>{SCRIPT}</script></body></html>");
    o
}

const W: f64 = 1000.0;
const LEFT: f64 = 170.0;
const RIGHT: f64 = 985.0;

struct Scale {
    from: i64,
    to: i64,
}

impl Scale {
    fn x(&self, t: i64) -> f64 {
        let span = (self.to - self.from).max(1) as f64;
        let x = LEFT + (t - self.from) as f64 / span * (RIGHT - LEFT);
        x.clamp(LEFT, RIGHT)
    }
}

fn polyline(
    o: &mut String,
    s: &Scale,
    pts: &[(i64, i64)],
    top: f64,
    h: f64,
    max: f64,
    color: &str,
) {
    if pts.is_empty() || max <= 0.0 {
        return;
    }
    let coords: Vec<String> = pts
        .iter()
        .map(|&(t, v)| {
            format!(
                "{:.1},{:.1}",
                s.x(t),
                top + h - (v as f64 / max).min(1.0) * h
            )
        })
        .collect();
    let _ = write!(
        o,
        "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
        coords.join(" ")
    );
}

fn hline(o: &mut String, y: f64, color: &str, label: &str) {
    let _ = write!(
        o,
        "<line x1=\"{LEFT}\" x2=\"{RIGHT}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{color}\" stroke-dasharray=\"4 3\"/><text class=\"axis\" x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
        RIGHT - 2.0,
        y - 2.0,
        esc(label)
    );
}

fn lane_label(o: &mut String, y: f64, text: &str) {
    let _ = write!(
        o,
        "<text class=\"lane\" x=\"8\" y=\"{y:.1}\">{}</text>",
        esc(text)
    );
}

fn outcome_color(outcome: &str) -> &'static str {
    match outcome {
        "ok" => "#2e7d32",
        "timeout" => "#e65100",
        "tls" => "#b3261e",
        "connect" => "#6a1b9a",
        _ => "#5d4037",
    }
}

fn class_color(class: &str) -> &'static str {
    match class {
        "attestation" => "#1565c0",
        "auth_webhook" => "#6a1b9a",
        "handler" => "#e65100",
        "poll" | "heartbeat" => "#b3261e",
        _ => "#546e7a",
    }
}

/// The timeline as inline SVG: probe results, heartbeat lag, open spans as
/// bars, RSS, fds and CLOSE_WAIT, with the failure window shaded.
fn timeline_svg(t: &Timeline) -> String {
    let s = Scale {
        from: t.from_ns,
        to: t.to_ns.max(t.from_ns + 1),
    };
    let bars = t.open_spans.len() + t.stalls.len();
    let lane_h = 80.0;
    let probe_top = 20.0;
    let hb_top = probe_top + 40.0;
    let bars_top = hb_top + lane_h + 20.0;
    let bars_h = (bars.max(1) as f64) * 14.0;
    let rss_top = bars_top + bars_h + 20.0;
    let fd_top = rss_top + lane_h + 20.0;
    let height = fd_top + lane_h + 30.0;
    let mut o = String::new();
    let _ = write!(
        o,
        "<svg id=\"timeline\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height:.0}\" viewBox=\"0 0 {W} {height:.0}\">"
    );
    if let Some((a, b)) = t.failure {
        let (x1, x2) = (s.x(a), s.x(b));
        let _ = write!(
            o,
            "<rect x=\"{x1:.1}\" y=\"10\" width=\"{:.1}\" height=\"{:.0}\" fill=\"#fdecea\"><title>failure window</title></rect>",
            (x2 - x1).max(1.0),
            height - 40.0
        );
    }
    // Probe results.
    lane_label(&mut o, probe_top + 14.0, "probe (GetMeta)");
    for p in &t.probes {
        let _ = write!(
            o,
            "<rect x=\"{:.1}\" y=\"{probe_top}\" width=\"3\" height=\"20\" fill=\"{}\"><title>{} {}{}</title></rect>",
            s.x(p.t) - 1.0,
            outcome_color(&p.outcome),
            esc(&fmt_time(p.t)),
            esc(&p.outcome),
            p.latency_ms.map(|l| format!(" {l:.0} ms")).unwrap_or_default()
        );
    }
    let mut lx = RIGHT - 300.0;
    for outcome in ["ok", "timeout", "tls", "connect", "other"] {
        let _ = write!(
            o,
            "<rect x=\"{lx:.0}\" y=\"4\" width=\"8\" height=\"8\" fill=\"{}\"/><text class=\"axis\" x=\"{:.0}\" y=\"12\">{outcome}</text>",
            outcome_color(outcome),
            lx + 11.0
        );
        lx += 60.0;
    }
    if t.probes.is_empty() {
        let _ = write!(
            o,
            "<text class=\"axis\" x=\"{LEFT}\" y=\"{:.0}\">no probe data</text>",
            probe_top + 14.0
        );
    }
    // Heartbeat lag.
    lane_label(&mut o, hb_top + 14.0, "heartbeat lag");
    let max_lag = t.heartbeat_lag_ms.iter().map(|p| p.1).max().unwrap_or(0);
    let hb_max = (max_lag.max(t.heartbeat_threshold_ms * 2)).max(1) as f64;
    let thr_y = hb_top + lane_h - t.heartbeat_threshold_ms as f64 / hb_max * lane_h;
    hline(
        &mut o,
        thr_y,
        "#b3261e",
        &format!("threshold {} ms", t.heartbeat_threshold_ms),
    );
    polyline(
        &mut o,
        &s,
        &t.heartbeat_lag_ms,
        hb_top,
        lane_h,
        hb_max,
        "#1565c0",
    );
    let _ = write!(
        o,
        "<text class=\"axis\" x=\"8\" y=\"{:.0}\">max {max_lag} ms</text>",
        hb_top + 28.0
    );
    if t.heartbeat_lag_ms.is_empty() {
        let _ = write!(
            o,
            "<text class=\"axis\" x=\"{LEFT}\" y=\"{:.0}\">no kms.runtime samples</text>",
            hb_top + 40.0
        );
    }
    // Open spans and stalls as bars, labelled in the left gutter.
    lane_label(&mut o, bars_top - 6.0, "open spans, stalls");
    for (i, b) in t.open_spans.iter().chain(&t.stalls).enumerate() {
        let y = bars_top + i as f64 * 14.0;
        let (x1, x2) = (s.x(b.start_ns), s.x(b.end_ns));
        let short: String = if b.label.chars().count() > 27 {
            b.label
                .chars()
                .take(26)
                .chain(std::iter::once('…'))
                .collect()
        } else {
            b.label.clone()
        };
        let _ = write!(
            o,
            "<rect class=\"bar\" x=\"{x1:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"11\" fill=\"{}\" opacity=\"0.8\"><title>{} {} .. {}{}</title></rect><text class=\"axis\" x=\"14\" y=\"{:.1}\">{}</text>",
            (x2 - x1).max(2.0),
            class_color(&b.class),
            esc(&b.label),
            esc(&fmt_time(b.start_ns)),
            esc(&fmt_time(b.end_ns)),
            b.trace_id.as_deref().map(|t| format!(" trace {}", esc(t))).unwrap_or_default(),
            y + 9.0,
            esc(&short)
        );
    }
    if bars == 0 {
        let _ = write!(
            o,
            "<text class=\"axis\" x=\"{LEFT}\" y=\"{:.0}\">no stuck span, no stall</text>",
            bars_top + 10.0
        );
    }
    // RSS.
    lane_label(&mut o, rss_top + 14.0, "RSS");
    let max_rss = t.rss_bytes.iter().map(|p| p.1).max().unwrap_or(0);
    let rss_scale = match t.memory_limit_bytes {
        Some(l) if l <= max_rss.saturating_mul(4) => l.max(max_rss),
        _ => max_rss + max_rss / 5,
    }
    .max(1) as f64;
    if let Some(l) = t.memory_limit_bytes {
        if (l as f64) <= rss_scale {
            hline(
                &mut o,
                rss_top + lane_h - l as f64 / rss_scale * lane_h,
                "#b3261e",
                &format!("limit {:.0} MiB", l as f64 / 1048576.0),
            );
        }
    }
    polyline(
        &mut o,
        &s,
        &t.rss_bytes,
        rss_top,
        lane_h,
        rss_scale,
        "#2e7d32",
    );
    let _ = write!(
        o,
        "<text class=\"axis\" x=\"8\" y=\"{:.0}\">peak {:.1} MiB</text>",
        rss_top + 28.0,
        max_rss as f64 / 1048576.0
    );
    // fds and CLOSE_WAIT.
    lane_label(&mut o, fd_top + 14.0, "open fds");
    let _ = write!(o, "<text class=\"lane\" x=\"62\" y=\"{:.1}\" fill=\"#e65100\" style=\"fill:#e65100\">/ CLOSE_WAIT</text>", fd_top + 14.0);
    let max_fd = t
        .open_fds
        .iter()
        .chain(&t.close_wait)
        .map(|p| p.1)
        .max()
        .unwrap_or(0);
    let fd_scale = match t.fd_limit {
        Some(l) if l <= max_fd.saturating_mul(4) => l.max(max_fd),
        _ => max_fd + max_fd / 5,
    }
    .max(1) as f64;
    if let Some(l) = t.fd_limit {
        if (l as f64) <= fd_scale {
            hline(
                &mut o,
                fd_top + lane_h - l as f64 / fd_scale * lane_h,
                "#b3261e",
                &format!("fd limit {l}"),
            );
        }
    }
    polyline(&mut o, &s, &t.open_fds, fd_top, lane_h, fd_scale, "#6a1b9a");
    polyline(
        &mut o,
        &s,
        &t.close_wait,
        fd_top,
        lane_h,
        fd_scale,
        "#e65100",
    );
    let _ = write!(
        o,
        "<text class=\"axis\" x=\"8\" y=\"{:.0}\">peak {max_fd}</text>",
        fd_top + 28.0
    );
    // Time axis.
    let axis_y = height - 12.0;
    for i in 0..=4 {
        let tt = s.from + (s.to - s.from) / 4 * i;
        let label = fmt_time(tt);
        let hms = label.get(11..19).unwrap_or(&label);
        let _ = write!(
            o,
            "<text class=\"axis\" x=\"{:.1}\" y=\"{axis_y:.0}\" text-anchor=\"{}\">{}</text>",
            s.x(tt),
            if i == 4 { "end" } else { "middle" },
            esc(hms)
        );
    }
    o.push_str("</svg>");
    o
}
