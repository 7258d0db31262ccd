//! `kms-collector report` and `kms-collector export` on a real store file.

mod fixture;

use std::process::Command;

use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kms-collector"))
}

#[test]
fn report_and_export_commands_read_a_store() {
    let f = fixture::load_fixture(&fixture::fixtures_dir().join("d_deadlock.json"));
    let store = fixture::load(&f);
    let db = store.path.to_str().expect("utf-8 path");

    let out = bin()
        .args(["report", "--db", db, "--format", "json"])
        .output()
        .expect("run report");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["hypotheses"]["D"]["verdict"], "confirmed");
    assert!(v["stuck_spans"].is_array() && v["probe"].is_object());

    let out = bin()
        .args(["report", "--db", db])
        .output()
        .expect("run report");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("CONFIRMED") && text.contains("parking_lot deadlock"),
        "{text}"
    );

    let html = store.dir.path().join("report.html");
    let out = bin()
        .args([
            "report", "--db", db, "--format", "html", "--since", "1m", "--out",
        ])
        .arg(&html)
        .output()
        .expect("run report");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_to_string(&html)
        .unwrap()
        .contains("<svg id=\"timeline\""));

    let jaeger = store.dir.path().join("stuck.json");
    let out = bin()
        .args([
            "export",
            "--db",
            db,
            "--format",
            "jaeger-json",
            "--stuck",
            "--out",
        ])
        .arg(&jaeger)
        .output()
        .expect("run export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&jaeger).unwrap()).unwrap();
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));

    let out = bin()
        .args([
            "export",
            "--db",
            db,
            "--format",
            "otlp-json",
            "--trace",
            "dd000000000000000000000000000001",
        ])
        .output()
        .expect("run export");
    let v: Value = serde_json::from_slice(&out.stdout).expect("OTLP JSON");
    assert_eq!(
        v["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["name"],
        "kms.request"
    );
}

#[test]
fn report_on_a_missing_store_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.sqlite");
    let out = bin()
        .arg("report")
        .arg("--db")
        .arg(&missing)
        .output()
        .expect("run report");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.sqlite"), "{err}");
    assert!(
        !missing.exists(),
        "a read-only report must not create the store"
    );
}
