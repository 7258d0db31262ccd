//! What each case's report must say, why, and the judgement of one report
//! against it.
//!
//! The JSON names are the report's (`hypotheses.{A..E}.verdict|culprit`,
//! `outcome`, `causes`, `requests`, `wait_locations`, `probe`,
//! `failure_window`). A case may accept more than one report
//! ([`expected`] returns the alternatives): a never-woken future is D when
//! the collector can see that no waker will fire, and honestly
//! `unexplained`, naming where the requests wait, when it cannot; it is
//! never "all ruled out".
//!
//! | case | outcome | causes | D | culprit names | why |
//! |---|---|---|---|---|---|
//! | `none`, `slow-handlers`, `cpu-heavy-yielding`, `bursty-load` | healthy | – | not confirmed | – | every request completes within the probe's timeout |
//! | `collector-first` | healthy | – | not confirmed | – | failures before the first success are "not up yet" |
//! | `pccs-hang` | explained | A | ruled out | attestation | requests wait on the PCCS; heartbeat and polls healthy |
//! | `guest-agent-quote-hang` | explained | A | ruled out | guest_agent / attest | a quote request is attestation; the waiters queue behind it in `kms.self_boot_info` |
//! | `webhook-hang`, `webhook-syn-blackhole`, `webhook-hang-under-lock` | explained | B | ruled out | auth_webhook | requests wait on the webhook (response, `connect`, or a lock held across the call) |
//! | `webhook-hang-fd-limit` | explained | B, E | ruled out | auth_webhook | the stuck webhook calls hold the fds that run out |
//! | `memory-leak` | explained | C | ruled out | RSS | RSS at the limit, requests wait for buffers |
//! | `blocking-worker`, `cpu-bound-handler`, `block-in-place` | explained | D | confirmed | the worker / request span | a poll that does not return |
//! | `async-deadlock`, `sync-deadlock` | explained | D | confirmed | the locks | lock cycles |
//! | `blocking-pool-exhaustion` | explained | D | confirmed | blocking pool | blocking threads at the maximum, queue not draining |
//! | `scheduler-starvation` | explained | D | confirmed | worker queue, or "run queue" in a heartbeat stall with no worker stuck in a poll | queues growing, workers busy, polls short; or (tasks that yield wait in a deferred list tokio's queue depths miss) the heartbeat late while the workers' CPU accounting shows them on a CPU throughout, as a stall or, each lag under the threshold, in most samples (`busy_and_late`) |
//! | `frozen-workers`, `frozen-workers-plain-http` | explained | D | confirmed | listen queue / worker | every worker blocked, connections never accepted (over plain HTTP the probe's `timeout` says nothing about TLS) |
//! | `never-woken-*` | explained D, or unexplained | D | confirmed or inconclusive | never woken / lost waker | the wait's span named either way |
//! | `fd-exhaustion` | explained | E | ruled out | fds / EMFILE | accept fails at the fd limit |
//! | `leaked-semaphore-permit`, `hung-actor` | unexplained | – | not confirmed | – | an application wait no rule can see into: the report must name the span |

use serde::Serialize;
use serde_json::Value;

use crate::lab::cases::Case;

/// The hypotheses, in report order.
pub const LETTERS: [&str; 5] = ["A", "B", "C", "D", "E"];

/// A check beyond verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// At least one request was cancelled (`requests.cancelled` > 0).
    Cancelled,
    /// The probe failed before its first success (`probe.not_up_yet` > 0).
    NotUpYet,
    /// D cites a heartbeat stall that began with a task dump
    /// (`stalled_by_taskdump`).
    DumpStalled,
}

/// One acceptable report for a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// `healthy`, `explained` or `unexplained`.
    pub outcome: &'static str,
    /// The confirmed hypotheses, cause first; exactly these are confirmed.
    pub causes: &'static [&'static str],
    /// The verdicts D may get when it is not among the causes.
    pub d: &'static [&'static str],
    /// Words of which at least one must appear in the first cause's culprit.
    pub culprit_names: &'static [&'static str],
    /// A span name that must appear among `wait_locations`.
    pub wait_span: Option<&'static str>,
    /// Further checks.
    pub checks: &'static [Check],
}

