//! `export --format jaeger-json` against the JSON Jaeger itself returns
//! (`/api/traces/{id}`, what the UI reads) for the same trace, on the fields
//! the UI reads: traceID, spanID, references, startTime, duration, tags,
//! logs, process, warnings. Closed spans are compared with a Jaeger fed by
//! `--forward`; the stuck-request comparison (snapshots, which only
//! `--jaeger-storage` shows live) is in `jaeger_storage.rs`.
//! Needs `KMS_JAEGER_BIN` (see `jaeger_support`).

mod jaeger_support;

use std::time::Duration;

use jaeger_support::kms::{self, hex};
use jaeger_support::*;
use kms_collector::export::{jaeger_json, render, select_spans, ExportFormat, Selection};
use kms_collector::forward::ForwardConfig;
use kms_collector::serve::{Server, ServerConfig};
use kms_collector::store::SqliteReader;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use serde_json::Value;

const SEC: u64 = 1_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jaeger_json_export_reads_as_jaegers_own_json() {
    let Some(bin) = jaeger_bin() else { return };
    let jaeger = Jaeger::start(&bin, "memory.yaml", None, &[]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(
        ServerConfig::default()
            .db(dir.path().join("kms-diag.sqlite"))
            .otlp_grpc("127.0.0.1:0".parse().expect("addr"))
            .otlp_http("127.0.0.1:0".parse().expect("addr"))
            .forward(Some(ForwardConfig::new(format!(
                "http://{}",
                jaeger.otlp_grpc
            )))),
    )
    .await
    .expect("collector starts");
    let t0 = now_ns() - 60 * SEC;
    let trace = kms::trace_id(30);
    let request = kms::request(&trace, 1, "GetMeta", t0, 3 * SEC);
    let failed = kms::outbound(&request, 2, t0 + SEC / 10, 2 * SEC);
    let mut ok = kms::outbound(&request, 3, t0 + 2 * SEC, SEC / 2);
    ok.status = None;
    ok.events.clear();
    TraceServiceClient::connect(format!("http://{}", server.grpc_addr()))
        .await
        .expect("connect")
        .export(kms::export(vec![request, failed, ok]))
        .await
        .expect("export");
    let id = hex(&trace);
    let live = jaeger
        .wait_trace(&id, "the trace", Duration::from_secs(20), |t| {
            t["spans"].as_array().is_some_and(|s| s.len() == 3)
        })
        .await;

    // What `kms-collector export --format jaeger-json --trace <id>` writes.
    let reader = SqliteReader::open(server.db_path()).expect("reader");
    let spans = select_spans(&reader, &Selection::Trace(id.clone())).expect("select");
    let file: Value =
        serde_json::from_str(&render(&spans, ExportFormat::JaegerJson)).expect("export is JSON");
    assert_eq!(file, jaeger_json(&spans));
    let exported = &file["data"][0];
    assert_same_ui_view(exported, &live);
    server.shutdown().await.expect("clean shutdown");
}
