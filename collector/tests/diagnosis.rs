//! Each diagnosis pass from stored fixtures: every `tests/fixtures/*.json` is
//! loaded into a real SQLite file, diagnosed, checked against the verdicts
//! the fixture expects, and compared with `tests/golden/<name>.json`.
//!
//! Regenerate the golden files with `UPDATE_GOLDEN=1 cargo test -p
//! kms-collector --test diagnosis`, then review the diff by eye.

mod fixture;

use kms_collector::report::{build_report, render_json, render_text, ReportOptions};
use serde_json::Value;

fn check_fixture(name: &str, f: &fixture::Fixture) -> Vec<String> {
    let store = fixture::load(f);
    let report = build_report(&store.reader(), &ReportOptions::default())
        .unwrap_or_else(|e| panic!("{name}: report failed: {e}"));
    let json = render_json(&report);
    let mut problems = Vec::new();
    for (h, want) in &f.expect {
        let got = report.hypotheses.get(h).map(|x| x.verdict.as_str());
        if got != want.as_str() {
            problems.push(format!(
                "{name}: {h} is {got:?}, expected {want}; evidence: {:#?}",
                report.hypotheses.get(h).map(|x| &x.evidence)
            ));
        }
    }
    for (h, want) in &f.expect_culprit {
        let culprit = report
            .hypotheses
            .get(h)
            .and_then(|x| x.culprit.clone())
            .unwrap_or_default();
        let want = want.as_str().unwrap_or_default();
        if !culprit.contains(want) {
            problems.push(format!(
                "{name}: culprit of {h} is {culprit:?}, expected it to contain {want:?}"
            ));
        }
    }
    if let Some(want) = &f.expect_outcome {
        if report.outcome.as_str() != want {
            problems.push(format!(
                "{name}: outcome is {}, expected {want}: {}",
                report.outcome.as_str(),
                report.outcome_summary
            ));
        }
    }
    if let Some(want) = &f.expect_causes {
        if &report.causes != want {
            problems.push(format!(
                "{name}: causes are {:?}, expected {want:?}: {}",
                report.causes, report.outcome_summary
            ));
        }
    }
    // Every confirmed verdict cites evidence; every inconclusive one says what is missing.
    for (h, hyp) in &report.hypotheses {
        if hyp.evidence.is_empty() {
            problems.push(format!("{name}: {h} has no evidence"));
        }
        if hyp.verdict.as_str() == "inconclusive"
            && !hyp
                .evidence
                .iter()
                .any(|e| e.kind == "missing_data" || e.kind == "before_handler")
        {
            problems.push(format!(
                "{name}: {h} is inconclusive without saying what is missing"
            ));
        }
    }
    // The text rendering names every hypothesis.
    let text = render_text(&report);
    for h in ["A", "B", "C", "D", "E"] {
        if !text.contains(&format!("  {h}  ")) {
            problems.push(format!("{name}: text report lacks hypothesis {h}"));
        }
    }
    for want in &f.expect_text {
        if !text.contains(want.as_str()) {
            problems.push(format!("{name}: text report lacks {want:?}:\n{text}"));
        }
    }
    for bad in &f.forbid_text {
        if text.contains(bad.as_str()) {
            problems.push(format!("{name}: text report says {bad:?}:\n{text}"));
        }
    }
    let golden = fixture::golden_dir().join(format!("{name}.json"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &json).expect("write golden");
    } else {
        match std::fs::read_to_string(&golden) {
            Ok(want) if want == json => {}
            Ok(want) => {
                let want: Value = serde_json::from_str(&want).unwrap_or(Value::Null);
                let got: Value = serde_json::from_str(&json).expect("report JSON parses");
                problems.push(format!(
                    "{name}: report differs from {} (UPDATE_GOLDEN=1 to regenerate, then review the diff); first difference: {}",
                    golden.display(),
                    first_difference(&want, &got, "$")
                ));
            }
            Err(e) => problems.push(format!(
                "{name}: no golden file {} ({e}); run with UPDATE_GOLDEN=1",
                golden.display()
            )),
        }
    }
    problems
}

