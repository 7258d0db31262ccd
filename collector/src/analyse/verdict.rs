//! Pass 8, verdicts: weighs the findings of the earlier passes into one
//! verdict per hypothesis, each with its cited evidence.
//!
//! D is confirmed by a stall (poll or heartbeat) in the failure window, a
//! parking_lot deadlock cycle, or an async lock cycle; ruled out when the
//! runtime stayed healthy through the failure window (heartbeat samples
//! covering it, none lagging, no stall, no deadlock) and the stuck requests
//! wait on something else; inconclusive otherwise, naming the missing data.
//! The probe's failure class is cited as well: a stalled runtime cannot
//! finish TLS handshakes, a stuck handler leaves them working.

use std::collections::BTreeMap;

use super::attrs::{ms_between, str_of};
use super::stuck_io::OUTBOUND_SPAN;
use super::{
    fmt_time, Context, Evidence, Hypothesis, Pass, StuckSpan, Verdict, WaitsOn, HYPOTHESES,
};
use crate::store::{ReadError, TimeWindow};

/// At most this many stuck spans are cited one by one per hypothesis.
const MAX_CITED: usize = 5;

/// The pass.
#[derive(Debug)]
pub(crate) struct Verdicts;

/// Closed outbound calls to one peer in the failure window.
#[derive(Debug, Default)]
struct PeerCalls {
    count: usize,
    slowest_ms: i64,
    /// Calls over the slow-call threshold, not overlapping a stall.
    slow: Vec<crate::store::SpanRow>,
}

fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn pct(r: f64) -> String {
    format!("{:.0}%", r * 100.0)
}

fn hyp(
    letter: &str,
    verdict: Verdict,
    culprit: Option<String>,
    evidence: Vec<Evidence>,
) -> Hypothesis {
    let title = HYPOTHESES
        .iter()
        .find(|(l, _)| *l == letter)
        .map(|(_, t)| (*t).to_owned())
        .unwrap_or_default();
    Hypothesis {
        title,
        verdict,
        culprit,
        evidence,
    }
}

fn stuck_evidence(s: &StuckSpan, kind: &str) -> Evidence {
    Evidence::new(kind, s.describe())
        .span(Some(&s.trace_id), Some(&s.innermost.span_id))
        .at(s.start_ns)
}

/// Cites up to [`MAX_CITED`] stuck spans, then counts the rest.
fn cite_stuck(spans: &[&StuckSpan], kind: &str, out: &mut Vec<Evidence>) {
    for s in spans.iter().take(MAX_CITED) {
        out.push(stuck_evidence(s, kind));
    }
    if spans.len() > MAX_CITED {
        out.push(Evidence::new(
            kind,
            format!(
                "... and {} more stuck requests like these",
                spans.len() - MAX_CITED
            ),
        ));
    }
}

