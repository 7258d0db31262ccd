//! Encoding to OTLP protobuf (see `docs/wire-format.md`).

use std::time::{Instant, SystemTime};

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{status, ResourceSpans, ScopeSpans, Span, Status};

use crate::event::{AttrValue, DiagEvent, Severity};
use crate::spans::{ClosedSpan, SpanRecord, SpanStatus, Value};

/// Scope of ordinary (closed) spans.
pub(crate) const SCOPE_SPANS: &str = "instrumented-kms";
/// Scope of open-span snapshots.
pub(crate) const SCOPE_OPEN_SPANS: &str = "instrumented-kms.open-spans";
/// Scope of diagnostic events.
pub(crate) const SCOPE_DIAG: &str = "instrumented-kms.diag";

/// The resource every export carries.
#[derive(Debug, Clone)]
pub(crate) struct ResourceInfo {
    pub(crate) service_name: String,
    pub(crate) service_version: String,
}

pub(crate) fn resource(info: &ResourceInfo) -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", str_value(&info.service_name)),
            kv("service.version", str_value(&info.service_version)),
            kv("host.name", str_value(&host_name())),
            kv("process.pid", int_value(i64::from(std::process::id()))),
            kv("kms.diag.build", str_value("debug-instrumentation")),
        ],
        ..Default::default()
    }
}

/// The kernel's host name (`uname`), or `unknown`.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(value),
        ..Default::default()
    }
}

fn str_value(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_owned())),
    }
}

fn int_value(i: i64) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::IntValue(i)),
    }
}

fn value(v: &Value) -> AnyValue {
    AnyValue {
        value: Some(match v {
            Value::Str(s) => any_value::Value::StringValue(s.clone()),
            Value::Int(i) => any_value::Value::IntValue(*i),
            Value::Float(f) => any_value::Value::DoubleValue(*f),
            Value::Bool(b) => any_value::Value::BoolValue(*b),
        }),
    }
}

fn value_owned(v: Value) -> AnyValue {
    AnyValue {
        value: Some(match v {
            Value::Str(s) => any_value::Value::StringValue(s),
            Value::Int(i) => any_value::Value::IntValue(i),
            Value::Float(f) => any_value::Value::DoubleValue(f),
            Value::Bool(b) => any_value::Value::BoolValue(b),
        }),
    }
}

fn attr_value(v: &AttrValue) -> AnyValue {
    AnyValue {
        value: Some(match v {
            AttrValue::Str(s) => any_value::Value::StringValue(s.clone()),
            AttrValue::Int(i) => any_value::Value::IntValue(*i),
            AttrValue::Float(f) => any_value::Value::DoubleValue(*f),
            AttrValue::Bool(b) => any_value::Value::BoolValue(*b),
        }),
    }
}

/// The parts of a span shared by closed spans and snapshots. A closed span
/// gives its attributes away (`take`); a snapshot copies them.
fn span_base(record: &SpanRecord, end_unix_nanos: u64, take: bool) -> Span {
    let mut m = record.lock();
    let attributes = if take {
        std::mem::take(&mut m.attributes)
            .into_iter()
            .map(|(k, v)| kv(k, value_owned(v)))
            .collect()
    } else {
        m.attributes.iter().map(|(k, v)| kv(k, value(v))).collect()
    };
    Span {
        trace_id: record.trace_id.to_vec(),
        span_id: record.span_id.to_vec(),
        parent_span_id: record
            .parent_span_id
            .map(|p| p.to_vec())
            .unwrap_or_default(),
        name: m.name.to_string(),
        kind: m.kind as i32,
        start_time_unix_nano: record.start_unix_nanos,
        end_time_unix_nano: end_unix_nanos,
        attributes,
        status: Some(Status {
            code: match m.status {
                SpanStatus::Unset => status::StatusCode::Unset,
                SpanStatus::Ok => status::StatusCode::Ok,
                SpanStatus::Error => status::StatusCode::Error,
            } as i32,
            message: String::new(),
        }),
        ..Default::default()
    }
}

/// A closed span.
pub(crate) fn closed_span(span: &ClosedSpan) -> Span {
    span_base(&span.record, span.end_unix_nanos, true)
}

/// An open-span snapshot: same ids, end = now, `incomplete = true`, age and
/// sequence number, status UNSET.
pub(crate) fn snapshot(
    record: &SpanRecord,
    seq: u32,
    now: SystemTime,
    now_instant: Instant,
) -> Span {
    let mut span = span_base(record, crate::spans::unix_nanos(now), false);
    let age = now_instant.saturating_duration_since(record.start);
    span.attributes.push(kv(
        "incomplete",
        AnyValue {
            value: Some(any_value::Value::BoolValue(true)),
        },
    ));
    span.attributes.push(kv(
        "kms.open.age_ms",
        int_value(i64::try_from(age.as_millis()).unwrap_or(i64::MAX)),
    ));
    span.attributes
        .push(kv("kms.open.snapshot_seq", int_value(i64::from(seq))));
    span.status = Some(Status {
        code: status::StatusCode::Unset as i32,
        message: String::new(),
    });
    span
}

/// A diagnostic event as a log record.
pub(crate) fn log_record(event: &DiagEvent) -> LogRecord {
    let (number, text) = match event.severity {
        Severity::Info => (9, "INFO"),
        Severity::Warn => (13, "WARN"),
        Severity::Error => (17, "ERROR"),
    };
    let time = crate::spans::unix_nanos(event.time);
    let mut attributes = Vec::with_capacity(event.attributes.len() + 1);
    attributes.push(kv("event.name", str_value(event.name)));
    attributes.extend(event.attributes.iter().map(|(k, v)| kv(k, attr_value(v))));
    LogRecord {
        time_unix_nano: time,
        observed_time_unix_nano: time,
        severity_number: number,
        severity_text: text.to_owned(),
        body: Some(str_value(&event.body)),
        attributes,
        trace_id: event.trace_id.map(|t| t.to_vec()).unwrap_or_default(),
        span_id: event.span_id.map(|s| s.to_vec()).unwrap_or_default(),
        event_name: event.name.to_owned(),
        ..Default::default()
    }
}

fn scope(name: &str) -> InstrumentationScope {
    InstrumentationScope {
        name: name.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    }
}

/// One trace export request: closed spans under scope `instrumented-kms`,
/// snapshots under `instrumented-kms.open-spans`.
pub(crate) fn trace_request(
    resource: &Resource,
    closed: Vec<Span>,
    snapshots: Vec<Span>,
) -> ExportTraceServiceRequest {
    let mut scope_spans = Vec::with_capacity(2);
    if !closed.is_empty() {
        scope_spans.push(ScopeSpans {
            scope: Some(scope(SCOPE_SPANS)),
            spans: closed,
            schema_url: String::new(),
        });
    }
    if !snapshots.is_empty() {
        scope_spans.push(ScopeSpans {
            scope: Some(scope(SCOPE_OPEN_SPANS)),
            spans: snapshots,
            schema_url: String::new(),
        });
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans,
            schema_url: String::new(),
        }],
    }
}

/// One logs export request under scope `instrumented-kms.diag`.
pub(crate) fn logs_request(
    resource: &Resource,
    records: Vec<LogRecord>,
) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource.clone()),
            scope_logs: vec![ScopeLogs {
                scope: Some(scope(SCOPE_DIAG)),
                log_records: records,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}
