//! The Writer contract (store/writer.rs), checked on the SQLite store through
//! the file an operator would open: idempotent writes, the merge rule, dedup,
//! durability across reopen, retention, and the store stage's group commit.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kms_collector::store::{
    Batch, ConsoleSnapshot, ConsoleTaskRow, EventRow, MetricSample, ProbeAttempt, ProbeOutcome,
    Record, Retention, RetentionSummary, SpanRow, SqliteStore, StoreError, StoreStage, Writer,
};
use proptest::prelude::*;
use rusqlite::Connection;
use serde_json::json;

fn span_row(trace: u8, id: u8, incomplete: bool, seq: Option<i64>, end_ns: i64) -> SpanRow {
    SpanRow {
        trace_id: format!("{trace:032x}"),
        span_id: format!("{id:016x}"),
        parent_span_id: None,
        name: "kms.request".into(),
        kind: 2,
        service: Some("dstack-kms".into()),
        scope: Some("instrumented-kms".into()),
        start_ns: 1_000,
        end_ns,
        status_code: if incomplete { 0 } else { 2 },
        status_message: None,
        incomplete,
        snapshot_seq: seq,
        attributes: json!({"rpc.method": "GetMeta", "incomplete": incomplete}),
        events: json!([]),
        resource: json!({"service.name": "dstack-kms"}),
        received_ns: 10,
    }
}

fn event_row(name: &str, time_ns: i64) -> EventRow {
    EventRow {
        time_ns,
        name: name.into(),
        severity: Some("ERROR".into()),
        trace_id: None,
        span_id: None,
        service: Some("dstack-kms".into()),
        body: Some("stall".into()),
        attributes: json!({"stall.kind": "poll", "stall.duration_ms": 1500}),
        received_ns: time_ns,
    }
}

fn metric(name: &str, time_ns: i64, value: f64) -> MetricSample {
    MetricSample {
        time_ns,
        name: name.into(),
        value: Some(value),
        attributes: json!({"k": "v"}),
        service: None,
        received_ns: time_ns,
    }
}

fn probe(time_ns: i64) -> ProbeAttempt {
    ProbeAttempt {
        time_ns,
        target: "https://127.0.0.1:9100/prpc/KMS.GetMeta".into(),
        latency_ms: Some(5000.0),
        outcome: ProbeOutcome::Timeout,
        http_status: None,
        error: Some("no answer".into()),
    }
}

fn console(snapshot_ns: i64) -> ConsoleSnapshot {
    ConsoleSnapshot {
        snapshot_ns,
        tasks: vec![ConsoleTaskRow {
            task_id: 7,
            tokio_task_id: Some(42),
            name: Some("handler".into()),
            kind: Some("task".into()),
            spawn_location: Some("src/main.rs:1:1".into()),
            fields: json!({}),
            state: "idle".into(),
            polls: Some(3),
            busy_ns: Some(1),
            idle_ns: Some(2),
            scheduled_ns: Some(3),
            wakes: Some(1),
            waker_count: Some(0),
            last_poll_started_ns: None,
            last_poll_ended_ns: None,
            warnings: vec!["lost-waker".into()],
        }],
        resources: vec![],
        async_ops: vec![],
    }
}

fn batch(spans: Vec<SpanRow>) -> Record {
    Record::Batch(Batch {
        spans,
        ..Batch::default()
    })
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).expect(sql)
}

/// The stored version of a span: (incomplete, snapshot_seq, end_ns).
fn stored(conn: &Connection, trace: u8, id: u8) -> (bool, Option<i64>, i64) {
    conn.query_row(
        "SELECT incomplete, snapshot_seq, end_ns FROM spans WHERE trace_id = ?1 AND span_id = ?2",
        [format!("{trace:032x}"), format!("{id:016x}")],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .expect("span stored")
}

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir.join("kms-diag.sqlite")).expect("open store")
}

// --- The conformance suite: every check takes a fresh writer. ---