impl Pass for Verdicts {
    fn name(&self) -> &'static str {
        "verdict"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let failure = cx.failure_or_window();
        let has_spans =
            !cx.reader.spans(cx.window, 1)?.is_empty() || !cx.diagnosis.stuck.is_empty();
        let outbound = cx.reader.spans_started(failure, OUTBOUND_SPAN, 100_000)?;
        let slow_ms = i64::try_from(cx.config.slow_call_threshold.as_millis()).unwrap_or(i64::MAX);
        let mut closed_by_peer: BTreeMap<String, PeerCalls> = BTreeMap::new();
        for s in outbound.iter().filter(|s| !s.incomplete) {
            let peer = str_of(&s.attributes, "kms.peer").unwrap_or_else(|| "other".into());
            let ms = ms_between(s.start_ns, s.end_ns);
            let e = closed_by_peer.entry(peer).or_default();
            e.count += 1;
            e.slowest_ms = e.slowest_ms.max(ms);
            // A call slowed by a runtime stall says nothing about the peer.
            let stalled = cx
                .diagnosis
                .stall
                .episodes
                .iter()
                .any(|ep| ep.first_ns <= s.end_ns && ep.last_ns >= s.start_ns);
            if ms >= slow_ms && !stalled && cx.diagnosis.failure.is_some() {
                e.slow.push(s.clone());
            }
        }
        // Dropped closed spans can hide completed calls (never snapshots:
        // those take the priority lane); say so where absence is evidence.
        let dropped: i64 = cx
            .reader
            .events("kms.export_drops", cx.window)?
            .iter()
            .filter_map(|e| super::attrs::i64_of(&e.attributes, "export.dropped_spans"))
            .sum();
        let mut h = BTreeMap::new();
        h.insert(
            "A".to_owned(),
            outbound_hypothesis(cx, "A", WaitsOn::Attestation, has_spans, &closed_by_peer),
        );
        h.insert(
            "B".to_owned(),
            outbound_hypothesis(cx, "B", WaitsOn::AuthWebhook, has_spans, &closed_by_peer),
        );
        if dropped > 0 {
            for letter in ["A", "B"] {
                if let Some(x) = h
                    .get_mut(letter)
                    .filter(|x: &&mut Hypothesis| x.verdict != Verdict::Confirmed)
                {
                    x.evidence.push(Evidence::new(
                        "export_drops",
                        format!("the KMS dropped {dropped} closed spans under load (kms.export_drops): completed calls may be missing; open-span snapshots are never dropped for capacity"),
                    ));
                }
            }
        }
        h.insert("C".to_owned(), memory_hypothesis(cx));
        let e = connections_hypothesis(cx, failure);
        let d = runtime_hypothesis(cx, failure, &h["C"], &e);
        // E's "requests don't reach the handler" reading depends on D: a
        // stalled or deadlocked runtime also stops requests before the
        // handler and lets connections pile up. Only fds at the limit or
        // accept errors confirm E next to a confirmed D.
        let e = if d.verdict == Verdict::Confirmed
            && e.verdict != Verdict::RuledOut
            && !exhausted(cx)
        {
            let mut e = e;
            e.verdict = Verdict::RuledOut;
            e.culprit = None;
            e.evidence.retain(|x| x.kind != "before_handler");
            e.evidence.push(Evidence::new(
                "explained_by_d",
                "requests do not reach the handler because the runtime is stalled or deadlocked (D); fds stayed below the limit and accept never failed",
            ));
            e
        } else {
            e
        };
        h.insert("D".to_owned(), d);
        h.insert("E".to_owned(), e);
        cx.diagnosis.hypotheses = h;
        Ok(())
    }
}

