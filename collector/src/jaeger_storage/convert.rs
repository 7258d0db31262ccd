//! Between the remote-storage messages and the store's types.

use opentelemetry_proto::tonic::trace::v1::TracesData;
use serde_json::Value;

use super::proto::{any_value, AnyValue, TraceQueryParameters};
use crate::store::{SpanRow, TraceQuery};

/// Traces a search returns when Jaeger does not say (`search_depth` 0).
pub(super) const DEFAULT_LIMIT: usize = 20;
/// Traces a search returns at most, whatever Jaeger asks.
pub(super) const MAX_LIMIT: usize = 10_000;

/// Nanoseconds of a timestamp, or `None` when unset. Jaeger sends Go's zero
/// time (year 1, negative seconds) for "no bound".
pub(super) fn timestamp_ns(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    let t = t?;
    if t.seconds <= 0 {
        return None;
    }
    t.seconds
        .checked_mul(1_000_000_000)?
        .checked_add(i64::from(t.nanos))
}

fn duration_ns(d: Option<&prost_types::Duration>) -> Option<i64> {
    let d = d?;
    let ns = d
        .seconds
        .checked_mul(1_000_000_000)?
        .checked_add(i64::from(d.nanos))?;
    (ns > 0).then_some(ns)
}

/// A timestamp from nanoseconds.
pub(super) fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        // Always in 0..1e9.
        nanos: i32::try_from(ns.rem_euclid(1_000_000_000)).unwrap_or(0),
    }
}

fn json_of(v: &AnyValue) -> Value {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => Value::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::DoubleValue(d)) => Value::from(*d),
        Some(any_value::Value::BytesValue(b)) => {
            Value::String(b.iter().map(|x| format!("{x:02x}")).collect())
        }
        // Arrays and maps never equal a stored scalar.
        Some(any_value::Value::ArrayValue(_)) | Some(any_value::Value::KvlistValue(_)) | None => {
            Value::Null
        }
    }
}

/// The store query for Jaeger's search parameters.
pub(super) fn query(p: &TraceQueryParameters) -> TraceQuery {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let limit = match usize::try_from(p.search_depth) {
        Ok(0) | Err(_) => DEFAULT_LIMIT,
        Ok(n) => n.min(MAX_LIMIT),
    };
    TraceQuery {
        service: non_empty(&p.service_name),
        operation: non_empty(&p.operation_name),
        attributes: p
            .attributes
            .iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value.as_ref().map_or(Value::Null, json_of),
                )
            })
            .collect(),
        start_min_ns: timestamp_ns(p.start_time_min.as_ref()),
        start_max_ns: timestamp_ns(p.start_time_max.as_ref()),
        duration_min_ns: duration_ns(p.duration_min.as_ref()),
        duration_max_ns: duration_ns(p.duration_max.as_ref()),
        limit,
    }
}

/// Jaeger's name of an OTLP span kind (`ptrace.SpanKind`'s, lowercase).
pub(super) fn kind_name(kind: i32) -> &'static str {
    match kind {
        1 => "internal",
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "",
    }
}

/// The span attribute Jaeger v2 shows as a span's warnings (and removes
/// from its tags): jaeger's `jptrace.WarningsAttribute`.
pub(super) const JAEGER_WARNINGS: &str = "@jaeger@warnings";

/// One trace's spans as one `TracesData` (a chunk never mixes traces).
/// Open-span snapshots carry `incomplete=true`, `error=true`,
/// `kms.open.age_ms` and the warning the JSON export gives them, so the live
/// trace and an exported file read the same in the UI.
pub(super) fn traces_data(spans: &[SpanRow]) -> TracesData {
    let mut data = TracesData {
        resource_spans: crate::export::otlp_request(spans).resource_spans,
    };
    let open: std::collections::HashMap<Vec<u8>, String> = spans
        .iter()
        .filter(|s| s.incomplete)
        .map(|s| (hex_bytes(&s.span_id), crate::export::open_span_warning(s)))
        .collect();
    if open.is_empty() {
        return data;
    }
    let spans = data
        .resource_spans
        .iter_mut()
        .flat_map(|rs| rs.scope_spans.iter_mut())
        .flat_map(|ss| ss.spans.iter_mut());
    for span in spans {
        if let Some(w) = open.get(&span.span_id) {
            span.attributes.push(otlp_kv(JAEGER_WARNINGS, w));
        }
    }
    data
}

fn otlp_kv(key: &str, warning: &str) -> opentelemetry_proto::tonic::common::v1::KeyValue {
    use opentelemetry_proto::tonic::common::v1::{
        any_value::Value as V, AnyValue as A, ArrayValue,
    };
    opentelemetry_proto::tonic::common::v1::KeyValue {
        key: key.to_owned(),
        value: Some(A {
            value: Some(V::ArrayValue(ArrayValue {
                values: vec![A {
                    value: Some(V::StringValue(warning.to_owned())),
                }],
            })),
        }),
        ..Default::default()
    }
}

/// 16 bytes as 32 lowercase hex digits; `None` unless exactly 16 bytes.
pub(super) fn trace_id_hex(id: &[u8]) -> Option<String> {
    (id.len() == 16).then(|| id.iter().map(|b| format!("{b:02x}")).collect())
}

/// Hex digits as bytes (empty when malformed).
pub(super) fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .filter_map(|i| hex.get(2 * i..2 * i + 2))
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_zero_time_and_zero_duration_mean_unset() {
        let zero = prost_types::Timestamp {
            seconds: -62_135_596_800,
            nanos: 0,
        };
        assert_eq!(timestamp_ns(Some(&zero)), None);
        assert_eq!(
            timestamp_ns(Some(&timestamp(1_700_000_000_123_456_789))),
            Some(1_700_000_000_123_456_789)
        );
        assert_eq!(duration_ns(Some(&prost_types::Duration::default())), None);
        let q = query(&TraceQueryParameters {
            service_name: "dstack-kms".into(),
            duration_min: Some(prost_types::Duration {
                seconds: 1,
                nanos: 5,
            }),
            ..Default::default()
        });
        assert_eq!(q.duration_min_ns, Some(1_000_000_005));
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert_eq!(q.operation, None);
    }

    #[test]
    fn trace_ids_round_trip() {
        let hex = "abababababababab0000000000000001";
        assert_eq!(trace_id_hex(&hex_bytes(hex)).as_deref(), Some(hex));
        assert_eq!(trace_id_hex(&[1, 2, 3]), None);
    }
}
