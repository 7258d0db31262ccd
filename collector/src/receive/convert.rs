//! OTLP messages to store rows. Pure functions: no I/O, no panics on any input.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{Map, Number, Value};

use crate::store::{EventRow, MetricSample, SpanRow};

/// The attribute that marks an open-span snapshot (docs/wire-format.md).
pub(crate) const INCOMPLETE_ATTR: &str = "incomplete";
/// The snapshot's sequence number attribute.
pub(crate) const SNAPSHOT_SEQ_ATTR: &str = "kms.open.snapshot_seq";

/// Rows from one request, and what had to be rejected.
#[derive(Debug)]
pub(crate) struct Converted<T> {
    pub(crate) rows: Vec<T>,
    pub(crate) rejected: i64,
    pub(crate) reason: Option<String>,
}

impl<T> Default for Converted<T> {
    fn default() -> Self {
        Converted {
            rows: Vec::new(),
            rejected: 0,
            reason: None,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// A valid id: the right length and not all zeroes (OTLP spec).
fn valid_id(bytes: &[u8], len: usize) -> bool {
    bytes.len() == len && bytes.iter().any(|&b| b != 0)
}

fn nanos(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// An OTLP value as JSON. Bytes become lowercase hex; non-finite doubles null.
pub(crate) fn any_value_json(value: &AnyValue) -> Value {
    match &value.value {
        None => Value::Null,
        Some(any_value::Value::StringValue(s)) => Value::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
        Some(any_value::Value::IntValue(i)) => Value::Number((*i).into()),
        Some(any_value::Value::DoubleValue(d)) => {
            Number::from_f64(*d).map_or(Value::Null, Value::Number)
        }
        Some(any_value::Value::ArrayValue(a)) => {
            Value::Array(a.values.iter().map(any_value_json).collect())
        }
        Some(any_value::Value::KvlistValue(kv)) => Value::Object(attributes_json(&kv.values)),
        Some(any_value::Value::BytesValue(b)) => Value::String(hex(b)),
        // A profiles-only string-table index: meaningless without the table.
        Some(any_value::Value::StringValueStrindex(i)) => Value::Number((*i).into()),
    }
}

fn attributes_json(attrs: &[KeyValue]) -> Map<String, Value> {
    attrs
        .iter()
        .map(|kv| {
            let v = kv.value.as_ref().map_or(Value::Null, any_value_json);
            (kv.key.clone(), v)
        })
        .collect()
}

fn find<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn service_name(resource: Option<&Resource>) -> Option<String> {
    match find(resource.map_or(&[], |r| &r.attributes), "service.name") {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn is_incomplete(span: &Span) -> bool {
    match find(&span.attributes, INCOMPLETE_ATTR) {
        Some(any_value::Value::BoolValue(b)) => *b,
        Some(any_value::Value::StringValue(s)) => s == "true",
        _ => false,
    }
}

/// True when `span` is an open-span snapshot (`incomplete = true`).
pub(crate) fn span_is_snapshot(span: &Span) -> bool {
    is_incomplete(span)
}

/// Spans of an export request as rows. Spans with an invalid trace, span or
/// parent id are rejected (counted, not stored).
pub(crate) fn traces(req: &ExportTraceServiceRequest, received_ns: i64) -> Converted<SpanRow> {
    let mut out = Converted::default();
    for rs in &req.resource_spans {
        let service = service_name(rs.resource.as_ref());
        let resource = Value::Object(attributes_json(
            rs.resource.as_ref().map_or(&[], |r| &r.attributes),
        ));
        for ss in &rs.scope_spans {
            let scope = ss.scope.as_ref().map(|s| s.name.clone());
            for span in &ss.spans {
                if !valid_id(&span.trace_id, 16)
                    || !valid_id(&span.span_id, 8)
                    || !(span.parent_span_id.is_empty() || span.parent_span_id.len() == 8)
                {
                    out.rejected += 1;
                    continue;
                }
                let incomplete = is_incomplete(span);
                let snapshot_seq = match find(&span.attributes, SNAPSHOT_SEQ_ATTR) {
                    Some(any_value::Value::IntValue(i)) if incomplete => Some(*i),
                    _ => None,
                };
                let events = span
                    .events
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "time_ns": nanos(e.time_unix_nano),
                            "name": e.name,
                            "attributes": attributes_json(&e.attributes),
                        })
                    })
                    .collect();
                let status = span.status.as_ref();
                out.rows.push(SpanRow {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: valid_id(&span.parent_span_id, 8)
                        .then(|| hex(&span.parent_span_id)),
                    name: span.name.clone(),
                    kind: span.kind,
                    service: service.clone(),
                    scope: scope.clone(),
                    start_ns: nanos(span.start_time_unix_nano),
                    end_ns: nanos(span.end_time_unix_nano),
                    status_code: status.map_or(0, |s| s.code),
                    status_message: status.map(|s| s.message.clone()).filter(|m| !m.is_empty()),
                    incomplete,
                    snapshot_seq,
                    attributes: Value::Object(attributes_json(&span.attributes)),
                    events: Value::Array(events),
                    resource: resource.clone(),
                    received_ns,
                });
            }
        }
    }
    if out.rejected > 0 {
        out.reason = Some(format!(
            "{} spans rejected: invalid trace_id (16 bytes, not all zero), span_id (8 bytes, not all zero) or parent_span_id",
            out.rejected
        ));
    }
    out
}

fn severity(record: &LogRecord) -> Option<String> {
    if !record.severity_text.is_empty() {
        return Some(record.severity_text.clone());
    }
    // SeverityNumber ranges of the OpenTelemetry log data model.
    let name = match record.severity_number {
        1..=4 => "TRACE",
        5..=8 => "DEBUG",
        9..=12 => "INFO",
        13..=16 => "WARN",
        17..=20 => "ERROR",
        21..=24 => "FATAL",
        _ => return None,
    };
    Some(name.to_owned())
}

fn event_name(record: &LogRecord) -> String {
    if !record.event_name.is_empty() {
        return record.event_name.clone();
    }
    match find(&record.attributes, "event.name") {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        _ => String::new(),
    }
}

/// Log records of an export request as event rows. Nothing is rejected: an
/// invalid trace or span id is dropped from the row, the record kept.
pub(crate) fn logs(req: &ExportLogsServiceRequest, received_ns: i64) -> Converted<EventRow> {
    let mut out = Converted::default();
    for rl in &req.resource_logs {
        let service = service_name(rl.resource.as_ref());
        for sl in &rl.scope_logs {
            for record in &sl.log_records {
                let time = if record.time_unix_nano != 0 {
                    record.time_unix_nano
                } else {
                    record.observed_time_unix_nano
                };
                let body = record.body.as_ref().map(|b| match &b.value {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    _ => any_value_json(b).to_string(),
                });
                out.rows.push(EventRow {
                    time_ns: nanos(time),
                    name: event_name(record),
                    severity: severity(record),
                    trace_id: valid_id(&record.trace_id, 16).then(|| hex(&record.trace_id)),
                    span_id: valid_id(&record.span_id, 8).then(|| hex(&record.span_id)),
                    service: service.clone(),
                    body,
                    attributes: Value::Object(attributes_json(&record.attributes)),
                    received_ns,
                });
            }
        }
    }
    out
}

/// Metric data points of an export request as samples: gauges and sums their
/// value, histograms and summaries their sum.
pub(crate) fn metrics(
    req: &ExportMetricsServiceRequest,
    received_ns: i64,
) -> Converted<MetricSample> {
    let mut out = Converted::default();
    for rm in &req.resource_metrics {
        let service = service_name(rm.resource.as_ref());
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let mut push = |time: u64, value: Option<f64>, attrs: &[KeyValue]| {
                    out.rows.push(MetricSample {
                        time_ns: nanos(time),
                        name: m.name.clone(),
                        value: value.filter(|v| v.is_finite()),
                        attributes: Value::Object(attributes_json(attrs)),
                        service: service.clone(),
                        received_ns,
                    });
                };
                let number = |v: &Option<number_data_point::Value>| match v {
                    Some(number_data_point::Value::AsDouble(d)) => Some(*d),
                    Some(number_data_point::Value::AsInt(i)) => Some(*i as f64),
                    None => None,
                };
                match &m.data {
                    Some(metric::Data::Gauge(g)) => {
                        for p in &g.data_points {
                            push(p.time_unix_nano, number(&p.value), &p.attributes);
                        }
                    }
                    Some(metric::Data::Sum(s)) => {
                        for p in &s.data_points {
                            push(p.time_unix_nano, number(&p.value), &p.attributes);
                        }
                    }
                    Some(metric::Data::Histogram(h)) => {
                        for p in &h.data_points {
                            push(p.time_unix_nano, p.sum, &p.attributes);
                        }
                    }
                    Some(metric::Data::ExponentialHistogram(h)) => {
                        for p in &h.data_points {
                            push(p.time_unix_nano, p.sum, &p.attributes);
                        }
                    }
                    Some(metric::Data::Summary(s)) => {
                        for p in &s.data_points {
                            push(p.time_unix_nano, Some(p.sum), &p.attributes);
                        }
                    }
                    None => {}
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    fn span(trace: Vec<u8>, id: Vec<u8>) -> Span {
        Span {
            trace_id: trace,
            span_id: id,
            name: "s".into(),
            ..Default::default()
        }
    }

    #[test]
    fn invalid_ids_are_rejected_and_counted() {
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![
                        span(vec![1; 16], vec![2; 8]),
                        span(vec![0; 16], vec![2; 8]),
                        span(vec![1; 15], vec![2; 8]),
                        span(vec![1; 16], vec![]),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let out = traces(&req, 7);
        assert_eq!(out.rows.len(), 1);
        assert_eq!(out.rejected, 3);
        assert_eq!(out.rows[0].trace_id, "01".repeat(16));
        assert_eq!(out.rows[0].span_id, "02".repeat(8));
        assert!(out.reason.is_some());
    }

    #[test]
    fn values_become_json() {
        let v = AnyValue {
            value: Some(any_value::Value::BytesValue(vec![0xab, 0x01])),
        };
        assert_eq!(any_value_json(&v), Value::String("ab01".into()));
        let v = AnyValue {
            value: Some(any_value::Value::DoubleValue(f64::NAN)),
        };
        assert_eq!(any_value_json(&v), Value::Null);
    }
}
