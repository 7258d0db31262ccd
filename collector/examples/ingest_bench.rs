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
//! run (the ceiling: one core decoding, nothing stored), and prints the
//! peak RSS of the process (collector and clients together) and the bytes
//! the database file takes per stored span.
//!
//! Then it sends the gRPC requests, the same bytes from as many clients, to
//! a Jaeger v2 storing into Badger, its embedded durable store
//! (`tests/jaeger/badger.yaml`, every write synced as ours is), and times
//! them until Jaeger's exporter reports every span written; after Jaeger
//! has shut down (flushing its memtables) it prints the bytes the Badger
//! directories take on disk per span beside ours. The `jaeger` binary is
//! `$KMS_JAEGER_BIN`, else `~/.cache/kms-debug/jaeger-v1.76.0/jaeger`
//! (what `.ci/run` builds); without it the comparison says why and is left
//! out. It runs Badger syncing every write (`JAEGER_BADGER_SYNC=true` for
//! this run only), then without (Jaeger's default, `=false` for only that).
//! A Jaeger that has not written every span within `JAEGER_BENCH_BUDGET_S`
//! (default 120) seconds is measured on the spans it wrote by then.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
        let channel = channel.clone();
        async move { grpc_export(channel, body).await.expect("export") }
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
    let our_bytes = size as f64 / (2.0 * spans);
    println!(
        "stored {} spans, database {:.1} MiB ({our_bytes:.0} B/span)",
        stats.spans_stored,
        size as f64 / 1048576.0,
    );

    // Durable as ours (every write synced), then Jaeger's default (no sync).
    let syncs: &[bool] = match std::env::var("JAEGER_BADGER_SYNC").as_deref() {
        Ok("true") => &[true],
        Ok("false") => &[false],
        _ => &[true, false],
    };
    for &sync in syncs {
        let run = jaeger_badger(dir.path(), grpc_bodies.clone(), clients, spans, sync).await;
        let label = if sync { "SyncWrites" } else { "no sync" };
        match run {
            Ok(j) => {
                println!(
                    "Jaeger v2 badger ({label}): {:>9.0} spans/s  ({:.2} s), store {:.1} MiB ({:.0} B/span)",
                    j.rate,
                    j.spans / j.rate,
                    j.bytes as f64 / 1048576.0,
                    j.bytes as f64 / j.spans
                );
                println!(
                    "ours / Jaeger ({label}): spans/s x{:.2} (gRPC), bytes/span x{:.2}",
                    grpc_rate / j.rate,
                    our_bytes / (j.bytes as f64 / j.spans)
                );
            }
            Err(why) => println!("Jaeger v2 badger ({label}): not compared: {why}"),
        }
    }
}

async fn grpc_export(channel: tonic::transport::Channel, body: Vec<u8>) -> Result<(), String> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| e.to_string())?;
    let path = http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    );
    grpc.unary(tonic::Request::new(Bytes::from(body)), path, RawCodec)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// What Jaeger with Badger did with the payload.
struct JaegerRun {
    /// Spans written (all of them unless Jaeger ran out of time).
    spans: f64,
    /// Spans per second, from the first export sent until Jaeger's exporter
    /// had written the last span.
    rate: f64,
    /// Bytes of the Badger directories on disk.
    bytes: u64,
}

fn jaeger_bin() -> Result<PathBuf, String> {
    let bin = match std::env::var_os("KMS_JAEGER_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").ok_or("HOME is not set")?)
            .join(".cache/kms-debug/jaeger-v1.76.0/jaeger"),
    };
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "no jaeger binary at {} (set KMS_JAEGER_BIN, or build it as .ci/run does)",
            bin.display()
        ))
    }
}

fn free_port() -> Result<std::net::SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// Jaeger, stopped with SIGTERM (so Badger flushes and closes) when dropped
/// early; killed if it does not stop.
struct JaegerProcess(Child);

impl JaegerProcess {
    /// SIGTERM, then waits up to 30 s for the exit.
    fn stop(&mut self) -> Result<(), String> {
        if self.0.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("jaeger exited with {status}"))
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        Err("jaeger did not stop within 30 s of SIGTERM".into())
    }
}