const NOT_CONFIRMED: &[&str] = &["ruled_out", "inconclusive"];
const RULED_OUT: &[&str] = &["ruled_out"];

const HEALTHY: Expected = Expected {
    outcome: "healthy",
    causes: &[],
    d: NOT_CONFIRMED,
    culprit_names: &[],
    wait_span: None,
    checks: &[],
};

const fn explained(
    cause: &'static [&'static str],
    culprit_names: &'static [&'static str],
) -> Expected {
    Expected {
        outcome: "explained",
        causes: cause,
        d: RULED_OUT,
        culprit_names,
        wait_span: None,
        checks: &[],
    }
}

const fn unexplained(span: &'static str) -> Expected {
    Expected {
        outcome: "unexplained",
        causes: &[],
        d: NOT_CONFIRMED,
        culprit_names: &[],
        wait_span: Some(span),
        checks: &[],
    }
}

/// A never-woken future waiting in `span`: D naming it, or unexplained
/// naming the span, with D left open.
const fn never_woken(span: &'static str, checks: &'static [Check]) -> [Expected; 2] {
    [
        Expected {
            outcome: "explained",
            causes: &["D"],
            d: &[],
            culprit_names: &["never woken", "lost waker", "waker"],
            wait_span: Some(span),
            checks,
        },
        Expected {
            outcome: "unexplained",
            causes: &[],
            d: &["inconclusive"],
            culprit_names: &[],
            wait_span: Some(span),
            checks,
        },
    ]
}

/// The reports acceptable for `case`, the preferred one first.
///
/// Where D must be ruled out, D `inconclusive` is accepted too when the
/// report cites a heartbeat stall that began with a task dump: the lab turns
/// task dumps on, and tokio's dump of a runtime full of stuck requests can
/// stall it by itself (seen in `pccs-hang` about one run in three). The
/// runtime then really was stalled, by the instrumentation, so "ruled out"
/// would be false and "confirmed" would blame the application.
pub fn expected(case: &Case) -> Vec<Expected> {
    let mut out = expected_without_dumps(case);
    let dump_stalled: Vec<Expected> = out
        .iter()
        .filter(|e| e.d == RULED_OUT && e.checks.is_empty() && !e.causes.contains(&"D"))
        .map(|e| Expected {
            d: &["inconclusive"],
            checks: &[Check::DumpStalled],
            ..*e
        })
        .collect();
    out.extend(dump_stalled);
    out
}

fn expected_without_dumps(case: &Case) -> Vec<Expected> {
    match case.name {
        "none" | "slow-handlers" | "cpu-heavy-yielding" | "bursty-load" => vec![HEALTHY],
        "collector-first" => vec![Expected {
            checks: &[Check::NotUpYet],
            ..HEALTHY
        }],
        "pccs-hang" => vec![explained(&["A"], &["attestation"])],
        "guest-agent-quote-hang" => vec![explained(&["A"], &["guest_agent", "attest"])],
        "webhook-hang" | "webhook-syn-blackhole" | "webhook-hang-under-lock" => {
            vec![explained(&["B"], &["auth_webhook"])]
        }
        "webhook-hang-fd-limit" => vec![explained(&["B", "E"], &["auth_webhook"])],
        "memory-leak" => vec![explained(&["C"], &["RSS"])],
        "blocking-worker" => vec![explained(&["D"], &["GetAppKey", "kms.request"])],
        "cpu-bound-handler" | "block-in-place" => {
            vec![explained(&["D"], &["GetMeta", "kms.request"])]
        }
        "async-deadlock" => vec![explained(&["D"], &["Mutex"])],
        "sync-deadlock" => vec![explained(&["D"], &["parking_lot"])],
        "blocking-pool-exhaustion" => vec![explained(&["D"], &["blocking pool"])],
        "scheduler-starvation" => vec![explained(&["D"], &["worker queue", "queue"])],
        "frozen-workers" | "frozen-workers-plain-http" => {
            vec![explained(&["D"], &["listen queue", "kms-worker-"])]
        }
        "never-woken-lost-waker" => never_woken("kms.cache_refresh", &[]).to_vec(),
        "never-woken-kept-waker" => never_woken("kms.config_reload", &[]).to_vec(),
        "never-woken-h2-cancelled" => {
            never_woken("kms.cache_refresh", &[Check::Cancelled]).to_vec()
        }
        "fd-exhaustion" => vec![explained(&["E"], &["fds", "EMFILE"])],
        "leaked-semaphore-permit" => vec![unexplained("kms.webhook_limiter")],
        "hung-actor" => vec![unexplained("kms.key_actor")],
        _ => vec![HEALTHY],
    }
}

