//! Pass 10, verdicts: each hypothesis is an ordered list of small rules over
//! one model (the findings of passes 1-9), like tokio-console's lints.
//!
//! A rule reads named facts and, when it applies, returns a [`Finding`]
//! that confirms the hypothesis, rules it out, says which data would decide
//! (missing), or only cites context. The weighing is the same for every
//! hypothesis: any confirming finding confirms; otherwise any missing data
//! keeps it inconclusive; only then may a ruling-out finding rule it out.
//! So a hypothesis is `ruled_out` only on positive evidence, and never while
//! something that would decide it is unknown.

use std::collections::BTreeMap;

use super::attrs::{i64_of, ms_between, str_of};
use super::stuck_io::OUTBOUND_SPAN;
use super::{Context, Diagnosis, Evidence, Hypothesis, Pass, StuckSpan, Verdict, HYPOTHESES};
use crate::analyse::AnalyseConfig;
use crate::store::{ReadError, SpanRow, TimeWindow};

mod a_attestation;
mod b_webhook;
mod c_memory;
mod d_runtime;
mod e_connections;
mod outcome;
mod peer;

pub use outcome::{Outcome, OutcomeKind};

/// At most this many requests are cited one by one per finding.
pub(crate) const MAX_CITED: usize = 5;

/// What a finding does to its hypothesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    /// The facts show it.
    Confirms,
    /// The facts exclude it.
    RulesOut,
    /// The facts that would decide it are missing.
    Missing,
    /// Context only.
    Cites,
}

/// What one rule found.
#[derive(Debug, Clone)]
pub(crate) struct Finding {
    pub(crate) effect: Effect,
    /// The named culprit, for a confirming finding.
    pub(crate) culprit: Option<String>,
    /// When what it found began (orders causes).
    pub(crate) since_ns: Option<i64>,
    pub(crate) evidence: Vec<Evidence>,
}

impl Finding {
    pub(crate) fn new(effect: Effect, evidence: Vec<Evidence>) -> Self {
        Finding {
            effect,
            culprit: None,
            since_ns: None,
            evidence,
        }
    }

    pub(crate) fn confirms(culprit: String, since_ns: Option<i64>, ev: Vec<Evidence>) -> Self {
        Finding {
            effect: Effect::Confirms,
            culprit: Some(culprit),
            since_ns,
            evidence: ev,
        }
    }

    pub(crate) fn one(effect: Effect, e: Evidence) -> Self {
        Finding::new(effect, vec![e])
    }
}

/// One rule of one hypothesis.
pub(crate) trait Rule {
    /// Its name: the evidence it cites carries it as `rule`.
    fn name(&self) -> &'static str;
    /// The facts it reads, as `docs/wire-format.md` and the passes name them.
    fn reads(&self) -> &'static str;
    /// The finding, when the rule applies.
    fn check(&self, m: &Model<'_>) -> Option<Finding>;
}

/// Closed outbound calls to one peer in the failure window.
#[derive(Debug, Default)]
pub(crate) struct PeerCalls {
    pub(crate) count: usize,
    pub(crate) slowest_ms: i64,
    /// Calls over the slow-call threshold that no stall overlapped.
    pub(crate) slow: Vec<SpanRow>,
}

/// The model the rules read: the findings plus what the verdict pass reads
/// once for all of them.
pub(crate) struct Model<'a> {
    pub(crate) d: &'a Diagnosis,
    pub(crate) config: &'a AnalyseConfig,
    /// The failure window, or the analysed window without a failure.
    pub(crate) failure: TimeWindow,
    /// True when GetMeta hung (not just answered with an error status).
    pub(crate) hang: bool,
    /// Any span stored in the window.
    pub(crate) has_spans: bool,
    /// Closed outbound calls by `kms.peer`.
    pub(crate) closed_calls: BTreeMap<String, PeerCalls>,
    /// Ordinary closed spans the producer dropped under load.
    pub(crate) export_drops: i64,
    /// Verdicts decided so far (A, B, C before D; D before E).
    pub(crate) decided: BTreeMap<String, Hypothesis>,
}