impl Drop for JaegerProcess {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Total of `otelcol_exporter_sent_spans` (and `..._send_failed_spans`) in
/// Jaeger's Prometheus metrics.
async fn exported_spans(http: &reqwest::Client, url: &str) -> Result<(f64, f64), String> {
    let text = http
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Ok((
        sum("otelcol_exporter_sent_spans"),
        sum("otelcol_exporter_send_failed_spans"),
    ))
}

/// Bytes allocated on disk under `dir` (as `du` counts them).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.blocks() * 512),
        })
        .sum()
}

/// Sends `bodies` to a fresh Jaeger with Badger under `dir` from `clients`
/// tasks, and measures as the doc comment at the top says.
async fn jaeger_badger(
    dir: &Path,
    bodies: Arc<Vec<Vec<u8>>>,
    clients: usize,
    spans: f64,
    synced: bool,
) -> Result<JaegerRun, String> {
    let bin = jaeger_bin()?;
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jaeger/badger.yaml");
    let badger = dir.join(if synced {
        "badger-sync"
    } else {
        "badger-nosync"
    });
    let (otlp, health, metrics) = (free_port()?, free_port()?, free_port()?);
    let log = dir.join("jaeger.log");
    let log_file =
        std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .env("JAEGER_OTLP_GRPC", otlp.to_string())
        .env("JAEGER_HEALTH", health.to_string())
        .env("JAEGER_QUERY_HTTP", free_port()?.to_string())
        .env("JAEGER_QUERY_GRPC", free_port()?.to_string())
        .env("JAEGER_METRICS_PORT", metrics.port().to_string())
        .env("JAEGER_BADGER_DIR", &badger)
        .env("JAEGER_BADGER_SYNC", synced.to_string())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let mut jaeger = JaegerProcess(child);
    let http = reqwest::Client::new();
    let metrics_url = format!("http://{metrics}/metrics");
    let health_url = format!("http://{health}/status");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = http
            .get(&health_url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            break;
        }
        if Instant::now() > deadline || jaeger.0.try_wait().ok().flatten().is_some() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(3).collect();
            return Err(format!("jaeger did not become healthy: {tail:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{otlp}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connecting to jaeger's OTLP port {otlp}: {e}"))?;
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failed = failures.clone();
    let started = Instant::now();
    let sending = tokio::spawn(drive(bodies, clients, move |_, body: Vec<u8>| {
        let channel = channel.clone();
        let failed = failed.clone();
        async move {
            if grpc_export(channel, body).await.is_err() {
                failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }));
    // The exports return once Jaeger's batch processor has the spans; they
    // are stored when its exporter has written them to Badger. A Jaeger
    // slower than the budget is measured on what it wrote within it.
    let budget = Duration::from_secs(
        std::env::var("JAEGER_BENCH_BUDGET_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(120),
    );
    let (written, took) = loop {
        let (sent, failed) = exported_spans(&http, &metrics_url).await?;
        if failed > 0.0 {
            return Err(format!("jaeger failed to write {failed} spans"));
        }
        if sent >= spans || started.elapsed() > budget {
            break (sent, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    sending.abort();
    let failures = failures.load(std::sync::atomic::Ordering::Relaxed);
    if failures > 0 && written >= spans {
        return Err(format!("{failures} exports to jaeger failed"));
    }
    if written < spans {
        println!(
            "  (jaeger wrote {written} of {spans} spans within the {} s budget, JAEGER_BENCH_BUDGET_S; \
             measured on those)",
            budget.as_secs()
        );
    }
    if written == 0.0 {
        return Err("jaeger wrote no span".into());
    }
    // Bytes on disk (allocated blocks: Badger preallocates its logs
    // sparsely). All spans written: after Jaeger stopped and flushed its
    // memtables. Out of time: now, for the spans written so far (Jaeger
    // would go on writing what it has queued while it shuts down).
    let bytes = if written < spans {
        let bytes = dir_bytes(&badger);
        if let Err(e) = jaeger.stop() {
            println!("  (jaeger, still writing its queue: {e})");
        }
        bytes
    } else {
        jaeger.stop()?;
        dir_bytes(&badger)
    };
    Ok(JaegerRun {
        spans: written,
        rate: written / took.as_secs_f64(),
        bytes,
    })
}
