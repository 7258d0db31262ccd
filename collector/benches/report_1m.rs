//! Benchmark (prints figures; not a timed test): `report` over a store of
//! 1 M spans. Target: <= 2 s.
//!
//! The store is a day of traffic (request + outbound span pairs), a day of
//! `kms.runtime`, `kms.process` and `kms.task_metrics` samples and probe
//! attempts, and a webhook hang in the last ten minutes (open-span
//! snapshots). It is written with direct SQLite inserts in one transaction.
//!
//! Run: `cargo bench -p kms-collector --bench report_1m` (`KMS_BENCH_SPANS`
//! changes the span count).

use std::time::Instant;

use kms_collector::report::{build_report, render_html, render_json, ReportOptions};
use kms_collector::store::{SqliteReader, SCHEMA_SQL};
use rusqlite::{params, Connection};

const DAY_NS: i64 = 86_400_000_000_000;
const T0: i64 = 1_767_225_600_000_000_000;
const HANG_NS: i64 = 600_000_000_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spans: i64 = std::env::var("KMS_BENCH_SPANS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.sqlite");
    let mut conn = Connection::open(&path)?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;")?;
    conn.execute_batch(SCHEMA_SQL)?;

    let started = Instant::now();
    let tx = conn.transaction()?;
    let end = T0 + DAY_NS;
    let hang_from = end - HANG_NS;
    {
        let mut span = tx.prepare(
            "INSERT INTO spans (trace_id, span_id, parent_span_id, name, kind, service, scope, \
             start_ns, end_ns, incomplete, snapshot_seq, attributes, resource, received_ns) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'dstack-kms', ?6, ?7, ?8, ?9, ?10, ?11, '{\"service.name\":\"dstack-kms\"}', ?8)",
        )?;
        let pairs = spans / 2;
        let step = DAY_NS / pairs.max(1);
        for i in 0..pairs {
            let start = T0 + i * step;
            let stuck = start >= hang_from && i % 4 == 0;
            let (req_end, out_end) = if stuck {
                (end, end)
            } else {
                (start + 20_000_000, start + 18_000_000)
            };
            let method = ["GetMeta", "GetAppKey", "GetTempCaCert", "SignCert"][(i % 4) as usize];
            let trace = format!("{:032x}", i + 1);
            let req_id = format!("{:016x}", 2 * i + 1);
            let scope = if stuck {
                "instrumented-kms.open-spans"
            } else {
                "instrumented-kms"
            };
            let req_attrs = format!(
                "{{\"rpc.system\":\"prpc\",\"rpc.service\":\"KMS\",\"rpc.method\":\"{method}\",\"url.path\":\"/prpc/KMS.{method}\",\"http.request.method\":\"POST\"{}}}",
                if stuck { ",\"incomplete\":true" } else { ",\"http.response.status_code\":200" }
            );
            span.execute(params![
                trace,
                req_id,
                None::<String>,
                "kms.request",
                2,
                scope,
                start,
                req_end,
                stuck as i64,
                stuck.then_some(3),
                req_attrs
            ])?;
            let out_attrs = format!(
                "{{\"kms.peer\":\"auth_webhook\",\"kms.call\":\"get_info\",\"server.address\":\"10.0.2.2\",\"server.port\":8000,\"url.path\":\"/\",\"http.request.method\":\"GET\"{}}}",
                if stuck { ",\"incomplete\":true" } else { "" }
            );
            span.execute(params![
                trace,
                format!("{:016x}", 2 * i + 2),
                req_id,
                "kms.outbound",
                3,
                scope,
                start + 1_000_000,
                out_end,
                stuck as i64,
                stuck.then_some(3),
                out_attrs
            ])?;
        }
        let mut event = tx.prepare(
            "INSERT INTO events (time_ns, name, severity, service, body, attributes, received_ns) \
             VALUES (?1, ?2, 'INFO', 'dstack-kms', ?3, ?4, ?1)",
        )?;
        let mut probe = tx.prepare(
            "INSERT INTO probe_attempts (time_ns, target, latency_ms, outcome, http_status, error) \
             VALUES (?1, 'https://10.0.2.15:9100/prpc/KMS.GetMeta', ?2, ?3, ?4, ?5)",
        )?;
        let mut t = T0;
        let mut k = 0i64;
        while t <= end {
            if k % 5 == 0 {
                event.execute(params![
                    t,
                    "kms.runtime",
                    "runtime sample",
                    "{\"heartbeat.lag_ms\":3,\"heartbeat.ok\":true,\"runtime.workers\":2}"
                ])?;
                let fds = 12 + (t - T0).max(hang_from - T0) / 1_000_000_000
                    - (hang_from - T0) / 1_000_000_000;
                event.execute(params![t, "kms.process", "process sample", format!("{{\"process.rss_bytes\":{},\"process.memory_limit_bytes\":2147483648,\"process.open_fds\":{fds},\"process.fd_limit\":1024,\"tcp.inbound\":\"{{\\\"ESTABLISHED\\\":2,\\\"CLOSE_WAIT\\\":{}}}\"}}", 33_554_432 + fds * 100_000, fds - 12)])?;
                for m in ["GetMeta", "GetAppKey", "GetTempCaCert", "SignCert"] {
                    event.execute(params![
                        t,
                        "kms.task_metrics",
                        "task sample",
                        format!("{{\"rpc.method\":\"{m}\",\"task.in_flight\":0}}")
                    ])?;
                }
            }
            if t >= hang_from {
                probe.execute(params![
                    t,
                    5000.0,
                    "timeout",
                    None::<i64>,
                    "no HTTP answer within 5s"
                ])?;
            } else {
                probe.execute(params![t, 12.0, "ok", 200, None::<String>])?;
            }
            t += 1_000_000_000;
            k += 1;
        }
    }
    tx.commit()?;
    drop(conn);
    let size = std::fs::metadata(&path)?.len()
        + std::fs::metadata(path.with_extension("sqlite-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    println!(
        "generated {spans} spans + a day of samples and probes in {:.1} s ({:.0} MiB)",
        started.elapsed().as_secs_f64(),
        size as f64 / 1048576.0
    );

    for (label, since) in [
        ("whole record (1 day)", None),
        ("--since 15m", Some(std::time::Duration::from_secs(900))),
    ] {
        let opts = ReportOptions {
            since,
            ..ReportOptions::default()
        };
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..3 {
            let t = Instant::now();
            let reader = SqliteReader::open(&path)?;
            let report = build_report(&reader, &opts)?;
            let json = render_json(&report);
            let html = render_html(&report);
            times.push(t.elapsed().as_secs_f64());
            last = Some((report, json.len(), html.len()));
        }
        let (report, json_len, html_len) = last.expect("ran");
        times.sort_by(f64::total_cmp);
        println!(
            "report over {spans} spans, {label}: best {:.3} s, median {:.3} s (open + diagnose + JSON {} KiB + HTML {} KiB); target <= 2 s; verdicts A={} B={} C={} D={} E={}, {} stuck",
            times[0],
            times[1],
            json_len / 1024,
            html_len / 1024,
            report.hypotheses["A"].verdict.as_str(),
            report.hypotheses["B"].verdict.as_str(),
            report.hypotheses["C"].verdict.as_str(),
            report.hypotheses["D"].verdict.as_str(),
            report.hypotheses["E"].verdict.as_str(),
            report.stuck_spans.len(),
        );
    }
    Ok(())
}
