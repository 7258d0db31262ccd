//! The OpenTelemetry Python SDK's OTLP exporters (gRPC and HTTP) against the
//! receivers: every span and log record stored and counted.
//!
//! Needs a virtualenv with `opentelemetry-sdk` and `opentelemetry-exporter-otlp`,
//! found at `$KMS_PY_VENV` or `.venv` at the repository root; `.ci/run`
//! creates it with
//! `python3 -m venv .venv && .venv/bin/pip install opentelemetry-sdk opentelemetry-exporter-otlp`.
//! Without it the test is SKIPPED, loudly.

mod ingest_support;

use std::path::PathBuf;
use std::process::Command;

use ingest_support::*;

fn venv_python() -> Option<PathBuf> {
    let venv = std::env::var_os("KMS_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    let python = venv.join("bin/python");
    if python.exists() {
        Some(python)
    } else {
        // Straight to stderr, past the test harness's capture: a skip must be seen.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED python_exporter: no Python venv at {} (set KMS_PY_VENV, or run \
             `python3 -m venv .venv && .venv/bin/pip install opentelemetry-sdk opentelemetry-exporter-otlp`) ***\n",
            venv.display()
        );
        None
    }
}

fn run_python(python: &PathBuf, protocol: &str, endpoint: &str, count: u32, name: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/export_spans.py");
    let out = Command::new(python)
        .arg(&script)
        .args(["--protocol", protocol, "--endpoint", endpoint])
        .args(["--count", &count.to_string(), "--name", name])
        // The exporter must not pick up a proxy or another endpoint.
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python exporter failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_over_grpc_and_http() {
    let Some(python) = venv_python() else {
        return;
    };
    let t = TestServer::start().await;
    let grpc = t.grpc_url();
    let http = format!("http://{}", t.server.http_addr());
    let py = python.clone();
    tokio::task::spawn_blocking(move || {
        run_python(&py, "grpc", &grpc, 600, "py.grpc");
        run_python(&py, "http", &http, 600, "py.http");
    })
    .await
    .expect("python runs");
    for name in ["py.grpc", "py.http"] {
        assert_eq!(
            t.query_i64(&format!(
                "SELECT COUNT(*) FROM spans WHERE name IN ('{name}', '{name}.child') AND service = 'python-test'"
            )),
            1200,
            "{name} spans"
        );
        // Each child's parent is stored.
        assert_eq!(
            t.query_i64(&format!(
                "SELECT COUNT(*) FROM spans c JOIN spans p ON p.span_id = c.parent_span_id AND p.trace_id = c.trace_id WHERE c.name = '{name}.child'"
            )),
            600,
            "{name} parents"
        );
        assert_eq!(
            t.query_i64(&format!(
                "SELECT COUNT(*) FROM events WHERE body LIKE 'python record %' AND name = '{name}.log' AND severity = 'WARN' AND trace_id IS NOT NULL"
            )),
            600,
            "{name} log records"
        );
    }
    let c = t.server.receiver_stats();
    assert_eq!(c.spans_stored, 2400);
    assert_eq!(c.log_records_stored, 1200);
    t.server.shutdown().await.expect("clean shutdown");
}