fn stores_everything_and_reopens(mut w: impl Writer, path: &Path) {
    let records = vec![
        batch(vec![span_row(1, 1, false, None, 2_000)]),
        Record::Batch(Batch {
            events: vec![event_row("kms.stall", 5)],
            metrics: vec![metric("m", 5, 1.5)],
            ..Batch::default()
        }),
        Record::Probe(probe(5)),
        Record::Console(console(5)),
        Record::Stats {
            time_ns: 5,
            values: vec![("receiver.spans_stored".into(), 1)],
        },
    ];
    w.write(&records).expect("write");
    drop(w);
    // A fresh connection (another process, in effect) sees all of it.
    let conn = Connection::open(path).expect("reopen");
    for table in [
        "spans",
        "events",
        "metric_samples",
        "probe_attempts",
        "console_tasks",
        "collector_stats",
    ] {
        assert_eq!(
            count(&conn, &format!("SELECT COUNT(*) FROM {table}")),
            1,
            "{table}"
        );
    }
    let attrs: String = conn
        .query_row("SELECT attributes FROM spans", [], |r| r.get(0))
        .expect("attributes");
    let attrs: serde_json::Value = serde_json::from_str(&attrs).expect("JSON");
    assert_eq!(attrs["rpc.method"], "GetMeta");
    let warnings: String = conn
        .query_row("SELECT warnings FROM console_tasks", [], |r| r.get(0))
        .expect("warnings");
    assert_eq!(warnings, r#"["lost-waker"]"#);
}

fn writes_are_idempotent(mut w: impl Writer, path: &Path) {
    let records = vec![
        batch(vec![
            span_row(1, 1, false, None, 2_000),
            span_row(1, 2, true, Some(1), 2_000),
        ]),
        Record::Batch(Batch {
            events: vec![event_row("kms.stall", 5), event_row("kms.stall", 6)],
            metrics: vec![metric("m", 5, 1.5)],
            ..Batch::default()
        }),
        Record::Probe(probe(5)),
        Record::Console(console(5)),
    ];
    w.write(&records).expect("first write");
    w.write(&records).expect("retried write");
    let conn = Connection::open(path).expect("open");
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM spans"), 2);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM events"), 2);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM metric_samples"), 1);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM probe_attempts"), 1);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM console_tasks"), 1);
    // Different content is not deduplicated away.
    w.write(&[Record::Batch(Batch {
        events: vec![event_row("kms.stall", 7)],
        metrics: vec![metric("m", 5, 2.5)],
        ..Batch::default()
    })])
    .expect("write");
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM events"), 3);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM metric_samples"), 2);
}

fn merge_rule_holds(mut w: impl Writer, path: &Path) {
    let conn = Connection::open(path).expect("open");
    // snapshot 1, snapshot 2, older snapshot again: seq 2 stays.
    for seq in [1, 2, 1] {
        w.write(&[batch(vec![span_row(1, 1, true, Some(seq), 1_000 + seq)])])
            .expect("write");
    }
    assert_eq!(stored(&conn, 1, 1), (true, Some(2), 1_002));
    // The closed span replaces it ...
    w.write(&[batch(vec![span_row(1, 1, false, None, 9_000)])])
        .expect("write");
    assert_eq!(stored(&conn, 1, 1), (false, None, 9_000));
    // ... and a late snapshot does not replace the closed span.
    w.write(&[batch(vec![span_row(1, 1, true, Some(3), 10_000)])])
        .expect("write");
    assert_eq!(stored(&conn, 1, 1), (false, None, 9_000));
    // Within one transaction too.
    w.write(&[batch(vec![
        span_row(1, 2, false, None, 9_000),
        span_row(1, 2, true, Some(5), 10_000),
    ])])
    .expect("write");
    assert_eq!(stored(&conn, 1, 2), (false, None, 9_000));
    // Within one multi-row statement (the store inserts spans in chunks).
    let mut rows: Vec<SpanRow> = (100..140u8)
        .map(|i| span_row(1, i, false, None, 2_000))
        .collect();
    rows.splice(
        5..5,
        [
            span_row(1, 3, true, Some(1), 1_001),
            span_row(1, 3, false, None, 9_000),
            span_row(1, 3, true, Some(5), 1_005),
            span_row(1, 4, true, Some(2), 1_002),
            span_row(1, 4, true, Some(1), 1_001),
        ],
    );
    w.write(&[batch(rows)]).expect("write");
    assert_eq!(stored(&conn, 1, 3), (false, None, 9_000));
    assert_eq!(stored(&conn, 1, 4), (true, Some(2), 1_002));
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM spans"), 2 + 2 + 40);
}

