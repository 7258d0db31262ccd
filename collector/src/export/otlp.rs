//! OTLP JSON: one `ExportTraceServiceRequest`, one `ResourceSpans` per
//! distinct resource, one `ScopeSpans` per scope.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use serde_json::Value;

use crate::store::SpanRow;

fn any(v: &Value) -> AnyValue {
    let value = match v {
        Value::Bool(b) => any_value::Value::BoolValue(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => any_value::Value::IntValue(i),
            None => any_value::Value::DoubleValue(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => any_value::Value::StringValue(s.clone()),
        Value::Array(a) => any_value::Value::ArrayValue(ArrayValue {
            values: a.iter().map(any).collect(),
        }),
        Value::Object(m) => any_value::Value::KvlistValue(KeyValueList {
            values: m.iter().map(|(k, v)| kv(k, any(v))).collect(),
        }),
        Value::Null => any_value::Value::StringValue(String::new()),
    };
    AnyValue { value: Some(value) }
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(value),
        ..KeyValue::default()
    }
}

fn kvs(attrs: &Value) -> Vec<KeyValue> {
    attrs
        .as_object()
        .map(|m| m.iter().map(|(k, v)| kv(k, any(v))).collect())
        .unwrap_or_default()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| s.get(2 * i..2 * i + 2))
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect()
}

fn ns(t: i64) -> u64 {
    u64::try_from(t).unwrap_or(0)
}

fn span_proto(s: &SpanRow) -> Span {
    let mut attributes = kvs(&s.attributes);
    if s.incomplete {
        attributes.retain(|kv| kv.key != "incomplete" && kv.key != "error");
        for key in ["incomplete", "error"] {
            attributes.push(kv(key, any(&Value::Bool(true))));
        }
        if !attributes.iter().any(|kv| kv.key == "kms.open.age_ms") {
            let age_ms = (s.end_ns - s.start_ns).max(0) / 1_000_000;
            attributes.push(kv("kms.open.age_ms", any(&Value::from(age_ms))));
        }
    }
    let events = s
        .events
        .as_array()
        .map(|evs| {
            evs.iter()
                .map(|e| span::Event {
                    time_unix_nano: ns(e.get("time_ns").and_then(Value::as_i64).unwrap_or(0)),
                    name: e
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    attributes: kvs(e.get("attributes").unwrap_or(&Value::Null)),
                    dropped_attributes_count: 0,
                })
                .collect()
        })
        .unwrap_or_default();
    Span {
        trace_id: hex(&s.trace_id),
        span_id: hex(&s.span_id),
        trace_state: String::new(),
        parent_span_id: s.parent_span_id.as_deref().map(hex).unwrap_or_default(),
        flags: 0,
        name: s.name.clone(),
        kind: s.kind,
        start_time_unix_nano: ns(s.start_ns),
        end_time_unix_nano: ns(s.end_ns),
        attributes,
        dropped_attributes_count: 0,
        events,
        dropped_events_count: 0,
        links: Vec::new(),
        dropped_links_count: 0,
        status: Some(Status {
            message: s.status_message.clone().unwrap_or_default(),
            code: if s.incomplete {
                status::StatusCode::Unset as i32
            } else {
                s.status_code
            },
        }),
    }
}

/// The spans as OTLP JSON.
pub fn otlp_json(spans: &[SpanRow]) -> Value {
    serde_json::to_value(otlp_request(spans)).unwrap_or(Value::Null)
}

/// The spans as one OTLP request: one `ResourceSpans` per distinct
/// resource, one `ScopeSpans` per scope, spans in the order given. Open-span
/// snapshots carry `incomplete=true`, `error=true` and `kms.open.age_ms`.
pub(crate) fn otlp_request(spans: &[SpanRow]) -> ExportTraceServiceRequest {
    let mut resources: Vec<ResourceSpans> = Vec::new();
    let mut keys: Vec<&Value> = Vec::new();
    for s in spans {
        let ri = match keys.iter().position(|r| *r == &s.resource) {
            Some(i) => i,
            None => {
                keys.push(&s.resource);
                let mut attrs = kvs(&s.resource);
                if let (Some(svc), false) = (&s.service, s.resource.get("service.name").is_some()) {
                    attrs.push(kv("service.name", any(&Value::String(svc.clone()))));
                }
                resources.push(ResourceSpans {
                    resource: Some(Resource {
                        attributes: attrs,
                        dropped_attributes_count: 0,
                        entity_refs: Vec::new(),
                    }),
                    scope_spans: Vec::new(),
                    schema_url: String::new(),
                });
                keys.len() - 1
            }
        };
        let scope_name = s.scope.clone().unwrap_or_default();
        let rs = &mut resources[ri];
        let si = match rs.scope_spans.iter().position(|ss| {
            ss.scope.as_ref().map(|sc| sc.name.as_str()) == Some(scope_name.as_str())
        }) {
            Some(i) => i,
            None => {
                rs.scope_spans.push(ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: scope_name,
                        ..InstrumentationScope::default()
                    }),
                    spans: Vec::new(),
                    schema_url: String::new(),
                });
                rs.scope_spans.len() - 1
            }
        };
        rs.scope_spans[si].spans.push(span_proto(s));
    }
    ExportTraceServiceRequest {
        resource_spans: resources,
    }
}