impl Model<'_> {
    /// Every hung request: open ones, then cancelled ones.
    pub(crate) fn hung(&self) -> impl Iterator<Item = &StuckSpan> {
        self.d.requests.hung(&self.d.stuck)
    }

    /// True when `letter` was confirmed by an earlier hypothesis's rules.
    pub(crate) fn confirmed(&self, letter: &str) -> bool {
        self.decided
            .get(letter)
            .is_some_and(|h| h.verdict == Verdict::Confirmed)
    }

    /// True when a failure episode was seen at all.
    pub(crate) fn failing(&self) -> bool {
        self.d.failure.is_some()
    }

    /// "failure window" or "window".
    pub(crate) fn window_name(&self) -> &'static str {
        if self.failing() {
            "failure window"
        } else {
            "window"
        }
    }
}

/// Cites up to [`MAX_CITED`] requests, then counts the rest.
pub(crate) fn cite_requests<'a>(
    spans: impl IntoIterator<Item = &'a StuckSpan>,
    kind: &str,
) -> Vec<Evidence> {
    let spans: Vec<&StuckSpan> = spans.into_iter().collect();
    let mut out: Vec<Evidence> = spans
        .iter()
        .take(MAX_CITED)
        .map(|s| {
            Evidence::new(kind, s.describe())
                .span(Some(&s.trace_id), Some(&s.innermost.span_id))
                .at(s.start_ns)
        })
        .collect();
    if spans.len() > MAX_CITED {
        out.push(Evidence::new(
            kind,
            format!(
                "... and {} more requests like these",
                spans.len() - MAX_CITED
            ),
        ));
    }
    out
}

/// Weighs the findings of `rules` into one verdict.
fn judge(letter: &str, rules: &[Box<dyn Rule>], m: &Model<'_>) -> (Hypothesis, Option<i64>) {
    let mut by_effect: BTreeMap<u8, Vec<Finding>> = BTreeMap::new();
    for rule in rules {
        if let Some(mut f) = rule.check(m) {
            for e in &mut f.evidence {
                e.rule = Some(rule.name().to_owned());
                e.reads = Some(rule.reads().to_owned());
            }
            let rank = match f.effect {
                Effect::Confirms => 0,
                Effect::Missing => 1,
                Effect::RulesOut => 2,
                Effect::Cites => 3,
            };
            by_effect.entry(rank).or_default().push(f);
        }
    }
    let take = |rank: u8, by: &mut BTreeMap<u8, Vec<Finding>>| by.remove(&rank).unwrap_or_default();
    let confirms = take(0, &mut by_effect);
    let missing = take(1, &mut by_effect);
    let rules_out = take(2, &mut by_effect);
    let cites = take(3, &mut by_effect);
    let (verdict, lead) = if !confirms.is_empty() {
        (Verdict::Confirmed, confirms)
    } else if !missing.is_empty() {
        // What would have ruled it out still says something.
        let mut lead = missing;
        lead.extend(rules_out);
        (Verdict::Inconclusive, lead)
    } else if !rules_out.is_empty() {
        (Verdict::RuledOut, rules_out)
    } else {
        let f = Finding::one(
            Effect::Missing,
            Evidence::new(
                "missing_data",
                "no rule could decide: none of the facts it is judged on was stored",
            ),
        );
        (Verdict::Inconclusive, vec![f])
    };
    let culprit = lead.iter().find_map(|f| f.culprit.clone());
    let since = lead.iter().filter_map(|f| f.since_ns).min();
    let evidence = lead
        .into_iter()
        .chain(cites)
        .flat_map(|f| f.evidence)
        .collect();
    let title = HYPOTHESES
        .iter()
        .find(|(l, _)| *l == letter)
        .map(|(_, t)| (*t).to_owned())
        .unwrap_or_default();
    (
        Hypothesis {
            title,
            verdict,
            culprit: culprit.filter(|_| verdict == Verdict::Confirmed),
            evidence,
        },
        since.filter(|_| verdict == Verdict::Confirmed),
    )
}

