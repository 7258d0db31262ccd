//! Figures (not a timed test): searches through a real Jaeger v2 reading a
//! store of 1 M spans over `serve --jaeger-storage`. Aim: service +
//! operation + min duration answered in <= 1 s.
//!
//! The store is the last 24 h of traffic (request + outbound span pairs,
//! 20 ms each) with a webhook hang in the last ten minutes: every fourth
//! request since then is still open (an open-span snapshot up to now).
//!
//! Run: `KMS_JAEGER_BIN=/path/to/jaeger cargo run --release -p kms-collector
//! --example jaeger_search_1m` (`KMS_BENCH_SPANS` changes the span count).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kms_collector::serve::{Server, ServerConfig};
use kms_collector::store::{
    Batch, Reader, Record, SpanRow, SqliteReader, SqliteStore, TraceQuery, Writer,
};
use serde_json::json;

const DAY_NS: i64 = 86_400_000_000_000;
const HANG_NS: i64 = 600_000_000_000;
/// Spans per write transaction while filling the store.
const BATCH_SPANS: usize = 50_000;

fn free_port() -> std::io::Result<std::net::SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Writes the day of traffic through the store's [`Writer`], so the figures
/// hold for whatever schema the store has.
fn fill(path: &std::path::Path, spans: i64, now: i64) -> Result<(), Box<dyn std::error::Error>> {
    let mut store = SqliteStore::open(path)?;
    let resource = json!({"service.name": "dstack-kms"});
    let t0 = now - DAY_NS;
    let hang_from = now - HANG_NS;
    let pairs = spans / 2;
    let step = DAY_NS / pairs.max(1);
    let mut batch = Vec::with_capacity(BATCH_SPANS);
    for i in 0..pairs {
        let start = t0 + i * step;
        let stuck = start >= hang_from && i % 4 == 0;
        let end = if stuck { now } else { start + 20_000_000 };
        let method = ["GetMeta", "GetAppKey", "GetTempCaCert", "SignCert"][(i % 4) as usize];
        let trace_id = format!("{:032x}", i + 1);
        let request_id = format!("{:016x}", 2 * i + 1);
        let mut request_attrs =
            json!({"rpc.method": method, "url.path": format!("/prpc/KMS.{method}")});
        let mut call_attrs = json!({"kms.peer": "auth_webhook", "kms.call": "get_info"});
        if stuck {
            for attrs in [&mut request_attrs, &mut call_attrs] {
                attrs["incomplete"] = json!(true);
                attrs["kms.open.age_ms"] = json!((now - start) / 1_000_000);
            }
        }
        let span =
            |span_id: String, parent: Option<String>, name: &str, kind, start_ns, attributes| {
                SpanRow {
                    trace_id: trace_id.clone(),
                    span_id,
                    parent_span_id: parent,
                    name: name.to_owned(),
                    kind,
                    service: Some("dstack-kms".to_owned()),
                    scope: Some("instrumented-kms".to_owned()),
                    start_ns,
                    end_ns: end,
                    status_code: if stuck { 0 } else { 1 },
                    status_message: None,
                    incomplete: stuck,
                    snapshot_seq: stuck.then_some((now - start) / 5_000_000_000),
                    attributes,
                    events: json!([]),
                    resource: resource.clone(),
                    received_ns: end,
                }
            };
        batch.push(span(
            request_id.clone(),
            None,
            "kms.request",
            2,
            start,
            request_attrs,
        ));
        batch.push(span(
            format!("{:016x}", 2 * i + 2),
            Some(request_id),
            "kms.outbound",
            3,
            start + 1_000_000,
            call_attrs,
        ));
        if batch.len() >= BATCH_SPANS || i + 1 == pairs {
            store.write(&[Record::Batch(Batch {
                spans: std::mem::take(&mut batch),
                ..Batch::default()
            })])?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spans: i64 = std::env::var("KMS_BENCH_SPANS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let bin = std::env::var("KMS_JAEGER_BIN").map_err(|_| "set KMS_JAEGER_BIN")?;
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos())?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("kms-diag.sqlite");
    let started = Instant::now();
    fill(&db, spans, now)?;
    println!("store: {spans} spans written in {:?}", started.elapsed());

    let server = Server::start(
        ServerConfig::default()
            .db(&db)
            .otlp_grpc("127.0.0.1:0".parse()?)
            .otlp_http("127.0.0.1:0".parse()?)
            .jaeger_storage(Some("127.0.0.1:0".parse()?)),
    )
    .await?;
    let storage = server
        .jaeger_storage_addr()
        .ok_or("no jaeger-storage address")?;
    let query = free_port()?;
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/jaeger/remote-storage.yaml"
    );
    let mut jaeger = Command::new(bin)
        .args(["--config", config])
        .env("KMS_JAEGER_STORAGE", storage.to_string())
        .env("JAEGER_QUERY_HTTP", query.to_string())
        .env("JAEGER_QUERY_GRPC", free_port()?.to_string())
        .env("JAEGER_OTLP_GRPC", free_port()?.to_string())
        .env("JAEGER_HEALTH", free_port()?.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("http://{query}/api/services"))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        if Instant::now() > deadline {
            let _ = jaeger.kill();
            return Err("jaeger did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let searches = [
        ("service + operation + minDuration=5s (stuck)", "/api/traces?service=dstack-kms&operation=kms.request&minDuration=5s&lookback=2d&limit=20"),
        ("service + operation + minDuration=10ms (all)", "/api/traces?service=dstack-kms&operation=kms.request&minDuration=10ms&lookback=2d&limit=20"),
        ("service + operation", "/api/traces?service=dstack-kms&operation=kms.request&lookback=2d&limit=20"),
        ("service only", "/api/traces?service=dstack-kms&lookback=2d&limit=20"),
        ("runbook: + tags incomplete=true + minDuration=10s", "/api/traces?service=dstack-kms&operation=kms.request&tags=%7B%22incomplete%22%3A%22true%22%7D&minDuration=10s&lookback=2d&limit=20"),
        ("tags rpc.method=GetMeta (checked on rows)", "/api/traces?service=dstack-kms&operation=kms.request&tags=%7B%22rpc.method%22%3A%22GetMeta%22%7D&lookback=2d&limit=20"),
        ("tags rpc.method=Nope (no match: walks every row)", "/api/traces?service=dstack-kms&operation=kms.request&tags=%7B%22rpc.method%22%3A%22Nope%22%7D&lookback=2d&limit=20"),
        ("services", "/api/services"),
        ("operations", "/api/services/dstack-kms/operations"),
    ];
    for (what, path) in searches {
        let mut times = Vec::new();
        let mut found = 0;
        for _ in 0..3 {
            let t = Instant::now();
            let body: serde_json::Value = http
                .get(format!("http://{query}{path}"))
                .send()
                .await?
                .json()
                .await?;
            times.push(t.elapsed());
            found = body["data"].as_array().map_or(0, Vec::len);
        }
        times.sort();
        println!(
            "{what}: {} results, median {:?} (min {:?}, max {:?})",
            found, times[1], times[0], times[2]
        );
    }
    let reader = SqliteReader::open(&db)?;
    let t = Instant::now();
    let hits = reader.find_traces(&TraceQuery {
        service: Some("dstack-kms".into()),
        operation: Some("kms.request".into()),
        duration_min_ns: Some(5_000_000_000),
        limit: 20,
        ..TraceQuery::default()
    })?;
    println!(
        "Reader::find_traces alone (stuck search): {} traces in {:?}",
        hits.len(),
        t.elapsed()
    );
    let _ = jaeger.kill();
    let _ = jaeger.wait();
    server.shutdown().await?;
    Ok(())
}
