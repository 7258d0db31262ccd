//! Real OTLP clients against the receivers on loopback: a tonic client, the
//! OpenTelemetry Rust SDK exporter over gRPC and HTTP (protobuf and JSON),
//! and the OTLP/JSON examples of the specification. Every span is stored and
//! counted.

mod ingest_support;

use std::time::Duration;

use ingest_support::*;
use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use prost::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_client_traces_logs_metrics_gzip_and_partial_success() {
    let t = TestServer::start().await;
    let mut traces = TraceServiceClient::connect(t.grpc_url())
        .await
        .expect("connect");
    traces
        .export(trace_request(spans(1, 1, 100)))
        .await
        .expect("plain export");
    let mut gz = TraceServiceClient::connect(t.grpc_url())
        .await
        .expect("connect")
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    gz.export(trace_request(spans(1, 101, 100)))
        .await
        .expect("gzip export");

    // Invalid ids: rejected and reported, the rest stored.
    let mut bad = spans(2, 1, 3);
    bad[1].trace_id = vec![0; 16];
    bad[2].span_id = vec![1, 2, 3];
    let resp = traces
        .export(trace_request(bad))
        .await
        .expect("partial export")
        .into_inner();
    let partial = resp.partial_success.expect("partial_success");
    assert_eq!(partial.rejected_spans, 2);
    assert!(
        partial.error_message.contains("invalid"),
        "{}",
        partial.error_message
    );

    LogsServiceClient::connect(t.grpc_url())
        .await
        .expect("connect")
        .export(log_request(&["kms.runtime", "kms.stall"]))
        .await
        .expect("logs export");
    MetricsServiceClient::connect(t.grpc_url())
        .await
        .expect("connect")
        .export(gauge_request())
        .await
        .expect("metrics export");

    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 201);
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans WHERE service = 'dstack-kms' AND scope = 'instrumented-kms'"), 201);
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM events WHERE name IN ('kms.runtime', 'kms.stall') AND severity = 'INFO'"), 2);
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM events WHERE json_extract(attributes, '$.\"heartbeat.lag_ms\"') = 3"), 2);
    assert_eq!(
        t.query_i64(
            "SELECT COUNT(*) FROM metric_samples WHERE name = 'process.rss' AND value = 1024.0"
        ),
        1
    );
    let c = t.server.receiver_stats();
    assert_eq!(c.spans_received, 203);
    assert_eq!(c.spans_rejected, 2);
    assert_eq!(c.spans_stored, 201);
    assert_eq!(c.log_records_stored, 2);
    assert_eq!(c.metric_points_stored, 1);
    t.server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_merge_through_the_receiver() {
    let t = TestServer::start().await;
    let mut client = TraceServiceClient::connect(t.grpc_url())
        .await
        .expect("connect");
    let closed = span(7, 7, "kms.request");
    // Closed first, then a late snapshot: the closed one stays.
    for s in [
        snapshot_of(&closed, 1),
        closed.clone(),
        snapshot_of(&closed, 2),
    ] {
        client.export(trace_request(vec![s])).await.expect("export");
    }
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 1);
    assert_eq!(t.query_i64("SELECT incomplete FROM spans"), 0);
    // A span that is only ever open: the newest snapshot.
    let open = span(7, 8, "kms.outbound");
    for seq in [1, 3, 2] {
        client
            .export(trace_request(vec![snapshot_of(&open, seq)]))
            .await
            .expect("export");
    }
    assert_eq!(
        t.query_i64("SELECT snapshot_seq FROM spans WHERE incomplete = 1"),
        3
    );
    t.server.shutdown().await.expect("clean shutdown");
}