impl Expected {
    /// A short description, e.g. `explained: B, E; D ruled_out`.
    pub fn describe(&self) -> String {
        let mut text = self.outcome.to_owned();
        if !self.causes.is_empty() {
            text.push_str(&format!(": {}", self.causes.join(", ")));
        }
        if !self.causes.contains(&"D") && !self.d.is_empty() {
            text.push_str(&format!("; D {}", self.d.join("|")));
            if self.checks.contains(&Check::DumpStalled) {
                text.push_str(" by a task dump's stall");
            }
        }
        if let Some(span) = self.wait_span {
            text.push_str(&format!("; waits in {span}"));
        }
        text
    }
}

/// One report judged against its case's expectations.
#[derive(Debug, Clone, Serialize)]
pub struct Judgement {
    /// The case's name.
    pub case: String,
    /// What was expected, e.g. `explained: B; D ruled_out` (alternatives
    /// joined with ` or `).
    pub expected: String,
    /// The report's `outcome`.
    pub outcome: String,
    /// D's verdict.
    pub d_verdict: String,
    /// Every confirmed hypothesis, in the report's cause order when it has
    /// one.
    pub confirmed: Vec<String>,
    /// Confirmed hypotheses that no expectation names.
    pub other_confirmed: Vec<String>,
    /// The culprit the report names for the first expected cause (or the
    /// first confirmed one).
    pub culprit: Option<String>,
    /// Whether the report has a failure window.
    pub hang_seen: bool,
    /// What is wrong against the closest expectation (empty when right).
    pub problems: Vec<String>,
}

impl Judgement {
    /// True when the report is one the case accepts.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The verdict of hypothesis `letter` in `report`, if present.
pub fn verdict<'a>(report: &'a Value, letter: &str) -> Option<&'a str> {
    report["hypotheses"][letter]["verdict"].as_str()
}

/// The culprit the report names for hypothesis `letter`.
pub fn culprit(report: &Value, letter: &str) -> Option<String> {
    report["hypotheses"][letter]["culprit"]
        .as_str()
        .map(str::to_owned)
}

/// Whether the report says the probed method was failing (a failure window).
pub fn hang_seen(report: &Value) -> bool {
    !report["failure_window"].is_null()
}

