//! Durable ingest benchmark: prints figures, asserts nothing.
//!
//! ```sh
//! cargo run --release -p kms-collector --example ingest_bench [-- REQUESTS CLIENTS]
//! ```
//!
//! Sends REQUESTS export requests of 512 spans each (default 400, i.e.
//! 204 800 spans) from CLIENTS concurrent clients (default 8) to an
//! in-process collector, once over OTLP/gRPC and once over OTLP/HTTP
//! (protobuf), each request acknowledged only after its commit
//! (`synchronous = FULL`). The database lives in a temporary directory under
//! the current directory, so on the disk, not on a tmpfs. It compares the
//! rates with the pure protobuf decode rate of the same payloads in the same
//! run (the ceiling: one core decoding, nothing stored) and prints the peak
//! RSS of the process (collector and clients together).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use kms_collector::serve::{Server, ServerConfig};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;

const SPANS_PER_REQUEST: usize = 512;

/// Passes already-encoded protobuf through tonic.
#[derive(Debug, Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, Self::Error> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn s(key: &str, v: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.into()))
}

/// A request span and an outbound span per pair, with the attributes the
/// library records (docs/wire-format.md).
fn payload(run: u64, req: u64) -> ExportTraceServiceRequest {
    let t0 = 1_750_000_000_000_000_000u64 + req * 1_000_000;
    let spans = (0..SPANS_PER_REQUEST as u64)
        .map(|i| {
            let mut trace_id = run.to_be_bytes().to_vec();
            trace_id.extend_from_slice(&((req << 20) | (i / 2)).to_be_bytes());
            let outbound = i % 2 == 1;
            Span {
                trace_id,
                span_id: ((1 << 63) | (req << 20) | i).to_be_bytes().to_vec(),
                parent_span_id: if outbound {
                    ((1 << 63) | (req << 20) | (i - 1)).to_be_bytes().to_vec()
                } else {
                    vec![]
                },
                name: if outbound {
                    "kms.outbound"
                } else {
                    "kms.request"
                }
                .into(),
                kind: if outbound { 3 } else { 2 },
                start_time_unix_nano: t0 + i * 1_000,
                end_time_unix_nano: t0 + i * 1_000 + 2_500_000,
                attributes: if outbound {
                    vec![
                        s("kms.peer", "auth_webhook"),
                        s("kms.call", "get_info"),
                        s("server.address", "10.0.2.2"),
                        kv("server.port", any_value::Value::IntValue(8000)),
                        s("url.path", "/"),
                        s("http.request.method", "GET"),
                    ]
                } else {
                    vec![
                        s("rpc.system", "prpc"),
                        s("rpc.service", "KMS"),
                        s("rpc.method", "GetMeta"),
                        s("http.request.method", "POST"),
                        s("url.path", "/prpc/KMS.GetMeta"),
                        s("client.address", "10.0.2.15"),
                        kv("client.port", any_value::Value::IntValue(40000 + i as i64)),
                        s("network.protocol.version", "1.1"),
                        kv("http.response.status_code", any_value::Value::IntValue(200)),
                    ]
                },
                status: Some(Status::default()),
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    s("service.name", "dstack-kms"),
                    s("service.version", "0.5.5"),
                    s("host.name", "kms-cvm"),
                    kv("process.pid", any_value::Value::IntValue(1)),
                    s("kms.diag.build", "debug-instrumentation"),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "instrumented-kms".into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

async fn start(dir: &std::path::Path) -> kms_collector::serve::ServerHandle {
    let any = "127.0.0.1:0".parse().expect("addr");
    Server::start(
        ServerConfig::default()
            .db(dir.join("bench.sqlite"))
            .otlp_grpc(any)
            .otlp_http(any)
            .store_queue(1024),
    )
    .await
    .expect("collector")
}

/// Runs `bodies` through `send` from `clients` tasks; returns the elapsed time.
async fn drive<T, F, Fut>(bodies: Arc<Vec<T>>, clients: usize, send: F) -> Duration
where
    T: Clone + Send + Sync + 'static,
    F: Fn(usize, T) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let bodies = bodies.clone();
            let send = send.clone();
            tokio::spawn(async move {
                for (i, body) in bodies.iter().enumerate().skip(c).step_by(clients) {
                    send(i, body.clone()).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client");
    }
    started.elapsed()
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let requests = args.first().copied().unwrap_or(400);
    let clients = args.get(1).copied().unwrap_or(8);
    let spans = (requests * SPANS_PER_REQUEST) as f64;
    let dir = tempfile::tempdir_in(".").expect("temp dir under the current directory");

    let run = std::process::id() as u64;
    let grpc_bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..requests as u64)
            .map(|r| payload(run, r).encode_to_vec())
            .collect(),
    );
    let http_bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..requests as u64)
            .map(|r| payload(run + 1, r).encode_to_vec())
            .collect(),
    );
    let bytes: usize = grpc_bodies.iter().map(Vec::len).sum();
    println!(
        "payload: {requests} requests x {SPANS_PER_REQUEST} spans = {spans} spans, {:.1} MiB protobuf ({} B/span), {clients} clients",
        bytes as f64 / 1048576.0,
        bytes / (requests * SPANS_PER_REQUEST)
    );

    // The ceiling: decoding the same payloads, one core, nothing else.
    let started = Instant::now();
    let mut n = 0usize;
    for b in grpc_bodies.iter().chain(http_bodies.iter()) {
        let m = ExportTraceServiceRequest::decode(&b[..]).expect("decode");
        n += m.resource_spans[0].scope_spans[0].spans.len();
    }
    let decode_rate = n as f64 / started.elapsed().as_secs_f64();
    println!("protobuf decode only:   {decode_rate:>12.0} spans/s");

    let server = start(dir.path()).await;
    let url = format!("http://{}", server.grpc_addr());
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    // Pre-encoded bodies through a pass-through codec: the clients cost as
    // little as the HTTP ones (no per-request clone and encode), so the
    // figure is the collector's.
    let took = drive(grpc_bodies.clone(), clients, move |_, body: Vec<u8>| {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        async move {
            grpc.ready().await.expect("ready");
            let path = http::uri::PathAndQuery::from_static(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            );
            grpc.unary(tonic::Request::new(Bytes::from(body)), path, RawCodec)
                .await
                .expect("export");
        }
    })
    .await;
    let grpc_rate = spans / took.as_secs_f64();
    println!(
        "durable ingest gRPC:    {grpc_rate:>12.0} spans/s  ({:.2} s, ratio to decode {:.2}, peak RSS {:.0} MiB)",
        took.as_secs_f64(),
        grpc_rate / decode_rate,
        peak_rss_mb()
    );

    let url = format!("http://{}/v1/traces", server.http_addr());
    let http = reqwest::Client::new();
    let took = drive(http_bodies.clone(), clients, move |_, body: Vec<u8>| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let res = http
                .post(&url)
                .header("content-type", "application/x-protobuf")
                .body(body)
                .send()
                .await
                .expect("post");
            assert!(res.status().is_success(), "{}", res.status());
        }
    })
    .await;
    let http_rate = spans / took.as_secs_f64();
    println!(
        "durable ingest HTTP:    {http_rate:>12.0} spans/s  ({:.2} s, ratio to decode {:.2}, peak RSS {:.0} MiB)",
        took.as_secs_f64(),
        http_rate / decode_rate,
        peak_rss_mb()
    );
    let stats = server.receiver_stats();
    assert_eq!(stats.spans_stored as f64, 2.0 * spans, "every span stored");
    server.shutdown().await.expect("shutdown");
    let size = std::fs::metadata(dir.path().join("bench.sqlite")).map_or(0, |m| m.len());
    println!(
        "stored {} spans, database {:.1} MiB ({:.0} B/span)",
        stats.spans_stored,
        size as f64 / 1048576.0,
        size as f64 / (2.0 * spans)
    );
}
