//! A real Jaeger v2 for the tests: the `jaeger` binary named by
//! `KMS_JAEGER_BIN` (`.ci/run` builds and sets it), started on free loopback
//! ports with a config kept in `tests/jaeger/`, and read through its HTTP
//! query APIs, the ones the UI uses.
//!
//! Without `KMS_JAEGER_BIN` a test says so and returns, except in CI
//! (`CI=true`), where it fails: CI must run every Jaeger test.
#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Env var naming the `jaeger` binary.
pub const JAEGER_BIN_ENV: &str = "KMS_JAEGER_BIN";

/// The `jaeger` binary, or `None` (after saying why) when the tests must be
/// left out on this machine.
///
/// # Panics
///
/// When `CI=true` and the binary is not there: CI must not skip these.
#[track_caller]
pub fn jaeger_bin() -> Option<PathBuf> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    match std::env::var_os(JAEGER_BIN_ENV).map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        other => {
            let why = match other {
                Some(p) => format!("{JAEGER_BIN_ENV}={} is not a file", p.display()),
                None => format!("{JAEGER_BIN_ENV} is not set"),
            };
            assert!(
                !in_ci,
                "CI=true but {why}: .ci/run must build Jaeger and set {JAEGER_BIN_ENV}"
            );
            eprintln!("NOT RUN: {why} (build it as .ci/run does to run this test)");
            None
        }
    }
}

/// The config files kept in the repository.
pub fn config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/jaeger")
        .join(name)
}

/// A free loopback port (bound, then released for Jaeger to take).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr")
}

