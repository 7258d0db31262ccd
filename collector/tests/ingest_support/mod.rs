//! Shared harness of the receive/store/forward tests: a collector on
//! loopback port 0 with a temporary database, OTLP message builders, and
//! polling with a deadline.
#![allow(dead_code)] // each test file uses a different part

use std::path::Path;
use std::time::{Duration, Instant};

use kms_collector::serve::{Server, ServerConfig, ServerHandle};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use rusqlite::{Connection, OpenFlags};
use tempfile::TempDir;

/// A collector on 127.0.0.1 port 0 (both protocols) with its own database.
pub struct TestServer {
    pub dir: TempDir,
    pub server: ServerHandle,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|c| c).await
    }

    pub async fn start_with(tweak: impl FnOnce(ServerConfig) -> ServerConfig) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = tweak(
            ServerConfig::default()
                .db(dir.path().join("kms-diag.sqlite"))
                .otlp_grpc(loopback0())
                .otlp_http(loopback0()),
        );
        let server = Server::start(config).await.expect("collector starts");
        TestServer { dir, server }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.server.grpc_addr())
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.server.http_addr(), path)
    }

    pub fn db(&self) -> Connection {
        open_ro(self.server.db_path())
    }

    /// One integer from a query on the database.
    #[track_caller]
    pub fn query_i64(&self, sql: &str) -> i64 {
        self.db()
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("query {sql:?} failed: {e}"))
    }
}

pub fn loopback0() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

pub fn open_ro(path: &Path) -> Connection {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open database")
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` then.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`wait_until`], from async code.
pub async fn wait_until_async(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

pub fn str_kv(key: &str, value: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

/// A 16-byte trace id from a number (never all zero).
pub fn trace_id(n: u64) -> Vec<u8> {
    let mut id = vec![0xab; 8];
    id.extend_from_slice(&n.to_be_bytes());
    id
}

/// An 8-byte span id from a number (never all zero).
pub fn span_id(n: u64) -> Vec<u8> {
    (n | 1 << 63).to_be_bytes().to_vec()
}

pub fn span(trace: u64, id: u64, name: &str) -> Span {
    Span {
        trace_id: trace_id(trace),
        span_id: span_id(id),
        name: name.into(),
        kind: 2,
        start_time_unix_nano: 1_700_000_000_000_000_000 + id,
        end_time_unix_nano: 1_700_000_000_000_000_000 + id + 1_000,
        attributes: vec![str_kv("rpc.method", "GetMeta")],
        ..Default::default()
    }
}

/// An open-span snapshot of `span` (wire-format: `incomplete`, seq, age).
pub fn snapshot_of(span: &Span, seq: i64) -> Span {
    let mut s = span.clone();
    s.end_time_unix_nano = s.start_time_unix_nano + seq as u64 * 5_000_000_000;
    s.attributes
        .push(kv("incomplete", any_value::Value::BoolValue(true)));
    s.attributes
        .push(kv("kms.open.snapshot_seq", any_value::Value::IntValue(seq)));
    s.attributes.push(kv(
        "kms.open.age_ms",
        any_value::Value::IntValue(seq * 5000),
    ));
    s.status = None;
    s
}

pub fn resource() -> Resource {
    Resource {
        attributes: vec![str_kv("service.name", "dstack-kms")],
        ..Default::default()
    }
}

pub fn trace_request(spans: Vec<Span>) -> ExportTraceServiceRequest {
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

/// `n` spans of trace `trace`, ids `first..first+n`.
pub fn spans(trace: u64, first: u64, n: u64) -> Vec<Span> {
    (first..first + n)
        .map(|i| span(trace, i, "kms.request"))
        .collect()
}

pub fn log_request(names: &[&str]) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource()),
            scope_logs: vec![ScopeLogs {
                log_records: names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| LogRecord {
                        time_unix_nano: 1_700_000_000_000_000_000 + i as u64,
                        severity_text: "INFO".into(),
                        severity_number: 9,
                        event_name: (*name).into(),
                        body: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(format!("{name} sample"))),
                        }),
                        attributes: vec![kv("heartbeat.lag_ms", any_value::Value::IntValue(3))],
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}
