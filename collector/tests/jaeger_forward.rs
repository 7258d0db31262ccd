//! `serve --forward` against a real Jaeger v2 (in-memory storage), checked
//! through Jaeger's query APIs: `/api/traces/{id}` (what the UI reads) and
//! `/api/v3/traces/{id}`. Needs `KMS_JAEGER_BIN` (see `jaeger_support`).

mod jaeger_support;

use std::time::Duration;

use jaeger_support::kms::{self, hex};
use jaeger_support::*;
use kms_collector::forward::ForwardConfig;
use kms_collector::serve::{Server, ServerConfig, ServerHandle};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use serde_json::Value;

const SEC: u64 = 1_000_000_000;

async fn collector(dir: &tempfile::TempDir, forward: ForwardConfig) -> ServerHandle {
    Server::start(
        ServerConfig::default()
            .db(dir.path().join("kms-diag.sqlite"))
            .otlp_grpc("127.0.0.1:0".parse().expect("addr"))
            .otlp_http("127.0.0.1:0".parse().expect("addr"))
            .forward(Some(forward)),
    )
    .await
    .expect("collector starts")
}

async fn send(server: &ServerHandle, req: ExportTraceServiceRequest) {
    TraceServiceClient::connect(format!("http://{}", server.grpc_addr()))
        .await
        .expect("connect to the collector")
        .export(req)
        .await
        .expect("export accepted");
}

