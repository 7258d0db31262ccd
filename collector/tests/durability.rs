//! Durability of acknowledged exports: the real `kms-collector serve`
//! binary, killed with SIGKILL while clients stream exports, then restarted
//! on the same database: every acknowledged span is there. And a SIGTERM
//! stops it cleanly with everything flushed.

mod ingest_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ingest_support::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

/// The running binary and the addresses it printed.
struct Collector {
    child: Child,
    grpc: String,
    http: String,
}

fn spawn_collector(db: &Path) -> Collector {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kms-collector"))
        .args(["serve", "--db"])
        .arg(db)
        .args(["--otlp-grpc", "127.0.0.1:0", "--otlp-http", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kms-collector");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the listening line");
    // listening otlp-grpc=127.0.0.1:P otlp-http=127.0.0.1:Q db=...
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .to_owned()
    };
    Collector {
        grpc: format!("http://{}", field("otlp-grpc=")),
        http: format!("http://{}", field("otlp-http=")),
        child,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_spans_survive_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("kms-diag.sqlite");
    let mut c = spawn_collector(&db);

    // Four clients stream exports of 50 spans each, recording what was acked.
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let count = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for client_id in 0..4u64 {
        let url = c.grpc.clone();
        let acked = acked.clone();
        let count = count.clone();
        clients.push(tokio::spawn(async move {
            let Ok(mut client) = TraceServiceClient::connect(url).await else {
                return;
            };
            for n in 0.. {
                let trace = client_id * 1_000_000 + n;
                match client.export(trace_request(spans(trace, 1, 50))).await {
                    Ok(_) => {
                        acked.lock().expect("lock").push(trace);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => return, // the collector is gone
                }
            }
        }));
    }
    wait_until_async("200 acknowledged exports", Duration::from_secs(30), || {
        count.load(Ordering::SeqCst) >= 200
    })
    .await;
    c.child.kill().expect("SIGKILL"); // std sends SIGKILL
    c.child.wait().expect("reaped");
    for task in clients {
        task.await.expect("client task");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 200);

    // Restart on the same file: it opens (WAL recovery) and serves.
    let mut c = spawn_collector(&db);
    TraceServiceClient::connect(c.grpc.clone())
        .await
        .expect("connect after restart")
        .export(trace_request(spans(42, 1, 1)))
        .await
        .expect("export after restart");
    let conn = open_ro(&db);
    let mut missing = Vec::new();
    for trace in &acked {
        let id = trace_id(*trace)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let n: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM spans WHERE trace_id = ?1",
                [&id],
                |r| r.get(0),
            )
            .expect("count");
        if n != 50 {
            missing.push((trace, n));
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    c.child.kill().expect("kill");
    c.child.wait().expect("reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("kms-diag.sqlite");
    let mut c = spawn_collector(&db);
    let res = reqwest::Client::new()
        .post(format!("{}/v1/logs", c.http))
        .header("content-type", "application/x-protobuf")
        .body(prost::Message::encode_to_vec(&log_request(&[
            "kms.process",
        ])))
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), 200);
    let status = Command::new("kill")
        .args(["-TERM", &c.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || c.child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(exit.success(), "exit status {exit:?}");
    let conn = open_ro(&db);
    let n: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM events WHERE name = 'kms.process'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(n, 1);
    // The final counters were stored on the way out.
    let stored: i64 = conn
        .query_row(
            "SELECT value FROM collector_stats WHERE name = 'receiver.log_records_stored' ORDER BY time_ns DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .expect("final stats");
    assert_eq!(stored, 1);
}
