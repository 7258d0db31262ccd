//! OTLP messages to store rows. Pure functions: no I/O, no panics on any input.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use std::sync::Arc;

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::store::encoded::{EncodedEvent, EncodedMetric, EncodedSpan, RawId};

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

/// An OTLP value written as JSON: bytes as lowercase hex, non-finite
/// doubles as null. Serialised straight from the message, with no
/// intermediate `serde_json::Value`.
pub(crate) struct ValueJson<'a>(pub(crate) &'a AnyValue);

impl Serialize for ValueJson<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        match &self.0.value {
            None => ser.serialize_unit(),
            Some(any_value::Value::StringValue(s)) => ser.serialize_str(s),
            Some(any_value::Value::BoolValue(b)) => ser.serialize_bool(*b),
            Some(any_value::Value::IntValue(i)) => ser.serialize_i64(*i),
            Some(any_value::Value::DoubleValue(d)) if d.is_finite() => ser.serialize_f64(*d),
            Some(any_value::Value::DoubleValue(_)) => ser.serialize_unit(),
            Some(any_value::Value::ArrayValue(a)) => {
                let mut seq = ser.serialize_seq(Some(a.values.len()))?;
                for v in &a.values {
                    seq.serialize_element(&ValueJson(v))?;
                }
                seq.end()
            }
            Some(any_value::Value::KvlistValue(kv)) => AttrsJson(&kv.values).serialize(ser),
            Some(any_value::Value::BytesValue(b)) => ser.serialize_str(&hex(b)),
            // A profiles-only string-table index: meaningless without the table.
            Some(any_value::Value::StringValueStrindex(i)) => ser.serialize_i64(i64::from(*i)),
        }
    }
}

/// OTLP attributes written as one JSON object.
pub(crate) struct AttrsJson<'a>(pub(crate) &'a [KeyValue]);

impl Serialize for AttrsJson<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut map = ser.serialize_map(Some(self.0.len()))?;
        for kv in self.0 {
            match &kv.value {
                Some(v) => map.serialize_entry(&kv.key, &ValueJson(v))?,
                None => map.serialize_entry(&kv.key, &())?,
            }
        }
        map.end()
    }
}

/// A span event in the `spans.events` JSON array.
#[derive(serde::Serialize)]
struct SpanEventJson<'a> {
    time_ns: i64,
    name: &'a str,
    attributes: AttrsJson<'a>,
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Our serialisers only emit strings, numbers, bools and nulls, with
    // string keys: writing them to a String cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn find<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn service_name(resource: Option<&Resource>) -> Option<Arc<str>> {
    match find(resource.map_or(&[], |r| &r.attributes), "service.name") {
        Some(any_value::Value::StringValue(s)) => Some(Arc::from(s.as_str())),
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
pub(crate) fn traces(req: &ExportTraceServiceRequest, received_ns: i64) -> Converted<EncodedSpan> {
    let mut out = Converted::default();
    for rs in &req.resource_spans {
        let service = service_name(rs.resource.as_ref());
        let resource: Arc<str> = Arc::from(to_json(&AttrsJson(
            rs.resource.as_ref().map_or(&[], |r| &r.attributes),
        )));
        for ss in &rs.scope_spans {
            let scope: Option<Arc<str>> = ss.scope.as_ref().map(|s| Arc::from(s.name.as_str()));
            for span in &ss.spans {
                if !valid_id(&span.trace_id, 16)
                    || !valid_id(&span.span_id, 8)
                    || !(span.parent_span_id.is_empty() || span.parent_span_id.len() == 8)
                {
                    out.rejected += 1;
                    continue;
                }
                let (Some(trace_id), Some(span_id)) = (
                    RawId::from_bytes(&span.trace_id),
                    RawId::from_bytes(&span.span_id),
                ) else {
                    out.rejected += 1;
                    continue;
                };
                let incomplete = is_incomplete(span);
                let snapshot_seq = match find(&span.attributes, SNAPSHOT_SEQ_ATTR) {
                    Some(any_value::Value::IntValue(i)) if incomplete => Some(*i),
                    _ => None,
                };
                let events: Vec<SpanEventJson<'_>> = span
                    .events
                    .iter()
                    .map(|e| SpanEventJson {
                        time_ns: nanos(e.time_unix_nano),
                        name: &e.name,
                        attributes: AttrsJson(&e.attributes),
                    })
                    .collect();
                let status = span.status.as_ref();
                out.rows.push(EncodedSpan {
                    trace_id,
                    span_id,
                    parent_span_id: valid_id(&span.parent_span_id, 8)
                        .then(|| RawId::from_bytes(&span.parent_span_id))
                        .flatten(),
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
                    attributes: to_json(&AttrsJson(&span.attributes)),
                    events: to_json(&events),
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
pub(crate) fn logs(req: &ExportLogsServiceRequest, received_ns: i64) -> Converted<EncodedEvent> {
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
                    _ => to_json(&ValueJson(b)),
                });
                out.rows.push(EncodedEvent::new(
                    nanos(time),
                    event_name(record),
                    severity(record),
                    valid_id(&record.trace_id, 16).then(|| hex(&record.trace_id)),
                    valid_id(&record.span_id, 8).then(|| hex(&record.span_id)),
                    service.clone(),
                    body,
                    to_json(&AttrsJson(&record.attributes)),
                    received_ns,
                ));
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
) -> Converted<EncodedMetric> {
    let mut out = Converted::default();
    for rm in &req.resource_metrics {
        let service = service_name(rm.resource.as_ref());
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let mut push = |time: u64, value: Option<f64>, attrs: &[KeyValue]| {
                    out.rows.push(EncodedMetric::new(
                        nanos(time),
                        m.name.clone(),
                        value.filter(|v| v.is_finite()),
                        to_json(&AttrsJson(attrs)),
                        service.clone(),
                        received_ns,
                    ));
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
        assert_eq!(out.rows[0].trace_id.as_bytes(), [1; 16]);
        assert_eq!(out.rows[0].span_id.as_bytes(), [2; 8]);
        assert!(out.reason.is_some());
    }

    #[test]
    fn values_become_json() {
        let v = |value| AnyValue { value: Some(value) };
        let attrs = vec![
            KeyValue {
                key: "b".into(),
                value: Some(v(any_value::Value::BytesValue(vec![0xab, 0x01]))),
                ..Default::default()
            },
            KeyValue {
                key: "nan".into(),
                value: Some(v(any_value::Value::DoubleValue(f64::NAN))),
                ..Default::default()
            },
            KeyValue {
                key: "list".into(),
                value: Some(v(any_value::Value::ArrayValue(
                    opentelemetry_proto::tonic::common::v1::ArrayValue {
                        values: vec![v(any_value::Value::IntValue(-3))],
                    },
                ))),
                ..Default::default()
            },
            KeyValue {
                key: "q\"uote".into(),
                value: None,
                ..Default::default()
            },
        ];
        assert_eq!(
            to_json(&AttrsJson(&attrs)),
            r#"{"b":"ab01","nan":null,"list":[-3],"q\"uote":null}"#
        );
    }
}
