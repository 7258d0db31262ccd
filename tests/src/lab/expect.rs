//! What each fault should produce in the collector's JSON report, and the
//! judgement of one report against it.
//!
//! The JSON names used here are the fixed ones of issue #3:
//! `hypotheses.{A..E}.verdict` / `.evidence`, `stuck_spans`, `probe`, plus the
//! collector's `culprit` and `failure_window`.

use serde::Serialize;
use serde_json::Value;

use crate::fault::Fault;

/// The hypotheses, in report order.
pub const LETTERS: [&str; 5] = ["A", "B", "C", "D", "E"];

/// What a fault should produce. Any hypothesis confirmed besides the
/// expected one makes the row wrong: an operator would chase it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The hypothesis that must be confirmed (`None`: none may be).
    pub confirmed: Option<&'static str>,
    /// The verdict D must get.
    pub d: &'static str,
    /// Words of which at least one must appear in the confirmed
    /// hypothesis's culprit (the named span, lock, worker or peer).
    pub culprit_names: &'static [&'static str],
}

/// The expectation for `fault`.
pub fn expected(fault: Fault) -> Expected {
    let (confirmed, culprit_names): (Option<&'static str>, &'static [&'static str]) = match fault {
        Fault::None => (None, &[]),
        Fault::PccsHang => (Some("A"), &["attestation"]),
        Fault::WebhookHang => (Some("B"), &["auth_webhook"]),
        Fault::MemoryLeak => (Some("C"), &["RSS"]),
        Fault::BlockingWorker => (Some("D"), &["GetAppKey", "kms.request"]),
        Fault::AsyncDeadlock => (Some("D"), &["Mutex"]),
        Fault::SyncDeadlock => (Some("D"), &["parking_lot"]),
        Fault::FdExhaustion => (Some("E"), &["fds", "EMFILE"]),
    };
    let d = if fault.hypothesis() == Some('D') {
        "confirmed"
    } else {
        "ruled_out"
    };
    Expected {
        confirmed,
        d,
        culprit_names,
    }
}

/// One report judged against its fault's expectation.
#[derive(Debug, Clone, Serialize)]
pub struct Judgement {
    /// The fault.
    pub fault: Fault,
    /// What was expected, e.g. `B confirmed, D ruled_out`.
    pub expected: String,
    /// D's verdict.
    pub d_verdict: String,
    /// Every confirmed hypothesis.
    pub confirmed: Vec<String>,
    /// Confirmed hypotheses other than the expected one.
    pub other_confirmed: Vec<String>,
    /// The culprit the report names for the expected hypothesis (or the first
    /// confirmed one).
    pub culprit: Option<String>,
    /// Whether the GetMeta probe saw a hang.
    pub hang_seen: bool,
    /// What is wrong (empty when the row is right).
    pub problems: Vec<String>,
}

impl Judgement {
    /// True when the report is what the fault should produce.
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

fn culprit_of(report: &Value, letter: &str) -> String {
    culprit(report, letter).unwrap_or_else(|| "no culprit named".into())
}

/// Whether the report says GetMeta was failing (a failure window, or probe
/// failures).
pub fn hang_seen(report: &Value) -> bool {
    !report["failure_window"].is_null()
}

/// Judges `report` against what `fault` should produce.
pub fn judge(fault: Fault, report: &Value) -> Judgement {
    let expect = expected(fault);
    let confirmed: Vec<String> = LETTERS
        .iter()
        .filter(|l| verdict(report, l) == Some("confirmed"))
        .map(|l| (*l).to_owned())
        .collect();
    let other_confirmed: Vec<String> = confirmed
        .iter()
        .filter(|l| Some(l.as_str()) != expect.confirmed)
        .cloned()
        .collect();
    let d_verdict = verdict(report, "D").unwrap_or("missing").to_owned();
    let named = expect.confirmed.or(confirmed.first().map(String::as_str));
    let culprit = named.and_then(|l| culprit(report, l));
    let hang = hang_seen(report);
    let mut problems = Vec::new();
    match expect.confirmed {
        None => {
            if !confirmed.is_empty() {
                problems.push(format!("no fault, yet confirmed: {}", confirmed.join(", ")));
            }
            if hang {
                problems.push("no fault, yet the report has a failure window".into());
            }
        }
        Some(letter) => {
            let got = verdict(report, letter).unwrap_or("missing");
            if got != "confirmed" {
                problems.push(format!("{letter} is {got}, expected confirmed"));
            } else if !expect.culprit_names.is_empty() {
                let text = culprit.clone().unwrap_or_default();
                if !expect.culprit_names.iter().any(|n| text.contains(n)) {
                    problems.push(format!(
                        "{letter}'s culprit `{text}` names none of {:?}",
                        expect.culprit_names
                    ));
                }
            }
            if !hang {
                problems.push("the report has no failure window (GetMeta never failed)".into());
            }
            for other in other_confirmed.iter().filter(|l| l.as_str() != "D") {
                problems.push(format!(
                    "{other} is confirmed too ({}), but this fault is {letter}",
                    culprit_of(report, other)
                ));
            }
        }
    }
    if d_verdict != expect.d && expect.confirmed != Some("D") {
        problems.push(format!("D is {d_verdict}, expected {}", expect.d));
    }
    Judgement {
        fault,
        expected: match expect.confirmed {
            None => "nothing confirmed, no hang".into(),
            Some("D") => "D confirmed".into(),
            Some(l) => format!("{l} confirmed, D ruled_out"),
        },
        d_verdict,
        confirmed,
        other_confirmed,
        culprit,
        hang_seen: hang,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(verdicts: [&str; 5], culprit_b: &str, failing: bool) -> Value {
        let mut h = serde_json::Map::new();
        for (l, v) in LETTERS.iter().zip(verdicts) {
            h.insert((*l).into(), json!({ "verdict": v, "evidence": [] }));
        }
        h["B"]["culprit"] = json!(culprit_b);
        json!({
            "hypotheses": h,
            "failure_window": if failing { json!({"from_ns": 1, "to_ns": 2}) } else { Value::Null },
        })
    }

    #[test]
    fn a_right_row_passes_and_wrong_ones_say_why() {
        let right = report(
            [
                "ruled_out",
                "confirmed",
                "ruled_out",
                "ruled_out",
                "ruled_out",
            ],
            "auth_webhook `get_info` to 127.0.0.1",
            true,
        );
        let j = judge(Fault::WebhookHang, &right);
        assert!(j.ok(), "{:?}", j.problems);
        assert_eq!(j.confirmed, vec!["B"]);

        let wrong_d = report(
            [
                "ruled_out",
                "confirmed",
                "ruled_out",
                "confirmed",
                "ruled_out",
            ],
            "auth_webhook",
            true,
        );
        let j = judge(Fault::WebhookHang, &wrong_d);
        assert!(!j.ok());
        assert_eq!(j.other_confirmed, vec!["D"]);
        assert!(j.problems[0].contains("D is confirmed"), "{:?}", j.problems);

        let also_a = report(
            [
                "confirmed",
                "confirmed",
                "ruled_out",
                "ruled_out",
                "ruled_out",
            ],
            "auth_webhook",
            true,
        );
        let j = judge(Fault::WebhookHang, &also_a);
        assert!(!j.ok());
        assert!(
            j.problems[0].contains("A is confirmed too"),
            "{:?}",
            j.problems
        );

        let wrong_culprit = report(
            [
                "ruled_out",
                "confirmed",
                "ruled_out",
                "ruled_out",
                "ruled_out",
            ],
            "attestation",
            true,
        );
        assert!(!judge(Fault::WebhookHang, &wrong_culprit).ok());
    }

    #[test]
    fn no_fault_must_confirm_nothing_and_not_hang() {
        let quiet = report(["ruled_out"; 5], "", false);
        assert!(judge(Fault::None, &quiet).ok());
        let hung = report(["ruled_out"; 5], "", true);
        assert!(!judge(Fault::None, &hung).ok());
    }
}
