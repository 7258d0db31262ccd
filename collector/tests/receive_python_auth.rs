//! The OpenTelemetry Python SDK's OTLP exporters against a collector that
//! asks for a token and serves TLS, configured the standard way
//! (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_CERTIFICATE`); and its
//! HTTP exporter reading a 413 for an oversized request rather than a broken
//! pipe.
//!
//! Needs the virtualenv described in `python_exporter.rs`; without it each
//! test is SKIPPED, loudly.

mod ingest_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ingest_support::*;
use kms_collector::serve::{ServerConfig, TlsFiles, Token};

const TOKEN: &str = "py-token-0123456789abcdef";

fn venv_python() -> Option<PathBuf> {
    let venv = std::env::var_os("KMS_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    let python = venv.join("bin/python");
    if python.exists() {
        Some(python)
    } else {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED receive_python_auth: no Python venv at {} (set KMS_PY_VENV, or run \
             `python3 -m venv .venv && .venv/bin/pip install opentelemetry-sdk opentelemetry-exporter-otlp`) ***\n",
            venv.display()
        );
        None
    }
}

/// Runs the exporter script; `headers` and `ca` go through the standard
/// variables.
fn run_python(
    python: &Path,
    protocol: &str,
    endpoint: &str,
    name: &str,
    headers: Option<&str>,
    ca: Option<&Path>,
    extra: &[&str],
) -> Output {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/export_spans.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .args(["--protocol", protocol, "--endpoint", endpoint])
        .args(["--count", "50", "--name", name])
        .args(extra)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_HEADERS")
        .env_remove("OTEL_EXPORTER_OTLP_CERTIFICATE")
        .env("NO_PROXY", "127.0.0.1")
        // requests lets these override the exporter's own CA file.
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        // Give up on retryable failures quickly.
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "5");
    if let Some(h) = headers {
        cmd.env("OTEL_EXPORTER_OTLP_HEADERS", h);
    }
    if let Some(ca) = ca {
        cmd.env("OTEL_EXPORTER_OTLP_CERTIFICATE", ca);
    }
    cmd.output().expect("run python")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn with_token(c: ServerConfig) -> ServerConfig {
    c.token(Some(Token::new(TOKEN).expect("token")))
}

/// Runs every protocol with no token, a wrong one and the right one.
fn token_matrix(python: &Path, grpc: &str, http: &str, ca: Option<&Path>, tag: &str) {
    let right = format!("authorization=Bearer%20{TOKEN}");
    for (protocol, endpoint) in [("grpc", grpc), ("http", http)] {
        for (headers, ok) in [
            (None, false),
            (Some("authorization=Bearer%20not-the-token"), false),
            (Some(right.as_str()), true),
        ] {
            let name = format!("py.{tag}.{protocol}.{}", if ok { "ok" } else { "refused" });
            let out = run_python(python, protocol, endpoint, &name, headers, ca, &[]);
            assert_eq!(
                out.status.success(),
                ok,
                "{protocol} headers {headers:?}: {}",
                text(&out)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_with_a_token_on_both_protocols() {
    let Some(python) = venv_python() else {
        return;
    };
    let t = TestServer::start_with(with_token).await;
    let grpc = t.grpc_url();
    let http = format!("http://{}", t.server.http_addr());
    tokio::task::spawn_blocking(move || token_matrix(&python, &grpc, &http, None, "plain"))
        .await
        .expect("python runs");
    for protocol in ["grpc", "http"] {
        assert_eq!(
            t.query_i64(&format!(
                "SELECT COUNT(*) FROM spans WHERE name LIKE 'py.plain.{protocol}.ok%'"
            )),
            100,
            "{protocol}"
        );
    }
    assert_eq!(
        t.query_i64("SELECT COUNT(*) FROM spans WHERE name LIKE '%refused%'"),
        0
    );
    // Each refused run sent spans and logs at least once per protocol.
    assert!(t.server.receiver_stats().requests_unauthenticated >= 8);
    t.server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_over_tls_with_a_token() {
    let Some(python) = venv_python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("certificate");
    let cert_path = dir.path().join("collector.crt");
    let key_path = dir.path().join("collector.key");
    std::fs::write(&cert_path, cert.cert.pem()).expect("write");
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("write");
    let files = TlsFiles {
        cert: cert_path.clone(),
        key: key_path,
    };
    let t = TestServer::start_with(|c| with_token(c).tls(Some(files))).await;
    let grpc = format!("https://{}", t.server.grpc_addr());
    let http = format!("https://{}", t.server.http_addr());
    tokio::task::spawn_blocking(move || {
        token_matrix(&python, &grpc, &http, Some(&cert_path), "tls")
    })
    .await
    .expect("python runs");
    for protocol in ["grpc", "http"] {
        assert_eq!(
            t.query_i64(&format!(
                "SELECT COUNT(*) FROM spans WHERE name LIKE 'py.tls.{protocol}.ok%'"
            )),
            100,
            "{protocol}"
        );
    }
    t.server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_exporter_reads_a_413_for_an_oversized_batch() {
    let Some(python) = venv_python() else {
        return;
    };
    // 50 spans of 4 KiB attributes: one request far over the limit.
    let t = TestServer::start_with(|c| c.http_max_body(64 * 1024)).await;
    let http = format!("http://{}", t.server.http_addr());
    let out = tokio::task::spawn_blocking(move || {
        run_python(
            &python,
            "http",
            &http,
            "py.big",
            None,
            None,
            &["--attr-bytes", "4096"],
        )
    })
    .await
    .expect("python runs");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("code: 413"), "no readable 413: {said}");
    for broken in [
        "BrokenPipe",
        "Broken pipe",
        "Connection aborted",
        "reset by peer",
    ] {
        assert!(!said.contains(broken), "{broken}: {said}");
    }
    assert_eq!(
        t.query_i64("SELECT COUNT(*) FROM spans WHERE name LIKE 'py.big%'"),
        0
    );
    t.server.shutdown().await.expect("clean shutdown");
}