fn gauge_request() -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource()),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "process.rss".into(),
                    data: Some(metric::Data::Gauge(Gauge {
                        data_points: vec![NumberDataPoint {
                            time_unix_nano: 1_700_000_000_000_000_000,
                            value: Some(number_data_point::Value::AsInt(1024)),
                            ..Default::default()
                        }],
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Makes `n` spans with the SDK and flushes them through `exporter`.
fn sdk_spans(exporter: opentelemetry_otlp::SpanExporter, n: usize, name: &'static str) {
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("sdk-test").build())
        .build();
    let tracer = provider.tracer("sdk-test");
    for i in 0..n {
        let mut s = tracer.start(name);
        s.set_attribute(opentelemetry::KeyValue::new("i", i as i64));
        s.end();
    }
    provider.force_flush().expect("flush");
    provider.shutdown().expect("shutdown");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn rust_sdk_over_grpc_gzip() {
    let rt = rt();
    let t = rt.block_on(TestServer::start());
    // The tonic exporter must be built inside the runtime that drives it.
    let exporter = {
        let _enter = rt.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(t.grpc_url())
            .with_compression(opentelemetry_otlp::Compression::Gzip)
            .build()
            .expect("exporter")
    };
    sdk_spans(exporter, 1500, "sdk.grpc");
    assert_eq!(
        t.query_i64("SELECT COUNT(*) FROM spans WHERE name = 'sdk.grpc' AND service = 'sdk-test'"),
        1500
    );
    assert_eq!(t.server.receiver_stats().spans_stored, 1500);
    rt.block_on(t.server.shutdown()).expect("clean shutdown");
}

#[test]
fn rust_sdk_over_http_protobuf_and_json() {
    let rt = rt();
    let t = rt.block_on(TestServer::start());
    for (protocol, name, gzip) in [
        (Protocol::HttpBinary, "sdk.http.proto", false),
        (Protocol::HttpJson, "sdk.http.json", false),
        (Protocol::HttpBinary, "sdk.http.proto.gz", true),
    ] {
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .with_endpoint(t.http_url("/v1/traces"));
        if gzip {
            builder = builder.with_compression(opentelemetry_otlp::Compression::Gzip);
        }
        sdk_spans(builder.build().expect("exporter"), 700, name);
        assert_eq!(
            t.query_i64(&format!("SELECT COUNT(*) FROM spans WHERE name = '{name}'")),
            700,
            "{protocol:?} gzip={gzip}"
        );
    }
    // The JSON exporter's hex ids are stored as the same lowercase hex.
    assert_eq!(
        t.query_i64("SELECT COUNT(*) FROM spans WHERE length(trace_id) = 32 AND length(span_id) = 16 AND trace_id = lower(trace_id)"),
        2100
    );
    rt.block_on(t.server.shutdown()).expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_json_examples_over_http() {
    let t = TestServer::start().await;
    let client = reqwest::Client::new();
    let post = |path: &'static str, body: &'static str| {
        client
            .post(t.http_url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let res = post("/v1/traces", include_str!("otlp_json/trace.json"))
        .await
        .expect("post");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let body: serde_json::Value = res.json().await.expect("JSON response");
    assert!(
        body.get("partialSuccess")
            .is_none_or(|p| p.get("rejectedSpans").is_none_or(|r| r == 0 || r == "0")),
        "{body}"
    );
    let res = post("/v1/logs", include_str!("otlp_json/logs.json"))
        .await
        .expect("post");
    assert_eq!(res.status(), 200);

    let db = t.db();
    let (trace, span, parent, start, attr): (String, String, String, i64, String) = db
        .query_row(
            "SELECT trace_id, span_id, parent_span_id, start_ns, json_extract(attributes, '$.\"my.span.attr\"') FROM spans",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .expect("span stored");
    assert_eq!(trace, "5b8efff798038103d269b633813fc60c");
    assert_eq!(span, "eee19b7ec3c1b174");
    assert_eq!(parent, "eee19b7ec3c1b173");
    assert_eq!(start, 1_544_712_660_000_000_000);
    assert_eq!(attr, "some value");
    let (severity, body, attrs): (String, String, String) = db
        .query_row("SELECT severity, body, attributes FROM events", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("event stored");
    assert_eq!(severity, "Information");
    assert_eq!(body, "Example log record");
    let attrs: serde_json::Value = serde_json::from_str(&attrs).expect("JSON");
    assert_eq!(attrs["int.attribute"], 10);
    assert_eq!(attrs["double.attribute"], 637.704);
    assert_eq!(
        attrs["array.attribute"],
        serde_json::json!(["many", "values"])
    );
    assert_eq!(attrs["map.attribute"]["some.map.key"], "some value");

    // Protobuf over HTTP answers in protobuf, with partial success.
    let mut bad = spans(3, 1, 2);
    bad[0].span_id = vec![0; 8];
    let res = client
        .post(t.http_url("/v1/traces"))
        .header("content-type", "application/x-protobuf")
        .body(trace_request(bad).encode_to_vec())
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/x-protobuf");
    let resp = ExportTraceServiceResponse::decode(res.bytes().await.expect("body"))
        .expect("protobuf response");
    assert_eq!(resp.partial_success.map(|p| p.rejected_spans), Some(1));
    // Strings for 64-bit integers, as the OTLP/JSON encoding prefers.
    let res = post(
        "/v1/traces",
        r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"0af7651916cd43dd8448eb211c80319c","spanId":"b7ad6b7169203331","name":"s","startTimeUnixNano":"1544712660000000000","endTimeUnixNano":"1544712661000000000","attributes":[{"key":"n","value":{"intValue":"42"}}]}]}]}]}"#,
    )
    .await
    .expect("post");
    assert_eq!(res.status(), 200);
    assert_eq!(
        t.query_i64("SELECT json_extract(attributes, '$.n') FROM spans WHERE trace_id = '0af7651916cd43dd8448eb211c80319c'"),
        42
    );
    wait_until_async("stats", Duration::from_secs(1), || {
        t.server.receiver_stats().spans_stored == 3
    })
    .await;
    t.server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_counters_run_periodically() {
    let t = TestServer::start_with(|c| {
        c.retention(kms_collector::store::Retention {
            max_age: Some(Duration::from_millis(300)),
            max_bytes: None,
        })
        .retention_interval(Duration::from_millis(50))
        .stats_interval(Duration::from_millis(50))
    })
    .await;
    TraceServiceClient::connect(t.grpc_url())
        .await
        .expect("connect")
        .export(trace_request(spans(1, 1, 10)))
        .await
        .expect("export");
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 10);
    let db = t.dir.path().join("kms-diag.sqlite");
    let count = |sql: &str| -> i64 {
        open_ro(&db)
            .query_row(sql, [], |r| r.get(0))
            .expect("query")
    };
    wait_until_async("the counters to be stored", Duration::from_secs(5), || {
        count("SELECT COUNT(*) FROM collector_stats WHERE name = 'receiver.spans_stored' AND value = 10") > 0
    })
    .await;
    wait_until_async(
        "retention to remove the old spans",
        Duration::from_secs(5),
        || count("SELECT COUNT(*) FROM spans") == 0,
    )
    .await;
    t.server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_and_console_run_inside_serve_and_write_through_the_store() {
    use kms_collector::console::SnapshotSink;
    use kms_collector::probe::ProbeConfig;
    // Nothing listens on these: the probe records connect failures, the
    // console recorder keeps retrying; neither stops the server.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_addr = closed.local_addr().expect("addr");
    drop(closed);
    let t = TestServer::start_with(|c| {
        c.probe(Some(
            ProbeConfig::new(format!("http://{closed_addr}/prpc/KMS.GetMeta"))
                .interval(Duration::from_millis(50)),
        ))
        .console(Some(format!("http://{closed_addr}")))
    })
    .await;
    let db = t.dir.path().join("kms-diag.sqlite");
    wait_until_async(
        "probe attempts in the store",
        Duration::from_secs(10),
        || {
            open_ro(&db)
                .query_row(
                    "SELECT COUNT(*) FROM probe_attempts WHERE outcome = 'connect'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .expect("query")
                >= 2
        },
    )
    .await;
    // The sink the console recorder writes through.
    let sink = kms_collector::serve::StoreSink::new(t.server.store());
    let snapshot = kms_collector::store::ConsoleSnapshot {
        snapshot_ns: 5,
        ..Default::default()
    };
    tokio::task::spawn_blocking(move || sink.write_console_snapshot(&snapshot))
        .await
        .expect("join")
        .expect("stored");
    t.server.shutdown().await.expect("clean shutdown");
}