/// The pass.
#[derive(Debug)]
pub(crate) struct Verdicts;

impl Pass for Verdicts {
    fn name(&self) -> &'static str {
        "verdict"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let failure = cx.failure_or_window();
        let has_spans =
            !cx.reader.spans(cx.window, 1)?.is_empty() || !cx.diagnosis.stuck.is_empty();
        let closed_calls = closed_calls(cx, failure)?;
        let export_drops = cx
            .reader
            .events("kms.export_drops", cx.window)?
            .iter()
            .filter_map(|e| i64_of(&e.attributes, "export.dropped_spans"))
            .sum();
        let hang = match (&cx.diagnosis.failure, cx.diagnosis.probe.episodes.last()) {
            (None, _) => false,
            (Some(f), Some(ep)) if f.source == "probe" => ep.is_hang(),
            (Some(_), _) => true,
        };
        let mut m = Model {
            d: &cx.diagnosis,
            config: cx.config,
            failure,
            hang,
            has_spans,
            closed_calls,
            export_drops,
            decided: BTreeMap::new(),
        };
        let mut since: BTreeMap<String, i64> = BTreeMap::new();
        let order: [(&str, Vec<Box<dyn Rule>>); 5] = [
            ("A", a_attestation::rules()),
            ("B", b_webhook::rules()),
            ("C", c_memory::rules()),
            ("D", d_runtime::rules()),
            ("E", e_connections::rules()),
        ];
        for (letter, rules) in order {
            let (h, t) = judge(letter, &rules, &m);
            if let Some(t) = t {
                since.insert(letter.to_owned(), t);
            }
            m.decided.insert(letter.to_owned(), h);
        }
        let outcome = outcome::decide(&m, &since);
        let hypotheses = std::mem::take(&mut m.decided);
        cx.diagnosis.hypotheses = hypotheses;
        cx.diagnosis.outcome = outcome;
        Ok(())
    }
}

/// Closed outbound calls in the failure window, by peer; slow ones kept
/// (during a failure, and when no stall overlapped them and the runtime was
/// not saturated by then: a call slowed by the runtime says nothing about
/// its peer).
fn closed_calls(
    cx: &Context<'_>,
    failure: TimeWindow,
) -> Result<BTreeMap<String, PeerCalls>, ReadError> {
    let slow_ms = i64::try_from(cx.config.slow_call_threshold.as_millis()).unwrap_or(i64::MAX);
    let saturated_from = cx.diagnosis.stall.saturated_since();
    let mut by_peer: BTreeMap<String, PeerCalls> = BTreeMap::new();
    for s in cx
        .reader
        .spans_started(failure, OUTBOUND_SPAN, 100_000)?
        .into_iter()
        .filter(|s| !s.incomplete)
    {
        let peer = str_of(&s.attributes, "kms.peer").unwrap_or_else(|| "other".into());
        let ms = ms_between(s.start_ns, s.end_ns);
        let stalled = cx
            .diagnosis
            .stall
            .episodes
            .iter()
            .any(|ep| ep.first_ns <= s.end_ns && ep.last_ns >= s.start_ns)
            || saturated_from.is_some_and(|t| s.end_ns >= t);
        let e = by_peer.entry(peer).or_default();
        e.count += 1;
        e.slowest_ms = e.slowest_ms.max(ms);
        if ms >= slow_ms && !stalled && cx.diagnosis.failure.is_some() {
            e.slow.push(s);
        }
    }
    Ok(by_peer)
}

/// Peers named by hung requests, for the "waits on" summaries.
pub(crate) fn wait_summary<'a>(spans: impl IntoIterator<Item = &'a StuckSpan>) -> String {
    let mut places: BTreeMap<String, usize> = BTreeMap::new();
    for s in spans {
        let key = match s.waits_on {
            super::WaitsOn::Handler => format!("`{}`", s.innermost.name),
            _ => s.call_label(),
        };
        *places.entry(key).or_default() += 1;
    }
    places
        .iter()
        .map(|(k, n)| format!("{k} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