fn first_difference(a: &Value, b: &Value, path: &str) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) if w == v => {}
                    Some(w) => return first_difference(v, w, &format!("{path}.{k}")),
                    None => return format!("{path}.{k} missing"),
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map(|k| format!("{path}.{k} added"))
                .unwrap_or_default()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find(|(_, (v, w))| v != w)
            .map(|(i, (v, w))| first_difference(v, w, &format!("{path}[{i}]")))
            .unwrap_or_default(),
        _ => format!("{path}: {a} != {b}"),
    }
}

#[test]
fn every_fixture_gives_its_expected_verdicts_and_golden_report() {
    let fixtures = fixture::all_fixtures();
    let names: Vec<&str> = fixtures.iter().map(|(n, _)| n.as_str()).collect();
    for required in [
        "none",
        "a_pccs_hang",
        "b_webhook_hang",
        "c_memory_leak",
        "d_stall",
        "d_deadlock",
        "d_async_lock",
        "e_fd_exhaustion",
    ] {
        assert!(
            names.contains(&required),
            "fixture {required} is missing: {names:?}"
        );
    }
    let problems: Vec<String> = fixtures
        .iter()
        .flat_map(|(n, f)| check_fixture(n, f))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn no_fault_confirms_nothing() {
    let f = fixture::load_fixture(&fixture::fixtures_dir().join("none.json"));
    let store = fixture::load(&f);
    let report = build_report(&store.reader(), &ReportOptions::default()).expect("report");
    for (h, hyp) in &report.hypotheses {
        assert_ne!(
            hyp.verdict.as_str(),
            "confirmed",
            "{h} confirmed on a healthy run: {:#?}",
            hyp.evidence
        );
    }
    assert!(report.stuck_spans.is_empty());
    assert!(report.failure_window.is_none());
    assert_eq!(report.probe.failed, 0);
}

#[test]
fn stuck_spans_name_the_innermost_outbound_call() {
    let f = fixture::load_fixture(&fixture::fixtures_dir().join("b_webhook_hang.json"));
    let store = fixture::load(&f);
    let report = build_report(&store.reader(), &ReportOptions::default()).expect("report");
    assert!(!report.stuck_spans.is_empty());
    for s in &report.stuck_spans {
        assert_eq!(s.name, "kms.request");
        assert_eq!(s.innermost.name, "kms.outbound");
        assert_eq!(s.innermost.peer.as_deref(), Some("auth_webhook"));
        assert_ne!(s.innermost.span_id, s.span_id);
    }
    // The probe says when GetMeta began failing and what was open then.
    assert_eq!(report.probe.failure_class.as_deref(), Some("timeout"));
    assert!(report.probe.first_failure_at.is_some());
    assert!(!report.probe.open_at_onset.is_empty());
    let json: Value = serde_json::from_str(&render_json(&report)).unwrap();
    for key in ["hypotheses", "stuck_spans", "probe"] {
        assert!(json.get(key).is_some(), "report JSON lacks {key}");
    }
    for h in ["A", "B", "C", "D", "E"] {
        let hyp = &json["hypotheses"][h];
        assert!(
            hyp["verdict"].is_string() && hyp["evidence"].is_array(),
            "{h}: {hyp}"
        );
        for e in hyp["evidence"].as_array().unwrap() {
            assert!(e["kind"].is_string() && e["summary"].is_string(), "{e}");
        }
    }
}

#[test]
fn since_limits_the_window_to_the_end_of_the_record() {
    let f = fixture::load_fixture(&fixture::fixtures_dir().join("b_webhook_hang.json"));
    let store = fixture::load(&f);
    let all = build_report(&store.reader(), &ReportOptions::default()).expect("report");
    let opts = ReportOptions {
        since: Some(std::time::Duration::from_secs(30)),
        ..ReportOptions::default()
    };
    let last = build_report(&store.reader(), &opts).expect("report");
    assert_eq!(last.window.to_ns, all.window.to_ns);
    assert_eq!(last.window.to_ns - last.window.from_ns, 30_000_000_000);
    assert!(last.probe.attempts < all.probe.attempts);
    // Still stuck at the end: the verdict holds on the last 30 s alone.
    assert_eq!(last.hypotheses["B"].verdict.as_str(), "confirmed");
}
