//! Export shapes: Jaeger `/api/traces` JSON (what the Jaeger UI loads from a
//! file) and OTLP `ExportTraceServiceRequest` JSON; stuck spans carry
//! `incomplete=true` and `error=true`.

mod fixture;

use kms_collector::export::{jaeger_json, otlp_json, select_spans, Selection};
use kms_collector::store::Reader;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use serde_json::Value;

fn webhook_hang() -> fixture::Store {
    let f = fixture::load_fixture(&fixture::fixtures_dir().join("b_webhook_hang.json"));
    fixture::load(&f)
}

fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["tags"].as_array()?.iter().find(|t| t["key"] == key)
}

#[test]
fn jaeger_json_has_the_api_traces_shape_and_marks_stuck_spans() {
    let store = webhook_hang();
    let reader = store.reader();
    let spans = select_spans(&reader, &Selection::Stuck).expect("select");
    assert_eq!(
        spans.len(),
        34,
        "17 stuck traces of a request and an outbound span"
    );
    let v = jaeger_json(&spans);
    let data = v["data"].as_array().expect("data array");
    assert_eq!(data.len(), 17);
    for trace in data {
        let trace_id = trace["traceID"].as_str().expect("traceID");
        assert_eq!(trace_id.len(), 32);
        let processes = trace["processes"].as_object().expect("processes");
        let spans = trace["spans"].as_array().expect("spans");
        assert_eq!(spans.len(), 2);
        for s in spans {
            for key in [
                "traceID",
                "spanID",
                "operationName",
                "references",
                "startTime",
                "duration",
                "tags",
                "logs",
                "processID",
                "warnings",
            ] {
                assert!(s.get(key).is_some(), "span lacks {key}: {s}");
            }
            assert_eq!(s["traceID"], trace_id);
            assert_eq!(s["spanID"].as_str().unwrap().len(), 16);
            let pid = s["processID"].as_str().unwrap();
            assert_eq!(processes[pid]["serviceName"], "dstack-kms");
            // Microseconds since the epoch (2026), not nanoseconds or ms.
            let start = s["startTime"].as_i64().expect("startTime int");
            assert!(
                (1_700_000_000_000_000..2_000_000_000_000_000).contains(&start),
                "{start}"
            );
            assert!(s["duration"].as_i64().unwrap() > 0);
            assert_eq!(
                tag(s, "incomplete").map(|t| (&t["type"], &t["value"])),
                Some((&"bool".into(), &true.into())),
                "{s}"
            );
            assert_eq!(tag(s, "error").map(|t| &t["value"]), Some(&true.into()));
            assert!(s["warnings"].as_array().is_some_and(|w| !w.is_empty()));
        }
        // The outbound span points at the request span.
        let outbound = spans
            .iter()
            .find(|s| s["operationName"] == "kms.outbound")
            .expect("outbound");
        let request = spans
            .iter()
            .find(|s| s["operationName"] == "kms.request")
            .expect("request");
        assert_eq!(outbound["references"][0]["refType"], "CHILD_OF");
        assert_eq!(outbound["references"][0]["spanID"], request["spanID"]);
        assert_eq!(
            tag(outbound, "kms.peer").map(|t| &t["value"]),
            Some(&"auth_webhook".into())
        );
        assert_eq!(
            tag(outbound, "span.kind").map(|t| &t["value"]),
            Some(&"client".into())
        );
        assert_eq!(
            tag(outbound, "server.port").map(|t| &t["type"]),
            Some(&"int64".into())
        );
    }
}

#[test]
fn closed_spans_are_not_marked_stuck_and_selections_pick_the_right_spans() {
    let store = webhook_hang();
    let reader = store.reader();
    let all = select_spans(&reader, &Selection::All).expect("all");
    let count: i64 = rusqlite::Connection::open(&store.path)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM spans", [], |r| r.get(0))
        .unwrap();
    assert_eq!(all.len() as i64, count);
    let first = &all[0];
    let one =
        select_spans(&reader, &Selection::Trace(first.trace_id.to_uppercase())).expect("trace");
    assert!(!one.is_empty() && one.iter().all(|s| s.trace_id == first.trace_id));
    let v = jaeger_json(&one);
    for s in v["data"][0]["spans"].as_array().unwrap() {
        assert!(
            tag(s, "incomplete").is_none(),
            "a closed span marked incomplete: {s}"
        );
        assert!(tag(s, "error").is_none());
    }
    assert!(select_spans(&reader, &Selection::Trace("ff".repeat(16)))
        .unwrap()
        .is_empty());
    assert!(reader.trace(&"0".repeat(32)).unwrap().is_empty());
}

#[test]
fn otlp_json_round_trips_as_an_export_request() {
    let store = webhook_hang();
    let reader = store.reader();
    let spans = select_spans(&reader, &Selection::Stuck).expect("select");
    let v = otlp_json(&spans);
    // OTLP JSON: camelCase names, hex ids.
    let first = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert_eq!(first["traceId"].as_str().map(str::len), Some(32), "{first}");
    assert_eq!(first["spanId"].as_str().map(str::len), Some(16));
    let req: ExportTraceServiceRequest =
        serde_json::from_value(v).expect("parses as ExportTraceServiceRequest");
    let decoded: Vec<_> = req
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .collect();
    assert_eq!(decoded.len(), spans.len());
    for s in decoded {
        for key in ["incomplete", "error"] {
            let v = s
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| v.value.as_ref());
            assert_eq!(
                v,
                Some(&any_value::Value::BoolValue(true)),
                "{key} on {}",
                s.name
            );
        }
        assert!(s.end_time_unix_nano > s.start_time_unix_nano);
    }
    let svc = req.resource_spans[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name");
    assert!(svc.is_some());
}