fn outbound_hypothesis(
    cx: &Context<'_>,
    letter: &str,
    peer: WaitsOn,
    has_spans: bool,
    closed_by_peer: &BTreeMap<String, PeerCalls>,
) -> Hypothesis {
    let stuck = &cx.diagnosis.stuck;
    let mut ev = Vec::new();
    // A call cannot finish when the runtime froze (no future is polled) or
    // when it started after the fds ran out (no socket for it): those calls
    // are stuck because of D or E, and do not blame the peer.
    let frozen_since = cx.diagnosis.stall.full_stall_since();
    let long_ns = i64::try_from(cx.config.long_stall.as_nanos()).unwrap_or(i64::MAX);
    let c = &cx.diagnosis.connections;
    let no_fd_since = c
        .exhausted_since_ns
        .map(|t| t - c.sample_interval_ms.unwrap_or(0) * 1_000_000);
    let (mut on_peer, mut explained): (Vec<&StuckSpan>, Vec<(&StuckSpan, &str)>) =
        (Vec::new(), Vec::new());
    for s in stuck.iter().filter(|s| s.waits_on == peer) {
        let began = s.innermost.start_ns;
        if frozen_since.is_some_and(|f| began > f.saturating_sub(long_ns)) {
            explained.push((s, "the runtime stalled while it was in flight (D)"));
        } else if no_fd_since.is_some_and(|t| began >= t) {
            explained.push((s, "it started after the process ran out of fds (E)"));
        } else {
            on_peer.push(s);
        }
    }
    let note = explained.first().map(|(s, why)| {
        Evidence::new(
            "explained_elsewhere",
            format!(
                "{} stuck {} call(s) do not count against the peer: {why} (e.g. {})",
                explained.len(),
                peer.as_str(),
                s.describe()
            ),
        )
        .span(Some(&s.trace_id), Some(&s.innermost.span_id))
        .at(s.innermost.start_ns)
    });
    if let Some(first) = on_peer.first() {
        cite_stuck(&on_peer, "stuck_outbound", &mut ev);
        ev.extend(note.clone());
        // Requests idle in a span that a stuck call runs under (a once-cell,
        // a lock scope) are queued behind that call.
        let scopes: std::collections::BTreeSet<&str> = on_peer
            .iter()
            .flat_map(|s| s.path_names.iter().skip(1).map(String::as_str))
            .filter(|n| *n != OUTBOUND_SPAN && *n != super::stuck_io::REQUEST_SPAN)
            .collect();
        let queued: Vec<&StuckSpan> = stuck
            .iter()
            .filter(|s| {
                s.waits_on == WaitsOn::Handler && scopes.contains(s.innermost.name.as_str())
            })
            .collect();
        if !queued.is_empty() {
            ev.push(Evidence::new(
                "queued_behind",
                format!(
                    "{} more requests wait in `{}`, the span the stuck {} call runs under: queued behind it",
                    queued.len(),
                    queued[0].innermost.name,
                    peer.as_str()
                ),
            ));
        }
        let culprit = format!(
            "{} `{}`{} ({} stuck request{})",
            peer.as_str(),
            first.innermost.call.as_deref().unwrap_or(OUTBOUND_SPAN),
            first
                .innermost
                .server
                .as_deref()
                .map(|s| format!(" to {s}"))
                .unwrap_or_default(),
            on_peer.len(),
            if on_peer.len() == 1 { "" } else { "s" }
        );
        return hyp(letter, Verdict::Confirmed, Some(culprit), ev);
    }
    if !has_spans {
        ev.push(Evidence::new(
            "missing_data",
            "no spans stored in the window: cannot tell what requests wait on (is the KMS exporting traces to this collector?)",
        ));
        return hyp(letter, Verdict::Inconclusive, None, ev);
    }
    let others: BTreeMap<&str, usize> = stuck.iter().fold(BTreeMap::new(), |mut m, s| {
        *m.entry(s.waits_on.as_str()).or_default() += 1;
        m
    });
    ev.push(Evidence::new(
        "no_stuck_outbound",
        if !explained.is_empty() {
            format!(
                "no stuck request waits on {} except calls a stall or fd exhaustion froze (below)",
                peer.as_str()
            )
        } else if stuck.is_empty() {
            format!(
                "no request is stuck, none in an outbound call to {}",
                peer.as_str()
            )
        } else {
            format!(
                "none of the {} stuck requests waits on {} (they wait on: {})",
                stuck.len(),
                peer.as_str(),
                others
                    .iter()
                    .map(|(k, n)| format!("{k} x{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    ));
    ev.extend(note);
    let calls = closed_by_peer.get(peer.as_str());
    if let Some(slow) = calls.map(|c| &c.slow).filter(|s| !s.is_empty()) {
        let context = std::mem::take(&mut ev);
        for s in slow.iter().take(MAX_CITED) {
            ev.push(
                Evidence::new(
                    "slow_outbound",
                    format!(
                        "outbound {} `{}` took {} ms{} and was then abandoned or answered late",
                        peer.as_str(),
                        str_of(&s.attributes, "kms.call").unwrap_or_default(),
                        ms_between(s.start_ns, s.end_ns),
                        str_of(&s.attributes, "error.type")
                            .map(|e| format!(" (error.type {e})"))
                            .unwrap_or_default()
                    ),
                )
                .span(Some(&s.trace_id), Some(&s.span_id))
                .at(s.start_ns),
            );
        }
        if slow.len() > MAX_CITED {
            ev.push(Evidence::new(
                "slow_outbound",
                format!(
                    "... and {} more slow calls like these",
                    slow.len() - MAX_CITED
                ),
            ));
        }
        ev.extend(context);
        let first = &slow[0];
        let culprit = format!(
            "{} `{}`{}: {} calls in the failure window took over {} s",
            peer.as_str(),
            str_of(&first.attributes, "kms.call").unwrap_or_default(),
            str_of(&first.attributes, "server.address")
                .map(|a| match str_of(&first.attributes, "server.port") {
                    Some(p) => format!(" to {a}:{p}"),
                    None => format!(" to {a}"),
                })
                .unwrap_or_default(),
            slow.len(),
            cx.config.slow_call_threshold.as_secs()
        );
        return hyp(letter, Verdict::Confirmed, Some(culprit), ev);
    }
    if let Some(PeerCalls {
        count: n,
        slowest_ms: slowest,
        ..
    }) = calls
    {
        ev.push(Evidence::new(
            "calls_completed",
            format!(
                "{n} outbound calls to {} completed in the {}, slowest {slowest} ms",
                peer.as_str(),
                if cx.diagnosis.failure.is_some() {
                    "failure window"
                } else {
                    "window"
                }
            ),
        ));
    }
    hyp(letter, Verdict::RuledOut, None, ev)
}

fn memory_hypothesis(cx: &Context<'_>) -> Hypothesis {
    let m = &cx.diagnosis.memory;
    let mut ev = Vec::new();
    let (Some(peak), Some(peak_ns)) = (m.peak_rss_bytes, m.peak_ns) else {
        ev.push(Evidence::new(
            "missing_data",
            "no kms.process samples with process.rss_bytes in the window",
        ));
        return hyp("C", Verdict::Inconclusive, None, ev);
    };
    let trend = match (m.first_rss_bytes, m.slope_bytes_per_s) {
        (Some(first), Some(slope)) => format!(
            " (from {} at the start; trend {:+.1} KiB/s over {} samples)",
            mib(first),
            slope / 1024.0,
            m.samples
        ),
        _ => String::new(),
    };
    let Some(limit) = m.limit_bytes else {
        ev.push(Evidence::new("rss", format!("RSS peaked at {}{trend}", mib(peak))).at(peak_ns));
        ev.push(Evidence::new(
            "missing_data",
            "no process.memory_limit_bytes reported: cannot compare RSS with its limit",
        ));
        return hyp("C", Verdict::Inconclusive, None, ev);
    };
    let ratio = m.peak_ratio.unwrap_or(0.0);
    ev.push(
        Evidence::new(
            "rss",
            format!(
                "RSS peaked at {} of a {} limit ({}){trend}",
                mib(peak),
                mib(limit),
                pct(ratio)
            ),
        )
        .at(peak_ns),
    );
    if let Some(t) = m.projected_limit_ns {
        ev.push(
            Evidence::new(
                "rss_trend",
                format!("at this trend RSS reaches the limit at {}", fmt_time(t)),
            )
            .at(t),
        );
    }
    if m.near_limit {
        let culprit = format!("RSS {} of {} ({})", mib(peak), mib(limit), pct(ratio));
        hyp("C", Verdict::Confirmed, Some(culprit), ev)
    } else {
        ev.push(Evidence::new(
            "rss_below_limit",
            format!(
                "RSS stayed below {} of the limit",
                pct(cx.config.memory_near_limit)
            ),
        ));
        hyp("C", Verdict::RuledOut, None, ev)
    }
}

/// fds ran out (see [`super::ConnectionFindings::exhausted`]).
fn exhausted(cx: &Context<'_>) -> bool {
    cx.diagnosis.connections.exhausted()
}

fn connections_hypothesis(cx: &Context<'_>, failure: TimeWindow) -> Hypothesis {
    let c = &cx.diagnosis.connections;
    let mut ev = Vec::new();
    if let (Some(peak), Some(peak_ns)) = (c.peak_fds, c.peak_ns) {
        let of_limit = match (c.fd_limit, c.peak_ratio) {
            (Some(l), Some(r)) => format!(" of a limit of {l} ({})", pct(r)),
            _ => " (no fd limit reported)".into(),
        };
        ev.push(
            Evidence::new(
                "fds",
                format!(
                    "open fds peaked at {peak}{of_limit}, from {} at the start",
                    c.first_fds.unwrap_or(peak)
                ),
            )
            .at(peak_ns),
        );
    }
    if let Some([first, peak, last]) = c.close_wait {
        let why = if peak > first {
            " (clients gave up, the server never closed)"
        } else {
            ""
        };
        ev.push(Evidence::new(
            "close_wait",
            format!("inbound CLOSE_WAIT connections: {first} at the start, peak {peak}, last {last}{why}"),
        ));
    }
    if c.fd_unreadable > 0 {
        let mut e = Evidence::new(
            "fds_unreadable",
            format!(
                "{} process samples could not count open fds (reading /proc/self/fd failed) after earlier ones could: the process had no fd left to open it",
                c.fd_unreadable
            ),
        );
        if let Some(t) = c.first_fd_unreadable_ns {
            e = e.at(t);
        }
        ev.push(e);
    }
    if c.accept_errors > 0 {
        let mut e = Evidence::new(
            "accept_errors",
            format!(
                "{} log records say accept ran out of fds (EMFILE)",
                c.accept_errors
            ),
        );
        if let Some(t) = c.first_accept_error_ns {
            e = e.at(t);
        }
        ev.push(e);
    }
    if let Some(n) = c.requests_started_in_failure {
        ev.push(
            Evidence::new(
                "requests_started",
                format!(
                    "{n} request spans started during the failure window while the probe failed {} times",
                    c.probe_failures_in_failure
                ),
            )
            .at(failure.from_ns),
        );
    }
    let held_by_stuck = cx
        .diagnosis
        .stuck
        .iter()
        .filter(|s| s.waits_on.is_outbound())
        .count();
    if exhausted(cx) {
        if held_by_stuck > 0 {
            ev.push(Evidence::new(
                "secondary",
                format!("{held_by_stuck} stuck requests in outbound calls hold connections: exhaustion may follow from them"),
            ));
        }
        let culprit = match (c.peak_fds, c.fd_limit) {
            (Some(p), Some(l)) if c.near_limit => format!("open fds {p} of limit {l}"),
            (Some(p), Some(l)) if c.fd_unreadable > 0 => {
                format!("open fds {p} of limit {l}, then /proc/self/fd unreadable (EMFILE)")
            }
            _ => "accept failing with EMFILE".to_owned(),
        };
        return hyp("E", Verdict::Confirmed, Some(culprit), ev);
    }
    if c.requests_not_reaching_handler() && c.growing() {
        ev.push(Evidence::new(
            "before_handler",
            "the probe fails, telemetry keeps arriving, no request reaches the handler, and connections pile up",
        ));
        return hyp(
            "E",
            Verdict::Confirmed,
            Some("connections stuck before the handler".into()),
            ev,
        );
    }
    if c.samples == 0 {
        ev.push(Evidence::new(
            "missing_data",
            "no kms.process samples with process.open_fds in the window",
        ));
        return hyp("E", Verdict::Inconclusive, None, ev);
    }
    if c.requests_not_reaching_handler() {
        ev.push(Evidence::new(
            "before_handler",
            "requests do not reach the handler while fds stay far from the limit: stuck before the handler, cause not shown by fds",
        ));
        return hyp("E", Verdict::Inconclusive, None, ev);
    }
    if c.fd_limit.is_none() {
        ev.push(Evidence::new(
            "missing_data",
            "no process.fd_limit reported",
        ));
        return hyp("E", Verdict::Inconclusive, None, ev);
    }
    ev.push(Evidence::new(
        "fds_below_limit",
        format!(
            "open fds stayed below {} of the limit and no accept errors",
            pct(cx.config.fd_near_limit)
        ),
    ));
    hyp("E", Verdict::RuledOut, None, ev)
}

fn probe_class_evidence(cx: &Context<'_>) -> Option<Evidence> {
    let p = &cx.diagnosis.probe;
    let class = p.failure_class.as_deref()?;
    let at = p.first_failure_ns?;
    let summary = match class {
        "tls" => "probe: TLS handshakes fail or time out; a runtime that cannot poll connection tasks (full stall) or cannot accept (fd exhaustion) fits, a stuck handler does not",
        "timeout" => "probe: TLS handshakes complete but GetMeta gets no answer; the runtime still polls accept and connection tasks, so a full runtime stall does not fit",
        "connect" => "probe: TCP connects fail; the process is gone or not listening",
        "http_status" => "probe: GetMeta answers with an error status; the KMS is not hung",
        _ => "probe: GetMeta fails",
    };
    Some(Evidence::new(&format!("probe_{class}"), summary).at(at))
}

fn runtime_hypothesis(
    cx: &Context<'_>,
    failure: TimeWindow,
    c: &Hypothesis,
    e: &Hypothesis,
) -> Hypothesis {
    let d = &cx.diagnosis;
    let st = &d.stall;
    let hang = d.failure.is_some();
    let mut ev = Vec::new();
    let mut culprit = None;
    // Short stalls that ended are cited, but explain no hang.
    let mut transient = Vec::new();
    let long_ms = i64::try_from(cx.config.long_stall.as_millis()).unwrap_or(i64::MAX);
    // Stalls in the failure window count when still going on, or (during a
    // failure) when they lasted long.
    for ep in st.episodes_in(failure) {
        let counts = !ep.ended || (hang && ep.duration_ms >= long_ms);
        let who = match (&ep.thread_name, ep.worker) {
            (Some(n), _) => n.clone(),
            (None, Some(w)) => format!("worker {w}"),
            (None, None) => "runtime".into(),
        };
        let summary = if ep.kind == "heartbeat" {
            format!(
                "heartbeat lagged {} ms (threshold {} ms){}",
                ep.duration_ms,
                ep.threshold_ms.unwrap_or(st.threshold_ms),
                if ep.ended { "" } else { ", still lagging" }
            )
        } else {
            format!(
                "{who} stuck in one poll for {} ms{}{}{}{}",
                ep.duration_ms,
                ep.task_id
                    .map(|t| format!(", task {t}"))
                    .unwrap_or_default(),
                ep.span_name
                    .as_deref()
                    .map(|s| format!(", in span `{s}`"))
                    .unwrap_or_default(),
                ep.wchan
                    .as_deref()
                    .map(|w| format!(", thread waits in {w}"))
                    .unwrap_or_default(),
                if ep.ended { "" } else { ", still stuck" }
            )
        };
        if !counts {
            transient.push(
                Evidence::new(
                    "transient_stall",
                    format!("{summary}; ended, shorter than {long_ms} ms: explains no hang"),
                )
                .span(ep.trace_id.as_deref(), ep.span_id.as_deref())
                .at(ep.first_ns),
            );
            continue;
        }
        if culprit.is_none() && ep.kind != "heartbeat" {
            // Name the request too when the stalled span is a stored one.
            let request = d
                .stuck
                .iter()
                .find(|s| {
                    ep.span_id
                        .as_ref()
                        .is_some_and(|id| s.member_ids.contains(id))
                })
                .map(|s| {
                    format!(
                        " ({} trace {})",
                        s.rpc_method.as_deref().unwrap_or(&s.name),
                        s.trace_id
                    )
                })
                .unwrap_or_default();
            culprit = Some(format!(
                "{who} blocked in a poll{}{request}",
                ep.span_name
                    .as_deref()
                    .map(|s| format!(" in `{s}`"))
                    .unwrap_or_default()
            ));
        }
        ev.push(
            Evidence::new(
                if ep.kind == "heartbeat" {
                    "heartbeat_stall"
                } else {
                    "poll_stall"
                },
                summary,
            )
            .span(ep.trace_id.as_deref(), ep.span_id.as_deref())
            .at(ep.first_ns),
        );
    }
    if st.lagging_samples_in_failure > 0 && !(st.lag_persistent && hang) {
        transient.push(Evidence::new(
            "transient_lag",
            format!(
                "{} of {} kms.runtime samples in the window show the heartbeat late (max lag {} ms, threshold {} ms): spikes, not a stall",
                st.lagging_samples_in_failure,
                st.samples_in_failure,
                st.max_lag_in_failure_ms.unwrap_or(0),
                st.threshold_ms
            ),
        ));
    }
    if st.lag_persistent && hang {
        let mut e = Evidence::new(
            "heartbeat_lag",
            format!(
                "{} of {} kms.runtime samples in the failure window show the heartbeat late (max lag {} ms, threshold {} ms) or missed",
                st.lagging_samples_in_failure,
                st.samples_in_failure,
                st.max_lag_in_failure_ms.unwrap_or(0),
                st.threshold_ms
            ),
        );
        if let Some(t) = st.first_lagging_ns {
            e = e.at(t);
        }
        ev.push(e);
        culprit.get_or_insert_with(|| "runtime heartbeat lagging".into());
    }
    for cy in &d.deadlock.cycles {
        let threads = cy
            .threads
            .iter()
            .map(|t| {
                format!(
                    "{} (tid {}){}",
                    t.thread_name.as_deref().unwrap_or("?"),
                    t.thread_id,
                    t.waiting_at
                        .as_deref()
                        .map(|w| format!(" at {w}"))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        ev.push(
            Evidence::new(
                "deadlock",
                format!(
                    "parking_lot deadlock cycle of {} threads: {threads}; reported {} times",
                    cy.threads.len(),
                    cy.reports
                ),
            )
            .at(cy.first_ns),
        );
        culprit = Some(format!("parking_lot deadlock: {threads}"));
    }
    let lw = &d.lock_wait;
    if lw.cycle_suspected {
        for w in &lw.waits {
            ev.push(
                Evidence::new(
                    "lock_wait",
                    format!(
                        "task {}{}{} waits {} ms on {} {}{}{} (waker count {})",
                        w.task_id,
                        w.task_name
                            .as_deref()
                            .map(|n| format!(" `{n}`"))
                            .unwrap_or_default(),
                        w.spawn_location
                            .as_deref()
                            .map(|l| format!(" spawned at {l}"))
                            .unwrap_or_default(),
                        w.waited_ms,
                        w.resource_type,
                        w.resource_id,
                        w.resource_location
                            .as_deref()
                            .map(|l| format!(" created at {l}"))
                            .unwrap_or_default(),
                        if w.held == Some(true) { ", held" } else { "" },
                        w.waker_count
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "?".into())
                    ),
                )
                .at(lw.snapshot_ns.unwrap_or(0)),
            );
        }
        // Name the held locks when the recorded waits do not show the cycle.
        let wait_locks: std::collections::BTreeSet<i64> =
            lw.waits.iter().map(|w| w.resource_id).collect();
        let use_held = lw.held_locks.len() >= 2 && wait_locks.len() < 2;
        for l in lw.held_locks.iter().filter(|_| use_held) {
            ev.push(
                Evidence::new(
                    "lock_held",
                    format!(
                        "{} {}{} held since at least {} and still held",
                        l.resource_type,
                        l.resource_id,
                        l.location
                            .as_deref()
                            .map(|x| format!(" created at {x}"))
                            .unwrap_or_default(),
                        fmt_time(l.held_since_ns)
                    ),
                )
                .at(l.held_since_ns),
            );
        }
        ev.push(Evidence::new(
            "lock_cycle",
            lw.cycle_reason.clone().unwrap_or_default(),
        ));
        let handler: Vec<&StuckSpan> = d
            .stuck
            .iter()
            .filter(|s| s.waits_on == WaitsOn::Handler)
            .collect();
        cite_stuck(&handler, "stuck_handler", &mut ev);
        if culprit.is_none() {
            let named = |t: &str, id: i64, loc: Option<&str>| {
                format!(
                    "{t} {id}{}",
                    loc.map(|l| format!(" ({l})")).unwrap_or_default()
                )
            };
            let locks: Vec<String> = if use_held {
                lw.held_locks
                    .iter()
                    .map(|l| named(&l.resource_type, l.resource_id, l.location.as_deref()))
                    .collect()
            } else {
                lw.waits
                    .iter()
                    .map(|w| {
                        named(
                            &w.resource_type,
                            w.resource_id,
                            w.resource_location.as_deref(),
                        )
                    })
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect()
            };
            culprit = Some(format!("async lock cycle: {}", locks.join(" <-> ")));
        }
    }
    let probe = probe_class_evidence(cx);
    if !ev.is_empty() {
        ev.extend(probe);
        return hyp("D", Verdict::Confirmed, culprit, ev);
    }

    // No evidence for D. Healthy through the failure window?
    let healthy = st.covers_failure && !st.lag_persistent;
    let handler: Vec<&StuckSpan> = d
        .stuck
        .iter()
        .filter(|s| s.waits_on == WaitsOn::Handler)
        .collect();
    let outbound = d.stuck.iter().filter(|s| s.waits_on.is_outbound()).count();
    if !healthy {
        if st.runtime_samples == 0 {
            ev.push(Evidence::new(
                "missing_data",
                "no kms.runtime samples (heartbeat) and no kms.stall or kms.deadlock events in the window: cannot tell a stalled runtime from a healthy one (is the library built with runtime-metrics and watchdog?)",
            ));
        } else {
            ev.push(Evidence::new(
                "missing_data",
                format!(
                    "kms.runtime samples do not cover the failure window: {} samples in it, largest gap {} ms (interval {} ms)",
                    st.samples_in_failure,
                    st.largest_gap_in_failure_ms.unwrap_or(0),
                    st.sample_interval_ms.unwrap_or(0)
                ),
            ));
        }
        ev.extend(transient);
        ev.extend(probe);
        return hyp("D", Verdict::Inconclusive, None, ev);
    }
    ev.push(Evidence::new(
        "runtime_healthy",
        format!(
            "heartbeat healthy through the {}: max lag {} ms over {} kms.runtime samples (threshold {} ms); no lasting stall, no deadlock",
            if hang { "failure window" } else { "window" },
            st.max_lag_in_failure_ms.unwrap_or(0),
            st.samples_in_failure,
            st.threshold_ms
        ),
    ).at(failure.from_ns));
    ev.extend(transient);
    ev.extend(probe);
    if outbound > 0 {
        ev.push(Evidence::new(
            "waits_elsewhere",
            format!("{outbound} stuck requests wait on outbound calls, not on the runtime"),
        ));
    }
    for (letter, other) in [("C", c), ("E", e)] {
        if other.verdict == Verdict::Confirmed {
            ev.push(Evidence::new(
                "explained_elsewhere",
                format!(
                    "the failure is explained by {letter}: {}",
                    other.culprit.clone().unwrap_or_default()
                ),
            ));
        }
    }
    if !handler.is_empty() {
        if lw.console_snapshots == 0
            && outbound == 0
            && c.verdict != Verdict::Confirmed
            && e.verdict != Verdict::Confirmed
        {
            cite_stuck(&handler, "stuck_handler", &mut ev);
            ev.push(Evidence::new(
                "missing_data",
                format!(
                    "{} requests are idle inside the handler with no outbound call open while the runtime is healthy: an async lock cycle fits, but no tokio-console data (console_tasks / console_async_ops; run serve --console) to confirm or exclude it",
                    handler.len()
                ),
            ));
            return hyp("D", Verdict::Inconclusive, None, ev);
        }
        // Too early to tell: console saw tasks on held locks that have not
        // waited long enough yet, or its newest snapshot predates the point
        // where the stuck requests' waits would have passed the threshold.
        let oldest = handler.iter().map(|s| s.start_ns).min().unwrap_or(0);
        let due = oldest.saturating_add(
            i64::try_from(cx.config.lock_wait_threshold.as_nanos()).unwrap_or(i64::MAX),
        );
        let stale = lw.snapshot_ns.is_some_and(|t| t < due);
        // Every open request runs in some task: a console view with fewer
        // live tasks than stuck requests is not watching this process.
        let blind = lw.live_tasks < handler.len();
        if lw.console_snapshots > 0
            && outbound == 0
            && c.verdict != Verdict::Confirmed
            && e.verdict != Verdict::Confirmed
            && (lw.waits_below_threshold > 0 || stale || blind)
        {
            cite_stuck(&handler, "stuck_handler", &mut ev);
            ev.push(Evidence::new(
                "missing_data",
                if blind {
                    format!(
                        "{} requests are idle inside the handler, but the newest tokio-console snapshot shows only {} live tasks: the console recording does not cover these requests",
                        handler.len(),
                        lw.live_tasks
                    )
                } else if stale {
                    format!(
                        "{} requests are idle inside the handler, but the newest tokio-console snapshot was taken before their waits could pass {} ms: too early to tell an async lock cycle from another wait",
                        handler.len(),
                        lw.threshold_ms
                    )
                } else {
                    format!(
                        "{} requests are idle inside the handler and {} tasks wait on held locks, for less than {} ms so far: too early to tell an async lock cycle from contention",
                        handler.len(),
                        lw.waits_below_threshold,
                        lw.threshold_ms
                    )
                },
            ));
            return hyp("D", Verdict::Inconclusive, None, ev);
        }
        let console = if lw.console_snapshots == 0 {
            "no tokio-console data".to_owned()
        } else if lw.waits.is_empty() {
            "tokio-console shows no task waiting on a lock".to_owned()
        } else {
            format!(
                "tokio-console lock waits are not a cycle: {}",
                lw.cycle_reason.clone().unwrap_or_default()
            )
        };
        let mut places: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &handler {
            *places.entry(s.innermost.name.as_str()).or_default() += 1;
        }
        let places = places
            .iter()
            .map(|(n, c)| format!("`{n}` x{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        ev.push(Evidence::new(
            "handler_waits",
            format!(
                "{} requests idle inside the handler (innermost open span: {places}); {console}",
                handler.len()
            ),
        ));
    }
    hyp("D", Verdict::RuledOut, None, ev)
}