fn retention_by_age_and_size(mut w: impl Writer, path: &Path) {
    let spans: Vec<SpanRow> = (0..200u8)
        .map(|i| {
            let mut s = span_row(2, i, false, None, 2_000);
            s.received_ns = i64::from(i) * 1_000;
            s.attributes = json!({"padding": "x".repeat(2000)});
            s
        })
        .collect();
    w.write(&[batch(spans)]).expect("write");
    let mut events = vec![];
    for i in 0..50 {
        events.push(event_row("kms.runtime", i * 1_000));
    }
    w.write(&[Record::Batch(Batch {
        events,
        ..Batch::default()
    })])
    .expect("write");
    let conn = Connection::open(path).expect("open");

    // By age: now = 250 µs, max age 100 µs -> everything received before 150 µs goes.
    let s = w
        .apply_retention(
            &Retention {
                max_age: Some(std::time::Duration::from_micros(100)),
                max_bytes: None,
            },
            250_000,
        )
        .expect("retention");
    assert_eq!(s.cutoff_ns, 150_000);
    assert_eq!(count(&conn, "SELECT MIN(received_ns) FROM spans"), 150_000);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM spans"), 50);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM events"), 0);

    // By size: the oldest go first until the data fit. An empty store
    // already holds about 110 KB of schema pages.
    const LIMIT: u64 = 180_000;
    let before = count(
        &conn,
        "SELECT (SELECT page_count FROM pragma_page_count()) * 4096",
    );
    assert!(
        before > LIMIT as i64,
        "{before} bytes before: test data too small"
    );
    let RetentionSummary { bytes_after, .. } = w
        .apply_retention(
            &Retention {
                max_age: None,
                max_bytes: Some(LIMIT),
            },
            250_000,
        )
        .expect("retention");
    assert!(bytes_after <= LIMIT, "{bytes_after} bytes left");
    let left = count(&conn, "SELECT COUNT(*) FROM spans");
    assert!(left > 0 && left < 50, "{left} spans left");
    assert_eq!(
        count(&conn, "SELECT MAX(received_ns) FROM spans"),
        199_000,
        "the newest span stays"
    );
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let dir = tempfile::tempdir().expect("temp dir");
            let w = open(dir.path());
            super::$name(w, &dir.path().join("kms-diag.sqlite"));
        }
    )*};
}

mod sqlite {
    use super::open;
    conformance!(
        stores_everything_and_reopens,
        writes_are_idempotent,
        merge_rule_holds,
        retention_by_age_and_size,
    );
}

