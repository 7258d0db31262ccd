//! Jaeger `/api/traces` JSON, the shape the Jaeger UI's "JSON file" upload
//! reads: `{"data":[{"traceID","spans":[..],"processes":{..}}]}`.
//!
//! It reads as Jaeger v2 itself renders the same spans (checked against a
//! real Jaeger in `tests/jaeger_export.rs`): tags sorted by key, `span.kind`,
//! `otel.scope.name`, `otel.status_code` (`OK`/`ERROR`),
//! `otel.status_description` and `error=true` from the status, resource
//! attributes other than `service.name` as process tags, events as logs
//! whose first field is `event`. An open-span snapshot also carries
//! `incomplete=true`, `error=true` and a span warning
//! ([`open_span_warning`]), as it does when Jaeger reads it live through
//! `serve --jaeger-storage`.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::store::SpanRow;

fn tag(key: &str, v: &Value) -> Value {
    let (ty, value) = match v {
        Value::Bool(b) => ("bool", json!(b)),
        Value::Number(n) if n.is_i64() || n.is_u64() => ("int64", json!(n)),
        Value::Number(n) => ("float64", json!(n)),
        Value::String(s) => ("string", json!(s)),
        other => ("string", json!(other.to_string())),
    };
    json!({"key": key, "type": ty, "value": value})
}

fn tags_of(attrs: &Value) -> Vec<Value> {
    attrs
        .as_object()
        .map(|m| m.iter().map(|(k, v)| tag(k, v)).collect())
        .unwrap_or_default()
}

/// Sorts tags by key, as Jaeger's query service does before answering.
fn sorted(mut tags: Vec<Value>) -> Vec<Value> {
    tags.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
    tags
}

/// The warning an open-span snapshot carries in Jaeger: the UI shows it on
/// the span.
pub(crate) fn open_span_warning(s: &SpanRow) -> String {
    format!(
        "still open at its last snapshot{}: duration is the time open so far",
        s.snapshot_seq
            .map(|n| format!(" (#{n})"))
            .unwrap_or_default()
    )
}

fn kind_name(kind: i32) -> Option<&'static str> {
    match kind {
        1 => Some("internal"),
        2 => Some("server"),
        3 => Some("client"),
        4 => Some("producer"),
        5 => Some("consumer"),
        _ => None,
    }
}

/// The spans as Jaeger JSON, one entry per trace; one process per distinct
/// (service, resource).
pub fn jaeger_json(spans: &[SpanRow]) -> Value {
    let mut traces: BTreeMap<&str, Vec<&SpanRow>> = BTreeMap::new();
    for s in spans {
        traces.entry(&s.trace_id).or_default().push(s);
    }
    let data: Vec<Value> = traces
        .into_iter()
        .map(|(trace_id, spans)| {
            let mut processes: Vec<(String, &Value)> = Vec::new();
            let mut process_map = Map::new();
            let out_spans: Vec<Value> = spans
                .iter()
                .map(|s| {
                    let service = s.service.clone().unwrap_or_else(|| "unknown".into());
                    let pid = match processes
                        .iter()
                        .position(|(svc, res)| *svc == service && *res == &s.resource)
                    {
                        Some(i) => format!("p{}", i + 1),
                        None => {
                            processes.push((service.clone(), &s.resource));
                            let pid = format!("p{}", processes.len());
                            let ptags: Vec<Value> = sorted(
                                tags_of(&s.resource)
                                    .into_iter()
                                    .filter(|t| t["key"] != "service.name")
                                    .collect(),
                            );
                            process_map.insert(
                                pid.clone(),
                                json!({"serviceName": service, "tags": ptags}),
                            );
                            pid
                        }
                    };
                    span_json(s, &pid)
                })
                .collect();
            json!({
                "traceID": trace_id,
                "spans": out_spans,
                "processes": process_map,
                "warnings": null,
            })
        })
        .collect();
    json!({"data": data, "total": 0, "limit": 0, "offset": 0, "errors": null})
}

fn span_json(s: &SpanRow, pid: &str) -> Value {
    let mut tags = tags_of(&s.attributes);
    if let Some(k) = kind_name(s.kind) {
        tags.push(tag("span.kind", &json!(k)));
    }
    if let Some(scope) = &s.scope {
        tags.push(tag("otel.scope.name", &json!(scope)));
    }
    let mut warnings = Vec::new();
    let is_error = s.status_code == 2 || s.incomplete;
    if s.status_code == 1 && !s.incomplete {
        tags.push(tag("otel.status_code", &json!("OK")));
    }
    if s.status_code == 2 {
        tags.push(tag("otel.status_code", &json!("ERROR")));
        if let Some(m) = s.status_message.as_ref().filter(|m| !m.is_empty()) {
            tags.push(tag("otel.status_description", &json!(m)));
        }
    }
    if s.incomplete {
        // The snapshot's own attributes may already say incomplete; say it once.
        tags.retain(|t| t["key"] != "incomplete");
        tags.push(tag("incomplete", &json!(true)));
        warnings.push(json!(open_span_warning(s)));
    }
    if is_error {
        tags.retain(|t| t["key"] != "error");
        tags.push(tag("error", &json!(true)));
    }
    let references: Vec<Value> = s
        .parent_span_id
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| json!({"refType": "CHILD_OF", "traceID": s.trace_id, "spanID": p}))
        .collect();
    let logs: Vec<Value> = s
        .events
        .as_array()
        .map(|evs| {
            evs.iter()
                .map(|e| {
                    let mut fields = vec![tag(
                        "event",
                        &json!(e.get("name").and_then(Value::as_str).unwrap_or("")),
                    )];
                    fields.extend(sorted(tags_of(e.get("attributes").unwrap_or(&Value::Null))));
                    json!({
                        "timestamp": e.get("time_ns").and_then(Value::as_i64).unwrap_or(0) / 1000,
                        "fields": fields,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "traceID": s.trace_id,
        "spanID": s.span_id,
        "operationName": s.name,
        "references": references,
        "startTime": s.start_ns / 1000,
        "duration": (s.end_ns - s.start_ns).max(0) / 1000,
        "tags": sorted(tags),
        "logs": logs,
        "processID": pid,
        "warnings": if warnings.is_empty() { Value::Null } else { Value::Array(warnings) },
    })
}