/// A running Jaeger; killed on drop.
pub struct Jaeger {
    child: Child,
    /// OTLP/gRPC receiver.
    pub otlp_grpc: SocketAddr,
    /// HTTP query API and UI.
    pub query_http: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Jaeger {
    /// Starts `bin` with `config_file` on fresh ports (`otlp_grpc` given, or
    /// fresh), `extra_env` added, and waits until its query API answers
    /// `/api/services` (so its storage answers too).
    pub async fn start(
        bin: &Path,
        config_file: &str,
        otlp_grpc: Option<SocketAddr>,
        extra_env: &[(&str, String)],
    ) -> Jaeger {
        let mut j = Jaeger::launch(bin, config_file, otlp_grpc, extra_env);
        j.wait_ready(|status| (200..300).contains(&status)).await;
        j
    }

    /// As [`Jaeger::start`], for a Jaeger whose storage is expected to
    /// refuse it: ready when its query API answers at all.
    pub async fn start_refused(
        bin: &Path,
        config_file: &str,
        extra_env: &[(&str, String)],
    ) -> Jaeger {
        let mut j = Jaeger::launch(bin, config_file, None, extra_env);
        j.wait_ready(|_| true).await;
        j
    }

    fn launch(
        bin: &Path,
        config_file: &str,
        otlp_grpc: Option<SocketAddr>,
        extra_env: &[(&str, String)],
    ) -> Jaeger {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("jaeger.log");
        let otlp_grpc = otlp_grpc.unwrap_or_else(free_port);
        let query_http = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(config(config_file))
            .env("JAEGER_OTLP_GRPC", otlp_grpc.to_string())
            .env("JAEGER_QUERY_HTTP", query_http.to_string())
            .env("JAEGER_QUERY_GRPC", free_port().to_string())
            .env("JAEGER_HEALTH", free_port().to_string())
            .env_remove("KMS_JAEGER_STORAGE_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("jaeger log file"));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start jaeger");
        Jaeger {
            child,
            otlp_grpc,
            query_http,
            log,
            _dir: dir,
        }
    }

    async fn wait_ready(&mut self, services_answered: impl Fn(u16) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = http();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "jaeger exited ({status}) while starting:\n{}",
                    self.log_text()
                );
            }
            let url = format!("http://{}/api/services", self.query_http);
            if let Ok(r) = client.get(&url).send().await {
                if services_answered(r.status().as_u16()) {
                    // The OTLP receiver starts after the query extension.
                    if tokio::net::TcpStream::connect(self.otlp_grpc).await.is_ok() {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "jaeger did not become ready in 60 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What Jaeger logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET` a query-API path, e.g. `/api/traces/<id>`: status and JSON body.
    pub async fn get(&self, path_and_query: &str) -> (u16, Value) {
        let url = format!("http://{}{}", self.query_http, path_and_query);
        let r = http()
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    /// `/api/traces/<id>` (the UI's API): the trace's one `data` entry, or
    /// `None` while Jaeger does not have it.
    pub async fn ui_trace(&self, trace_id: &str) -> Option<Value> {
        let (status, body) = self.get(&format!("/api/traces/{trace_id}")).await;
        (status == 200)
            .then(|| body["data"].get(0).cloned())
            .flatten()
    }

    /// `/api/v3/traces/<id>`: the OTLP JSON `resourceSpans`, or `None`.
    pub async fn v3_trace(&self, trace_id: &str) -> Option<Value> {
        let (status, body) = self.get(&format!("/api/v3/traces/{trace_id}")).await;
        (status == 200)
            .then(|| body["result"]["resourceSpans"].clone())
            .filter(|v| v.is_array())
    }

    /// Polls `/api/traces/<id>` until `cond` holds for the trace, or panics
    /// after `timeout`.
    pub async fn wait_trace(
        &self,
        trace_id: &str,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.ui_trace(trace_id).await {
                if cond(&t) {
                    return t;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what} in jaeger; last: {:?}",
                self.ui_trace(trace_id).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops Jaeger (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        self.kill();
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// The span of a `/api/traces` trace with this operation name.
#[track_caller]
pub fn ui_span<'a>(trace: &'a Value, operation: &str) -> &'a Value {
    trace["spans"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["operationName"] == operation))
        .unwrap_or_else(|| panic!("no span {operation} in {trace}"))
}

/// A tag's value on a `/api/traces` span, log or process.
pub fn ui_tag<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| &t["value"])
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// OTLP builders for a KMS-shaped trace: a `kms.request` (SERVER) with a
/// `kms.outbound` child (CLIENT), resource `dstack-kms`.
pub mod kms {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        any_value, AnyValue, InstrumentationScope, KeyValue,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{
        span, status, ResourceSpans, ScopeSpans, Span, Status,
    };

    /// A key/value attribute.
    pub fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    /// A string attribute.
    pub fn s(key: &str, value: &str) -> KeyValue {
        kv(key, any_value::Value::StringValue(value.into()))
    }

    /// An int attribute.
    pub fn i(key: &str, value: i64) -> KeyValue {
        kv(key, any_value::Value::IntValue(value))
    }

    /// A trace id (16 bytes) from a seed; never all zero.
    pub fn trace_id(seed: u64) -> Vec<u8> {
        let mut id = 0x4b4d_5300_0000_0000_u64.to_be_bytes().to_vec();
        id.extend_from_slice(
            &seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .max(1)
                .to_be_bytes(),
        );
        id
    }

    /// Hex of an id.
    pub fn hex(id: &[u8]) -> String {
        id.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A span id (8 bytes) from a seed.
    pub fn span_id(seed: u64) -> Vec<u8> {
        (seed | 1 << 62).to_be_bytes().to_vec()
    }

    /// The `kms.request` span of `method`, `[start, start + dur_ns]`.
    pub fn request(trace: &[u8], id: u64, method: &str, start: u64, dur_ns: u64) -> Span {
        Span {
            trace_id: trace.to_vec(),
            span_id: span_id(id),
            name: "kms.request".into(),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + dur_ns,
            attributes: vec![
                s("rpc.system", "prpc"),
                s("rpc.method", method),
                s("url.path", &format!("/prpc/KMS.{method}")),
                i("http.response.status_code", 200),
            ],
            status: Some(Status {
                code: status::StatusCode::Ok as i32,
                message: String::new(),
            }),
            ..Default::default()
        }
    }

    /// A failed `kms.outbound` call to the auth webhook under `parent`, with
    /// one event.
    pub fn outbound(parent: &Span, id: u64, start: u64, dur_ns: u64) -> Span {
        Span {
            trace_id: parent.trace_id.clone(),
            span_id: span_id(id),
            parent_span_id: parent.span_id.clone(),
            name: "kms.outbound".into(),
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + dur_ns,
            attributes: vec![
                s("kms.peer", "auth_webhook"),
                s("kms.call", "get_info"),
                s("server.address", "127.0.0.1"),
                i("server.port", 8000),
                s("error.type", "timeout"),
            ],
            events: vec![span::Event {
                time_unix_nano: start + dur_ns / 2,
                name: "retrying".into(),
                attributes: vec![i("attempt", 2)],
                dropped_attributes_count: 0,
            }],
            status: Some(Status {
                code: status::StatusCode::Error as i32,
                message: "webhook timed out".into(),
            }),
            ..Default::default()
        }
    }

    /// The open-span snapshot of `span` taken `open_ns` after its start
    /// (docs/wire-format.md: `incomplete`, `kms.open.snapshot_seq`,
    /// `kms.open.age_ms`; end = snapshot time; no status).
    pub fn snapshot(span: &Span, seq: i64, open_ns: u64) -> Span {
        let mut s = span.clone();
        s.end_time_unix_nano = s.start_time_unix_nano + open_ns;
        s.attributes
            .retain(|kv| kv.key != "http.response.status_code");
        s.attributes
            .push(kv("incomplete", any_value::Value::BoolValue(true)));
        s.attributes.push(i("kms.open.snapshot_seq", seq));
        s.attributes
            .push(i("kms.open.age_ms", (open_ns / 1_000_000) as i64));
        s.status = None;
        s.events.clear();
        s
    }

    /// The KMS's resource.
    pub fn resource() -> Resource {
        Resource {
            attributes: vec![
                s("service.name", "dstack-kms"),
                s("service.version", "0.5.5"),
                s("host.name", "kms-cvm"),
            ],
            ..Default::default()
        }
    }

    /// One export request with `spans` under the KMS resource.
    pub fn export(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "instrumented-kms".into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }
}

/// A `/api/traces` trace reduced to what the UI reads, comparable across
/// sources: spans sorted by id, each with its process inlined (process ids
/// are arbitrary), `flags` left out.
pub fn ui_view(trace: &Value) -> Value {
    let mut spans: Vec<Value> = trace["spans"]
        .as_array()
        .map(|spans| {
            spans
                .iter()
                .map(|s| {
                    let process = s["processID"]
                        .as_str()
                        .map(|p| trace["processes"][p].clone())
                        .unwrap_or(Value::Null);
                    serde_json::json!({
                        "traceID": s["traceID"],
                        "spanID": s["spanID"],
                        "operationName": s["operationName"],
                        "references": s["references"],
                        "startTime": s["startTime"],
                        "duration": s["duration"],
                        "tags": s["tags"],
                        "logs": s["logs"],
                        "process": process,
                        "warnings": s["warnings"],
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    spans.sort_by(|a, b| a["spanID"].as_str().cmp(&b["spanID"].as_str()));
    serde_json::json!({"traceID": trace["traceID"], "warnings": trace["warnings"], "spans": spans})
}

/// Asserts two UI views are equal, printing both pretty on failure.
#[track_caller]
pub fn assert_same_ui_view(ours: &Value, jaeger: &Value) {
    let (a, b) = (ui_view(ours), ui_view(jaeger));
    assert!(
        a == b,
        "export and Jaeger differ\n--- export:\n{}\n--- jaeger:\n{}",
        serde_json::to_string_pretty(&a).unwrap_or_default(),
        serde_json::to_string_pretty(&b).unwrap_or_default()
    );
}
