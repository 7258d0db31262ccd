//! The forwarder: closed spans, logs and metrics reach the destination (here
//! a second collector, which is an OTLP/gRPC receiver like Jaeger's);
//! open-span snapshots do not; a stuck destination never slows ingest.

mod ingest_support;

use std::time::{Duration, Instant};

use ingest_support::*;
use kms_collector::forward::ForwardConfig;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_closed_spans_and_logs_but_not_snapshots() {
    let dest = TestServer::start().await;
    let dest_url = dest.grpc_url();
    let src = TestServer::start_with(|c| c.forward(Some(ForwardConfig::new(dest_url)))).await;
    let mut traces = TraceServiceClient::connect(src.grpc_url())
        .await
        .expect("connect");
    let stuck = span(1, 1, "kms.outbound");
    let done = span(1, 2, "kms.request");
    traces
        .export(trace_request(vec![
            snapshot_of(&stuck, 1),
            snapshot_of(&done, 1),
        ]))
        .await
        .expect("snapshots");
    traces
        .export(trace_request(vec![done.clone(), snapshot_of(&stuck, 2)]))
        .await
        .expect("closed + snapshot");
    traces
        .export(trace_request(spans(2, 1, 100)))
        .await
        .expect("closed spans");
    LogsServiceClient::connect(src.grpc_url())
        .await
        .expect("connect")
        .export(log_request(&["kms.stall"]))
        .await
        .expect("logs");

    // The destination stores before it answers, and the source counts a
    // request forwarded once the answer is back: wait for both.
    wait_until_async(
        "forwarded data at the destination, and its answers at the source",
        Duration::from_secs(10),
        || {
            dest.query_i64("SELECT COUNT(*) FROM spans") == 101
                && dest.query_i64("SELECT COUNT(*) FROM events") == 1
                && src
                    .server
                    .forward_stats()
                    .is_some_and(|f| f.requests_forwarded + f.requests_dropped >= 3)
        },
    )
    .await;
    // The source keeps the snapshot; the destination has only closed spans.
    assert_eq!(
        src.query_i64("SELECT COUNT(*) FROM spans WHERE incomplete = 1"),
        1
    );
    assert_eq!(
        dest.query_i64("SELECT COUNT(*) FROM spans WHERE incomplete = 1"),
        0
    );
    assert_eq!(
        dest.query_i64("SELECT COUNT(*) FROM spans WHERE trace_id = 'abababababababab0000000000000001' AND span_id = '8000000000000002' AND name = 'kms.request'"),
        1
    );
    let f = src.server.forward_stats().expect("forwarding");
    assert_eq!(f.snapshots_skipped, 3);
    assert_eq!(f.spans_forwarded, 101);
    assert_eq!(
        f.requests_forwarded, 3,
        "two span requests and one log request"
    );
    assert_eq!(f.requests_dropped, 0);
    src.server.shutdown().await.expect("clean shutdown");
    dest.server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_destination_never_slows_ingest() {
    // Accepts TCP, never speaks: every forward attempt waits for its timeout.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", blackhole.local_addr().expect("addr"));
    let src = TestServer::start_with(|c| {
        c.forward(Some(
            ForwardConfig::new(url)
                .queue(4)
                .max_attempts(1)
                .timeout(Duration::from_secs(30)),
        ))
    })
    .await;
    let mut client = TraceServiceClient::connect(src.grpc_url())
        .await
        .expect("connect");
    let started = Instant::now();
    for i in 0..100 {
        client
            .export(trace_request(spans(10 + i, 1, 20)))
            .await
            .expect("export");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "100 exports took {took:?}");
    assert_eq!(src.query_i64("SELECT COUNT(*) FROM spans"), 2000);
    let f = src.server.forward_stats().expect("forwarding");
    // One in flight, four queued, the rest dropped and counted.
    assert!(f.requests_dropped >= 95, "{f:?}");
    assert_eq!(f.requests_forwarded, 0);
    src.server.shutdown().await.expect("clean shutdown");
    drop(blackhole);
}