#[test]
fn sqlite_store_uses_wal_and_full_sync() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let mode: String = store
        .connection()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("pragma");
    assert_eq!(mode, "wal");
    let sync: i64 = store
        .connection()
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .expect("pragma");
    assert_eq!(sync, 2, "FULL");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kms-diag.sqlite");
    Connection::open(&path)
        .and_then(|c| c.execute_batch("PRAGMA user_version = 99"))
        .expect("prepare");
    assert!(matches!(
        SqliteStore::open(&path),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

// --- The store stage ---

/// A writer that fails any write containing a span named "poison".
struct Poisonable {
    inner: SqliteStore,
    writes: Arc<AtomicUsize>,
}

impl Writer for Poisonable {
    fn write(&mut self, records: &[Record]) -> Result<(), StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let poisoned = records.iter().any(|r| match r {
            Record::Batch(b) => b.spans.iter().any(|s| s.name == "poison"),
            _ => false,
        });
        if poisoned {
            return Err(StoreError::Closed);
        }
        self.inner.write(records)
    }

    fn apply_retention(
        &mut self,
        retention: &Retention,
        now_ns: i64,
    ) -> Result<RetentionSummary, StoreError> {
        self.inner.apply_retention(retention, now_ns)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_groups_writes_and_isolates_a_failing_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let writes = Arc::new(AtomicUsize::new(0));
    let writer = Poisonable {
        inner: open(dir.path()),
        writes: writes.clone(),
    };
    let (stage, handle) = StoreStage::spawn(writer, 1024, 1024).expect("stage");
    // Queue many writes before awaiting any, one of them poisoned.
    let mut pending = Vec::new();
    for i in 0..200u8 {
        let mut s = span_row(3, i, false, None, 2_000);
        if i == 77 {
            s.name = "poison".into();
        }
        pending.push(handle.try_write(vec![batch(vec![s])]).expect("queued"));
    }
    let mut failed = vec![];
    for (i, p) in pending.into_iter().enumerate() {
        if p.committed().await.is_err() {
            failed.push(i);
        }
    }
    assert_eq!(failed, vec![77], "only the poisoned request fails");
    let conn = Connection::open(dir.path().join("kms-diag.sqlite")).expect("open");
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM spans"), 199);
    handle.shutdown().await;
    assert!(stage.join(std::time::Duration::from_secs(5)).await);
    assert!(
        handle.try_write(vec![]).is_err(),
        "no writes after shutdown"
    );
    // 200 requests took far fewer transactions than 200 (+ the fallback ones).
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_commits_many_requests_per_transaction() {
    let dir = tempfile::tempdir().expect("temp dir");
    let writes = Arc::new(AtomicUsize::new(0));
    let writer = Poisonable {
        inner: open(dir.path()),
        writes: writes.clone(),
    };
    let (stage, handle) = StoreStage::spawn(writer, 1024, 1024).expect("stage");
    let pending: Vec<_> = (0..200u8)
        .map(|i| {
            handle
                .try_write(vec![batch(vec![span_row(5, i, false, None, 2_000)])])
                .expect("queued")
        })
        .collect();
    for p in pending {
        p.committed().await.expect("committed");
    }
    // Queued faster than one fsync: far fewer transactions than requests.
    let n = writes.load(Ordering::SeqCst);
    assert!(n < 100, "{n} transactions for 200 requests");
    handle.shutdown().await;
    assert!(stage.join(std::time::Duration::from_secs(5)).await);
}

// --- Properties ---

#[derive(Debug, Clone)]
enum Version {
    Snapshot(i64),
    Closed,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever the order and the transaction boundaries, the closed span
    /// wins; without one, the highest snapshot does.
    #[test]
    fn merge_rule_is_order_independent(
        versions in prop::collection::vec(
            prop_oneof![(1i64..20).prop_map(Version::Snapshot), Just(Version::Closed)],
            1..12,
        ),
        split in prop::collection::vec(any::<bool>(), 12),
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut w = open(dir.path());
        let mut group = vec![];
        for (i, v) in versions.iter().enumerate() {
            group.push(match v {
                Version::Snapshot(seq) => span_row(9, 9, true, Some(*seq), 1_000 + seq),
                Version::Closed => span_row(9, 9, false, None, 99_000),
            });
            if split[i] {
                w.write(&[batch(std::mem::take(&mut group))]).expect("write");
            }
        }
        w.write(&[batch(group)]).expect("write");
        let conn = Connection::open(dir.path().join("kms-diag.sqlite")).expect("open");
        let expected = if versions.iter().any(|v| matches!(v, Version::Closed)) {
            (false, None, 99_000)
        } else {
            let max = versions.iter().filter_map(|v| match v {
                Version::Snapshot(s) => Some(*s),
                Version::Closed => None,
            }).max().expect("one snapshot");
            (true, Some(max), 1_000 + max)
        };
        prop_assert_eq!(stored(&conn, 9, 9), expected);
        prop_assert_eq!(count(&conn, "SELECT COUNT(*) FROM spans"), 1);
    }

    /// Retention removes exactly the oldest rows: after a pass with cutoff t
    /// nothing older than t remains in any table and nothing newer was removed.
    #[test]
    fn retention_removes_oldest_first(
        span_times in prop::collection::vec(0i64..1_000, 1..60),
        event_times in prop::collection::vec(0i64..1_000, 0..60),
        max_age in prop::option::of(0u64..1_000),
        max_bytes in prop::option::of(8_192u64..200_000),
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut w = open(dir.path());
        let spans: Vec<SpanRow> = span_times.iter().enumerate().map(|(i, t)| {
            let mut s = span_row(4, 0, false, None, 2_000);
            s.span_id = format!("{:016x}", i + 1);
            s.received_ns = *t;
            s.attributes = json!({"padding": "y".repeat(500)});
            s
        }).collect();
        let events: Vec<EventRow> = event_times.iter().enumerate().map(|(i, t)| {
            let mut e = event_row("kms.process", *t);
            e.body = Some(format!("{i}"));
            e
        }).collect();
        w.write(&[Record::Batch(Batch { spans, events, ..Batch::default() })]).expect("write");
        let retention = Retention {
            max_age: max_age.map(std::time::Duration::from_nanos),
            max_bytes,
        };
        let s = w.apply_retention(&retention, 1_000).expect("retention");
        let conn = Connection::open(dir.path().join("kms-diag.sqlite")).expect("open");
        let kept = |table: &str| -> Vec<i64> {
            let mut stmt = conn.prepare(&format!("SELECT received_ns FROM {table}")).expect("prepare");
            stmt.query_map([], |r| r.get(0)).expect("query").map(|r| r.expect("row")).collect()
        };
        let (kept_spans, kept_events) = (kept("spans"), kept("events"));
        let all: Vec<i64> = span_times.iter().chain(event_times.iter()).copied().collect();
        let expected_left = all.iter().filter(|t| **t >= s.cutoff_ns).count();
        prop_assert_eq!(kept_spans.len() + kept_events.len(), expected_left);
        prop_assert!(kept_spans.iter().chain(kept_events.iter()).all(|t| *t >= s.cutoff_ns));
        if let Some(age) = max_age {
            prop_assert!(s.cutoff_ns >= 1_000 - age as i64 || s.rows_deleted == 0);
        }
        if let Some(limit) = max_bytes {
            prop_assert!(s.bytes_after <= limit || kept_spans.len() + kept_events.len() == 0);
        }
    }
}

// --- Writer then Reader: what is written is what the diagnosis reads. ---

#[test]
fn sqlite_writer_and_reader_round_trip() {
    use kms_collector::store::{Reader, SqliteReader, TimeWindow};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut w = open(dir.path());
    let mut closed = span_row(6, 1, false, None, 2_000);
    closed.parent_span_id = Some(format!("{:016x}", 9));
    closed.status_message = Some("deadline exceeded".into());
    closed.events = json!([{"time_ns": 1_500, "name": "retry", "attributes": {"n": 1}}]);
    let snapshot = span_row(6, 2, true, Some(4), 3_000);
    let event = event_row("kms.stall", 1_200);
    let attempt = probe(1_300);
    let snap = console(1_400);
    w.write(&[
        batch(vec![closed.clone(), snapshot.clone()]),
        Record::Batch(Batch {
            events: vec![event.clone()],
            ..Batch::default()
        }),
        Record::Probe(attempt.clone()),
        Record::Console(snap.clone()),
    ])
    .expect("write");
    drop(w);

    let r = SqliteReader::open(dir.path().join("kms-diag.sqlite")).expect("reader");
    let trace = r.trace(&closed.trace_id).expect("trace");
    assert_eq!(trace, vec![closed, snapshot.clone()]);
    assert_eq!(
        r.incomplete_spans(TimeWindow::ALL).expect("incomplete"),
        vec![snapshot]
    );
    assert_eq!(
        r.events("kms.stall", TimeWindow::ALL).expect("events"),
        vec![event]
    );
    assert_eq!(
        r.probe_attempts(TimeWindow::ALL).expect("probes"),
        vec![attempt]
    );
    assert_eq!(
        r.console_snapshot_times(TimeWindow::ALL).expect("times"),
        vec![1_400]
    );
    assert_eq!(r.console_snapshot(1_400).expect("snapshot"), snap);
}