fn count(server: &ServerHandle, sql: &str) -> i64 {
    rusqlite::Connection::open_with_flags(
        server.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open store")
    .query_row(sql, [], |r| r.get(0))
    .expect("query")
}

fn span_ids(trace: &Value) -> Vec<String> {
    let mut ids: Vec<String> = trace["spans"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|s| s["spanID"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_traces_read_intact_in_jaeger_and_stuck_spans_arrive_when_they_close() {
    let Some(bin) = jaeger_bin() else { return };
    let jaeger = Jaeger::start(&bin, "memory.yaml", None, &[]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = collector(
        &dir,
        ForwardConfig::new(format!("http://{}", jaeger.otlp_grpc)),
    )
    .await;

    let t0 = now_ns() - 60 * SEC;
    let trace = kms::trace_id(1);
    let id = hex(&trace);
    let request = kms::request(&trace, 1, "GetMeta", t0, 3 * SEC);
    let failed = kms::outbound(&request, 2, t0 + SEC / 10, 2 * SEC);
    // A second outbound call, still stuck: only its snapshots exist.
    let stuck = kms::outbound(&request, 3, t0 + 2 * SEC, 40 * SEC);
    send(
        &server,
        kms::export(vec![kms::snapshot(&stuck, 1, 10 * SEC)]),
    )
    .await;
    send(
        &server,
        kms::export(vec![
            request.clone(),
            failed.clone(),
            kms::snapshot(&stuck, 2, 15 * SEC),
        ]),
    )
    .await;

    let t = jaeger
        .wait_trace(&id, "the two closed spans", Duration::from_secs(20), |t| {
            t["spans"].as_array().is_some_and(|s| s.len() >= 2)
        })
        .await;
    // Snapshots were not forwarded: the store has three spans, Jaeger two.
    assert_eq!(
        span_ids(&t),
        vec![hex(&request.span_id), hex(&failed.span_id)]
    );
    assert_eq!(
        count(&server, "SELECT COUNT(*) FROM spans WHERE incomplete = 1"),
        1
    );
    let stats = server.forward_stats().expect("forwarding");
    assert_eq!(stats.snapshots_skipped, 2, "{stats:?}");

    // Names, attributes, parent link, status, events and resource, as the UI reads them.
    let req = ui_span(&t, "kms.request");
    let out = ui_span(&t, "kms.outbound");
    assert_eq!(ui_tag(req, "rpc.method"), Some(&Value::from("GetMeta")));
    assert_eq!(
        ui_tag(req, "http.response.status_code"),
        Some(&Value::from(200))
    );
    assert_eq!(ui_tag(req, "span.kind"), Some(&Value::from("server")));
    assert_eq!(ui_tag(out, "span.kind"), Some(&Value::from("client")));
    assert_eq!(ui_tag(out, "kms.peer"), Some(&Value::from("auth_webhook")));
    assert_eq!(ui_tag(out, "server.port"), Some(&Value::from(8000)));
    assert_eq!(ui_tag(out, "error"), Some(&Value::from(true)));
    assert_eq!(
        ui_tag(out, "otel.status_description"),
        Some(&Value::from("webhook timed out"))
    );
    assert_eq!(
        out["references"],
        serde_json::json!([{"refType": "CHILD_OF", "traceID": id, "spanID": hex(&request.span_id)}])
    );
    assert_eq!(req["startTime"], Value::from(t0 / 1000));
    assert_eq!(req["duration"], Value::from(3 * SEC / 1000));
    let log = &out["logs"][0];
    assert_eq!(log["timestamp"], Value::from((t0 + SEC / 10 + SEC) / 1000));
    assert!(log["fields"].as_array().is_some_and(|f| f
        .iter()
        .any(|f| f["key"] == "event" && f["value"] == "retrying")));
    let process = &t["processes"][req["processID"].as_str().expect("processID")];
    assert_eq!(process["serviceName"], "dstack-kms");
    assert_eq!(ui_tag(process, "host.name"), Some(&Value::from("kms-cvm")));

    // The same trace through api_v3 (OTLP JSON).
    let v3 = jaeger.v3_trace(&id).await.expect("api_v3 has the trace");
    let attrs = &v3[0]["resource"]["attributes"];
    assert!(attrs.as_array().is_some_and(|a| a
        .iter()
        .any(|kv| kv["key"] == "service.name" && kv["value"]["stringValue"] == "dstack-kms")));
    let spans: Vec<&Value> = v3
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rs| rs["scopeSpans"].as_array().into_iter().flatten())
        .flat_map(|ss| ss["spans"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(spans.len(), 2, "{v3}");
    let out3 = spans
        .iter()
        .find(|s| s["name"] == "kms.outbound")
        .expect("outbound in api_v3");
    assert_eq!(out3["status"]["code"], 2, "{out3}");
    assert_eq!(out3["status"]["message"], "webhook timed out");

    // The stuck call ends: its closed span is forwarded and Jaeger has it whole.
    send(&server, kms::export(vec![stuck.clone()])).await;
    let t = jaeger
        .wait_trace(&id, "the closed stuck span", Duration::from_secs(20), |t| {
            t["spans"].as_array().is_some_and(|s| s.len() == 3)
        })
        .await;
    let closed = t["spans"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["spanID"] == hex(&stuck.span_id)))
        .expect("closed stuck span");
    assert_eq!(closed["duration"], Value::from(40 * SEC / 1000));
    assert_eq!(ui_tag(closed, "incomplete"), None);
    assert_eq!(
        count(&server, "SELECT COUNT(*) FROM spans WHERE incomplete = 1"),
        0
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_restarting_jaeger_loses_nothing_from_the_store() {
    let Some(bin) = jaeger_bin() else { return };
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    // Retries for about 30 s per request before giving up.
    let forward = ForwardConfig::new(format!("http://{port}"))
        .max_attempts(20)
        .initial_backoff(Duration::from_millis(100))
        .max_backoff(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    let server = collector(&dir, forward).await;
    let t0 = now_ns() - 60 * SEC;

    // Jaeger not started yet: the export is stored at once, forwarding retries.
    let a = kms::trace_id(10);
    send(
        &server,
        kms::export(vec![kms::request(&a, 1, "GetMeta", t0, SEC)]),
    )
    .await;
    assert_eq!(count(&server, "SELECT COUNT(*) FROM spans"), 1);
    wait_for(
        || server.forward_stats().is_some_and(|s| s.retries >= 2),
        "retries",
    )
    .await;

    let mut jaeger = Jaeger::start(&bin, "memory.yaml", Some(port), &[]).await;
    jaeger
        .wait_trace(
            &hex(&a),
            "the span sent while Jaeger was down",
            Duration::from_secs(30),
            |_| true,
        )
        .await;

    // Jaeger dies; what arrives meanwhile is stored, and forwarded once it is back.
    jaeger.kill();
    let retries_before = server.forward_stats().map_or(0, |s| s.retries);
    let b = kms::trace_id(11);
    send(
        &server,
        kms::export(vec![kms::request(&b, 2, "GetAppKey", t0, SEC)]),
    )
    .await;
    assert_eq!(count(&server, "SELECT COUNT(*) FROM spans"), 2);
    wait_for(
        || {
            server
                .forward_stats()
                .is_some_and(|s| s.retries > retries_before)
        },
        "a retry while Jaeger is down",
    )
    .await;
    let jaeger = Jaeger::start(&bin, "memory.yaml", Some(port), &[]).await;
    jaeger
        .wait_trace(
            &hex(&b),
            "the span sent while Jaeger restarted",
            Duration::from_secs(30),
            |_| true,
        )
        .await;
    // Jaeger answers the export before our counter moves: wait for it.
    wait_for(
        || {
            server
                .forward_stats()
                .is_some_and(|s| s.requests_forwarded == 2)
        },
        "both requests counted as forwarded",
    )
    .await;
    let stats = server.forward_stats().expect("forwarding");
    assert_eq!(stats.requests_dropped, 0, "{stats:?}");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_gives_up_within_its_bounds_and_the_store_keeps_everything() {
    // No Jaeger needed: nothing listens on the port. Three attempts, 100 +
    // 200 ms apart, then the request is dropped from the forward queue only.
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let forward = ForwardConfig::new(format!("http://{port}"))
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(100))
        .timeout(Duration::from_secs(1));
    let server = collector(&dir, forward).await;
    let t = kms::trace_id(20);
    let started = std::time::Instant::now();
    send(
        &server,
        kms::export(vec![kms::request(&t, 1, "GetMeta", now_ns(), SEC)]),
    )
    .await;
    wait_for(
        || {
            server
                .forward_stats()
                .is_some_and(|s| s.requests_dropped == 1)
        },
        "the request given up",
    )
    .await;
    let stats = server.forward_stats().expect("forwarding");
    assert_eq!(stats.retries, 2, "{stats:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(count(&server, "SELECT COUNT(*) FROM spans"), 1);
    server.shutdown().await.expect("clean shutdown");
}

async fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