/// The span names of the report's `wait_locations`.
pub fn wait_spans(report: &Value) -> Vec<String> {
    report["wait_locations"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|w| w["span"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn confirmed_letters(report: &Value) -> Vec<String> {
    let mut confirmed: Vec<String> = report["causes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for letter in LETTERS {
        if verdict(report, letter) == Some("confirmed") && !confirmed.iter().any(|c| c == letter) {
            confirmed.push(letter.to_owned());
        }
    }
    confirmed
}

/// What is wrong with `report` against one expectation.
fn problems(expect: &Expected, report: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let outcome = report["outcome"].as_str().unwrap_or("missing");
    if outcome != expect.outcome {
        problems.push(format!("outcome is {outcome}, expected {}", expect.outcome));
    }
    for letter in LETTERS {
        let got = verdict(report, letter).unwrap_or("missing");
        let wanted = expect.causes.contains(&letter);
        if wanted && got != "confirmed" {
            problems.push(format!("{letter} is {got}, expected confirmed"));
        } else if !wanted && got == "confirmed" {
            problems.push(format!(
                "{letter} is confirmed too ({})",
                culprit(report, letter).unwrap_or_else(|| "no culprit named".into())
            ));
        }
    }
    if expect.causes.len() > 1 {
        let order: Vec<&str> = report["causes"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if order != expect.causes {
            problems.push(format!(
                "causes are {order:?}, expected {:?} (cause first)",
                expect.causes
            ));
        }
    }
    if !expect.causes.contains(&"D") && !expect.d.is_empty() {
        let d = verdict(report, "D").unwrap_or("missing");
        if !expect.d.contains(&d) {
            problems.push(format!("D is {d}, expected {}", expect.d.join(" or ")));
        }
    }
    if let (Some(first), false) = (expect.causes.first(), expect.culprit_names.is_empty()) {
        if verdict(report, first) == Some("confirmed") {
            let text = culprit(report, first).unwrap_or_default();
            if !expect.culprit_names.iter().any(|n| text.contains(n)) {
                problems.push(format!(
                    "{first}'s culprit `{text}` names none of {:?}",
                    expect.culprit_names
                ));
            }
        }
    }
    let hang = hang_seen(report);
    if expect.outcome == "healthy" && hang {
        problems.push("healthy, yet the report has a failure window".into());
    } else if expect.outcome != "healthy" && !hang {
        problems.push("the report has no failure window (the probe never failed)".into());
    }
    if let Some(span) = expect.wait_span {
        let spans = wait_spans(report);
        if !spans.iter().any(|s| s.contains(span)) {
            problems.push(format!("wait_locations {spans:?} do not name {span}"));
        }
    }
    for check in expect.checks {
        match check {
            Check::Cancelled => {
                let n = report["requests"]["cancelled"].as_u64().unwrap_or(0);
                if n == 0 {
                    problems.push("requests.cancelled is 0, expected the dropped handlers".into());
                }
            }
            Check::NotUpYet => {
                let n = report["probe"]["not_up_yet"].as_u64().unwrap_or(0);
                if n == 0 {
                    problems
                        .push("probe.not_up_yet is 0, expected the failures before start".into());
                }
            }
            Check::DumpStalled => {
                let cited = report["hypotheses"]["D"]["evidence"]
                    .as_array()
                    .is_some_and(|ev| {
                        ev.iter()
                            .any(|e| e["rule"].as_str() == Some("stalled_by_taskdump"))
                    });
                if !cited {
                    problems.push(
                        "D is inconclusive without a heartbeat stall begun by a task dump".into(),
                    );
                }
            }
        }
    }
    problems
}

/// Judges `report` against what `case` should produce: right when one of
/// its expectations holds; otherwise the problems against the closest.
pub fn judge(case: &Case, report: &Value) -> Judgement {
    let alternatives = expected(case);
    let judged: Vec<Vec<String>> = alternatives.iter().map(|e| problems(e, report)).collect();
    let best = judged
        .iter()
        .enumerate()
        .min_by_key(|(i, p)| (p.len(), *i))
        .map(|(i, _)| i)
        .unwrap_or(0);
    let expect = alternatives.get(best).copied().unwrap_or(HEALTHY);
    let confirmed = confirmed_letters(report);
    let named: Vec<&str> = alternatives
        .iter()
        .flat_map(|e| e.causes.iter().copied())
        .collect();
    let other_confirmed = confirmed
        .iter()
        .filter(|l| !named.contains(&l.as_str()))
        .cloned()
        .collect();
    let culprit = expect
        .causes
        .first()
        .copied()
        .or(confirmed.first().map(String::as_str))
        .and_then(|l| culprit(report, l));
    Judgement {
        case: case.name.to_owned(),
        expected: alternatives
            .iter()
            .map(Expected::describe)
            .collect::<Vec<_>>()
            .join(" or "),
        outcome: report["outcome"].as_str().unwrap_or("missing").to_owned(),
        d_verdict: verdict(report, "D").unwrap_or("missing").to_owned(),
        confirmed,
        other_confirmed,
        culprit,
        hang_seen: hang_seen(report),
        problems: judged.into_iter().nth(best).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(outcome: &str, verdicts: [&str; 5], causes: &[&str], failing: bool) -> Value {
        let mut h = serde_json::Map::new();
        for (l, v) in LETTERS.iter().zip(verdicts) {
            h.insert((*l).into(), json!({ "verdict": v, "evidence": [] }));
        }
        json!({
            "outcome": outcome,
            "causes": causes,
            "hypotheses": h,
            "failure_window": if failing { json!({"from_ns": 1, "to_ns": 2}) } else { Value::Null },
            "wait_locations": [],
            "requests": { "completed": 1, "failed": 0, "cancelled": 0, "open": 0 },
            "probe": { "not_up_yet": 0 },
        })
    }

    fn case(name: &str) -> Case {
        Case::by_name(name).unwrap()
    }

    const OUT: &str = "ruled_out";
    const YES: &str = "confirmed";

    #[test]
    fn a_right_row_passes_and_wrong_ones_say_why() {
        let mut right = report("explained", [OUT, YES, OUT, OUT, OUT], &["B"], true);
        right["hypotheses"]["B"]["culprit"] = json!("auth_webhook `get_info` to 127.0.0.1");
        let j = judge(&case("webhook-hang"), &right);
        assert!(j.ok(), "{:?}", j.problems);
        assert_eq!(j.confirmed, vec!["B"]);

        let mut wrong_d = right.clone();
        wrong_d["hypotheses"]["D"]["verdict"] = json!(YES);
        let j = judge(&case("webhook-hang"), &wrong_d);
        assert!(!j.ok());
        assert_eq!(j.other_confirmed, vec!["D"]);
        assert!(
            j.problems.iter().any(|p| p.contains("D is confirmed too")),
            "{:?}",
            j.problems
        );

        let mut wrong_culprit = right.clone();
        wrong_culprit["hypotheses"]["B"]["culprit"] = json!("attestation");
        assert!(!judge(&case("webhook-hang"), &wrong_culprit).ok());

        let mut no_outcome = right;
        no_outcome.as_object_mut().unwrap().remove("outcome");
        let j = judge(&case("webhook-hang"), &no_outcome);
        assert_eq!(j.problems, vec!["outcome is missing, expected explained"]);
    }

    #[test]
    fn two_causes_must_come_cause_first() {
        let mut r = report("explained", [OUT, YES, OUT, OUT, YES], &["B", "E"], true);
        r["hypotheses"]["B"]["culprit"] = json!("auth_webhook get_info");
        assert!(judge(&case("webhook-hang-fd-limit"), &r).ok());
        r["causes"] = json!(["E", "B"]);
        let j = judge(&case("webhook-hang-fd-limit"), &r);
        assert!(j.problems[0].contains("cause first"), "{:?}", j.problems);
    }

    #[test]
    fn never_woken_accepts_d_or_unexplained_naming_the_span_but_not_all_ruled_out() {
        let c = case("never-woken-lost-waker");
        let mut unexplained = report(
            "unexplained",
            [OUT, OUT, OUT, "inconclusive", OUT],
            &[],
            true,
        );
        unexplained["wait_locations"] =
            json!([{ "span": "kms.cache_refresh", "fate": "open", "count": 3 }]);
        assert!(judge(&c, &unexplained).ok());

        let mut d = report("explained", [OUT, OUT, OUT, YES, OUT], &["D"], true);
        d["hypotheses"]["D"]["culprit"] =
            json!("3 tasks never woken, spawned at twin/server.rs:150");
        d["wait_locations"] = unexplained["wait_locations"].clone();
        assert!(judge(&c, &d).ok());

        let mut all_out = report("unexplained", [OUT; 5], &[], true);
        all_out["wait_locations"] = unexplained["wait_locations"].clone();
        let j = judge(&c, &all_out);
        assert!(!j.ok());
        assert!(
            j.problems.iter().any(|p| p.contains("D is ruled_out")),
            "{:?}",
            j.problems
        );
    }

    #[test]
    fn healthy_rows_must_not_fail_and_collector_first_needs_not_up_yet() {
        let quiet = report("healthy", [OUT; 5], &[], false);
        assert!(judge(&case("none"), &quiet).ok());
        let hung = report("healthy", [OUT; 5], &[], true);
        assert!(!judge(&case("none"), &hung).ok());
        let j = judge(&case("collector-first"), &quiet);
        assert!(j.problems[0].contains("not_up_yet"), "{:?}", j.problems);
        let mut started_late = quiet;
        started_late["probe"]["not_up_yet"] = json!(2);
        assert!(judge(&case("collector-first"), &started_late).ok());
    }

    #[test]
    fn every_case_has_an_expectation() {
        for c in Case::ALL {
            let e = expected(&c);
            assert!(!e.is_empty());
            if c.fault.hangs() {
                assert_ne!(e[0].outcome, "healthy", "{}", c.name);
            } else {
                assert_eq!(e[0].outcome, "healthy", "{}", c.name);
            }
        }
    }
}
